"""The collection: every instance of a topology, started, watched and stopped together.

One `Supervisor` runs inside the daemon's event loop. Each instance has one
life task (`disaggd.supervise.life`) owned by the supervisor's task group;
every change of an instance's state or readiness is one `InstanceEvent` sent
to the one listener (``on_event``). The rooms next door:

* `states` — the states and their legal edges;
* `policy` — what follows a life that ended (pure);
* `instance` — one instance's record and the one method that changes it;
* `life` — the task of one instance (spawned or remote);
* `child` — one process group: spawn, output, SIGTERM → grace → SIGKILL;
* `osapi` — the OS seam (prctl, killpg, waitid, bind) and `guardian_client`;
* `health` — the ``GET /health`` probe.

Process hygiene, because vLLM's API server forks an EngineCore that survives a
SIGKILL of its parent (vllm #55510): every child gets ``PR_SET_PDEATHSIG``; the
daemon is a child subreaper, so orphaned grandchildren come to it and are
reaped; a guardian process kills every registered group if the daemon dies
without cleaning up; and before any restart and at stop the old group must be
empty.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any

import aiohttp

from disaggd._compat import TaskGroup
from disaggd.observe.logs import get_logger
from disaggd.supervise import health
from disaggd.supervise.child import KILL_WAIT, read_lines
from disaggd.supervise.events import EventListener, InstanceEvent, InstanceStatus
from disaggd.supervise.instance import Instance
from disaggd.supervise.life import PORT_WAIT, Probe, new_life
from disaggd.supervise.osapi import LinuxOs, OsApi, port_in_use
from disaggd.supervise.output import OutputRing
from disaggd.supervise.states import ProcessState
from disaggd.topology import InstanceSection, Topology
from disaggd.topology.spec import InstanceSpec, build_spec

__all__ = [
    "InstanceEvent",
    "InstanceStatus",
    "Supervisor",
    "port_in_use",
    "read_lines",
]

log = get_logger(__name__)

_S = ProcessState


class _Changes:
    """Wakes every waiter at each instance event or removal (`Supervisor.wait_ready`)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None) -> bool:
        """Wait for the next change; False when `timeout` seconds (None: no limit) pass first."""
        if timeout is None:
            await self._event.wait()
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class Supervisor:
    """Starts, watches, restarts and stops the instances of one topology.

    Use as ``async with Supervisor(topo) as sup: await sup.start_all() ...``;
    leaving the block stops every instance (`shutdown`) and leaves no task.

    Args:
        topo: the topology to run.
        on_event: ``f(event)``, called in the loop, in order, on every change of
            an instance's state or readiness (one `InstanceEvent` per change;
            readiness turns False at once on any exit, failed probes or stop).
            Must not block; an exception is logged and ignored.
        clock: monotonic seconds; every timeout and timestamp uses it.
        os_api: the OS seam (default `LinuxOs`: real processes and a guardian).
        probe: the health probe ``await probe(base_url, timeout_s)`` (default:
            ``GET /health`` over aiohttp).
        port_wait: seconds a port in use is retried before FATAL.
        kill_wait: seconds a group may take to vanish after SIGKILL before FATAL.
    """

    def __init__(
        self,
        topo: Topology,
        *,
        on_event: EventListener | None = None,
        clock: Callable[[], float] = time.monotonic,
        os_api: OsApi | None = None,
        probe: Probe | None = None,
        port_wait: float = PORT_WAIT,
        kill_wait: float = KILL_WAIT,
    ) -> None:
        self._topo = topo
        self._on_event = on_event
        self._clock = clock
        self._os: OsApi = os_api if os_api is not None else LinuxOs()
        self._probe = probe
        self._port_wait = port_wait
        self._kill_wait = kill_wait
        self._instances: dict[str, Instance] = {}
        self._tg: TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._changes = _Changes()
        self._closing = False
        self._shutdown_lock = asyncio.Lock()
        self._shutdown_result: bool | None = None
        self._subreaper_prev: bool | None = None

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        tg = TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        if self._probe is None:
            self._session = health.new_session()
            self._probe = _http_probe(self._session, self._clock)
        # Orphans of a crashing `vllm serve` (EngineCore, workers) come to us, not to init.
        self._subreaper_prev = self._os.set_subreaper(True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.shutdown()
        finally:
            if self._session is not None:
                await self._session.close()
            if self._subreaper_prev is not None:
                self._os.set_subreaper(self._subreaper_prev)
            if self._tg is not None:
                # Only our own tasks are in it, and they are done; the caller's exception,
                # if any, propagates unchanged rather than wrapped in an ExceptionGroup.
                await self._tg.__aexit__(None, None, None)

    @property
    def topology(self) -> Topology:
        """The topology it runs now."""
        return self._topo

    @property
    def guardian_pid(self) -> int | None:
        """Pid of the guardian process, once a child has been spawned."""
        return self._os.guardian_pid

    def update_topology(self, topo: Topology) -> None:
        """Adopt `topo` (reload): its ``[supervisor]`` timings apply from now on.

        Each instance keeps the spec it runs until `restart` or `remove` is called for it.
        """
        self._topo = topo

    # -- the collection --------------------------------------------------------------------

    async def start_all(self) -> None:
        """Start every instance of the topology concurrently.

        Spawned instances go STOPPED → STARTING and are spawned by their life
        task; remote ones are probed. Returns once launched, not when ready
        (see `wait_ready`). Instances already running are left alone.

        Raises:
            RuntimeError: the supervisor is shut down or not entered.
        """
        self._check_open()
        for inst in self._topo.instances:
            rec = self._instances.get(inst.name)
            if rec is None:
                rec = self._new(build_spec(self._topo, inst))
            if rec.idle() and rec.state in (_S.STOPPED, _S.FATAL):
                self._launch(rec, "start")
        await asyncio.sleep(0)

    async def wait_ready(
        self, names: Iterable[str] | None = None, timeout: float | None = None
    ) -> bool:
        """Wait until every instance in `names` (default: all) is RUNNING and ready.

        Returns:
            True when they all are; False when `timeout` seconds pass first, or
            when one of them is FATAL, stopped for good (shutdown) or removed.

        Raises:
            KeyError: an unknown instance name.
        """
        wanted = list(names) if names is not None else list(self._instances)
        for name in wanted:
            if name not in self._instances:
                raise KeyError(name)
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            recs = [self._instances.get(n) for n in wanted]
            if any(r is None or r.state is _S.FATAL or _idle_stopped(r) for r in recs):
                return False
            if all(r is not None and r.ready for r in recs):
                return True
            if not await self._changes.wait(None if deadline is None else deadline - self._clock()):
                return False

    def statuses(self) -> list[InstanceStatus]:
        """A snapshot of every instance, in the order they were added."""
        now = self._clock()
        return [rec.status(now) for rec in self._instances.values()]

    def status(self, name: str) -> InstanceStatus:
        """A snapshot of instance `name`.

        Raises:
            KeyError: no such instance.
        """
        return self._instances[name].status(self._clock())

    async def add(self, inst: InstanceSection, topo: Topology) -> None:
        """Add and start a new instance (reload); `topo` is the topology it comes from.

        Raises:
            ValueError: an instance of that name exists already.
            RuntimeError: the supervisor is shut down.
        """
        self._check_open()
        if inst.name in self._instances:
            raise ValueError(f"instance {inst.name!r} exists already")
        self._launch(self._new(build_spec(topo, inst)), "added")
        await asyncio.sleep(0)

    async def remove(self, name: str) -> None:
        """Stop instance `name` (SIGTERM, ``stop_grace``, SIGKILL) and forget it (reload).

        Raises:
            KeyError: no such instance.
        """
        rec = self._instances[name]
        async with rec.lock:
            await self._stop(rec, self._clock() + self._topo.supervisor.stop_grace)
            if self._instances.get(name) is rec:
                del self._instances[name]
        rec.output.end("instance removed")
        rec.log.info("instance_removed")
        self._changes.notify()

    def output(self, name: str) -> OutputRing:
        """The recent output of instance `name` and its followers.

        Raises:
            KeyError: no such instance.
        """
        return self._instances[name].output

    async def stop(self, name: str) -> bool:
        """Stop instance `name` by hand: SIGTERM, ``stop_grace``, SIGKILL.

        It stays STOPPED (``held``) until `start`, `restart`, or a reload that
        changes its spec; a FATAL instance stays FATAL, held. Callers drain it first.

        Returns:
            True when its process group is gone.

        Raises:
            KeyError: no such instance.
        """
        rec = self._instances[name]
        async with rec.lock:
            rec.held = True
            return await self._stop(rec, self._clock() + self._topo.supervisor.stop_grace)

    async def start(self, name: str, *, wait: bool = True) -> bool:
        """Start instance `name` when nothing runs for it (STOPPED or FATAL).

        Clears ``held``, FATAL and the failure count; an instance whose life
        runs (STARTING, RUNNING, BACKOFF, ...) is left alone.

        Returns:
            With `wait`, whether it is ready within ``start_timeout``; without,
            True once launched (or already running).

        Raises:
            KeyError: no such instance.
            RuntimeError: the supervisor is shut down.
        """
        self._check_open()
        rec = self._instances[name]
        async with rec.lock:
            self._check_open()
            rec.held = False
            if rec.idle():
                rec.failures = 0
                self._launch(rec, "start requested")
        if not wait:
            return True
        return await self.wait_ready([name], timeout=self._topo.supervisor.start_timeout)

    async def restart(
        self,
        name: str,
        inst: InstanceSection | None = None,
        topo: Topology | None = None,
        *,
        wait: bool = True,
    ) -> bool:
        """Stop instance `name` if it runs, then start it again.

        With `inst` (and the `topo` it comes from, default the current one) the
        new start uses the new section. Clears FATAL and the failure count.

        Returns:
            With `wait`, whether it became ready within ``start_timeout``;
            without, True once it is launched.

        Raises:
            KeyError: no such instance.
            ValueError: `inst` has another name.
            RuntimeError: the supervisor is shut down.
        """
        self._check_open()
        rec = self._instances[name]
        if inst is not None and inst.name != name:
            raise ValueError(f"cannot restart {name!r} as {inst.name!r}")
        async with rec.lock:
            await self._stop(rec, self._clock() + self._topo.supervisor.stop_grace)
            self._check_open()
            if inst is not None:
                rec.spec = build_spec(topo or self._topo, inst)
            rec.failures = 0
            rec.restarts += 1
            rec.held = False
            self._launch(rec, "restart requested")
        if not wait:
            return True
        return await self.wait_ready([name], timeout=self._topo.supervisor.start_timeout)

    async def shutdown(self) -> bool:
        """Stop every instance concurrently under one deadline (``stop_grace``).

        Each group gets SIGTERM (and SIGCONT); what is left at the deadline gets
        SIGKILL. Returns once every child is reaped, then releases the guardian.
        Idempotent: later calls return the first result.

        Returns:
            True when every process of every group is gone.
        """
        async with self._shutdown_lock:
            if self._shutdown_result is not None:
                return self._shutdown_result
            self._closing = True
            deadline = self._clock() + self._topo.supervisor.stop_grace
            recs = list(self._instances.values())

            async def stop_one(rec: Instance) -> bool:
                async with rec.lock:
                    return await self._stop(rec, deadline)

            results = await asyncio.gather(*(stop_one(r) for r in recs))
            for rec in recs:
                rec.output.end("the daemon is stopping")
            await self._os.close()
            self._shutdown_result = all(results)
            log.info("supervisor_stopped", clean=self._shutdown_result, instances=len(recs))
            return self._shutdown_result

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tg is None:
            raise RuntimeError("Supervisor is not entered (use `async with`)")
        if self._closing:
            raise RuntimeError("Supervisor is shut down")

    def _new(self, spec: InstanceSpec) -> Instance:
        rec = Instance(spec, self._topo.supervisor.output_lines, self._clock(), self._emit)
        self._instances[spec.name] = rec
        return rec

    def _emit(self, event: InstanceEvent) -> None:
        """The one listener channel (every `Instance.change` ends here)."""
        self._changes.notify()
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("callback_failed", callback="on_event", instance=event.name)

    def _start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._tg is not None
        task: asyncio.Task[None] = self._tg.create_task(coro, name=name)
        return task

    def _launch(self, rec: Instance, reason: str) -> None:
        assert self._probe is not None
        rec.stop_requested = asyncio.get_running_loop().create_future()
        rec.stop_deadline = None
        rec.change(_S.STARTING, reason, self._clock())
        life = new_life(
            rec,
            os_api=self._os,
            probe=self._probe,
            config=lambda: self._topo.supervisor,
            clock=self._clock,
            start_task=self._start_task,
            port_wait=self._port_wait,
            kill_wait=self._kill_wait,
        )
        rec.runner = self._start_task(life.run(), f"disaggd:{rec.name}")

    async def _stop(self, rec: Instance, deadline: float) -> bool:
        """Ask the life of `rec` to stop by `deadline` and wait for it (caller holds the lock)."""
        runner = rec.runner
        if runner is None or runner.done():
            return rec.group_gone
        rec.stop_deadline = deadline
        if rec.stop_requested is not None and not rec.stop_requested.done():
            rec.stop_requested.set_result(None)
        rec.change(None, "stop requested", self._clock())  # the router must stop sending at once
        # asyncio.wait, not await: a cancelled caller must not cancel the teardown.
        await asyncio.wait({runner})
        return rec.group_gone


def _http_probe(session: aiohttp.ClientSession, clock: Callable[[], float]) -> Probe:
    """The default probe: ``GET {base_url}/health`` over `session`."""

    async def probe(url: str, timeout: float) -> health.ProbeResult:
        return await health.probe(session, url, timeout, clock=clock)

    return probe


def _idle_stopped(rec: Instance) -> bool:
    """STOPPED with no life task: nothing will start it unless asked."""
    return rec.state is _S.STOPPED and rec.idle()
