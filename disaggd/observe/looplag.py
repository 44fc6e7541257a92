"""Event-loop lag: how late the daemon's one loop runs what is due.

The proxy, the supervisor's probes and child-exit handling share one asyncio
loop, so a loop kept busy by request forwarding delays supervision. The monitor
sleeps `interval` seconds again and again and records how much later than asked
it woke up (the same measure as Node's ``monitorEventLoopDelay`` and aiomonitor).
`disaggd_event_loop_lag_seconds` is the largest lag of the last `window` samples.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from disaggd.observe.metrics import Metrics

#: Seconds between samples: often enough to see a stall, cheap enough to ignore.
INTERVAL = 0.25
#: Samples the gauge's maximum covers (INTERVAL * WINDOW seconds).
WINDOW = 40


class LoopLag:
    """Keeps the lag samples; `record` is fed by `run` (or by a test with its own clock)."""

    def __init__(self, metrics: Metrics, window: int = WINDOW) -> None:
        self._metrics = metrics
        self._samples: deque[float] = deque(maxlen=window)

    @property
    def worst(self) -> float:
        """Largest lag of the window, seconds (0 before any sample)."""
        return max(self._samples, default=0.0)

    def record(self, lag: float) -> None:
        """Add one sample (seconds late; negative values count as 0)."""
        lag = max(0.0, lag)
        self._samples.append(lag)
        self._metrics.loop_lag_hist.observe(lag)
        self._metrics.loop_lag.set(self.worst)

    async def run(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Sample forever (cancel to stop)."""
        while True:
            start = clock()
            await asyncio.sleep(interval)
            self.record(clock() - start - interval)
