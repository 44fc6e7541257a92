"""An instance's recent output: a bounded ring of lines, and followers of new lines.

The ring keeps the last ``[supervisor].output_lines`` lines of a child's stdout
and stderr, each with its stream and wall-clock time, across restarts of the
instance (a crash report wants the previous run's last words). A `Follower`
(``disaggd logs NAME -f``) gets every new line through a bounded queue: when a
reader falls behind, further lines are counted as dropped instead of queued,
so a slow reader costs the daemon one integer increment per line, never a wait
and never unbounded memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: Lines a follower may have queued before further ones are dropped (and counted).
FOLLOW_QUEUE = 1000


@dataclass(frozen=True)
class OutputLine:
    """One line of child output.

    Attributes:
        seq: 1, 2, ... per instance, across restarts (a gap means lines left the ring).
        time: wall-clock seconds since the epoch when the daemon read it.
        stream: ``stdout`` or ``stderr``.
        text: the line, without its newline.
    """

    seq: int
    time: float
    stream: str
    text: str

    def as_dict(self) -> dict[str, object]:
        """The JSON shape of the control protocol: ``{"seq", "time", "stream", "line"}``."""
        return {"seq": self.seq, "time": self.time, "stream": self.stream, "line": self.text}


@dataclass(frozen=True)
class Batch:
    """What a follower reads at once.

    Attributes:
        lines: new lines, oldest first.
        dropped: lines lost since the previous batch because the reader was behind.
        ended: why no more lines will come (instance removed, daemon stopping), or None.
    """

    lines: list[OutputLine]
    dropped: int
    ended: str | None


class Follower:
    """A reader of new lines: a bounded queue; what does not fit is counted, not kept."""

    def __init__(self, limit: int = FOLLOW_QUEUE) -> None:
        self._limit = limit
        self._queue: deque[OutputLine] = deque()
        self._dropped = 0
        self._ended: str | None = None
        self._wake = asyncio.Event()

    def offer(self, line: OutputLine) -> None:
        """Queue `line`, or count it as dropped when the queue is full (never waits)."""
        if len(self._queue) >= self._limit:
            self._dropped += 1
        else:
            self._queue.append(line)
        self._wake.set()

    def end(self, reason: str) -> None:
        """No more lines will come; the reader gets what is queued, then `reason`."""
        if self._ended is None:
            self._ended = reason
        self._wake.set()

    async def next(self) -> Batch:
        """Wait until there is something to read; then take all of it."""
        while not (self._queue or self._dropped or self._ended):
            self._wake.clear()
            await self._wake.wait()
        lines, self._queue = list(self._queue), deque()
        dropped, self._dropped = self._dropped, 0
        return Batch(lines, dropped, self._ended)


class OutputRing:
    """The last `maxlen` lines of one instance, and its followers.

    Args:
        maxlen: lines kept (``[supervisor].output_lines``).
        wallclock: seconds since the epoch, for each line's time (a display time,
            not a timeout: the wall clock is what a reader compares with).
    """

    def __init__(self, maxlen: int, wallclock: Callable[[], float] = time.time) -> None:
        self._lines: deque[OutputLine] = deque(maxlen=maxlen)
        self._followers: set[Follower] = set()
        self._wallclock = wallclock
        self._seq = 0

    def append(self, stream: str, text: str) -> None:
        """Keep one line of `stream` and hand it to every follower."""
        self._seq += 1
        line = OutputLine(self._seq, self._wallclock(), stream, text)
        self._lines.append(line)
        for follower in self._followers:
            follower.offer(line)

    def tail(self, n: int) -> list[OutputLine]:
        """The last `n` lines kept (fewer when fewer are kept), oldest first."""
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def texts(self, n: int | None = None) -> tuple[str, ...]:
        """The text of the last `n` lines (default: all kept), for reports and status."""
        lines = self._lines if n is None else self.tail(n)
        return tuple(line.text for line in lines)

    def follow(self, limit: int = FOLLOW_QUEUE) -> Follower:
        """A new follower of every line appended from now on; `unfollow` it when done."""
        follower = Follower(limit)
        self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        """Stop handing lines to `follower` (idempotent)."""
        self._followers.discard(follower)

    def end(self, reason: str) -> None:
        """End every follower with `reason` (the instance is removed)."""
        for follower in self._followers:
            follower.end(reason)
        self._followers.clear()
