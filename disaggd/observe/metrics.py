"""The daemon's Prometheus metrics, in one registry of its own.

One `CollectorRegistry` per `Metrics` (not prometheus_client's global one), so
that tests and several daemons in one process never share counters. `GET
/metrics` on the proxy serves `Metrics.render()`.

Every name starts with ``disaggd_``. Latencies are in seconds, as the client of
the proxy sees them (TTFT counts the prefill leg; inter-token latency is the
gap between stream chunks forwarded to the client).

The proxy's metrics live here; the supervisor side adds its own (instance
state, restarts) as attributes next to them, in `Metrics.__init__`, under the
"supervisor" comment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets (seconds) modelled on vLLM's own histograms (vllm/v1/metrics/loggers.py),
# with finer steps at the low end where a proxy's overhead shows.
#: Event-loop lag: a healthy loop stays under a millisecond; a probe timeout is seconds.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
    15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip

#: (instance, role, ready, outstanding) for each upstream, read at scrape time.
UpstreamSource = Callable[[], Iterable[tuple[str, str, bool, int]]]


class VerdictTally:
    """KV check verdicts per decode instance, for `disaggd status` (not a Prometheus series:
    a label per instance and verdict would outlive instances that a reload removes)."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def count(self, instance: str | None, verdict: str) -> None:
        """One more `verdict` for the decode `instance` (None: not counted)."""
        if instance is None:
            return
        per = self._counts.get(instance)
        if per is None:
            per = self._counts[instance] = {}
        per[verdict] = per.get(verdict, 0) + 1

    def counts(self) -> dict[str, dict[str, int]]:
        """Instance name → verdict → count (a copy)."""
        return {name: dict(per) for name, per in self._counts.items()}


class _UpstreamCollector(Collector):
    """Per-instance gauges read from the router when scraped: zero cost per request."""

    def __init__(self) -> None:
        self.source: UpstreamSource | None = None

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "disaggd_upstream_requests_in_flight",
            "Requests the proxy has in flight on each instance.",
            labels=["instance", "role"],
        )
        ready = GaugeMetricFamily(
            "disaggd_upstream_ready",
            "1 while the proxy routes to the instance (ready and not draining).",
            labels=["instance", "role"],
        )
        if self.source is not None:
            for name, role, is_ready, outstanding in self.source():
                inflight.add_metric([name, role], outstanding)
                ready.add_metric([name, role], 1.0 if is_ready else 0.0)
        yield inflight
        yield ready

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps registration free of the source.
        return iter(())


