"""Passive health: what the legs report about each instance, and when it trips a breaker.

The active probes (`disaggd.supervise.health`) ask ``GET /health`` every few seconds; this
watches the requests themselves. A leg reports `sent` and `answered` (so a stall — legs
waiting on an instance that answers nothing for ``stall_timeout`` s — is seen at once,
by one timer per instance) and `succeeded` or `failed` (consecutive connect errors,
resets, 5xx and timeouts open the instance's `Breaker`; a 4xx never counts). Legs still
waiting on a stalled instance are cancelled and recorded in `abandoned`, so that they
can tell that cancel from their client leaving and try another instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from disaggd.observe.logs import get_logger
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role

log = get_logger("disaggd.proxy")

#: Legs that must be waiting on an instance, none answered for ``stall_timeout``, to call
#: it stalled (a lone long prefill is not).
STALL_MIN_WAITING = 2


class PassiveHealth:
    """The breakers' inputs for every upstream of one router.

    Args:
        wake: called with a role when one of its instances can take requests again.

    Attributes:
        stall: ``[proxy] stall_timeout`` in seconds; 0 turns the stall check off.
        abandoned: leg tasks cancelled because their upstream stalled.
    """

    def __init__(self, wake: Callable[[Role], None]) -> None:
        self._wake = wake
        self.stall = 0.0
        self.abandoned: set[asyncio.Task[Any]] = set()

    def check_stall(self, up: Upstream, now: float) -> None:
        """Trip `up` at once if legs have waited on it past ``stall`` (a pick looks first)."""
        if up.waiting >= STALL_MIN_WAITING and self.stall and now - up.progress_at > self.stall:
            self._trip(up, now, "stall")

    def sent(self, up: Upstream) -> None:
        """A leg was sent to `up` and waits for its answer (the current task)."""
        if up.waiting == 0:
            up.progress_at = time.monotonic()
        up.waiting += 1
        if self.stall and up._stall_timer is None:
            # One timer per instance and stall period, not one per leg: it re-arms itself.
            loop = asyncio.get_running_loop()
            up._stall_timer = loop.call_later(self.stall, self._check_stall, up)
        task = asyncio.current_task()
        if task is not None:
            up._waiters.add(task)

    def answered(self, up: Upstream) -> None:
        """`up` answered a leg that `sent` counted (or the leg gave up on it)."""
        up.waiting = max(0, up.waiting - 1)
        up.progress_at = time.monotonic()
        task = asyncio.current_task()
        if task is not None:
            up._waiters.discard(task)

    def _check_stall(self, up: Upstream) -> None:
        """The stall timer fired: open `up`'s breaker if it answered nothing for
        ``stall_timeout`` while owing answers; else look again when that could be."""
        up._stall_timer = None
        if not up.waiting or not self.stall:
            return
        now = time.monotonic()
        due = up.progress_at + self.stall
        # Two legs at least: one long prefill alone answers nothing for a while and is
        # not a stall; an engine that batches answers its other requests meanwhile.
        if now >= due and up.waiting >= STALL_MIN_WAITING:
            self._trip(up, now, "stall")
            due = now + self.stall
        if up.waiting:
            loop = asyncio.get_running_loop()
            up._stall_timer = loop.call_later(max(due - now, 0.01), self._check_stall, up)

    def succeeded(self, up: Upstream) -> None:
        """A leg on `up` succeeded: its breaker closes."""
        if up.breaker.success() is not None:
            up.tripped = False
            log.info("breaker_closed", instance=up.name)
            self._wake(up.role)

    def failed(self, up: Upstream, kind: str) -> None:
        """A leg on `up` failed for `kind` (never a 4xx)."""
        if up.breaker.failure(time.monotonic(), kind) is not None:
            self._opened(up)

    def _trip(self, up: Upstream, now: float, reason: str) -> None:
        if up.breaker.threshold <= 0:
            return  # the breaker is off: a stall is left to the timeouts
        if up.breaker.trip(now, reason) is not None:
            self._opened(up)
        up.progress_at = now  # judged: the next stall needs another full period
        # Legs still waiting on it go elsewhere (`abandoned` tells them why they were cancelled).
        for task in list(up._waiters):
            self.abandoned.add(task)
            task.cancel()
        up._waiters.clear()

    def _opened(self, up: Upstream) -> None:
        up.tripped = True
        b = up.breaker
        log.warning(
            "breaker_opened",
            instance=up.name,
            reason=b.reason,
            failures=b.failures,
            cooldown=b.cooldown,
        )
