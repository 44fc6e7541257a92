"""One request's record, and the one place it is accounted: metrics and its log line.

Every request, whatever became of it, ends in `Accounting.done`: one
``disaggd_requests_total`` sample, its latencies, and one ``request_done`` line.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Literal

from disaggd.observe.logs import get_logger
from disaggd.observe.metrics import Metrics
from disaggd.observe.tracing import UNSTARTED, RequestTrace
from disaggd.proxy.kvcheck import VERDICTS, kv_verdict
from disaggd.proxy.prefix import RouteKey
from disaggd.proxy.request import INFERENCE_ROUTES
from disaggd.proxy.settings import Settings
from disaggd.proxy.upstream import Upstream

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Decision = Literal["disaggregated", "decode_only", "fallback", "prefill_only", "none"]

log = get_logger("disaggd.proxy")


class GapCounts:
    """One stream's inter-chunk gaps, counted per histogram bucket as they come.

    ``disaggd_inter_token_latency_seconds`` keeps its meaning (every gap between
    two token chunks sent is one observation), but the histogram is fed once per
    request (`Accounting.done`): its ``observe`` takes a lock and walks the
    buckets, about 1 µs a chunk, where a bisect and an increment cost a sixth.
    A scrape sees a stream's gaps when the stream ends.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds  # upper bounds, +Inf last (as the histogram's)
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def add(self, gap: float) -> None:
        """Count one gap (seconds): the first bucket whose bound is >= it, as ``observe``."""
        self.counts[bisect.bisect_left(self.bounds, gap)] += 1
        self.total += gap


def _child(cache: dict[tuple[str, ...], Any], metric: Any, *labels: str) -> Any:
    """`metric`'s child for `labels`, from `cache` (``labels()`` locks and validates)."""
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


class Record:
    """One client request: its inputs, and what it has become so far (for the
    reply, the metrics and its log line). Times are `time.monotonic` seconds."""

    __slots__ = (
        "auth",
        "base_rid",
        "client_rid",
        "deadline",
        "decision",
        "decode",
        "disconnected",
        "error",
        "gaps",
        "key",
        "kv",
        "last_sent",
        "prefill",
        "prefill_ms",
        "prefiller",
        "prompt_tokens",
        "raw",
        "reason",
        "req",
        "retries",
        "rid",
        "route",
        "s",
        "send",
        "sending_last",
        "started",
        "status",
        "stream",
        "t0",
        "trace",
        "ttft",
    )

    def __init__(self, route: str, t0: float, s: Settings, send: Send) -> None:
        self.route = route
        self.send = send  # the ASGI send of the client's connection
        self.t0 = t0
        self.s = s  # one request, one settings snapshot: a reload does not change it midway
        self.deadline = t0 + s.proxy.request_timeout
        self.req: dict[str, Any] = {}
        self.raw = b""
        self.auth: str | None = None  # forwarded upstream (forward_authorization only)
        self.client_rid: str | None = None
        self.base_rid = ""  # the client's id, or a fresh one: what every attempt's id starts from
        self.rid = ""  # the id of the current attempt (X-Request-Id of the legs and reply)
        self.decision: Decision = "none"
        self.prefill: str | None = None
        self.decode: str | None = None
        self.status = 0
        self.started = False  # response headers sent
        self.sending_last = False  # the last body message is being sent: a disconnect is moot
        self.disconnected = False
        self.stream = False
        self.ttft: float | None = None
        self.last_sent = 0.0
        self.gaps: GapCounts | None = None  # the stream's inter-chunk gaps, once it streams
        self.retries = 0
        self.prefill_ms: float | None = None
        self.prompt_tokens: int | None = None
        self.error: str | None = None
        self.kv: str | None = None
        self.key: RouteKey | None = None  # prefix and session routing (disaggd.proxy.prefix)
        self.reason: str | None = None  # why `decision` was taken (disagg_decision_total)
        # The prefill llm-d's x-prefiller-host-port names (disaggd.proxy.prefiller), or None.
        self.prefiller: Upstream | None = None
        self.trace: RequestTrace = UNSTARTED  # started by the gate (disaggd.observe.tracing)

    def identify(self, client_rid: str | None) -> None:
        """Take the client's ``X-Request-Id`` as the request's id, or make a fresh one."""
        self.client_rid = client_rid
        self.base_rid = self.rid = client_rid or os.urandom(16).hex()

    def remaining(self) -> float:
        """Seconds left before the request's deadline (<= 0: passed)."""
        return self.deadline - time.monotonic()


