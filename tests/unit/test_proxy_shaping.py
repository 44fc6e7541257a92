"""The proxy's pure parts: request checks, leg shaping, the KV check, SSE synthesis, metrics."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from disaggd.observe.metrics import Metrics
from disaggd.proxy.app import bind_listener
from disaggd.proxy.errors import HTTPError, stream_error_event
from disaggd.proxy.failures import TABLE, Failures, Fault, Leg
from disaggd.proxy.handoff import decode_body, handoff_for, prefill_request
from disaggd.proxy.kvcheck import kv_verdict, usage_from
from disaggd.proxy.record import Accounting, Record
from disaggd.proxy.request import (
    CHAT,
    COMPLETIONS,
    NON_TEXT_PART_CHARS,
    answers_from_prefill,
    check_auth,
    parse_request,
    prompt_chars,
)
from disaggd.proxy.settings import Settings
from disaggd.proxy.sse import event_end, synthesize_stream
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role, connectors, parse_config
from disaggd.topology.connectors import Handoff
from tests.harness.common import standin_topology
from tests.harness.proxy import metric_value, sse_events

C = COMPLETIONS


def test_parse_request_accepts_vllm_shapes() -> None:
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert parse_request(C, json.dumps({"model": "m", "prompt": prompt}).encode())
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": None,
    }
    assert parse_request(CHAT, json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        (C, b"", None),
        (C, b"\xff\xfe", None),
        (C, b"null", None),
        (C, b'{"prompt": "x"}', "model"),
        (C, b'{"model": "m", "prompt": [true]}', "prompt"),
        (C, b'{"model": "m", "prompt": {"a": 1}}', "prompt"),
        (
            C,
            b'{"model": "m", "prompt": "x", "max_completion_tokens": 1.5}',
            "max_completion_tokens",
        ),
        (C, b'{"model": "m", "prompt": "x", "min_tokens": false}', "min_tokens"),
        (CHAT, b'{"model": "m", "messages": [{"content": "x"}]}', "messages"),
    ],
)
def test_parse_request_rejects(route: str, raw: bytes, param: str | None) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request(route, raw)
    assert info.value.status == 400 and info.value.param == param


def test_prompt_chars() -> None:
    assert prompt_chars(C, {"prompt": "hello"}) == 5
    assert prompt_chars(C, {"prompt": ["ab", "cde"]}) == 5
    assert prompt_chars(C, {"prompt": [1, 2, 3]}) == 12
    assert prompt_chars(C, {"prompt": [[1, 2], [3]]}) == 12
    msgs = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}]},
        {"role": "assistant", "content": None},
    ]
    assert prompt_chars(CHAT, {"messages": msgs}) == 5
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert prompt_chars(CHAT, {"messages": image}) >= NON_TEXT_PART_CHARS


def test_prefill_request_only_prefills() -> None:
    req = {
        "model": "m",
        "prompt": "p",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "min_tokens": 10,
        "min_completion_tokens": 2,
        "n": 3,
        "kv_transfer_params": {"evil": 1},
        "temperature": 0.5,
    }
    kv = {"do_remote_decode": True}
    out = prefill_request(req, kv)
    assert out == {
        "model": "m",
        "prompt": "p",
        "stream": False,
        "max_tokens": 1,
        "n": 1,
        "temperature": 0.5,
        "kv_transfer_params": kv,
    }
    assert "max_completion_tokens" not in out
    out = prefill_request({"model": "m", "messages": [], "max_completion_tokens": 9}, None)
    assert out["max_completion_tokens"] == 1 and out["max_tokens"] == 1
    assert "kv_transfer_params" not in out
    assert req["max_tokens"] == 50  # the client's request is not touched


def test_decode_body_reuses_client_bytes() -> None:
    raw = b' {"model": "m", "prompt": "p\\u00e9"} \n'
    req = json.loads(raw)
    assert decode_body(raw, req, None) is raw
    spliced = decode_body(raw, req, {"a": [1, 2]})
    assert json.loads(spliced) == {**req, "kv_transfer_params": {"a": [1, 2]}}
    assert spliced.startswith(b'{"model": "m", "prompt": "p\\u00e9"')
    # A client's own kv_transfer_params never reach a decode.
    raw2 = b'{"model": "m", "prompt": "p", "kv_transfer_params": {"remote_host": "evil"}}'
    req2 = json.loads(raw2)
    assert json.loads(decode_body(raw2, req2, None)) == {"model": "m", "prompt": "p"}
    assert json.loads(decode_body(raw2, req2, {"ok": 1}))["kv_transfer_params"] == {"ok": 1}


def test_answers_from_prefill() -> None:
    assert answers_from_prefill({}, "stop")
    assert answers_from_prefill({"n": 1}, "stop")
    assert not answers_from_prefill({}, "length")
    assert not answers_from_prefill({}, None)
    assert not answers_from_prefill({"n": 2}, "stop")
    assert not answers_from_prefill({"min_tokens": 3}, "stop")
    assert not answers_from_prefill({"min_completion_tokens": 3}, "stop")
    assert not answers_from_prefill({"use_beam_search": True}, "stop")


@pytest.mark.parametrize(
    ("usage", "verdict"),
    [
        (None, "unknown"),
        ({}, "unknown"),
        ({"prompt_tokens": 100}, "unknown"),
        ({"prompt_tokens": 100, "prompt_tokens_details": None}, "unknown"),
        ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}}, "short_prompt"),
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 96}}, "moved"),
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 84}}, "moved"),
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 83}}, "recomputed"),
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 0}}, "recomputed"),
    ],
)
def test_kv_verdict(usage: Any, verdict: str) -> None:
    assert kv_verdict(usage, 16)[0] == verdict


def test_usage_from_body_and_stream_tail() -> None:
    body = json.dumps(
        {"choices": [{"text": 'say "usage": {"x": 1}'}], "usage": {"prompt_tokens": 5}}
    ).encode()
    assert usage_from(body) == {"prompt_tokens": 5}
    tail = (
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"prompt_tokens_details":'
        b'{"cached_tokens":7}}}\n\ndata: [DONE]\n\n'
    )
    assert usage_from(tail) == {
        "prompt_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    assert usage_from(b'{"usage": null}') is None
    assert usage_from(b"data: [DONE]\n\n") is None


@pytest.mark.parametrize("route", [C, CHAT])
@pytest.mark.parametrize("usage", [False, True])
def test_synthesize_stream(route: str, usage: bool) -> None:
    if route == C:
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    else:
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "", "tool_calls": []},
        }
    result = {
        "id": "x",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    body = synthesize_stream(route, result, usage)
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
        chunks = chunks[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    if route == CHAT:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "tool_calls" not in chunks[-1]["choices"][0]["delta"]
    else:
        assert all(c["object"] == "text_completion" for c in chunks)


def test_stream_error_event_is_vllm_shaped() -> None:
    events = sse_events(stream_error_event("boom", "bad_gateway_error", 502))
    assert events == [
        {"error": {"message": "boom", "type": "bad_gateway_error", "param": None, "code": 502}},
        "[DONE]",
    ]


def test_check_auth() -> None:
    check_auth("Bearer k3y", b"k3y")
    check_auth("bearer k3y", b"k3y")
    for header in (None, "", "k3y", "Bearer", "Bearer k3", "Basic k3y"):
        with pytest.raises(HTTPError) as info:
            check_auth(header, b"k3y")
        assert info.value.status == 401
    with pytest.raises(HTTPError):
        check_auth("Bearer anything", None)  # required but unset: fail closed


def test_event_end() -> None:
    assert event_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert event_end(b"data: a\r\n\r\ndata: b") == len(b"data: a\r\n\r\n")
    assert event_end(b"data: a") == 0


def test_metrics_registry_is_private_and_renders() -> None:
    a, b = Metrics(), Metrics()
    a.requests.labels("/v1/completions", "200", "disaggregated").inc()
    a.kv_check.labels("moved").inc()
    a.observe_instance("decode-0", "decode", "STARTING")
    a.observe_instance("decode-0", "decode", "RUNNING")
    a.bind_upstreams(lambda: [("decode-0", "decode", True, 3)])
    text = a.render().decode()
    assert metric_value(text, "disaggd_requests_total", decision="disaggregated") == 1
    assert metric_value(text, "disaggd_kv_check_total", verdict="moved") == 1
    assert metric_value(text, "disaggd_instance_state", instance="decode-0", state="RUNNING") == 1
    assert metric_value(text, "disaggd_instance_state", instance="decode-0", state="STARTING") == 0
    assert metric_value(text, "disaggd_upstream_requests_in_flight", instance="decode-0") == 3
    assert metric_value(text, "disaggd_upstream_ready", instance="decode-0") == 1
    assert metric_value(b.render().decode(), "disaggd_requests_total") == 0
    for name in (
        "disaggd_time_to_first_token_seconds",
        "disaggd_inter_token_latency_seconds",
        "disaggd_e2e_request_latency_seconds",
        "disaggd_prefill_latency_seconds",
        "disaggd_upstream_errors_total",
        "disaggd_retries_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


# -- handoff strategies ---------------------------------------------------------------------------


def _up(name: str, kv: str | None) -> Upstream:
    role = Role.PREFILL if name.startswith("p") else Role.DECODE
    return Upstream(name=name, role=role, base_url="http://h:1", kv_address=kv)


def test_storage_handoff_adds_nothing() -> None:
    h = handoff_for(Handoff.STORAGE, kv_check=True)
    req = {"model": "m", "prompt": ["a", "b"], "max_tokens": 9}
    assert json.loads(h.prefill_body(req)) == prefill_request(req, None)
    assert h.decode_params({"kv_transfer_params": {"x": 1}}) == (None, True)
    assert h.splits_batches and not h.pins_decode
    d = _up("d", "h:2")
    assert h.request_id("rid", 0, None, _up("p", "h:1"), d) == "rid"
    assert h.request_id("rid", 2, None, None, d) == "rid-r2"


def test_kv_params_handoff_carries_the_prefills_params() -> None:
    h = handoff_for(Handoff.KV_TRANSFER_PARAMS, kv_check=True)
    body = json.loads(h.prefill_body({"model": "m", "prompt": "p"}))
    assert body["kv_transfer_params"] == connectors.prefill_kv_transfer_params()
    returned = {"remote_host": "h", "remote_prefill_cached_tokens": 16}
    # The KV check needs the decode's own cached count (vllm output_processor.py).
    assert h.decode_params({"kv_transfer_params": returned}) == ({"remote_host": "h"}, True)
    unchecked = handoff_for(Handoff.KV_TRANSFER_PARAMS, kv_check=False)
    assert unchecked.decode_params({"kv_transfer_params": returned}) == (returned, True)
    assert h.decode_params({"kv_transfer_params": None}) == (None, False)
    assert not h.splits_batches and not h.pins_decode


def test_request_id_handoff_names_both_kv_addresses() -> None:
    h = handoff_for(Handoff.REQUEST_ID, kv_check=True)
    p, d = _up("p", "10.0.0.1:14579"), _up("d", "10.0.0.2:14580")
    assert h.pins_decode
    assert h.request_id("abc", 0, None, p, d) == (
        "___prefill_addr_10.0.0.1:14579___decode_addr_10.0.0.2:14580_abc"
    )
    rid = h.request_id("c:l_i", 1, "c:l_i", p, d)
    prefix = "___prefill_addr_10.0.0.1:14579___decode_addr_10.0.0.2:14580_cli-"
    assert rid.startswith(prefix) and rid.endswith("-r1")
    assert ":" not in rid[len(prefix) :] and "_" not in rid[len(prefix) :]
    # No KV address known, or no prefill (a decode-only leg): a plain id.
    assert h.request_id("abc", 1, None, _up("p", None), d) == "abc-r1"
    assert h.request_id("abc", 0, None, None, d) == "abc"


# -- the failure table --------------------------------------------------------------------------


def test_failure_table_counts_tags_and_decides(tmp_path: Path) -> None:
    metrics = Metrics()
    failures = Failures(Accounting(metrics))
    s = Settings.from_topology(parse_config(standin_topology(tmp_path, prefill=1, decode=1)))
    rec = Record(C, 0.0, s, _no_send)
    exc = ConnectionResetError("gone")
    rule = failures.fail(rec, Leg.PREFILL, Fault.BROKEN, "prefill-0", exc)
    assert rule.retry and rule.status is None
    assert rec.error == "prefill_ConnectionResetError:prefill-0"
    rule = failures.fail(rec, Leg.DECODE, Fault.STREAM_SHORT, "decode-0")
    assert rule.error("decode-0").status == 502 and rec.error == "decode_stream_cut:decode-0"
    rule = failures.fail(rec, Leg.PREFILL, Fault.HTTP_4XX, "prefill-0", status=413)
    assert not rule.retry and rule.status is None and rec.error == "prefill_http_413:prefill-0"
    assert failures.fail(rec, Leg.DECODE, Fault.TIMEOUT, "d").error("d").status == 504
    text = metrics.render().decode()
    assert metric_value(text, "disaggd_upstream_errors_total", kind="disconnect") == 1
    assert metric_value(text, "disaggd_upstream_errors_total", kind="stream_cut") == 1
    # Every fault a prefill or decode leg can meet has a row.
    for leg, faults in (
        (Leg.PREFILL, set(Fault) - {Fault.STREAM_CUT, Fault.STREAM_SHORT, Fault.ABORTED}),
        (Leg.DECODE, set(Fault) - {Fault.DEADLINE, Fault.BAD_RESPONSE}),
    ):
        assert {f for (lg, f) in TABLE if lg is leg} == faults


async def _no_send(_msg: Any) -> None:
    raise AssertionError("nothing is sent here")


def test_bind_listener_names_the_address_in_use() -> None:
    sock = bind_listener("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            bind_listener("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        sock.close()
