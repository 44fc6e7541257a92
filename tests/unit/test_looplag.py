"""Event-loop lag: the window maximum, clamping, and the exported series."""

from __future__ import annotations

import contextlib

from disaggd.observe.looplag import LoopLag
from disaggd.observe.metrics import Metrics


def gauge(metrics: Metrics) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith("disaggd_event_loop_lag_seconds "):
            return float(line.split()[1])
    raise AssertionError("disaggd_event_loop_lag_seconds not exported")


def test_gauge_is_the_worst_sample_of_the_window() -> None:
    metrics = Metrics()
    lag = LoopLag(metrics, window=3)
    for sample in (0.001, 0.2, 0.003):
        lag.record(sample)
    assert lag.worst == 0.2 and gauge(metrics) == 0.2
    lag.record(0.004)  # 0.2 leaves the window
    lag.record(-0.5)  # a timer that fired early counts as on time
    assert lag.worst == 0.004 and gauge(metrics) == 0.004
    text = metrics.render().decode()
    assert "disaggd_event_loop_lag_sample_seconds_count 5.0" in text


class _Done(Exception):
    pass


async def test_run_measures_how_late_the_loop_woke() -> None:
    # A fake clock: each sleep of 0.001 s "took" 0.001 + 0.05 s; then the clock ends the run.
    ticks = [0.0, 0.051, 1.0, 1.051]

    def clock() -> float:
        if not ticks:
            raise _Done
        return ticks.pop(0)

    metrics = Metrics()
    lag = LoopLag(metrics)
    with contextlib.suppress(_Done):
        await lag.run(interval=0.001, clock=clock)
    assert round(lag.worst, 6) == 0.05 and round(gauge(metrics), 6) == 0.05
    assert "disaggd_event_loop_lag_sample_seconds_count 2.0" in metrics.render().decode()
