"""Admission (in-flight limits, wait queue: 429 busy / 503 nothing routable), the
per-instance breaker against real stand-ins (5xx, SIGSTOP), /livez and /readyz."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.harness.proxy import MODEL, Cluster, serve_proxy, standin_cluster

PROMPT = "the quick brown fox jumps over the lazy dog " * 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "admission", prefill=2, decode=1)


async def _post(s: aiohttp.ClientSession, base: str, prompt: str = PROMPT, **kw: Any) -> Any:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw}
    t = time.monotonic()
    async with s.post(base + "/v1/completions", json=body) as r:
        return r.status, r.headers.copy(), await r.read(), time.monotonic() - t


async def test_overload_sheds_with_429_and_retry_after(cluster: Cluster) -> None:
    """1 slot on the decode, a queue of 2: of 8 concurrent slow requests, 3 are served
    (one at a time), the other 5 get 429 at once; none times out."""
    topo = cluster.topology(decode_max_inflight=1, queue_size=2, queue_timeout=30.0)
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(_post(s, px.base, "[[slow=0.05]] " + PROMPT, max_tokens=6) for _ in range(8))
        )
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] * 3 + [429] * 5, statuses
        for status, headers, body, took in results:
            if status == 429:
                assert headers["Retry-After"] == "5"
                assert json.loads(body)["error"]["type"] == "rate_limit_error"
                assert took < 1.0  # refused at once, not after a wait
        assert px.metric("disaggd_admission_rejected_total", reason="queue_full") == 5
        assert px.metric("disaggd_admission_queue_depth", role="decode") == 0
    assert await cluster.inflight("decode-0") == 0


async def test_queue_deadline_gives_429(cluster: Cluster) -> None:
    topo = cluster.topology(decode_max_inflight=1, queue_size=10, queue_timeout=0.3)
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        slow = asyncio.create_task(_post(s, px.base, "[[slow=0.2]] " + PROMPT, max_tokens=10))
        await asyncio.sleep(0.2)
        status, _, _, took = await _post(s, px.base)
        assert status == 429 and 0.25 < took < 2.0
        assert (await slow)[0] == 200
        assert px.metric("disaggd_admission_rejected_total", reason="queue_timeout") == 1


async def test_no_limits_by_default(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology()) as px, aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(_post(s, px.base, "[[slow=0.02]] " + PROMPT) for _ in range(20))
        )
        assert all(r[0] == 200 for r in results)


async def test_nothing_ready_is_503(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology(), ready={"prefill-0"}) as px:
        async with aiohttp.ClientSession() as s:
            status, headers, _, _ = await _post(s, px.base)
        assert status == 503 and headers["Retry-After"] == "5"
        assert px.metric("disaggd_admission_rejected_total", reason="unavailable") == 1


async def test_failing_prefill_leaves_rotation(cluster: Cluster) -> None:
    """prefill-0 answers 500 to everything while its /health says 200: after
    breaker_failures of them it gets nothing more; no client request fails."""
    await cluster.faults("prefill-0", fail_status=500)
    topo = cluster.topology(breaker_failures=3, breaker_cooldown=60.0, prefill_policy="round_robin")
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        for _ in range(30):
            status, _, _, _ = await _post(s, px.base)
            assert status == 200
        assert px.router.breaker_state("prefill-0") == "open"
        assert px.metric("disaggd_breaker_state", instance="prefill-0", state="open") == 1
        assert px.metric("disaggd_breaker_state", instance="prefill-1", state="closed") == 1
    assert len(await cluster.records("prefill-0")) == 3


async def test_sigstopped_prefill_leaves_rotation_within_seconds(cluster: Cluster) -> None:
    """SIGSTOP of one of two prefills under load: its breaker opens on the stall
    (stall_timeout 1 s here), requests waiting on it fail over, nobody waits long."""
    topo = cluster.topology(stall_timeout=1.0, prefill_timeout=60.0)
    pid = cluster.procs["prefill-0"].pid
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        await _post(s, px.base)
        os.kill(pid, signal.SIGSTOP)  # our own child
        try:
            t0 = time.monotonic()
            results = []
            out_at = None
            while time.monotonic() - t0 < 6:
                results += await asyncio.gather(*(_post(s, px.base) for _ in range(4)))
                if out_at is None and px.router.breaker_state("prefill-0") == "open":
                    out_at = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert out_at is not None and out_at < 3.0, out_at
        assert all(r[0] == 200 for r in results)
        worst = max(r[3] for r in results)
        assert worst < 3.0, worst
        print(f"SIGSTOP: out of rotation after {out_at:.2f} s; slowest request {worst:.2f} s")


async def test_livez_and_readyz(cluster: Cluster) -> None:
    async with (
        serve_proxy(cluster.topology(), ready={"prefill-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(px.base + "/livez") as r:
            assert r.status == 200
        async with s.get(px.base + "/readyz") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
        px.router.set_ready("decode-0", True)
        async with s.get(px.base + "/readyz") as r:
            assert r.status == 200
        px.proxy.stop_accepting()
        async with s.get(px.base + "/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        async with s.get(px.base + "/livez") as r:
            assert r.status == 200