class Accounting:
    """The proxy's per-request metrics and log lines.

    Metric children are cached by label values: `labels()` takes a lock and
    validates on every call; a dict hit is an order of magnitude cheaper on the
    hot path.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._e2e: dict[tuple[str, str], Any] = {}
        self._ttft: dict[tuple[str, str], Any] = {}
        self.itl = {r: metrics.itl.labels(r) for r in INFERENCE_ROUTES}
        self._itl_bounds = {r: list(h._upper_bounds) for r, h in self.itl.items()}
        self._kv = {v: metrics.kv_check.labels(v) for v in VERDICTS}
        self._decided: dict[tuple[str, ...], Any] = {}
        self._routed: dict[tuple[str, ...], Any] = {}

    def gaps(self, route: str) -> GapCounts:
        """A fresh gap counter for one stream on `route` (fed to the histogram by `done`)."""
        return GapCounts(self._itl_bounds[route])

    def _flush_gaps(self, rec: Record) -> None:
        # prometheus_client's own fields (stable since 0.4): one locked add per bucket
        # used instead of one observe per chunk.
        gaps, hist = rec.gaps, self.itl[rec.route]
        if gaps is None or not any(gaps.counts):
            return
        for bucket, n in zip(hist._buckets, gaps.counts, strict=True):
            if n:
                bucket.inc(n)
        hist._sum.inc(gaps.total)


    def upstream_error(self, instance: str, kind: str) -> None:
        """Count one failed upstream leg (``disaggd_upstream_errors_total{instance,kind}``)."""
        self.metrics.upstream_errors.labels(instance, kind).inc()

    def retry(self, rec: Record, role: str) -> None:
        """Count a leg sent again to another instance."""
        rec.retries += 1
        self.metrics.retries.labels(role).inc()

    def prefill_leg(self, rec: Record, instance: str, seconds: float) -> None:
        """Record one prefill leg's duration (successful or not)."""
        rec.prefill_ms = seconds * 1000.0
        self.metrics.prefill_latency.labels(instance).observe(seconds)

    def usage(self, rec: Record, usage: Mapping[str, Any] | None) -> None:
        """Note a ``usage`` the request's answer carried; on a disaggregated request
        with the KV check on, judge whether the decode loaded the KV (`kv_verdict`)."""
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            rec.prompt_tokens = usage["prompt_tokens"]
        if rec.decision != "disaggregated" or not rec.s.kv_check:
            return
        block = rec.s.block_size
        verdict, prompt_tokens, cached = kv_verdict(usage, block)
        rec.kv = verdict
        self._kv[verdict].inc()
        self.metrics.kv_by_decode.count(rec.decode, verdict)
        if verdict == "recomputed":
            log.warning(
                "kv_recomputed",
                request_id=rec.rid,
                prefill=rec.prefill,
                decode=rec.decode,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached,
                block_size=block,
            )

    def _count_routing(self, rec: Record) -> None:
        """``disaggd_disagg_decision_total`` and ``disaggd_routed_total`` of a request."""
        if rec.reason is not None:
            kind = "prefill-decode" if rec.reason in ("uncached", "header") else "decode-only"
            _child(self._decided, self.metrics.disagg_decision, kind, rec.reason).inc()
        if rec.key is not None:
            for role, why in rec.key.why.items():
                _child(self._routed, self.metrics.routed, role.value, why).inc()

    def done(self, rec: Record) -> None:
        """Metrics and the one ``request_done`` line of a finished request."""
        e2e = time.monotonic() - rec.t0
        self._flush_gaps(rec)
        if rec.reason is not None or rec.key is not None:
            self._count_routing(rec)
        decision = rec.decision
        key = (rec.route, rec.status, decision)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(
                rec.route, str(rec.status), decision
            )
        child.inc()
        k2 = (rec.route, decision)
        hist = self._e2e.get(k2)
        if hist is None:
            hist = self._e2e[k2] = self.metrics.e2e.labels(rec.route, decision)
        hist.observe(e2e)
        if rec.ttft is not None:
            hist = self._ttft.get(k2)
            if hist is None:
                hist = self._ttft[k2] = self.metrics.ttft.labels(rec.route, decision)
            hist.observe(rec.ttft)
        log.info(
            "request_done",
            request_id=rec.rid,
            client_request_id=rec.client_rid,
            route=rec.route,
            decision=decision,
            prefill=rec.prefill,
            decode=rec.decode,
            status=rec.status,
            stream=rec.stream,
            ttft_ms=None if rec.ttft is None else round(rec.ttft * 1000.0, 2),
            e2e_ms=round(e2e * 1000.0, 2),
            prefill_ms=None if rec.prefill_ms is None else round(rec.prefill_ms, 2),
            prompt_tokens=rec.prompt_tokens,
            retries=rec.retries,
            kv=rec.kv,
            error=rec.error,
        )
