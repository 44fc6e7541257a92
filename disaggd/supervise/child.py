"""One child process group: spawn, output pump, polite-then-forceful stop.

A `Child` is one start of a spawned instance: the leader the OS seam spawned in
its own session, the tasks that read its stdout and stderr line by line into
the logs, and `terminate` — SIGTERM (and SIGCONT) to the whole group, the grace
period, SIGKILL, and a wait until no member of the group is left, orphans
reparented to us included. Nothing here decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from disaggd.observe.logs import child_level
from disaggd.supervise.osapi import ChildProcess, OsApi
from disaggd.topology.spec import InstanceSpec

#: After the SIGKILL of a group, how long to wait for it to disappear, seconds.
KILL_WAIT = 5.0
#: After a group is gone, how long its output readers may take to drain, seconds.
DRAIN_WAIT = 1.0

#: Starts a task owned by the supervisor's task group: ``start_task(coro, name)``.
TaskStarter = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exited with status N (unexpected)``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode} (unexpected)"


async def read_lines(
    reader: asyncio.StreamReader, on_line: Callable[[bytes], None], *, yield_every: int = 64
) -> None:
    """Call `on_line` with every line of `reader` (without its newline) until EOF.

    A line longer than the reader's limit is delivered in pieces instead of
    raising. Yields to the loop every `yield_every` lines, so a child that
    writes fast cannot starve the loop from a full buffer.
    """
    count = 0
    split = False  # the previous piece was part of an over-long line
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                on_line(exc.partial)
            return
        except asyncio.LimitOverrunError as exc:
            on_line(await reader.readexactly(exc.consumed))
            split = True
        else:
            if not (split and line == b"\n"):
                on_line(line[:-1])
            split = False
        count += 1
        if count % yield_every == 0:
            await asyncio.sleep(0)


class Child:
    """A running process group (leader pid == pgid) and its output readers.

    Build with `Child.spawn`. Args of the constructor: the spawned process, the
    OS seam, the clock (monotonic seconds), the bound logger of its instance, and
    how long to wait for the group to vanish after SIGKILL (seconds).
    """

    def __init__(
        self,
        proc: ChildProcess,
        os_api: OsApi,
        clock: Callable[[], float],
        log: Any,
        kill_wait: float = KILL_WAIT,
    ) -> None:
        self.proc = proc
        self._os = os_api
        self._clock = clock
        self._log = log
        self._kill_wait = kill_wait
        self._readers: list[asyncio.Task[None]] = []

    @classmethod
    async def spawn(
        cls,
        spec: InstanceSpec,
        os_api: OsApi,
        *,
        clock: Callable[[], float],
        log: Any,
        on_line: Callable[[str, str], None],
        start_task: TaskStarter,
        kill_wait: float = KILL_WAIT,
    ) -> Child:
        """Spawn `spec` and pump its output into ``on_line(stream, line)`` and the logs.

        Raises:
            OSError, subprocess.SubprocessError: it could not be spawned.
        """
        child = cls(await os_api.spawn(spec), os_api, clock, log, kill_wait)
        for stream, reader in (("stdout", child.proc.stdout), ("stderr", child.proc.stderr)):
            if reader is not None:
                pump = child._pump(reader, stream, on_line)
                child._readers.append(start_task(pump, f"{spec.name}:{stream}"))
        return child

    @property
    def pid(self) -> int:
        """The leader's pid."""
        return self.proc.pid

    @property
    def pgid(self) -> int:
        """The group's id: start_new_session makes the child lead its own group."""
        return self.proc.pid

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves to the leader's return code the moment it is reaped."""
        return self.proc.exited

    async def _pump(
        self, reader: asyncio.StreamReader, stream: str, on_line: Callable[[str, str], None]
    ) -> None:
        def line_in(raw: bytes) -> None:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            on_line(stream, line)
            getattr(self._log, child_level(line))("child_output", stream=stream, line=line)

        try:
            await read_lines(reader, line_in)
        except Exception:
            self._log.exception("child_output_failed", stream=stream)

    def kill(self) -> None:
        """SIGKILL the group now (the supervisor is being torn down, or a bug)."""
        self._os.signal_group(self.pgid, signal.SIGKILL)

    async def terminate(self, deadline: float) -> bool:
        """SIGTERM (+SIGCONT) the group, SIGKILL it at `deadline`; True once it is empty.

        False when members are still there ``kill_wait`` s after the SIGKILL (a
        process stuck in the kernel); the guardian keeps watching such a group.
        """
        pgid = self.pgid
        if self._os.signal_group(pgid, signal.SIGTERM):
            # A stopped (SIGSTOP) process only acts on the SIGTERM once continued.
            self._os.signal_group(pgid, signal.SIGCONT)
            self._log.info("child_signalled", pid=self.pid, pgid=pgid, signal="SIGTERM")
        if await self._wait_gone(deadline):
            return True
        self._log.warning(
            "child_kill",
            pid=self.pid,
            pgid=pgid,
            signal="SIGKILL",
            reason="stop grace deadline passed",
            members=self._os.group_members(pgid),
        )
        self._os.signal_group(pgid, signal.SIGKILL)
        if await self._wait_gone(self._clock() + self._kill_wait):
            return True
        self._log.error("child_group_stuck", pgid=pgid, members=self._os.group_members(pgid))
        return False

    async def _wait_gone(self, deadline: float) -> bool:
        pgid, exited = self.pgid, self.exited
        delay = 0.005
        while True:
            if exited.done():
                # Only now: waitid on the group would steal the leader's status from its reaper.
                self._os.reap_group(pgid)
                if not self._os.group_exists(pgid):
                    return True
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            if exited.done():
                await asyncio.sleep(min(delay, remaining))
            else:
                await asyncio.wait({exited}, timeout=min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def close(self, group_gone: bool) -> None:
        """After `terminate`: release the group (when gone), drain the readers, close pipes."""
        if group_gone:
            self._os.release_group(self.pgid)
        if self._readers:
            _, pending = await asyncio.wait(self._readers, timeout=DRAIN_WAIT)
            for task in pending:  # a process that left the group still holds the pipe
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.proc.close()
