"""The life of one instance: its task, from launch to STOPPED or FATAL.

A spawned instance, one start after another::

    prepare folders, wait for free ports -> spawn -> poll GET /health until 200
    (STARTING -> RUNNING) -> probe every probe_interval while RUNNING -> it
    ends (exit, start timeout, failed probes, stop) -> terminate the whole group
    -> empty its TMPDIR -> `policy.decide` -> BACKOFF and again | FATAL | STOPPED

A remote instance (``url``) is only probed: STARTING until healthy, back to
STARTING when unhealthy, never spawned, never FATAL.

Every change of state or readiness goes through `Instance.change`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
from collections.abc import Callable, Coroutine
from typing import Any

from disaggd.supervise import policy
from disaggd.supervise.child import KILL_WAIT, Child, TaskStarter, describe_exit
from disaggd.supervise.health import ProbeResult
from disaggd.supervise.instance import Instance
from disaggd.supervise.osapi import OsApi
from disaggd.supervise.policy import End, Ending
from disaggd.supervise.states import TRANSITIONS, ProcessState
from disaggd.topology import SupervisorSection

#: How long a port in use is retried before the instance goes FATAL, seconds.
PORT_WAIT = 3.0
#: Between two checks of a busy port, seconds.
PORT_RETRY = 0.2

#: One health probe: ``await probe(base_url, timeout_s)``; never raises.
Probe = Callable[[str, float], Coroutine[Any, Any, ProbeResult]]

_S = ProcessState


def start_poll(sup: SupervisorSection) -> float:
    """Seconds between /health polls while starting (vLLM binds only once loaded)."""
    return min(1.0, max(0.25, sup.probe_interval))


def new_life(rec: Instance, **kwargs: Any) -> Life:
    """The life that suits `rec`: `SpawnedLife` or `RemoteLife` (kwargs: see `Life`)."""
    cls = SpawnedLife if rec.spec.spawned else RemoteLife
    return cls(rec, **kwargs)


class Life:
    """Runs one instance until it is STOPPED or FATAL (`run` is its task); probing.

    Args:
        rec: the instance; its ``stop_requested`` future must be set for this life.
        os_api: the OS seam.
        probe: the health probe.
        config: returns the ``[supervisor]`` section in force now (a reload may change it).
        clock: monotonic seconds.
        start_task: starts a task in the supervisor's task group (output pumps).
        port_wait: seconds a port in use is retried before FATAL.
        kill_wait: seconds a group may take to vanish after SIGKILL.
    """

    def __init__(
        self,
        rec: Instance,
        *,
        os_api: OsApi,
        probe: Probe,
        config: Callable[[], SupervisorSection],
        clock: Callable[[], float],
        start_task: TaskStarter,
        port_wait: float = PORT_WAIT,
        kill_wait: float = KILL_WAIT,
    ) -> None:
        assert rec.stop_requested is not None
        self.rec = rec
        self._stop = rec.stop_requested
        self._os = os_api
        self._probe = probe
        self._config = config
        self._clock = clock
        self._start_task = start_task
        self._port_wait = port_wait
        self._kill_wait = kill_wait
        self._ran_since: float | None = None  # when this start became RUNNING

    async def run(self) -> None:
        """Supervise until STOPPED or FATAL; a bug ends in FATAL, never in a stray group."""
        rec = self.rec
        try:
            await self._live()
        except Exception as exc:
            rec.log.exception("supervisor_error", pid=rec.pid)
            rec.last_exit = f"supervisor error: {type(exc).__name__}: {exc}"
            if rec.state is _S.RUNNING:
                self._change(_S.STOPPING, "supervisor error")
            if _S.FATAL in TRANSITIONS[rec.state]:
                self._change(_S.FATAL, rec.last_exit)

    async def _live(self) -> None:
        raise NotImplementedError

    # -- the one way this task changes the instance ----------------------------------------

    def _change(self, state: ProcessState, reason: str, *, ready: bool = False) -> None:
        self.rec.change(state, reason, self._clock(), ready=ready)

    def _end(self, kind: Ending, reason: str = "") -> End:
        return End(kind, reason, at=self._clock())

    def _to_stopped(self) -> None:
        if self.rec.state in (_S.STARTING, _S.RUNNING):
            self._change(_S.STOPPING, "stop requested")
        self._change(_S.STOPPED, "stop requested")

    # -- probing (spawned and remote) ------------------------------------------------------

    async def _watch_running(self, child: Child | None) -> End:
        """Probe every ``probe_interval``; ``probe_failures`` failures in a row: unhealthy."""
        rec = self.rec
        failed = 0
        while True:
            sup = self._config()
            end = await self._idle(child, sup.probe_interval)
            if end is not None:
                return end
            if rec.failures and policy.is_stable(self._ran_since, sup, self._clock()):
                rec.log.info("child_stable", failures_cleared=rec.failures)
                rec.failures = 0
            result = await self._probe_or_end(child, sup.probe_timeout)
            if isinstance(result, End):
                return result
            if result.ok:
                failed = 0
                continue
            failed += 1
            rec.log.warning(
                "child_probe_failed",
                pid=rec.pid,
                error=result.error,
                consecutive=failed,
                limit=sup.probe_failures,
            )
            if failed >= sup.probe_failures:
                reason = f"unhealthy: {failed} probes failed ({result.error})"
                rec.log.error("child_unhealthy", pid=rec.pid, reason=reason)
                return self._end(Ending.UNHEALTHY, reason)

    async def _probe_or_end(self, child: Child | None, timeout: float) -> ProbeResult | End:
        """Probe once, unless the child exits or a stop comes first."""
        task = asyncio.create_task(self._probe(self.rec.spec.base_url, timeout))
        events: set[asyncio.Future[Any]] = {task, self._stop}
        if child is not None:
            events.add(child.exited)
        try:
            await asyncio.wait(events, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        end = self._ended(child)
        return end if end is not None else task.result()

    def _ended(self, child: Child | None) -> End | None:
        if self.rec.stopping():
            return self._end(Ending.STOP)
        if child is not None and child.exited.done():
            return self._end(Ending.EXIT, describe_exit(child.exited.result()))
        return None

    async def _idle(self, child: Child | None, seconds: float) -> End | None:
        """Sleep `seconds` unless the child exits or a stop comes first."""
        events: set[asyncio.Future[Any]] = {self._stop}
        if child is not None:
            events.add(child.exited)
        if seconds > 0:
            await asyncio.wait(events, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        return self._ended(child)


class SpawnedLife(Life):
    """A spawned instance: one start after another until STOPPED or FATAL."""

    async def _live(self) -> None:
        rec = self.rec
        while True:
            end = await self._one_start()
            if rec.stopping():  # a stop wins over whatever ended the life meanwhile
                end = End(Ending.STOP, at=end.at)
            decision = policy.decide(end, rec.failures, self._ran_since, self._config(), end.at)
            if decision.cleared:
                rec.log.info("child_stable", failures_cleared=decision.cleared)
            rec.failures = decision.failures
            if decision.state is _S.STOPPED:
                self._to_stopped()
                return
            rec.last_exit = end.reason
            self._change(decision.state, decision.reason)
            if decision.state is _S.FATAL:
                return
            await asyncio.wait({self._stop}, timeout=decision.delay)
            if rec.stopping():
                self._change(_S.STOPPED, "stop requested")
                return
            rec.restarts += 1
            self._change(_S.STARTING, f"restart {rec.restarts} after: {end.reason}")

    async def _one_start(self) -> End:
        """One start, until it ends for any reason; then its group is gone (or stuck)."""
        rec, spec = self.rec, self.rec.spec
        self._ran_since = None
        try:
            self._os.prepare_dirs(spec)
        except OSError as exc:
            return self._end(Ending.CANNOT_START, f"cannot create {exc.filename}: {exc.strerror}")
        busy = await self._wait_ports()
        if rec.stopping():
            return self._end(Ending.STOP)
        if busy is not None:
            return self._end(Ending.CANNOT_START, busy)
        try:
            child = await Child.spawn(
                spec,
                self._os,
                clock=self._clock,
                log=rec.log,
                on_line=rec.output.append,  # (stream, text)
                start_task=self._start_task,
                kill_wait=self._kill_wait,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            rec.log.error("child_spawn_failed", error=str(exc), command=shlex.join(spec.argv))
            return self._end(Ending.SPAWN_FAILED, f"spawn failed: {exc}")
        rec.pid, rec.group_gone = child.pid, False
        rec.log.info("child_spawned", pid=child.pid, pgid=child.pgid, command=shlex.join(spec.argv))
        try:
            end = await self._watch(child)
            rec.group_gone = await child.terminate(self._stop_deadline(child, end))
        except BaseException:
            # Cancelled (the task group is being torn down) or a bug: never leave the group.
            child.kill()
            raise
        await child.close(rec.group_gone)
        assert spec.tmpdir is not None
        self._os.empty_dir(spec.tmpdir)
        rec.pid = None
        return End(end.kind, end.reason, rec.group_gone, end.at)

    def _stop_deadline(self, child: Child, end: End) -> float:
        """Enter the state that comes with `end` and say when SIGKILL is due."""
        rec = self.rec
        grace = self._clock() + self._config().stop_grace
        if end.kind is Ending.EXIT:
            rec.log.warning(
                "child_exited",
                pid=child.pid,
                status=child.exited.result(),
                reason=end.reason,
                last_output=rec.report(),
            )
            if rec.state is _S.RUNNING:
                self._change(_S.EXITED, end.reason)
            return grace
        if end.kind is Ending.STOP:
            self._change(_S.STOPPING, "stop requested")
            return rec.stop_deadline or grace
        self._change(_S.STOPPING, end.reason)
        return grace

    async def _wait_ports(self) -> str | None:
        """None when the instance's ports are free (or a stop came); else the FATAL reason."""
        spec = self.rec.spec
        deadline = self._clock() + self._port_wait
        while True:
            busy = [
                (kind, port) for kind, port in spec.ports if self._os.port_in_use(spec.host, port)
            ]
            if not busy:
                return None
            what = ", ".join(f"port {port} ({kind})" for kind, port in busy)
            if self._clock() >= deadline:
                return f"{what} in use on {spec.host}"
            self.rec.log.info("port_busy", ports=what, host=spec.host)
            # The previous owner may be releasing it: retry briefly, never spawn into it.
            await asyncio.wait({self._stop}, timeout=PORT_RETRY)
            if self.rec.stopping():
                return None

    async def _watch(self, child: Child) -> End:
        """Wait for readiness, then probe while RUNNING; return why this start ends."""
        started = self._clock()
        end = await self._until_healthy(child, started)
        if end is not None:
            return end
        self._ran_since = self._clock()
        self._change(_S.RUNNING, "GET /health 200", ready=True)
        self.rec.log.info("child_ready", pid=child.pid, seconds=round(self._clock() - started, 3))
        return await self._watch_running(child)

    async def _until_healthy(self, child: Child, started: float) -> End | None:
        """Poll /health until 200 (None), or the start timeout, an exit or a stop (End)."""
        while True:
            sup = self._config()
            tick = self._clock()
            left = started + sup.start_timeout - tick
            if left <= 0:
                return self._end(Ending.START_TIMEOUT, f"not ready within {sup.start_timeout:g}s")
            result = await self._probe_or_end(child, min(sup.probe_timeout, left))
            if isinstance(result, End):
                return result
            if result.ok:
                return None
            wait = min(
                start_poll(sup) - (self._clock() - tick),
                started + sup.start_timeout - self._clock(),
            )
            end = await self._idle(child, wait)
            if end is not None:
                return end


class RemoteLife(Life):
    """A remote instance: probed only; STARTING until healthy, never spawned, never FATAL."""

    async def _live(self) -> None:
        rec = self.rec
        while True:
            if await self._until_remote_healthy() is not None:
                self._to_stopped()
                return
            self._change(_S.RUNNING, "GET /health 200", ready=True)
            rec.log.info("remote_ready", url=rec.spec.base_url)
            end = await self._watch_running(None)
            if end.kind is Ending.STOP:
                self._to_stopped()
                return
            rec.last_exit = end.reason
            self._change(_S.STARTING, end.reason)

    async def _until_remote_healthy(self) -> End | None:
        while True:
            sup = self._config()
            tick = self._clock()
            result = await self._probe_or_end(None, sup.probe_timeout)
            if isinstance(result, End):
                return result
            if result.ok:
                return None
            self.rec.last_exit = f"not healthy: {result.error}"
            end = await self._idle(None, start_poll(sup) - (self._clock() - tick))
            if end is not None:
                return end