class Metrics:
    """All metrics of one daemon.

    Attributes:
        registry: the registry `render` exposes.
        requests: ``disaggd_requests_total{route,status,decision}``; ``status``
            is the HTTP status the client got (499: the client went away first).
        ttft: ``disaggd_time_to_first_token_seconds{route,decision}``, streaming
            requests: request received to first stream chunk sent.
        itl: ``disaggd_inter_token_latency_seconds{route}``, gaps between
            stream chunks sent to the client (vLLM writes one SSE event per chunk).
        e2e: ``disaggd_e2e_request_latency_seconds{route,decision}``, request
            received to last byte sent.
        prefill_latency: ``disaggd_prefill_latency_seconds{instance}``, one
            prefill leg (successful or not).
        upstream_errors: ``disaggd_upstream_errors_total{instance,kind}``; kinds:
            ``connect``, ``timeout``, ``disconnect``, ``http_5xx``, ``http_4xx``,
            ``bad_response``, ``stream_cut`` (`disaggd.proxy.failures.TABLE`).
        retries: ``disaggd_retries_total{role}``, legs sent again to another instance.
        disagg_decision: ``disaggd_disagg_decision_total{decision_type,reason}``, the
            decision taken before the legs, named as llm-d's
            ``llm_d_epp_disagg_decision_total`` (``prefill-decode``, ``decode-only``);
            reasons: ``uncached`` (disaggregated), ``cached`` (the decode holds most of
            the prompt), ``short`` (the length rule), ``batch``.
        routed: ``disaggd_routed_total{role,why}``, instances chosen by prefix or
            session routing (`disaggd.proxy.prefix`): ``session``, ``cache``, ``load``.
        kv_check: ``disaggd_kv_check_total{verdict}``, see `disaggd.proxy.kvcheck.kv_verdict`.
        kv_by_decode: the same verdicts counted per decode instance (`VerdictTally`).
        inflight: ``disaggd_requests_in_flight``, client requests being served.
        loop_lag / loop_lag_hist: ``disaggd_event_loop_lag_seconds`` (largest lag of
            the last window) and its samples; see `disaggd.observe.looplag`.
        upstream_in_flight / upstream_ready (``disaggd_upstream_requests_in_flight``,
            ``disaggd_upstream_ready{instance,role}``): read from the router at scrape
            time, once `bind_upstreams` gave a source.
    """

    def __init__(self) -> None:
        # `*_created` series double every counter's output and nothing here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_metrics(self.registry)
        self._routing_metrics(self.registry)
        self.kv_by_decode = VerdictTally()
        self._daemon_metrics(self.registry)
        self._states: dict[str, str] = {}

    def _request_metrics(self, r: CollectorRegistry) -> None:
        """The proxy's side: requests, latencies, upstream legs, the KV check."""
        self.requests = Counter(
            "disaggd_requests",
            "Client requests by route, HTTP status and routing decision.",
            ["route", "status", "decision"],
            registry=r,
        )
        self.ttft = Histogram(
            "disaggd_time_to_first_token_seconds",
            "Streaming requests: time from request received to first chunk sent (s).",
            ["route", "decision"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "disaggd_inter_token_latency_seconds",
            "Gap between stream chunks sent to the client (s).",
            ["route"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "disaggd_e2e_request_latency_seconds",
            "Time from request received to last byte sent (s).",
            ["route", "decision"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prefill_latency = Histogram(
            "disaggd_prefill_latency_seconds",
            "Duration of one prefill leg (s).",
            ["instance"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "disaggd_upstream_errors",
            "Failed upstream legs by instance and kind.",
            ["instance", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "disaggd_retries",
            "Legs sent again to another instance after a failure, by role.",
            ["role"],
            registry=r,
        )
        self.kv_check = Counter(
            "disaggd_kv_check",
            "Disaggregated requests by whether the decode loaded the prompt's KV.",
            ["verdict"],
            registry=r,
        )
        self.inflight = Gauge(
            "disaggd_requests_in_flight",
            "Client requests the proxy is serving now.",
            registry=r,
        )
        self._upstreams = _UpstreamCollector()
        r.register(self._upstreams)

    def _routing_metrics(self, r: CollectorRegistry) -> None:
        """How requests were routed: the disaggregation decision, prefix and session choices."""
        self.disagg_decision = Counter(
            "disaggd_disagg_decision",
            "Disaggregation decisions before the legs (decision_type: prefill-decode, "
            "decode-only, as llm-d), by reason (uncached, cached, short, batch).",
            ["decision_type", "reason"],
            registry=r,
        )
        self.routed = Counter(
            "disaggd_routed",
            "Instances chosen by prefix or session routing, by role and why "
            "(session, cache, load).",
            ["role", "why"],
            registry=r,
        )

    def _daemon_metrics(self, r: CollectorRegistry) -> None:
        """The supervisor's side and the daemon's own event loop."""
        self.instance_state = Gauge(
            "disaggd_instance_state",
            "1 for the process state each instance is in, 0 for the others.",
            ["instance", "role", "state"],
            registry=r,
        )
        # -- the daemon's own event loop ----------------------------------------------------
        self.loop_lag = Gauge(
            "disaggd_event_loop_lag_seconds",
            "How late the event loop woke a timer, largest over the last sampling window (s). "
            "Supervision shares this loop: probes and exit handling wait this long too.",
            registry=r,
        )
        self.loop_lag_hist = Histogram(
            "disaggd_event_loop_lag_sample_seconds",
            "Every sampled event-loop lag (s).",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def observe_instance(self, name: str, role: str, state: str) -> None:
        """Record that instance `name` entered process `state` (disaggd.supervise.states names).

        Every state an instance has been in stays exported (at 0), so a query
        for ``state="FATAL"`` finds 0 rather than nothing.
        """
        previous = self._states.get(name)
        if previous == state:
            return
        if previous is not None:
            self.instance_state.labels(name, role, previous).set(0)
        self.instance_state.labels(name, role, state).set(1)
        self._states[name] = state

    def bind_upstreams(self, source: UpstreamSource) -> None:
        """Read per-instance in-flight counts and readiness from `source` when scraped."""
        self._upstreams.source = source

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return bytes(generate_latest(self.registry))

    #: Content-Type of `render`'s output.
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
