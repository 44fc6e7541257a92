"""llm-d's ``x-prefiller-host-port`` and one W3C trace across client → proxy → both legs,
over real HTTP against stand-in engines (and a local OTLP/HTTP receiver)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from disaggd.observe.tracing import parse_traceparent
from disaggd.topology import ObserveSection, Topology, parse_config
from tests.harness.common import free_port
from tests.harness.proxy import MODEL, Cluster, serve_proxy, sse_events, standin_cluster

PROMPT = "the quick brown fox jumps over the lazy dog " * 4
HEADER = "x-prefiller-host-port"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "llmd", prefill=2, decode=1)


async def _post(base: str, headers: dict[str, str], **extra: Any) -> tuple[int, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, **extra}
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/v1/completions", json=body, headers=headers) as r,
    ):
        raw = await r.read()
        return r.status, sse_events(raw) if extra.get("stream") else json.loads(raw)


def _without(cluster: Cluster, name: str, **proxy: Any) -> Topology:
    """The cluster's topology without instance `name` (its stand-in still runs)."""
    doc = json.loads(json.dumps(cluster.doc))
    doc["instance"] = [i for i in doc["instance"] if i["name"] != name]
    doc["proxy"] = {**doc.get("proxy", {}), "port": free_port(), **proxy}
    return parse_config(doc, cluster.tmp / "without.toml")


# -- x-prefiller-host-port ----------------------------------------------------------------------


async def test_header_names_a_configured_prefill(cluster: Cluster) -> None:
    p1 = f"127.0.0.1:{cluster.port('prefill-1')}"
    p0 = f"127.0.0.1:{cluster.port('prefill-0')}"
    async with serve_proxy(cluster.topology()) as px:
        for value in (p1, f"{p1}, {p0}", f"http://{p1}", p1.upper()):
            status, body = await _post(px.base, {HEADER: value})
            assert status == 200, body
        assert px.metric("disaggd_disagg_decision_total", decision_type="prefill-decode",
                         reason="header") == 4
    assert len(await cluster.records("prefill-1")) == 4
    assert await cluster.records("prefill-0") == []


async def test_header_unknown_address_is_400_by_default(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology()) as px:
        for value in ("10.9.9.9:8100", "no-port", "127.0.0.1:0"):
            status, body = await _post(px.base, {HEADER: value})
            assert status == 400, (value, body)
            assert body["error"]["param"] == HEADER
            assert body["error"]["type"] == "invalid_request_error"
    for name in ("prefill-0", "prefill-1", "decode-0"):
        assert await cluster.records(name) == []


async def test_header_adhoc_address_when_allowed(cluster: Cluster) -> None:
    adhoc = f"127.0.0.1:{cluster.port('prefill-1')}"  # a running engine the topology lacks
    async with serve_proxy(_without(cluster, "prefill-1")) as px:
        status, body = await _post(px.base, {HEADER: adhoc})
        assert status == 400 and body["error"]["param"] == HEADER
    topo = _without(cluster, "prefill-1", allow_prefiller_header=True)
    async with serve_proxy(topo) as px:
        status, body = await _post(px.base, {HEADER: adhoc})
        assert status == 200, body
    assert len(await cluster.records("prefill-1")) == 1
    assert await cluster.records("prefill-0") == []


async def test_header_prefill_draining_is_not_replaced(cluster: Cluster) -> None:
    """The named prefill is drained: no other prefill is tried; prefill_fallback decides."""
    p1 = f"127.0.0.1:{cluster.port('prefill-1')}"
    async with serve_proxy(cluster.topology()) as px:
        px.router.set_draining("prefill-1", True)
        status, body = await _post(px.base, {HEADER: p1})
        assert status == 200, body  # the decode prefilled itself (fallback)
    async with serve_proxy(cluster.topology(prefill_fallback="fail")) as px:
        px.router.set_draining("prefill-1", True)
        status, body = await _post(px.base, {HEADER: p1})
        assert status == 503, body
    assert await cluster.records("prefill-0") == []
    assert await cluster.records("prefill-1") == []


# -- one trace ----------------------------------------------------------------------------------


async def test_traceparent_on_both_legs_without_export(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology()) as px:
        status, _ = await _post(px.base, {})
        assert status == 200
        client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        status, _ = await _post(px.base, {"traceparent": client, "tracestate": "k=v"})
        assert status == 200
    legs = [*(await cluster.records("prefill-0")), *(await cluster.records("prefill-1"))]
    decodes = await cluster.records("decode-0")
    assert len(legs) == 2 and len(decodes) == 2
    ids = [parse_traceparent(r["headers"]["traceparent"]) for r in (*legs, *decodes)]
    assert all(i is not None for i in ids)
    traces = {i[0] for i in ids if i is not None}
    assert len(traces) == 2 and "0af7651916cd43dd8448eb211c80319c" in traces
    assert len({i[1] for i in ids if i is not None}) == 4  # each leg its own span id
    for r in (*legs, *decodes):
        if "0af76519" in r["headers"]["traceparent"]:
            assert r["headers"]["tracestate"] == "k=v"
        else:
            assert "tracestate" not in r["headers"]


@pytest.fixture
async def otlp() -> AsyncIterator[tuple[str, list[Any]]]:
    """A local OTLP/HTTP receiver: POST /v1/traces (protobuf); yields (base URL, spans)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans: list[Any] = []

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        for rs in msg.resource_spans:
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", spans
    finally:
        await runner.cleanup()


async def test_one_trace_exported_over_otlp(
    cluster: Cluster, otlp: tuple[str, list[Any]]
) -> None:
    endpoint, spans = otlp
    topo = cluster.topology()
    topo = topo.model_copy(update={"observe": ObserveSection(otlp_endpoint=endpoint)})
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with serve_proxy(topo) as px:
        status, events = await _post(
            px.base, {"traceparent": f"00-{trace_id}-{client_span}-01"}, stream=True
        )
        assert status == 200 and events[-1] == "[DONE]"
    # aclose flushed the exporter.
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"disaggd.request", "disaggd.prefill", "disaggd.decode"}, spans
    assert {s.trace_id.hex() for s in spans} == {trace_id}
    req, pre, dec = (by_name[f"disaggd.{n}"] for n in ("request", "prefill", "decode"))
    assert req.parent_span_id.hex() == client_span
    assert pre.parent_span_id == req.span_id and dec.parent_span_id == req.span_id
    assert [e.name for e in req.events] == ["first_token"]
    assert req.start_time_unix_nano <= req.events[0].time_unix_nano <= req.end_time_unix_nano
    # Each leg's request carried its own span as the engine's parent, in the same trace.
    legs = [*(await cluster.records("prefill-0")), *(await cluster.records("prefill-1"))]
    (prefill_leg,) = legs
    (decode_leg,) = await cluster.records("decode-0")
    assert prefill_leg["headers"]["traceparent"] == f"00-{trace_id}-{pre.span_id.hex()}-01"
    assert decode_leg["headers"]["traceparent"] == f"00-{trace_id}-{dec.span_id.hex()}-01"
