"""One trace across client → proxy → prefill → decode (W3C Trace Context, OTLP export).

The proxy calls four points per request, never one per chunk:

* `Tracer.start` when a request arrives: takes the client's ``traceparent`` /
  ``tracestate`` (W3C Trace Context level 1) or starts a trace;
* `RequestTrace.leg` around each prefill or decode attempt: a span id of its own,
  sent to the engine as the parent of its work (`LegSpan.traceparent`);
* `RequestTrace.end` when the request is accounted: status, error and the first
  token's time (an event at ``t0 + ttft``, recorded without any per-chunk hook).

Without ``[observe] otlp_endpoint`` the tracer exports nothing and imports nothing
from OpenTelemetry: ids come from `os.urandom`, so the legs still carry one trace id.
With it, `OtlpTracer` (OpenTelemetry's SDK and OTLP/HTTP exporter, the ``otel`` extra,
imported then) exports spans ``disaggd.request`` (SERVER), ``disaggd.prefill`` and
``disaggd.decode`` (CLIENT, one per attempt) with a ``first_token`` event on the
request span, from a batch processor's own thread: the event loop never waits on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

#: tracestate kept at most (W3C: propagate at least 512 characters; longer may be dropped).
MAX_TRACESTATE = 512

_HEX = frozenset("0123456789abcdef")

Attrs = Mapping[str, "str | int | float | bool | None"]


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` of a W3C ``traceparent``, or None when invalid.

    Version ``00`` must be exactly 55 characters; a later version (not ``ff``) may
    carry more after a ``-``, which is ignored. All-zero ids are invalid.
    """
    v = value.strip()
    if len(v) < 55 or (len(v) > 55 and (v[:2] == "00" or v[55] != "-")):
        return None
    version, trace_id, parent_id, flags = v[:2], v[3:35], v[36:52], v[53:55]
    if v[2] != "-" or v[35] != "-" or v[52] != "-" or version == "ff":
        return None
    if not _HEX.issuperset(version + trace_id + parent_id + flags):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags


def traceparent(trace_id: str, span_id: str, flags: str) -> str:
    """A version-00 ``traceparent`` value."""
    return f"00-{trace_id}-{span_id}-{flags}"


class LegSpan:
    """One leg attempt: ``with trace.leg("prefill", name) as span:``; set `status` to the
    engine's HTTP status once known (None at exit: no answer, an error).

    Attributes:
        traceparent: the value the leg sends (this span is the engine's parent).
        status: the engine's HTTP status, or None.
    """

    __slots__ = ("status", "traceparent")

    def __init__(self, header: str) -> None:
        self.traceparent = header
        self.status: int | None = None

    def __enter__(self) -> LegSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class RequestTrace:
    """One request's trace context; this base records nothing (ids only).

    Attributes:
        trace_id: 32 hex digits.
        flags: the trace flags (``01``: sampled).
        state: the client's ``tracestate``, passed on to both legs, or None.
    """

    __slots__ = ("flags", "state", "trace_id")

    recording = False

    def __init__(self, trace_id: str, flags: str, state: str | None) -> None:
        self.trace_id = trace_id
        self.flags = flags
        self.state = state

    def leg(self, role: str, instance: str) -> LegSpan:
        """A span for one leg attempt to `instance` (`role`: prefill or decode)."""
        return LegSpan(traceparent(self.trace_id, os.urandom(8).hex(), self.flags))

    def end(self, status: int, error: str | None, ttft: float | None, attrs: Attrs) -> None:
        """End the request span: HTTP `status`, `error` (None: ok), `ttft` seconds."""


#: The trace of a request that has not been started yet (never sent anywhere).
UNSTARTED = RequestTrace("0" * 32, "00", None)


class Tracer:
    """Starts request traces; this base propagates ids and exports nothing."""

    def start(self, parent: str | None, state: str | None, route: str, t0: float) -> RequestTrace:
        """The trace of a request on `route` that arrived at `t0` (`time.monotonic`), whose
        client sent `parent` (``traceparent``) and `state` (``tracestate``), either None;
        an invalid parent starts a new trace (and its tracestate is dropped, as W3C says)."""
        ids = parse_traceparent(parent) if parent is not None else None
        if ids is None:
            return RequestTrace(os.urandom(16).hex(), "01", None)
        return RequestTrace(ids[0], ids[2], clean_tracestate(state))

    def shutdown(self) -> None:
        """Flush and stop the exporter (nothing here)."""


def clean_tracestate(state: str | None) -> str | None:
    if state is None or len(state) > MAX_TRACESTATE or not state.strip():
        return None
    return state.strip()


def tracer_for(otlp_endpoint: str | None, service: str = "disaggd") -> Tracer:
    """The tracer for ``[observe] otlp_endpoint``: OTLP export when set, else ids only.

    Raises:
        ImportError: the endpoint is set but OpenTelemetry's SDK is not installed
            (``pip install 'disaggd[otel]'``).
    """
    if otlp_endpoint is None:
        return Tracer()
    from disaggd.observe.otlp import OtlpTracer  # the SDK is imported only now

    return OtlpTracer(otlp_endpoint, service)


def wall_ns(mono: float) -> int:
    """`time.monotonic` seconds as wall-clock nanoseconds (span times)."""
    return time.time_ns() - int((time.monotonic() - mono) * 1e9)
