"""The proxy against stand-in engines over real HTTP: routes, handoffs, routing, auth.

Failure cases are in test_proxy_failures.py; pure request shaping in
test_proxy_shaping.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from disaggd.topology import parse_config
from tests.harness.common import free_port, standin_topology
from tests.harness.proxy import MODEL, Cluster, serve_proxy, sse_events, standin_cluster

PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # 36 words


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 prefills + 2 decodes, NIXL-style kv_transfer_params, 100-token context."""
    yield from standin_cluster(
        tmp_path_factory, "p2d2", prefill=2, decode=2, model_args=["--max-model-len", "100"]
    )


def _body(route: str, stream: bool, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "stream": stream, **extra}
    if route == "/v1/completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    return body


# -- 1P1D: the four shapes of a request ---------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_1p1d_returns_decode_output_and_kv_moves(
    cluster: Cluster, route: str, stream: bool
) -> None:
    topo = cluster.topology()
    body = _body(route, stream, max_tokens=6)
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(px.base + route, json=body, headers={"X-Request-Id": "abc-123"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "abc-123"
            got = await r.read()
            ctype = r.headers["Content-Type"]
        # The same request straight to the decode: what it produces, byte for byte.
        async with s.post(
            cluster.url("decode-0") + route, json=body, headers={"X-Request-Id": "abc-123"}
        ) as r:
            direct = await r.read()
        assert (
            px.metric("disaggd_requests_total", route=route, status="200", decision="disaggregated")
            == 1.0
        )

    def norm(b: bytes) -> bytes:
        # The direct call loads no KV: only its cached-token count differs.
        b = re.sub(rb'"cached_tokens":\d+', b'"cached_tokens":0', b)
        return re.sub(rb'"created":\d+', b'"created":0', b)

    if stream:
        assert ctype.startswith("text/event-stream")
        assert norm(got) == norm(direct)
        events = sse_events(got)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    else:
        assert ctype.startswith("application/json")
        assert json.loads(got)["choices"] == json.loads(direct)["choices"]

    (pre,) = await cluster.records("prefill-0", route)
    dec = [r for r in await cluster.records("decode-0", route) if r["verdict"] != "miss"]
    assert len(dec) == 1
    (dec_rec,) = dec
    # Prefill leg: only prefill, and asks for a remote decode.
    pb = pre["body"]
    assert pb["stream"] is False and pb["max_tokens"] == 1 and pb["n"] == 1
    assert "stream_options" not in pb
    assert pb["kv_transfer_params"]["do_remote_decode"] is True
    assert pre["verdict"] == "prefill"
    # Decode leg: the client's body plus the prefill's params, nothing else.
    db = dict(dec_rec["body"])
    params = db.pop("kv_transfer_params")
    assert params["do_remote_prefill"] is True
    # ... less the prefill's cache count, so the decode reports its own (the KV check).
    assert "remote_prefill_cached_tokens" not in params
    assert db == body
    assert dec_rec["verdict"] == "hit"
    assert px.metric("disaggd_kv_check_total", verdict="moved") == 1.0
    # One id on both legs: the client's.
    assert pre["request_id"] == dec_rec["request_id"] == "abc-123"


async def test_no_max_tokens_added_and_new_request_id(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": PROMPT}
        async with s.post(px.base + "/v1/completions", json=body) as r:
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
            text = (await r.json())["choices"][0]["text"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    decodes = await cluster.records("decode-0") + await cluster.records("decode-1")
    (dec,) = decodes
    assert "max_tokens" not in dec["body"] and "max_completion_tokens" not in dec["body"]
    assert dec["request_id"] == rid and dec["verdict"] == "hit"
    # The stand-in generates min(16, 100 - prompt) tokens when none is asked for.
    assert dec["completion_tokens"] == 16 and text


async def test_max_completion_tokens_and_min_tokens_shaping(cluster: Cluster) -> None:
    topo = cluster.topology()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": 5,
        "min_tokens": 3,
        "n": 1,
    }
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
        s.post(px.base + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
    (pre,) = await cluster.records("prefill-0")
    assert pre["body"]["max_completion_tokens"] == 1 and pre["body"]["max_tokens"] == 1
    assert "min_tokens" not in pre["body"]
    (dec,) = await cluster.records("decode-0")
    assert dec["body"]["max_completion_tokens"] == 5 and dec["body"]["min_tokens"] == 3
    assert "max_tokens" not in dec["body"]


# -- xPyD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_2p2d_spreads_and_every_decode_gets_kv(cluster: Cluster, stream: bool) -> None:
    topo = cluster.topology()
    route = "/v1/completions"
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:

        async def one(i: int) -> str:
            body = {
                "model": MODEL,
                "prompt": f"request {i} " + PROMPT,
                "max_tokens": 4,
                "stream": stream,
            }
            async with s.post(px.base + route, json=body) as r:
                assert r.status == 200
                data = await r.read()
                if stream:
                    assert sse_events(data)[-1] == "[DONE]"
                return r.headers["X-Request-Id"]

        rids = await asyncio.gather(*(one(i) for i in range(16)))
    assert len(set(rids)) == 16
    seen: dict[str, int] = {}
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        recs = await cluster.records(name)
        seen[name] = len(recs)
        want = "prefill" if name.startswith("prefill") else "hit"
        assert all(r["verdict"] == want for r in recs), recs
    assert seen["prefill-0"] + seen["prefill-1"] == 16
    assert seen["decode-0"] + seen["decode-1"] == 16


async def test_least_outstanding_routes_around_busy_instances(cluster: Cluster) -> None:
    """With one prefill and one decode held busy (deterministic outstanding counts),
    every request goes to the idle ones; round robin or random routing would not."""
    topo = cluster.topology()  # least_outstanding for both roles
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        ups = {u.name: u for u in px.router.upstreams()}
        with px.router.hold(ups["prefill-1"]), px.router.hold(ups["decode-0"]):
            for _ in range(6):
                async with s.post(px.base + "/v1/completions", json=body) as r:
                    assert r.status == 200
        assert all(u.outstanding == 0 for u in ups.values())
    assert len(await cluster.records("prefill-0")) == 6
    assert len(await cluster.records("decode-1")) == 6
    assert await cluster.records("prefill-1") == await cluster.records("decode-0") == []


async def test_round_robin_policy_alternates(cluster: Cluster) -> None:
    topo = cluster.topology(prefill_policy="round_robin", decode_policy="round_robin")
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        for _ in range(4):
            small = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
            async with s.post(px.base + "/v1/completions", json=small) as r:
                assert r.status == 200
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert len(await cluster.records(name)) == 2


async def test_only_ready_instances_are_used(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with (
        serve_proxy(topo, ready={"prefill-1", "decode-1"}) as px,
        aiohttp.ClientSession() as s,
    ):
        for _ in range(3):
            small = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
            async with s.post(px.base + "/v1/completions", json=small) as r:
                assert r.status == 200
    assert await cluster.records("prefill-0") == [] and await cluster.records("decode-0") == []
    assert len(await cluster.records("prefill-1")) == 3


# -- conditional disaggregation, prefill-only answers ----------------------------------------


async def test_short_prompt_goes_decode_only(cluster: Cluster) -> None:
    topo = cluster.topology(decode_only_below_chars=100)
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        short = {"model": MODEL, "prompt": "hello there", "max_tokens": 3}
        async with s.post(px.base + "/v1/completions", json=short) as r:
            assert r.status == 200
        token_ids = {"model": MODEL, "prompt": list(range(30)), "max_tokens": 3}  # 120 "chars"
        async with s.post(px.base + "/v1/completions", json=token_ids) as r:
            assert r.status == 200
        assert px.metric("disaggd_requests_total", decision="decode_only") == 1.0
        assert px.metric("disaggd_requests_total", decision="disaggregated") == 1.0
    (pre,) = await cluster.records("prefill-0")
    assert pre["body"]["prompt"] == list(range(30))
    dec = await cluster.records("decode-0")
    assert [r["verdict"] for r in dec] == ["miss", "hit"]
    assert dec[0]["body"] == short  # decode-only: the client's request as is


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_that_stops_answers_itself(
    cluster: Cluster, route: str, stream: bool
) -> None:
    """Its only token was a stop token: no KV to hand over, the prefill result is the answer."""
    topo = cluster.topology()
    body = _body(route, stream, max_tokens=8)
    body["prompt" if route == "/v1/completions" else "messages"] = (
        "say nothing [[stop]]"
        if route == "/v1/completions"
        else [{"role": "user", "content": "say nothing [[stop]]"}]
    )
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(px.base + route, json=body) as r:
            assert r.status == 200
            data = await r.read()
            ctype = r.headers["Content-Type"]
        assert px.metric("disaggd_requests_total", decision="prefill_only") == 1.0
    assert await cluster.records("decode-0") == []
    (pre,) = await cluster.records("prefill-0")
    assert pre["finish_reason"] == "stop"
    if stream:
        assert ctype.startswith("text/event-stream")
        events = sse_events(data)
        assert events[-1] == "[DONE]"
        usage = events[-2]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 1
        finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"] == "stop"]
        assert len(finals) == 1
        kind = "text_completion" if route == "/v1/completions" else "chat.completion.chunk"
        assert all(e["object"] == kind for e in events[:-1])
    else:
        result = json.loads(data)
        assert result["choices"][0]["finish_reason"] == "stop"


async def test_min_tokens_request_is_not_answered_by_a_stopping_prefill(cluster: Cluster) -> None:
    topo = cluster.topology()
    body = {"model": MODEL, "prompt": "say nothing [[stop]]", "max_tokens": 4, "min_tokens": 2}
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(px.base + "/v1/completions", json=body) as r:
            assert r.status == 200
        assert px.metric("disaggd_requests_total", decision="fallback") == 1.0
    (dec,) = await cluster.records("decode-0")
    assert "kv_transfer_params" not in dec["body"]


# -- the other two handoffs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p2p(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "p2p", connector="P2pNcclConnector")


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "storage", connector="ExampleConnector")


@pytest.mark.parametrize("stream", [False, True])
async def test_request_id_handoff(p2p: Cluster, stream: bool) -> None:
    topo = p2p.topology()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": stream}
    hdrs = {"X-Request-Id": "client:7_x"}
    async with (
        serve_proxy(topo) as px,
        aiohttp.ClientSession() as s,
        s.post(px.base + "/v1/completions", json=body, headers=hdrs) as r,
    ):
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
        await r.read()
    pa = (await p2p.info("prefill-0"))["kv_address"]
    da = (await p2p.info("decode-0"))["kv_address"]
    assert rid.startswith(f"___prefill_addr_{pa}___decode_addr_{da}_client7x-")
    (pre,) = await p2p.records("prefill-0")
    (dec,) = await p2p.records("decode-0")
    assert pre["request_id"] == dec["request_id"] == rid
    assert pre["verdict"] == "prefill" and dec["verdict"] == "hit"
    assert "kv_transfer_params" not in pre["body"] and dec["body"] == body


async def test_storage_handoff(storage: Cluster) -> None:
    topo = storage.topology()
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
    async with (
        serve_proxy(topo) as px,
        aiohttp.ClientSession() as s,
        s.post(px.base + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
    (pre,) = await storage.records("prefill-0")
    (dec,) = await storage.records("decode-0")
    assert pre["verdict"] == "prefill" and dec["verdict"] == "hit"
    assert pre["request_id"] == dec["request_id"] == rid
    assert "kv_transfer_params" not in pre["body"] and pre["body"]["max_tokens"] == 1
    assert dec["body"] == body


# -- other routes ----------------------------------------------------------------------------------


async def test_health_follows_readiness(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready=()) as px, aiohttp.ClientSession() as s:

        async def health() -> tuple[int, dict[str, object]]:
            async with s.get(px.base + "/health") as r:
                return r.status, await r.json()

        status, body = await health()
        assert status == 503 and body["missing"] == ["prefill", "decode"]
        px.router.set_ready("prefill-0", True)
        px.router.set_ready("decode-1", True)
        assert (await health())[0] == 200
        px.router.set_ready("decode-1", False)  # the last decode died
        status, body = await health()
        assert status == 503 and body["missing"] == ["decode"] and body["decode_ready"] == 0
        px.router.set_ready("decode-0", True)
        assert (await health())[0] == 200
        px.router.set_draining("decode-0", True)
        assert (await health())[0] == 503


async def test_models_and_metrics(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready=()) as px, aiohttp.ClientSession() as s:
        async with s.get(px.base + "/v1/models") as r:  # no decode: from the topology
            assert r.status == 200
            data = await r.json()
            assert [m["id"] for m in data["data"]] == [MODEL]
            assert data["data"][0]["owned_by"] == "disaggd"
        px.router.set_ready("decode-0", True)
        async with s.get(px.base + "/v1/models") as r:  # from the decode
            data = await r.json()
            assert data["data"][0]["owned_by"] == "vllm"
        async with s.get(px.base + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        for name in (
            "disaggd_requests_in_flight",
            "disaggd_upstream_ready",
            "disaggd_upstream_requests_in_flight",
            "disaggd_kv_check_total",
        ):
            assert name in text
        async with s.get(px.base + "/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == 404


async def test_api_key(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DISAGGD_KEY", "s3cret")
    topo = cluster.topology(api_key_env="TEST_DISAGGD_KEY")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with s.post(px.base + "/v1/completions", json=body, headers=headers) as r:
                assert r.status == 401
                err = (await r.json())["error"]
                assert err["type"] == "authentication_error" and err["code"] == 401
            async with s.get(px.base + "/v1/models", headers=headers) as r:
                assert r.status == 401
        ok = {"Authorization": "Bearer s3cret"}
        async with s.post(px.base + "/v1/completions", json=body, headers=ok) as r:
            assert r.status == 200
        async with s.get(px.base + "/v1/models", headers=ok) as r:
            assert r.status == 200
        async with s.get(px.base + "/health") as r:
            assert r.status == 200  # probes carry no key
        # The metrics name every instance and its load: behind the key by default.
        async with s.get(px.base + "/metrics") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        async with s.get(px.base + "/metrics", headers=ok) as r:
            assert r.status == 200 and "disaggd_requests_total" in await r.text()
    async with (
        serve_proxy(
            cluster.topology(api_key_env="TEST_DISAGGD_KEY", metrics_require_key=False)
        ) as px,
        aiohttp.ClientSession() as s,
        s.get(px.base + "/metrics") as r,
    ):
        assert r.status == 200  # opened on purpose
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        # A reload reads the variable again.
        monkeypatch.setenv("TEST_DISAGGD_KEY", "rotated")
        px.proxy.update_settings(topo)
        async with s.post(px.base + "/v1/completions", json=body, headers=ok) as r:
            assert r.status == 401
    recs = await cluster.records("decode-0") + await cluster.records("decode-1")
    assert len(recs) == 1
    # Not forwarded unless configured, and no hop-by-hop or unknown header either.
    assert "authorization" not in recs[0]["headers"]


#: Every header a leg may carry: the proxy's own (and aiohttp's transport headers).
_LEG_HEADERS = {
    "host",
    "content-type",
    "content-length",
    "x-request-id",
    "accept",
    "accept-encoding",
    "traceparent",  # W3C Trace Context: each leg's own span (disaggd.observe.tracing)
    "authorization",
    "connection",
}


async def test_forward_authorization_and_headers(cluster: Cluster) -> None:
    topo = cluster.topology(forward_authorization=True)
    headers = {
        "Authorization": "Bearer upstream-key",
        "Connection": "keep-alive, x-secret",
        "X-Secret": "1",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "TE": "trailers",
        "Cookie": "a=b",
    }
    small = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
        s.post(px.base + "/v1/completions", json=small, headers=headers) as r,
    ):
        assert r.status == 200
    for name in ("prefill-0", "decode-0"):
        (rec,) = await cluster.records(name)
        h = rec["headers"]
        assert h["authorization"] == "Bearer upstream-key"
        # Exactly what the proxy itself sets: any client header that leaked (hop-by-hop
        # ones, those `Connection` names, cookies) would add a name here.
        assert set(h) <= _LEG_HEADERS, sorted(set(h) - _LEG_HEADERS)
        assert h.get("connection", "keep-alive").lower() == "keep-alive"


async def test_drain_rejects_new_and_finishes_inflight(cluster: Cluster) -> None:
    topo = cluster.topology()
    slow = {
        "model": MODEL,
        "prompt": "slow [[slow=0.05]] " + PROMPT,
        "max_tokens": 10,
        "stream": True,
    }
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        async with s.post(px.base + "/v1/completions", json=slow) as r:
            assert r.status == 200
            await r.content.readany()
            assert px.proxy.inflight == 1
            px.proxy.stop_accepting()
            async with s.post(
                px.base + "/v1/completions", json={"model": MODEL, "prompt": PROMPT}
            ) as r2:
                assert r2.status == 503
                assert r2.headers["Retry-After"] == "5"
                assert (await r2.json())["error"]["code"] == 503
            async with s.get(px.base + "/health") as r3:
                assert r3.status == 503
            assert await px.proxy.wait_drained(0.01) is False
            rest = await r.read()
            assert rest.endswith(b"data: [DONE]\n\n")
        assert await px.proxy.wait_drained(5) is True
        assert px.proxy.inflight == 0


async def test_serve_reports_address_in_use(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo):
        from disaggd.observe.metrics import Metrics
        from disaggd.proxy.app import Proxy
        from disaggd.proxy.router import Router

        other = Proxy(topo, Router(topo), Metrics())

        async def never() -> None:
            await asyncio.Event().wait()

        with pytest.raises(OSError):
            await other.serve(never)
        await other.aclose()


async def test_settings_apply_at_once(cluster: Cluster) -> None:
    topo = cluster.topology()
    slow = {"model": MODEL, "prompt": "slow [[slow=0.1]] " + PROMPT, "max_tokens": 10}
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(px.base + "/v1/completions", json=slow) as r:
            assert r.status == 200
        px.proxy.update_settings(cluster.topology(request_timeout=0.3, retry_after=9))
        async with s.post(px.base + "/v1/completions", json=slow) as r:
            assert r.status == 504
        px.router.set_ready("decode-0", False)
        async with s.post(px.base + "/v1/completions", json=slow) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "9"


async def test_stream_metrics_and_inflight_gauge(cluster: Cluster) -> None:
    topo = cluster.topology()
    body = {
        "model": MODEL,
        "prompt": "slow [[slow=0.02]] " + PROMPT,
        "max_tokens": 8,
        "stream": True,
    }
    async with (
        serve_proxy(topo, ready={"prefill-0", "decode-1"}) as px,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(px.base + "/v1/completions", json=body) as r:
            await r.content.readany()
            assert px.metric("disaggd_upstream_requests_in_flight", instance="decode-1") == 1
            assert px.metric("disaggd_requests_in_flight") == 1
            await r.read()
        assert px.metric("disaggd_upstream_requests_in_flight", instance="decode-1") == 0
        assert px.metric("disaggd_time_to_first_token_seconds_count", decision="disaggregated") == 1
        assert px.metric("disaggd_inter_token_latency_seconds_count") >= 3
        assert px.metric("disaggd_e2e_request_latency_seconds_count") == 1
        assert px.metric("disaggd_prefill_latency_seconds_count", instance="prefill-0") == 1
        assert px.metric("disaggd_upstream_ready", instance="decode-1") == 1
        assert px.metric("disaggd_upstream_ready", instance="decode-0") == 0


# -- the KV check, against a fake engine that reports cached tokens -------------------------------


class _FakeEngine:
    """Answers as vLLM with ``--enable-prompt-tokens-details`` would: prefill legs get
    kv_transfer_params back, decode legs report `cached` prompt tokens."""

    def __init__(self, cached: int | None, prompt_tokens: int = 100) -> None:
        self.cached = cached
        self.prompt_tokens = prompt_tokens
        self.runner: Any = None

    def usage(self) -> dict[str, Any]:
        u: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": 2,
            "total_tokens": self.prompt_tokens + 2,
        }
        if self.cached is not None:
            u["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return u

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        params = body.get("kv_transfer_params") or {}
        head = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": MODEL}
        if params.get("do_remote_decode"):
            return web.json_response(
                {
                    **head,
                    "choices": [{"index": 0, "text": "a", "finish_reason": "length"}],
                    "usage": self.usage(),
                    "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [1]},
                }
            )
        if not body.get("stream"):
            return web.json_response(
                {
                    **head,
                    "choices": [{"index": 0, "text": "ab", "finish_reason": "length"}],
                    "usage": self.usage(),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text, finish in (("a", None), ("b", "length")):
            chunk = {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            last = {**head, "choices": [], "usage": self.usage()}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()


@pytest.mark.parametrize(
    ("cached", "stream", "verdict"),
    [
        (96, False, "moved"),
        (90, True, "moved"),
        (10, False, "recomputed"),
        (0, True, "recomputed"),
        (None, False, "unknown"),
    ],
)
async def test_kv_check_verdicts_and_log_lines(
    tmp_path: Path, cached: int | None, stream: bool, verdict: str
) -> None:
    pp, dp = free_port(), free_port()
    doc = standin_topology(tmp_path)
    doc["instance"] = [
        {"name": "p", "role": "prefill", "url": f"http://127.0.0.1:{pp}", "kv_port": free_port()},
        {"name": "d", "role": "decode", "url": f"http://127.0.0.1:{dp}", "kv_port": free_port()},
    ]
    topo = parse_config(doc)
    engines = [_FakeEngine(cached), _FakeEngine(cached)]
    await engines[0].start(pp)
    await engines[1].start(dp)
    body: dict[str, Any] = {"model": MODEL, "prompt": "x " * 100, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    try:
        with capture_logs() as logs:
            async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
                async with s.post(
                    px.base + "/v1/completions", json=body, headers={"X-Request-Id": "kv-1"}
                ) as r:
                    assert r.status == 200
                    await r.read()
                assert px.metric("disaggd_kv_check_total", verdict=verdict) == 1
    finally:
        for e in engines:
            await e.runner.cleanup()
    (done,) = [e for e in logs if e["event"] == "request_done"]
    assert done["request_id"] == "kv-1" and done["kv"] == verdict
    assert done["route"] == "/v1/completions" and done["decision"] == "disaggregated"
    assert done["prefill"] == "p" and done["decode"] == "d" and done["status"] == 200
    assert done["prompt_tokens"] == 100 and done["e2e_ms"] > 0
    assert (done["ttft_ms"] is not None) is stream
    warnings = [e for e in logs if e["event"] == "kv_recomputed"]
    if verdict == "recomputed":
        (w,) = warnings
        assert w["log_level"] == "warning" and w["request_id"] == "kv-1"
        assert w["prompt_tokens"] == 100 and w["cached_tokens"] == cached
    else:
        assert warnings == []
