"""OTLP export of the proxy's traces with OpenTelemetry's SDK (the ``otel`` extra).

Imported only when ``[observe] otlp_endpoint`` is set (`disaggd.observe.tracing.tracer_for`).
Spans go to ``{endpoint}/v1/traces`` as OTLP/HTTP protobuf from a `BatchSpanProcessor`
(its own thread, a bounded queue: a slow or absent collector never blocks the loop;
spans past the queue are dropped by the SDK).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

from disaggd.observe.tracing import (
    Attrs,
    LegSpan,
    RequestTrace,
    Tracer,
    clean_tracestate,
    parse_traceparent,
    traceparent,
    wall_ns,
)

#: Seconds between exports: short enough that a trace shows up while one looks for it.
EXPORT_DELAY_MS = 1000


def _fail(span: Span, status: int | None) -> None:
    if status is None or status >= 500:
        span.set_status(Status(StatusCode.ERROR, "no answer" if status is None else str(status)))


class _OtlpLeg(LegSpan):
    __slots__ = ("_span",)

    def __init__(self, span: Span, flags: str) -> None:
        ctx = span.get_span_context()
        super().__init__(traceparent(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", flags))
        self._span = span

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self._span.set_attribute("http.response.status_code", self.status)
        _fail(self._span, self.status)
        self._span.end()


class _OtlpTrace(RequestTrace):
    __slots__ = ("_ctx", "_span", "_start_ns", "_tracer")

    recording = True

    def __init__(self, tracer: trace.Tracer, span: Span, state: str | None, start_ns: int) -> None:
        ctx = span.get_span_context()
        super().__init__(f"{ctx.trace_id:032x}", f"{int(ctx.trace_flags):02x}", state)
        self._tracer = tracer
        self._span = span
        self._ctx = trace.set_span_in_context(span)
        self._start_ns = start_ns

    def leg(self, role: str, instance: str) -> LegSpan:
        span = self._tracer.start_span(
            f"disaggd.{role}",
            context=self._ctx,
            kind=SpanKind.CLIENT,
            attributes={"disaggd.leg": role, "disaggd.instance": instance},
        )
        return _OtlpLeg(span, self.flags)

    def end(self, status: int, error: str | None, ttft: float | None, attrs: Attrs) -> None:
        span = self._span
        if ttft is not None:
            span.add_event("first_token", timestamp=self._start_ns + int(ttft * 1e9))
        span.set_attribute("http.response.status_code", status)
        for key, value in attrs.items():
            if value is not None:
                span.set_attribute(f"disaggd.{key}", value)
        if error is not None:
            span.set_attribute("error.type", error[:200])
        _fail(span, status if status else None)
        span.end()


class OtlpTracer(Tracer):
    """Exports each request's spans to an OTLP/HTTP collector at `endpoint`."""

    def __init__(self, endpoint: str, service: str) -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
        )
        self._provider = provider
        self._tracer = provider.get_tracer("disaggd.proxy")

    def start(self, parent: str | None, state: str | None, route: str, t0: float) -> RequestTrace:
        ids = parse_traceparent(parent) if parent is not None else None
        ctx = None
        kept = None
        if ids is not None:
            kept = clean_tracestate(state)
            remote = SpanContext(
                trace_id=int(ids[0], 16),
                span_id=int(ids[1], 16),
                is_remote=True,
                trace_flags=TraceFlags(int(ids[2], 16)),
                trace_state=TraceState.from_header([kept]) if kept else None,
            )
            ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        start_ns = wall_ns(t0)
        span = self._tracer.start_span(
            "disaggd.request",
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"http.route": route},
            start_time=start_ns,
        )
        return _OtlpTrace(self._tracer, span, kept, start_ns)

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter's thread."""
        self._provider.shutdown()
