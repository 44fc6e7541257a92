"""The per-instance breaker as a pure state machine, on a fake clock."""

from __future__ import annotations

from disaggd.proxy.breaker import Breaker, BreakerState


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b = Breaker(threshold=3, cooldown=5.0)
    assert b.failure(0.0, "http_5xx") is None
    assert b.failure(0.1, "http_5xx") is None
    assert b.success() is None  # a success in between resets the count
    assert b.failure(0.2, "connect") is None
    assert b.failure(0.3, "connect") is None
    assert b.failure(0.4, "connect") is BreakerState.OPEN
    assert b.reason == "connect"
    assert not b.can_pass(0.5) and not b.can_pass(5.3)


def test_half_open_lets_one_trial_through_after_cooldown() -> None:
    b = Breaker(threshold=1, cooldown=5.0)
    b.failure(10.0, "disconnect")
    assert not b.can_pass(14.9)
    assert b.can_pass(15.0)
    b.trial_started(15.0)
    assert b.state is BreakerState.HALF_OPEN
    assert not b.can_pass(15.1)  # only one trial at a time
    assert b.success() is BreakerState.CLOSED
    assert b.can_pass(15.2)


def test_failed_trial_reopens_and_lost_trial_is_replaced() -> None:
    b = Breaker(threshold=2, cooldown=1.0)
    b.failure(0.0, "x")
    b.failure(0.0, "x")
    b.trial_started(1.0)
    assert b.failure(1.5, "http_5xx") is BreakerState.OPEN  # one failure is enough now
    assert not b.can_pass(2.4) and b.can_pass(2.5)
    b.trial_started(2.5)
    # The trial's outcome never came (its client left): another one after a cool-down.
    assert not b.can_pass(3.0) and b.can_pass(3.5)


def test_stall_trips_at_once_and_zero_threshold_disables() -> None:
    b = Breaker(threshold=5, cooldown=1.0)
    assert b.trip(0.0, "stall") is BreakerState.OPEN
    assert b.trip(0.1, "stall") is None  # already open
    off = Breaker(threshold=0, cooldown=1.0)
    for i in range(100):
        assert off.failure(float(i), "connect") is None
    assert off.trip(0.0, "stall") is None and off.can_pass(0.0)
