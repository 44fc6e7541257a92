"""The proxy's failure paths against stand-in engines: every case answers with the
right status and body, never hangs, and leaves no upstream leg running."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import pytest

from tests.harness.common import async_wait_for, free_port, standin_topology
from tests.harness.proxy import (
    MODEL,
    Cluster,
    Running,
    established_to,
    running,
    serve_proxy,
    sse_events,
)

PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # 36 words


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 prefills + 2 decodes (NIXL-style), 100-token context, plus a prefill and a
    decode in the topology that nothing listens for (connection refused)."""
    tmp = tmp_path_factory.mktemp("failures")
    doc = standin_topology(tmp, prefill=2, decode=2, model_args=["--max-model-len", "100"])
    doc["instance"] += [
        {
            "name": "prefill-dead",
            "role": "prefill",
            "url": f"http://127.0.0.1:{free_port()}",
            "kv_port": free_port(),
        },
        {
            "name": "decode-dead",
            "role": "decode",
            "url": f"http://127.0.0.1:{free_port()}",
            "kv_port": free_port(),
        },
    ]
    yield from running(Cluster(tmp, doc))


def _error(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return dict(err)


async def _no_leg_left(cluster: Cluster, *names: str) -> None:
    """The proxy holds no connection to these instances, and they run nothing for it."""
    for name in names:
        port = cluster.port(name)
        await async_wait_for(
            lambda p=port: established_to(p) == 0,  # type: ignore[misc]
            5,
            what=f"{name} closed",
        )
    for name in names:
        deadline = time.monotonic() + 5
        while await cluster.inflight(name):
            assert time.monotonic() < deadline, f"{name} still runs a request"
            await asyncio.sleep(0.05)


async def _post(
    px: Running, body: Any, route: str = "/v1/completions", **kw: Any
) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        data = (
            body
            if isinstance(body, bytes | str) or hasattr(body, "__aiter__")
            else json.dumps(body)
        )
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        async with s.post(px.base + route, data=data, headers=headers, **kw) as r:
            return r.status, r.headers.copy(), await r.read()


def _req(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}


# -- prefill --------------------------------------------------------------------------------------


async def test_prefill_4xx_is_returned_as_is_without_decode(cluster: Cluster) -> None:
    """A 300-token prompt against a 100-token context: the prefill's own 400, at once."""
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        t = time.monotonic()
        status, headers, body = await _post(px, _req("word " * 300))
        assert time.monotonic() - t < 2
        assert px.metric("disaggd_retries_total") == 0
    assert status == 400
    err = _error(body)
    assert "maximum context length is 100 tokens" in err["message"]
    (pre,) = await cluster.records("prefill-0") + await cluster.records("prefill-1")
    assert pre["status"] == 400
    assert await cluster.records("decode-0") == []
    assert headers["X-Request-Id"] == pre["request_id"]


@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_5xx_retried_on_another_with_fresh_id(cluster: Cluster, stream: bool) -> None:
    await cluster.faults("prefill-0", fail_status=503, fail_count=1)
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        status, headers, _ = await _post(px, _req(stream=stream), headers={"X-Request-Id": "rid-1"})
        assert px.metric("disaggd_retries_total", role="prefill") == 1
        assert (
            px.metric("disaggd_upstream_errors_total", instance="prefill-0", kind="http_5xx") == 1
        )
        assert px.metric("disaggd_requests_total", status="200", decision="disaggregated") == 1
    assert status == 200
    (p0,) = await cluster.records("prefill-0")
    (p1,) = await cluster.records("prefill-1")
    (dec,) = await cluster.records("decode-0")
    assert p0["status"] == 503 and p0["request_id"] == "rid-1"
    assert p1["request_id"] == dec["request_id"] == headers["X-Request-Id"] == "rid-1-r1"
    assert dec["verdict"] == "hit"


async def test_prefill_connection_refused_is_retried(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-dead", "prefill-1", "decode-0"}) as px:
        # Two requests: ties go round robin, so one of them tries the dead one first.
        for _ in range(2):
            status, _, _ = await _post(px, _req())
            assert status == 200
        assert (
            px.metric("disaggd_upstream_errors_total", instance="prefill-dead", kind="connect") == 1
        )
        assert px.metric("disaggd_retries_total", role="prefill") == 1
    decs = await cluster.records("decode-0")
    assert [d["verdict"] for d in decs] == ["hit", "hit"]


async def test_prefill_timeout_retried_and_abandoned_leg_closed(cluster: Cluster) -> None:
    await cluster.faults("prefill-0", prefill_delay=3.0)
    topo = cluster.topology(prefill_timeout=0.5)
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        t = time.monotonic()
        status, _, _ = await _post(px, _req())
        assert time.monotonic() - t < 2
        assert px.metric("disaggd_upstream_errors_total", instance="prefill-0", kind="timeout") == 1
        assert status == 200
        assert established_to(cluster.port("prefill-0")) == 0
    (dec,) = await cluster.records("decode-0")
    assert dec["verdict"] == "hit"


async def test_no_prefill_left_falls_back_to_decode(cluster: Cluster) -> None:
    for name in ("prefill-0", "prefill-1"):
        await cluster.faults(name, fail_status=500, fail_count=1)
    topo = cluster.topology(prefill_fallback="decode")
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        status, _, body = await _post(px, _req())
        assert px.metric("disaggd_requests_total", status="200", decision="fallback") == 1
    assert status == 200 and json.loads(body)["choices"]
    (dec,) = await cluster.records("decode-0")
    assert dec["verdict"] == "miss" and "kv_transfer_params" not in dec["body"]
    assert dec["body"] == _req()


async def test_no_prefill_left_fails_when_configured(cluster: Cluster) -> None:
    for name in ("prefill-0", "prefill-1"):
        await cluster.faults(name, fail_status=502, fail_count=1)
    topo = cluster.topology(prefill_fallback="fail", retry_after=7)
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        status, headers, body = await _post(px, _req())
    assert status == 503 and headers["Retry-After"] == "7"
    assert _error(body)["code"] == 503
    assert await cluster.records("decode-0") == []


@pytest.mark.parametrize("fallback", ["decode", "fail"])
async def test_no_prefill_ready(cluster: Cluster, fallback: str) -> None:
    topo = cluster.topology(prefill_fallback=fallback)
    async with serve_proxy(topo, ready={"decode-0"}) as px:
        status, headers, body = await _post(px, _req())
    if fallback == "decode":
        assert status == 200
        (dec,) = await cluster.records("decode-0")
        assert dec["verdict"] == "miss"
    else:
        assert status == 503 and "Retry-After" in headers
        assert "prefill" in _error(body)["message"]
        assert await cluster.records("decode-0") == []


async def test_no_decode_ready(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0"}) as px:
        status, headers, body = await _post(px, _req())
        assert px.metric("disaggd_requests_total", status="503", decision="none") == 1
    assert status == 503 and headers["Retry-After"] == "5"
    assert "decode" in _error(body)["message"]
    assert await cluster.records("prefill-0") == []


# -- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_error_before_first_byte(cluster: Cluster, stream: bool) -> None:
    await cluster.faults("decode-0", fail_status=503, fail_count=1)
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        status, headers, body = await _post(px, _req(stream=stream))
        assert px.metric("disaggd_upstream_errors_total", instance="decode-0", kind="http_5xx") == 1
    assert status == 503
    assert headers["Content-Type"].startswith("application/json")
    assert "injected 503" in _error(body)["message"]


async def test_decode_midstream_error_becomes_sse_error_event(cluster: Cluster) -> None:
    topo = cluster.topology()
    body = _req("cut me [[midstream_error]] " + PROMPT, max_tokens=10, stream=True)
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        status, _, data = await _post(px, body)
        assert (
            px.metric("disaggd_upstream_errors_total", instance="decode-0", kind="stream_cut") == 1
        )
    assert status == 200
    events = sse_events(data)  # whole events only: nothing torn
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == 502 and "decode-0" in err["message"]
    tokens = [e for e in events[:-2] if "choices" in e]
    assert 1 <= len(tokens) <= 3
    await _no_leg_left(cluster, "decode-0")


async def test_decode_cut_without_stream_is_502(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        status, _, body = await _post(px, _req("cut me [[midstream_error]] " + PROMPT))
    assert status == 502 and _error(body)["type"] == "bad_gateway_error"


async def test_decode_connection_refused(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "decode-dead"}) as px:
        status, _, body = await _post(px, _req())
        assert status == 502 and "decode-dead" in _error(body)["message"]
        # With a live decode too, the leg moves there (it never reached the dead one);
        # two requests: ties go round robin, so one of them tries the dead one first.
        px.router.set_ready("decode-1", True)
        for _ in range(2):
            status, _, _ = await _post(px, _req())
            assert status == 200
        assert px.metric("disaggd_retries_total", role="decode") == 1
    decs = await cluster.records("decode-1")
    assert [d["verdict"] for d in decs] == ["hit", "hit"]


# -- deadlines and disconnects --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_504_and_upstream_aborted(cluster: Cluster, stream: bool) -> None:
    topo = cluster.topology(request_timeout=0.5)
    body = _req("slow [[slow=0.1]] " + PROMPT, max_tokens=10, stream=stream)
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        t = time.monotonic()
        status, _, data = await _post(px, body)
        assert time.monotonic() - t < 1.5
        if stream:
            # Headers went out with the first token: the deadline arrives in-band.
            assert status == 200
            events = sse_events(data)
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        else:
            assert status == 504 and _error(data)["type"] == "timeout_error"
        assert established_to(cluster.port("decode-0")) == 0  # the proxy closed its leg
    # A stand-in stops a stream at its next write; a plain answer runs to its end (1 s).
    await _no_leg_left(cluster, "decode-0")


async def test_request_timeout_during_prefill(cluster: Cluster) -> None:
    for name in ("prefill-0", "prefill-1"):
        await cluster.faults(name, prefill_delay=3.0)
    topo = cluster.topology(request_timeout=0.5)
    async with serve_proxy(topo, ready={"prefill-0", "prefill-1", "decode-0"}) as px:
        status, _, data = await _post(px, _req())
        assert status == 504 and _error(data)["code"] == 504
        assert px.metric("disaggd_retries_total") == 0
        assert (
            established_to(cluster.port("prefill-0")) + established_to(cluster.port("prefill-1"))
            == 0
        )
    assert await cluster.records("decode-0") == []


async def test_client_disconnect_mid_stream_aborts_decode(cluster: Cluster) -> None:
    topo = cluster.topology()
    body = _req("slow [[slow=0.1]] " + PROMPT, max_tokens=50, stream=True)
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        async with aiohttp.ClientSession() as s:
            r = await s.post(px.base + "/v1/completions", json=body)
            assert r.status == 200
            await r.content.readany()
            assert await cluster.inflight("decode-0") == 1
            r.close()  # the client goes away, 45 tokens (4.5 s) early
        t = time.monotonic()
        await async_wait_for(lambda: px.proxy.inflight == 0, 2, what="proxy request ended")
        await _no_leg_left(cluster, "decode-0")
        assert time.monotonic() - t < 2
        assert px.metric("disaggd_requests_total", status="499") == 1
        assert px.router.get("decode-0").outstanding == 0  # type: ignore[union-attr]


async def test_client_disconnect_during_prefill_aborts_it(cluster: Cluster) -> None:
    await cluster.faults("prefill-0", prefill_delay=1.5)
    topo = cluster.topology()
    async with serve_proxy(topo, ready={"prefill-0", "decode-0"}) as px:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(px.base + "/v1/completions", json=_req()))
            await async_wait_for(lambda: established_to(cluster.port("prefill-0")) == 1, 3)
            task.cancel()  # the client gives up while the prefill runs
            with pytest.raises(asyncio.CancelledError):
                await task
        await async_wait_for(lambda: px.proxy.inflight == 0, 2, what="proxy request ended")
        assert established_to(cluster.port("prefill-0")) == 0
        assert px.router.get("prefill-0").outstanding == 0  # type: ignore[union-attr]
        await asyncio.sleep(1.6)  # the prefill would have finished by now
        assert await cluster.records("decode-0") == []  # no decode leg was ever sent
        assert px.metric("disaggd_requests_total", status="499") == 1


# -- malformed requests: answered without touching an upstream ------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", b'"text"', None),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/completions", {"model": 3, "prompt": "hi"}, "model"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": True}, "n"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "stream_options": []},
            "stream_options",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": ["hi"]}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": {"role": "user"}}, "messages"),
    ],
)
async def test_malformed_request_is_400(
    cluster: Cluster, route: str, body: Any, param: str | None
) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo) as px:
        status, _, data = await _post(px, body, route)
        assert px.metric("disaggd_requests_total", status="400", decision="none") == 1
    assert status == 400
    err = _error(data)
    assert err["type"] == "invalid_request_error" and err["code"] == 400
    assert err["param"] == param
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert await cluster.records(name) == []


async def test_body_over_limit_is_413(cluster: Cluster) -> None:
    topo = cluster.topology(max_body_bytes=1000)
    big = json.dumps(_req("x " * 600)).encode()

    async def chunked() -> Any:
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    async with serve_proxy(topo) as px:
        status, _, data = await _post(px, big)  # Content-Length says it all
        assert status == 413 and _error(data)["code"] == 413
        status, _, data = await _post(px, chunked())  # chunked: counted as it comes
        assert status == 413 and _error(data)["code"] == 413
        status, _, _ = await _post(px, _req())  # a small one still goes through
        assert status == 200
    assert len(await cluster.records("decode-0") + await cluster.records("decode-1")) == 1


async def test_wrong_method_is_405(cluster: Cluster) -> None:
    topo = cluster.topology()
    async with serve_proxy(topo) as px, aiohttp.ClientSession() as s:
        async with s.get(px.base + "/v1/completions") as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
            assert _error(await r.read())["code"] == 405
        async with s.post(px.base + "/health") as r:
            assert r.status == 405
