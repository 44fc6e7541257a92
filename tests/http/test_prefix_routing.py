"""Prefix and session routing over real HTTP against stand-ins with a prefix cache."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from tests.harness.common import standin_topology
from tests.harness.proxy import MODEL, Cluster, running, serve_proxy

#: A prefix of 60 words (~420 characters, 6 blocks of the proxy's index).
PREFIX = " ".join(f"shared{i}" for i in range(60))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 prefills + 1 decode, each with a 256-block prefix cache."""
    tmp = tmp_path_factory.mktemp("prefix")
    doc = standin_topology(
        tmp,
        prefill=2,
        decode=1,
        model_args=["--max-model-len", "400", "--enable-prompt-tokens-details"],
    )
    yield from running(Cluster(tmp, doc, env={"STANDIN_PREFIX_CACHE_BLOCKS": "256"}))


async def _complete(
    s: aiohttp.ClientSession, base: str, prompt: str, session: str | None = None
) -> dict[str, object]:
    headers = {"X-Session-Id": session} if session else {}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with s.post(base + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        out: dict[str, object] = await r.json()
        return out


async def _prefills(cluster: Cluster) -> Counter[str]:
    return Counter({n: len(await cluster.records(n)) for n in ("prefill-0", "prefill-1")})


async def test_hot_prefix_at_high_concurrency_spills_past_the_balance_rule(
    cluster: Cluster,
) -> None:
    abs_, rel, n = 2, 1.5, 40
    topo = cluster.topology(
        prefill_policy="cache_aware", cache_balance_abs=abs_, cache_balance_rel=rel
    )
    for name in ("prefill-0", "prefill-1"):
        await cluster.faults(name, prefill_delay=0.3)
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        await asyncio.gather(*(_complete(s, px.base, f"{PREFIX} q{i}") for i in range(n)))
        assert px.metric("disaggd_routed_total", role="prefill", why="cache") > 0
    counts = await _prefills(cluster)
    hot, cold = max(counts.values()), min(counts.values())
    assert hot + cold == n
    # At every pick the chosen one held at most max(least + abs, rel * least) requests.
    assert hot <= max(cold + abs_, rel * cold) + 1, counts


async def test_decode_holding_the_prompt_decides_decode_only(cluster: Cluster) -> None:
    topo = cluster.topology(decode_policy="cache_aware", decode_only_uncached_below_chars=64)
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        first = await _complete(s, px.base, f"{PREFIX} again")
        second = await _complete(s, px.base, f"{PREFIX} again")
        assert first["choices"] == second["choices"]  # type: ignore[index]
        m = px.metric
        assert (
            m("disaggd_disagg_decision_total", decision_type="prefill-decode", reason="uncached")
            == 1
        )
        assert m("disaggd_disagg_decision_total", decision_type="decode-only", reason="cached") == 1
        assert m("disaggd_requests_total", decision="decode_only") == 1
    assert sum((await _prefills(cluster)).values()) == 1


async def test_session_stays_on_its_prefill_and_hits_its_cache(cluster: Cluster) -> None:
    topo = cluster.topology(session_affinity=True)
    before = {
        n: (await cluster.info(n))["prefix_cache"]["hits"] for n in ("prefill-0", "prefill-1")
    }
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        turns = ""
        for i in range(4):
            turns += f" turn{i} " + " ".join(f"t{i}w{k}" for k in range(20))
            await _complete(s, px.base, PREFIX + turns, session="conv-7")
            await _complete(s, px.base, f"other {i} " + PREFIX, session=f"solo-{i}")
        assert px.metric("disaggd_routed_total", role="prefill", why="session") >= 3
    recs = {n: await cluster.records(n) for n in ("prefill-0", "prefill-1")}
    conv = {n for n, rs in recs.items() for r in rs if "turn0" in r["body"]["prompt"]}
    assert len(conv) == 1  # all four turns on one prefill
    home = conv.pop()
    hits = (await cluster.info(home))["prefix_cache"]["hits"] - before[home]
    assert hits >= 3 * 64  # turns 2..4 found at least the shared prefix's 4 blocks
