"""`disaggd status` as a person reads it: the READY column's words."""

from __future__ import annotations

from typing import Any

from disaggd.daemon.status import render_status


def row(**kw: Any) -> dict[str, Any]:
    base = {"name": "decode-0", "role": "decode", "state": "RUNNING", "ready": True, "pid": 7}
    return {**base, **kw}


def ready_word(**kw: Any) -> str:
    line = render_status([row(**kw)]).splitlines()[1]
    return line.split()[3]


def test_ready_column_says_why_an_instance_takes_no_requests() -> None:
    assert ready_word(breaker="closed") == "yes"
    assert ready_word(breaker="open") == "breaker"  # "breaker open"
    assert "breaker open" in render_status([row(breaker="open")])
    assert "breaker half-open" in render_status([row(breaker="half_open")])
    assert ready_word(drained=True, breaker="open") == "drained"
    assert ready_word(ready=False, breaker="open") == "no"
