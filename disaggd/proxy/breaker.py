"""Passive health: a circuit breaker per instance, fed by what its requests saw.

A pure state machine (no clock of its own, no I/O: the caller passes ``now``,
`time.monotonic` seconds), after SGLang's router and Envoy's outlier detection:

* CLOSED: requests flow; ``threshold`` consecutive failures (connect errors,
  resets, 5xx, timeouts, a stall — never a 4xx, which is the client's fault)
  open it;
* OPEN: no request is routed to the instance until ``cooldown`` seconds passed;
* HALF_OPEN: one trial request goes through; its success closes the breaker,
  its failure opens it again. A trial whose outcome never comes (its client
  went away) is given up after another ``cooldown`` and a new one is let through.

The router asks `can_pass` while picking and calls `trial_started` for the one it
picked; legs report `success` and `failure`.
"""

from __future__ import annotations

from enum import Enum


class BreakerState(str, Enum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """One instance's breaker.

    Args:
        threshold: consecutive failures that open it; 0: never opens.
        cooldown: seconds open before a trial request.

    Attributes:
        state: the current `BreakerState`.
        failures: consecutive failures so far (reset by a success).
        reason: what opened it last (``connect``, ``http_5xx``, ``stall``, ...).
    """

    __slots__ = ("_since", "cooldown", "failures", "reason", "state", "threshold")

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.reason = ""
        self._since = 0.0  # when it opened, or when the trial started

    def can_pass(self, now: float) -> bool:
        """Whether a request may be routed to the instance now (no state change)."""
        if self.state is BreakerState.CLOSED:
            return True
        return now - self._since >= self.cooldown

    def trial_started(self, now: float) -> None:
        """A request was routed to an open instance whose cool-down passed: the trial."""
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.HALF_OPEN
            self._since = now

    def success(self) -> BreakerState | None:
        """A request succeeded; returns the new state when it changed."""
        self.failures = 0
        if self.state is BreakerState.CLOSED:
            return None
        self.state = BreakerState.CLOSED
        return self.state

    def failure(self, now: float, reason: str) -> BreakerState | None:
        """A request failed for `reason`; returns the new state when it changed."""
        self.failures += 1
        if self.threshold <= 0:
            return None
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.threshold
        ):
            return self.trip(now, reason)
        return None

    def trip(self, now: float, reason: str) -> BreakerState | None:
        """Open now (a stall is judged at once, not counted); returns OPEN if it changed."""
        if self.threshold <= 0:
            return None
        changed = self.state is not BreakerState.OPEN
        self.state = BreakerState.OPEN
        self.reason = reason
        self._since = now
        return self.state if changed else None
