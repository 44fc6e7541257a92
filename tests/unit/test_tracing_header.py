"""Pure parts of tracing (W3C traceparent) and of llm-d's x-prefiller-host-port."""

from __future__ import annotations

import pytest

from disaggd.observe.tracing import Tracer, parse_traceparent
from disaggd.proxy.prefiller import first_value, host_port

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TP, True),
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),
        (TP + "-extra", False),  # version 00 is exactly 55 characters
        ("ff" + TP[2:], False),
        (TP.upper(), False),
        ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", False),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("garbage", False),
    ],
)
def test_parse_traceparent(value: str, ok: bool) -> None:
    assert (parse_traceparent(value) is not None) is ok


def test_tracer_keeps_or_starts_a_trace() -> None:
    t = Tracer().start(TP, "a=1", "/v1/completions", 0.0)
    assert (t.trace_id, t.flags, t.state) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01", "a=1")
    leg = t.leg("prefill", "prefill-0")
    ids = parse_traceparent(leg.traceparent)
    assert ids is not None and ids[0] == t.trace_id and ids[1] != "00f067aa0ba902b7"
    fresh = Tracer().start("bogus", "a=1", "/v1/completions", 0.0)
    assert len(fresh.trace_id) == 32 and fresh.state is None  # tracestate dropped with it


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.2:8100", "10.0.0.2:8100"),
        (" 10.0.0.2:8100 , 10.0.0.3:8100", "10.0.0.2:8100"),
        ("http://Prefill.Local:8100", "prefill.local:8100"),
        ("[::1]:8100", "[::1]:8100"),
        ("10.0.0.2", None),
        ("10.0.0.2:0", None),
        ("10.0.0.2:99999", None),
        ("10.0.0.2:8100/x", None),
        ("user@10.0.0.2:8100", None),
        ("", None),
    ],
)
def test_prefiller_host_port(value: str, expected: str | None) -> None:
    assert host_port(first_value(value)) == expected
