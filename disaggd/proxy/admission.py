"""Admission control: which requests may start now, which wait, which are refused.

The contract (README, "What the proxy does"):

* an instance takes at most ``[proxy] prefill_max_inflight`` /
  ``decode_max_inflight`` requests of this proxy at once (0: no limit);
* a request that finds every eligible instance of a role at its limit waits
  for a slot, FIFO, at most ``queue_timeout`` seconds (and never past its own
  deadline), with at most ``queue_size`` requests waiting per role;
* past either bound: **429** ``rate_limit_error`` with ``Retry-After`` (busy:
  try again soon);
* nothing of the role is ready, or everything is draining or has its breaker
  open: **503** ``service_unavailable_error`` with ``Retry-After`` (no endpoint).

Counted in ``disaggd_admission_rejected_total{role,reason}`` (reason:
``queue_full``, ``queue_timeout``, ``unavailable``) and
``disaggd_admission_queue_depth{role}``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from disaggd.observe.metrics import Metrics
from disaggd.proxy.errors import HTTPError, unavailable
from disaggd.proxy.record import Record
from disaggd.proxy.router import Router
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role


def busy(message: str) -> HTTPError:
    """429 with ``Retry-After``: every instance is at its limit; try again soon."""
    return HTTPError(429, message, "rate_limit_error", retry_after=True)


class _Breakers:
    """``disaggd_breaker_state{instance,state}``: 1 for each instance's breaker state,
    read from the router at scrape time."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "disaggd_breaker_state",
            "1 for the state (closed, open, half_open) of each instance's breaker.",
            labels=["instance", "state"],
        )
        for up in self._router.upstreams():
            fam.add_metric([up.name, up.breaker.state.value], 1.0)
        yield fam

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Admission:
    """Gives requests an upstream of a role, waiting for a slot when all are full."""

    def __init__(self, router: Router, metrics: Metrics) -> None:
        self._router = router
        self._rejected = Counter(
            "disaggd_admission_rejected",
            "Requests refused at admission, by role and reason "
            "(queue_full, queue_timeout: 429; unavailable: 503).",
            ["role", "reason"],
            registry=metrics.registry,
        )
        depth = Gauge(
            "disaggd_admission_queue_depth",
            "Requests waiting for an in-flight slot, by role.",
            ["role"],
            registry=metrics.registry,
        )
        metrics.registry.register(_Breakers(router))
        for role in Role:
            depth.labels(role.value).set_function(functools.partial(router.queued, role))

    def _reject(self, role: Role, reason: str, err: HTTPError) -> HTTPError:
        self._rejected.labels(role.value, reason).inc()
        return err

    async def take(
        self, rec: Record, role: Role, exclude: Collection[str] = (), *, required: bool = True
    ) -> Upstream | None:
        """The upstream of `role` that gets the request, waiting for a slot if all are full.

        The caller must hold it (`Router.hold`) before its next await.

        Args:
            rec: the request (its settings and deadline).
            role: prefill or decode.
            exclude: instances already tried.
            required: None is no answer (the decode): raise 503 instead.

        Returns:
            The upstream, or None when none is eligible and `required` is False.

        Raises:
            HTTPError: 429 (queue full, or no slot within ``queue_timeout``),
                503 (nothing routable and `required`).
        """
        router = self._router
        up = router.pick(role, exclude, rec.key)
        if up is not None:
            return up
        p = rec.s.proxy
        if router.full(role, exclude) and router.queued(role) >= p.queue_size:
            raise self._reject(
                role, "queue_full", busy(f"every {role.value} instance is busy; try again later")
            )
        end = time.monotonic() + min(p.queue_timeout, rec.remaining())
        while router.full(role, exclude):
            left = end - time.monotonic()
            if left <= 0 or not await router.wait_slot(role, left):
                raise self._reject(
                    role,
                    "queue_timeout",
                    busy(f"no {role.value} instance was free in time; try again later"),
                )
            up = router.pick(role, exclude, rec.key)
            if up is not None:
                return up
        if not required:
            return None
        why = self._router.why_none(role)
        raise self._reject(
            role, "unavailable", unavailable(f"no {role.value} instance is ready ({why})")
        )
