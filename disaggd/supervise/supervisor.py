"""Children: spawn, watch, restart and stop the `vllm serve` instances.

One `Supervisor` runs every instance of a topology inside the daemon's event
loop. Each instance has one runner task (owned by the supervisor's task group)
that walks it through the states of `disaggd.supervise.states`:

* spawned instances: check their ports, spawn the child in its own session
  (process group), poll ``GET /health`` until 200 (STARTING → RUNNING), probe it
  periodically while RUNNING, and on a crash, a start timeout or failed probes
  kill the whole group, wait until no process of it is left, back off and start
  again, up to FATAL;
* remote instances (``url``): only probed; STARTING until healthy, back to
  STARTING when unhealthy, never FATAL.

Process hygiene, because vLLM's API server forks an EngineCore that survives a
SIGKILL of its parent (vllm #55510):

* every child gets ``PR_SET_PDEATHSIG(SIGKILL)``: it dies with the daemon;
* the daemon is a child subreaper, so an orphaned grandchild is reparented to
  it and reaped here (``waitid(P_PGID)``, only once the group leader has been
  reaped by asyncio, so that its exit status is not stolen);
* a guardian process (`disaggd.supervise.guardian`) kills every registered group if the
  daemon dies without cleaning up (SIGKILL reaches only direct children);
* before any restart and at stop, the old group must be empty.

An exit nobody asked for is a crash whatever its status: vLLM may exit 0 when
its engine dies (vllm #48966).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from disaggd._compat import TaskGroup
from disaggd.observe.logs import child_level, get_logger
from disaggd.supervise import guardian, health
from disaggd.supervise.backoff import Backoff
from disaggd.supervise.states import TRANSITIONS, ProcessState, check_transition
from disaggd.topology import InstanceSection, SupervisorSection, Topology
from disaggd.topology.spec import InstanceSpec, build_spec

log = get_logger(__name__)

#: Longest line read from a child in one piece; longer lines are split, never lost.
READ_LIMIT = 256 * 1024
#: How long a port in use is retried before the instance goes FATAL, seconds.
PORT_WAIT = 3.0
#: After the SIGKILL of a group, how long to wait for it to disappear, seconds.
KILL_WAIT = 5.0
#: After a group is gone, how long its output readers may take to drain, seconds.
DRAIN_WAIT = 1.0
#: Output lines attached to crash and FATAL log events.
REPORT_LINES = 20

_S = ProcessState

# -- Linux process controls --------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every Linux libc has prctl
        return None


_LIBC = _load_libc()


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the daemon (its parent) dies.

    Runs in the child between fork and exec: nothing here may take a lock.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    # The daemon may have died between fork and prctl: then no signal would ever come.
    if os.getppid() != parent:
        os._exit(1)


def set_subreaper(enabled: bool) -> bool | None:
    """Make this process a child subreaper (or stop being one).

    Returns the previous setting, or None where prctl is unavailable (not Linux).
    """
    if _LIBC is None:
        return None
    prev = ctypes.c_int(0)
    _LIBC.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(prev), 0, 0, 0)
    if _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        return None
    return bool(prev.value)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_exists(pgid: int) -> bool:
    """True while any process of group `pgid` exists, zombies included."""
    return _signal_group(pgid, 0)


def _reap_group(pgid: int) -> None:
    """Reap exited members of `pgid` that are our children (reparented orphans).

    Only called once the group leader has been reaped by asyncio: ``waitid`` on
    the group would otherwise steal the leader's exit status.
    """
    while True:
        try:
            info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return
        if info is None:
            return


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exited with status N (unexpected)``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode} (unexpected)"


def port_in_use(host: str, port: int) -> bool:
    """True when `port` on `host` cannot be bound because something holds it.

    SO_REUSEADDR makes a port in TIME_WAIT count as free, as it is for vLLM.
    Errors other than EADDRINUSE (an address not on this host, a privileged
    port) are left for the child to report.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _empty_dir(path: Path) -> None:
    """Remove everything inside `path` (not `path` itself); errors are ignored."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


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


# -- public types ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceStatus:
    """A snapshot of one instance.

    Attributes:
        name: instance name.
        role: "prefill" or "decode".
        state: its process state.
        spawned: False for a remote instance (``url``).
        url: base URL of its OpenAI server.
        port: its HTTP port (None when a remote URL gives none).
        pid: the child's main pid while its process group exists, else None.
        ready: RUNNING and healthy: the router may send it requests.
        since: monotonic time (s) it entered `state`.
        uptime: seconds since it became RUNNING; None unless RUNNING.
        restarts: starts after the first one (automatic or requested).
        failures: failures in a row without a stable run (reset after ``stable_after`` s).
        last_exit: why it last stopped or failed, e.g. ``killed by SIGKILL``,
            ``unhealthy: 3 probes failed (timeout)``, ``port 8100 (HTTP) in use``.
        last_output: the last lines of the child's stdout and stderr.
    """

    name: str
    role: str
    state: ProcessState
    spawned: bool
    url: str
    port: int | None
    pid: int | None
    ready: bool
    since: float
    uptime: float | None
    restarts: int
    failures: int
    last_exit: str | None
    last_output: tuple[str, ...]


ReadyCallback = Callable[[str, bool], None]
StateCallback = Callable[[InstanceStatus], None]


# -- internals ---------------------------------------------------------------------------------


class _Ending(Enum):
    """Why one life of a child ended."""

    STOP = "stop"  # asked to stop: not a failure
    EXIT = "exit"  # exited unasked: a crash
    TIMEOUT = "timeout"  # not healthy within start_timeout
    UNHEALTHY = "unhealthy"  # probes failed while RUNNING
    SPAWN = "spawn"  # could not be spawned (a failure, retried)
    FATAL = "fatal"  # cannot be started at all (port in use): no retry


@dataclass
class _End:
    kind: _Ending
    reason: str = ""


class _ChildProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Resolves `exited` the moment the child is reaped.

    `asyncio.subprocess.Process.wait()` also waits for the pipes to close
    (cpython gh-119710), and an orphaned EngineCore keeps them open: that would
    hide the crash of the API server for as long as its orphan lives.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, exited: asyncio.Future[int]) -> None:
        super().__init__(limit=READ_LIMIT, loop=loop)
        self.exited = exited
        self._sub: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._sub = transport
        super().connection_made(transport)

    def process_exited(self) -> None:
        rc = self._sub.get_returncode() if self._sub is not None else None
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(rc if rc is not None else -1)


@dataclass
class _Child:
    pid: int
    transport: asyncio.SubprocessTransport
    exited: asyncio.Future[int]
    readers: list[asyncio.Task[None]]

    @property
    def pgid(self) -> int:
        # start_new_session: the child leads its own session and group.
        return self.pid


class _Instance:
    """Mutable state of one supervised instance (the supervisor's own)."""

    def __init__(self, inst: InstanceSection, topo: Topology, now: float) -> None:
        self.inst = inst
        self.spec: InstanceSpec = build_spec(topo, inst)
        self.compose(inst, topo)
        self.state = _S.STOPPED
        self.since = now
        self.running_since: float | None = None
        self.ready = False
        self.pid: int | None = None
        self.restarts = 0
        self.failures = 0
        self.last_exit: str | None = None
        self.output: deque[str] = deque(maxlen=topo.supervisor.output_lines)
        self.runner: asyncio.Task[None] | None = None
        self.stop_requested: asyncio.Future[None] | None = None
        self.stop_deadline: float | None = None
        self.group_gone = True
        self.lock = asyncio.Lock()
        self.log: Any = get_logger(__name__, instance=inst.name, role=inst.role.value)

    def compose(self, inst: InstanceSection, topo: Topology) -> None:
        self.inst = inst
        self.spec = build_spec(topo, inst)

    @property
    def name(self) -> str:
        return self.inst.name

    def stopping(self) -> bool:
        return self.stop_requested is not None and self.stop_requested.done()


class _Guardian:
    """The daemon's end of the pipe to `disaggd.supervise.guardian`."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgids: set[int] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self) -> None:
        if self._closed or (self._proc is not None and self._proc.poll() is None):
            return
        if self._proc is not None:
            log.error("guardian_exited", pid=self._proc.pid, status=self._proc.returncode)
            self._close_pipe()
        try:
            self._proc = guardian.start()
        except OSError as exc:
            log.error("guardian_failed", error=str(exc))
            self._proc = None
            return
        assert self._proc.stdin is not None
        # Never block the loop on it; a line is far below PIPE_BUF, so writes stay atomic.
        os.set_blocking(self._proc.stdin.fileno(), False)
        log.debug("guardian_started", pid=self._proc.pid)
        for pgid in self._pgids:
            self._send(f"+{pgid}\n")

    def register(self, pgid: int) -> None:
        self._pgids.add(pgid)
        self._send(f"+{pgid}\n")

    def unregister(self, pgid: int) -> None:
        self._pgids.discard(pgid)
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._closed:
            return
        if self._proc is None or self._proc.poll() is not None:
            self.ensure_started()  # a new guardian is told every registered group
            return
        if self._proc.stdin is None or self._proc.stdin.closed:
            return
        try:
            os.write(self._proc.stdin.fileno(), line.encode())
        except OSError as exc:
            log.error("guardian_write_failed", error=str(exc), line=line.strip())

    def _close_pipe(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    async def close(self, timeout: float = guardian.SWEEP_SECONDS + 2.0) -> None:
        """Close the pipe (the guardian kills what is still registered) and reap it."""
        self._closed = True
        if self._proc is None:
            return
        self._close_pipe()
        deadline = time.monotonic() + timeout
        # No event tells when a Popen child exits; it exits within milliseconds of EOF.
        while self._proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._proc.poll() is None:  # pragma: no cover - the guardian is tiny
            log.error("guardian_stuck", pid=self._proc.pid)
            self._proc.kill()
            self._proc.wait()
        if self._pgids:
            log.error("guardian_killed_groups", pgids=sorted(self._pgids))


def _idle_stopped(rec: _Instance) -> bool:
    """STOPPED with no runner: nothing will start it unless asked."""
    return rec.state is _S.STOPPED and (rec.runner is None or rec.runner.done())


def _start_poll(sup: SupervisorSection) -> float:
    """Seconds between /health polls while starting (vLLM binds only once loaded)."""
    return min(1.0, max(0.25, sup.probe_interval))


class Supervisor:
    """Starts, watches, restarts and stops the instances of one topology.

    Use as ``async with Supervisor(topo) as sup: await sup.start_all() ...``;
    leaving the block stops every instance (`shutdown`) and leaves no task.

    Args:
        topo: the topology to run.
        on_ready_change: ``f(name, ready)``, called in the loop the moment an
            instance's readiness changes (RUNNING and healthy → True; any exit,
            failed probes or a stop → False at once).
        on_state_change: ``f(status)``, called in the loop on every state change.
        clock: monotonic seconds; every timeout and timestamp uses it.
        port_wait: seconds a port in use is retried before FATAL.
    """

    def __init__(
        self,
        topo: Topology,
        *,
        on_ready_change: ReadyCallback | None = None,
        on_state_change: StateCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        port_wait: float = PORT_WAIT,
    ) -> None:
        self._topo = topo
        self._on_ready_change = on_ready_change
        self._on_state_change = on_state_change
        self._clock = clock
        self._port_wait = port_wait
        self._instances: dict[str, _Instance] = {}
        self._tg: TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._guardian = _Guardian()
        self._changed = asyncio.Event()
        self._closing = False
        self._shutdown_lock = asyncio.Lock()
        self._shutdown_result: bool | None = None
        self._subreaper_prev: bool | None = None

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        tg = TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._session = health.new_session()
        # Orphans of a crashing `vllm serve` (EngineCore, workers) come to us, not to init.
        self._subreaper_prev = set_subreaper(True)
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
                set_subreaper(self._subreaper_prev)
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
        return self._guardian.pid

    def update_topology(self, topo: Topology) -> None:
        """Adopt `topo` (reload): its ``[supervisor]`` timings apply from now on.

        Instances whose section is unchanged adopt the new section object; the
        others keep theirs until `restart` or `remove` is called for them.
        """
        self._topo = topo
        for inst in topo.instances:
            rec = self._instances.get(inst.name)
            if rec is not None and rec.inst == inst:
                rec.inst = inst

    async def start_all(self) -> None:
        """Start every instance of the topology concurrently.

        Spawned instances go STOPPED → STARTING and are spawned by their runner;
        remote ones are probed. Returns once launched, not when ready (see
        `wait_ready`).

        Raises:
            RuntimeError: the supervisor is shut down or not entered.
        """
        self._check_open()
        for inst in self._topo.instances:
            rec = self._instances.get(inst.name)
            if rec is None:
                rec = _Instance(inst, self._topo, self._clock())
                self._instances[inst.name] = rec
            idle = rec.runner is None or rec.runner.done()
            if idle and rec.state in (_S.STOPPED, _S.FATAL):
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
            if all(r is not None and r.state is _S.RUNNING and r.ready for r in recs):
                return True
            changed = self._changed
            if deadline is None:
                await changed.wait()
                continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False

    def statuses(self) -> list[InstanceStatus]:
        """A snapshot of every instance, in the order they were added."""
        return [self._status(rec) for rec in self._instances.values()]

    def status(self, name: str) -> InstanceStatus:
        """A snapshot of instance `name`.

        Raises:
            KeyError: no such instance.
        """
        return self._status(self._instances[name])

    async def add(self, inst: InstanceSection, topo: Topology) -> None:
        """Add and start a new instance (reload); `topo` is the topology it comes from.

        Raises:
            ValueError: an instance of that name exists already.
            RuntimeError: the supervisor is shut down.
        """
        self._check_open()
        if inst.name in self._instances:
            raise ValueError(f"instance {inst.name!r} exists already")
        rec = _Instance(inst, topo, self._clock())
        self._instances[inst.name] = rec
        self._launch(rec, "added")
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
        rec.log.info("instance_removed")
        self._notify()

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
                rec.compose(inst, topo or self._topo)
            rec.failures = 0
            rec.restarts += 1
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

            async def stop_one(rec: _Instance) -> bool:
                async with rec.lock:
                    return await self._stop(rec, deadline)

            results = await asyncio.gather(*(stop_one(r) for r in recs))
            await self._guardian.close()
            self._shutdown_result = all(results)
            log.info("supervisor_stopped", clean=self._shutdown_result, instances=len(recs))
            return self._shutdown_result

    # -- state changes ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tg is None:
            raise RuntimeError("Supervisor is not entered (use `async with`)")
        if self._closing:
            raise RuntimeError("Supervisor is shut down")

    def _status(self, rec: _Instance) -> InstanceStatus:
        inst = rec.inst
        port = inst.port
        if port is None and inst.url is not None:
            port = urlsplit(inst.url).port
        uptime = None
        if rec.state is _S.RUNNING and rec.running_since is not None:
            uptime = self._clock() - rec.running_since
        return InstanceStatus(
            name=inst.name,
            role=inst.role.value,
            state=rec.state,
            spawned=inst.spawned,
            url=inst.base_url,
            port=port,
            pid=rec.pid,
            ready=rec.ready,
            since=rec.since,
            uptime=uptime,
            restarts=rec.restarts,
            failures=rec.failures,
            last_exit=rec.last_exit,
            last_output=tuple(rec.output),
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _transition(self, rec: _Instance, new: ProcessState, reason: str) -> None:
        """The one way an instance changes state: check the edge, log it, tell listeners.

        Raises:
            IllegalTransition: the edge is not in `disaggd.supervise.states.TRANSITIONS`.
        """
        old = rec.state
        check_transition(old, new)
        if new is not _S.RUNNING:
            self._set_ready(rec, False)
        if old is _S.RUNNING:
            self._check_stable(rec)  # a run that lasted stable_after clears the count
        rec.state = new
        rec.since = self._clock()
        if new is _S.RUNNING:
            rec.running_since = rec.since
        elif old is _S.RUNNING:
            rec.running_since = None
        level = "error" if new is _S.FATAL else "info"
        getattr(rec.log, level)(
            "instance_state",
            pid=rec.pid,
            from_state=old.value,
            to_state=new.value,
            reason=reason,
        )
        self._notify()
        if self._on_state_change is not None:
            try:
                self._on_state_change(self._status(rec))
            except Exception:
                rec.log.exception("callback_failed", callback="on_state_change")

    def _set_ready(self, rec: _Instance, ready: bool) -> None:
        if rec.ready == ready:
            return
        rec.ready = ready
        rec.log.info("instance_ready" if ready else "instance_not_ready", pid=rec.pid)
        self._notify()
        if self._on_ready_change is not None:
            try:
                self._on_ready_change(rec.name, ready)
            except Exception:
                rec.log.exception("callback_failed", callback="on_ready_change")

    def _launch(self, rec: _Instance, reason: str) -> None:
        assert self._tg is not None
        self._transition(rec, _S.STARTING, reason)
        rec.stop_requested = asyncio.get_running_loop().create_future()
        rec.stop_deadline = None
        rec.runner = self._tg.create_task(self._runner(rec), name=f"disaggd:{rec.name}")

    async def _stop(self, rec: _Instance, deadline: float) -> bool:
        """Ask the runner of `rec` to stop by `deadline` and wait for it (caller holds the lock)."""
        runner = rec.runner
        if runner is None or runner.done():
            return rec.group_gone
        rec.stop_deadline = deadline
        if rec.stop_requested is not None and not rec.stop_requested.done():
            rec.stop_requested.set_result(None)
        self._set_ready(rec, False)  # the router must stop sending at once
        # asyncio.wait, not await: a cancelled caller must not cancel the teardown.
        await asyncio.wait({runner})
        return rec.group_gone

    # -- runners ---------------------------------------------------------------------------

    async def _runner(self, rec: _Instance) -> None:
        try:
            if rec.inst.spawned:
                await self._run_spawned(rec)
            else:
                await self._run_remote(rec)
        except Exception as exc:
            rec.log.exception("supervisor_error", pid=rec.pid)
            rec.last_exit = f"supervisor error: {type(exc).__name__}: {exc}"
            self._set_ready(rec, False)
            if rec.state is _S.RUNNING:
                self._transition(rec, _S.STOPPING, "supervisor error")
            if _S.FATAL in TRANSITIONS[rec.state]:
                self._transition(rec, _S.FATAL, rec.last_exit)

    def _to_stopped(self, rec: _Instance) -> None:
        if rec.state in (_S.STARTING, _S.RUNNING):
            self._transition(rec, _S.STOPPING, "stop requested")
        self._transition(rec, _S.STOPPED, "stop requested")

    async def _run_spawned(self, rec: _Instance) -> None:
        while True:
            end = await self._life(rec)
            if end.kind is _Ending.STOP or rec.stopping():
                self._to_stopped(rec)
                return
            sup = self._topo.supervisor
            rec.last_exit = end.reason
            if end.kind is _Ending.FATAL:
                self._fatal(rec, end.reason)
                return
            if not rec.group_gone:
                # Never start a second engine next to one that still holds the GPU.
                self._fatal(rec, f"{end.reason}; its old process group survived SIGKILL")
                return
            rec.failures += 1
            if rec.failures >= sup.max_failures:
                self._fatal(rec, f"{end.reason}; {rec.failures} failures in a row")
                return
            delay = Backoff.from_config(sup).delay(rec.failures)
            self._transition(
                rec,
                _S.BACKOFF,
                f"{end.reason}; failure {rec.failures} of {sup.max_failures}, "
                f"next start in {delay:.3g}s",
            )
            assert rec.stop_requested is not None
            await asyncio.wait({rec.stop_requested}, timeout=delay)
            if rec.stopping():
                self._transition(rec, _S.STOPPED, "stop requested")
                return
            rec.restarts += 1
            self._transition(rec, _S.STARTING, f"restart {rec.restarts} after: {end.reason}")

    def _fatal(self, rec: _Instance, reason: str) -> None:
        self._transition(rec, _S.FATAL, reason)
        rec.log.error(
            "child_fatal",
            reason=reason,
            failures=rec.failures,
            last_exit=rec.last_exit,
            last_output=list(rec.output)[-REPORT_LINES:],
            hint=f"not restarted until `disaggd restart {rec.name}` or a reload",
        )

    async def _life(self, rec: _Instance) -> _End:
        """One start of a spawned instance, until it ends for any reason; the group is gone."""
        spec = rec.spec
        assert spec.workdir is not None and spec.tmpdir is not None
        assert rec.stop_requested is not None
        try:
            spec.workdir.mkdir(parents=True, exist_ok=True)
            spec.tmpdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _End(_Ending.FATAL, f"cannot create {exc.filename}: {exc.strerror}")
        _empty_dir(spec.tmpdir)  # left over if the daemon itself was killed
        busy = await self._wait_ports(rec)
        if rec.stopping():
            return _End(_Ending.STOP)
        if busy is not None:
            return _End(_Ending.FATAL, busy)
        try:
            child = await self._spawn(rec, spec)
        except (OSError, subprocess.SubprocessError) as exc:
            rec.log.error("child_spawn_failed", error=str(exc), command=shlex.join(spec.argv))
            return _End(_Ending.SPAWN, f"spawn failed: {exc}")
        sup = self._topo.supervisor
        try:
            end = await self._watch(rec, child)
            if end.kind is _Ending.EXIT:
                rc = child.exited.result()
                end.reason = describe_exit(rc)
                self._set_ready(rec, False)
                rec.log.warning(
                    "child_exited",
                    pid=child.pid,
                    status=rc,
                    reason=end.reason,
                    last_output=list(rec.output)[-REPORT_LINES:],
                )
                if rec.state is _S.RUNNING:
                    self._transition(rec, _S.EXITED, end.reason)
                deadline = self._clock() + sup.stop_grace
            elif end.kind is _Ending.STOP:
                self._transition(rec, _S.STOPPING, "stop requested")
                deadline = rec.stop_deadline or self._clock() + sup.stop_grace
            else:
                self._transition(rec, _S.STOPPING, end.reason)
                deadline = self._clock() + sup.stop_grace
            rec.group_gone = await self._terminate(rec, child, deadline)
        except BaseException:
            # Cancelled (the task group is being torn down) or a bug: never leave the group.
            _signal_group(child.pgid, signal.SIGKILL)
            raise
        if rec.group_gone:
            self._guardian.unregister(child.pgid)
        await self._drain(child)
        _empty_dir(spec.tmpdir)
        rec.pid = None
        return end

    async def _wait_ports(self, rec: _Instance) -> str | None:
        """None when the instance's ports are free (or a stop came); else the FATAL reason."""
        assert rec.stop_requested is not None
        host = rec.inst.host
        deadline = self._clock() + self._port_wait
        while True:
            busy = [(kind, port) for kind, port in rec.spec.ports if port_in_use(host, port)]
            if not busy:
                return None
            what = ", ".join(f"port {port} ({kind})" for kind, port in busy)
            if self._clock() >= deadline:
                return f"{what} in use on {host}"
            rec.log.info("port_busy", ports=what, host=host)
            # The previous owner may be releasing it: retry briefly, never spawn into it.
            await asyncio.wait({rec.stop_requested}, timeout=0.2)
            if rec.stopping():
                return None

    async def _spawn(self, rec: _Instance, spec: InstanceSpec) -> _Child:
        assert self._tg is not None
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        parent = os.getpid()
        transport, protocol = await loop.subprocess_exec(
            lambda: _ChildProtocol(loop, exited),
            *spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **spec.env},
            cwd=str(spec.workdir),
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
        pid = transport.get_pid()
        child = _Child(pid=pid, transport=transport, exited=exited, readers=[])
        self._guardian.register(child.pgid)
        rec.pid = pid
        rec.group_gone = False
        rec.log.info("child_spawned", pid=pid, pgid=child.pgid, command=shlex.join(spec.argv))
        for stream, reader in (("stdout", protocol.stdout), ("stderr", protocol.stderr)):
            if reader is not None:
                child.readers.append(
                    self._tg.create_task(
                        self._pump(rec, reader, stream), name=f"{rec.name}:{stream}"
                    )
                )
        return child

    async def _pump(self, rec: _Instance, reader: asyncio.StreamReader, stream: str) -> None:
        def on_line(raw: bytes) -> None:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            rec.output.append(line)
            getattr(rec.log, child_level(line))("child_output", stream=stream, line=line)

        try:
            await read_lines(reader, on_line)
        except Exception:
            rec.log.exception("child_output_failed", stream=stream)

    async def _drain(self, child: _Child) -> None:
        """Let the output readers finish (the group is gone, so EOF is near); then cut them."""
        if child.readers:
            _, pending = await asyncio.wait(child.readers, timeout=DRAIN_WAIT)
            for task in pending:  # a process that left the group still holds the pipe
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        child.transport.close()

    async def _probe(self, timeout: float, url: str) -> health.ProbeResult:
        assert self._session is not None
        return await health.probe(self._session, url, timeout, clock=self._clock)

    async def _probe_or_end(
        self, rec: _Instance, child: _Child | None, timeout: float
    ) -> health.ProbeResult | _End:
        """Probe once, unless the child exits or a stop comes first."""
        assert rec.stop_requested is not None
        task = asyncio.create_task(self._probe(timeout, rec.inst.base_url))
        events: set[asyncio.Future[Any]] = {task, rec.stop_requested}
        if child is not None:
            events.add(child.exited)
        try:
            await asyncio.wait(events, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        end = self._ended(rec, child)
        return end if end is not None else task.result()

    def _ended(self, rec: _Instance, child: _Child | None) -> _End | None:
        if rec.stopping():
            return _End(_Ending.STOP)
        if child is not None and child.exited.done():
            return _End(_Ending.EXIT)
        return None

    async def _idle(self, rec: _Instance, child: _Child | None, seconds: float) -> _End | None:
        """Sleep `seconds` unless the child exits or a stop comes first."""
        assert rec.stop_requested is not None
        events: set[asyncio.Future[Any]] = {rec.stop_requested}
        if child is not None:
            events.add(child.exited)
        if seconds > 0:
            await asyncio.wait(events, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        return self._ended(rec, child)

    async def _watch(self, rec: _Instance, child: _Child) -> _End:
        """Wait for readiness, then probe while RUNNING; return why this life ends."""
        started = self._clock()
        while True:
            sup = self._topo.supervisor
            tick = self._clock()
            left = started + sup.start_timeout - tick
            if left <= 0:
                return _End(_Ending.TIMEOUT, f"not ready within {sup.start_timeout:g}s")
            result = await self._probe_or_end(rec, child, min(sup.probe_timeout, left))
            if isinstance(result, _End):
                return result
            if result.ok:
                break
            wait = min(
                _start_poll(sup) - (self._clock() - tick),
                started + sup.start_timeout - self._clock(),
            )
            end = await self._idle(rec, child, wait)
            if end is not None:
                return end
        self._transition(rec, _S.RUNNING, "GET /health 200")
        self._set_ready(rec, True)
        rec.log.info("child_ready", pid=child.pid, seconds=round(self._clock() - started, 3))
        return await self._watch_running(rec, child)

    async def _watch_running(self, rec: _Instance, child: _Child | None) -> _End:
        """Probe every ``probe_interval``; ``probe_failures`` failures in a row: unhealthy."""
        failed = 0
        while True:
            sup = self._topo.supervisor
            end = await self._idle(rec, child, sup.probe_interval)
            if end is not None:
                return end
            self._check_stable(rec)
            result = await self._probe_or_end(rec, child, sup.probe_timeout)
            if isinstance(result, _End):
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
                self._set_ready(rec, False)
                rec.log.error("child_unhealthy", pid=rec.pid, reason=reason)
                return _End(_Ending.UNHEALTHY, reason)

    def _check_stable(self, rec: _Instance) -> None:
        since = rec.running_since
        stable = since is not None and self._clock() - since >= self._topo.supervisor.stable_after
        if rec.failures and stable:
            rec.log.info("child_stable", failures_cleared=rec.failures)
            rec.failures = 0

    async def _terminate(self, rec: _Instance, child: _Child, deadline: float) -> bool:
        """SIGTERM (+SIGCONT) the group, SIGKILL it at `deadline`; True once it is empty."""
        pgid = child.pgid
        if _signal_group(pgid, signal.SIGTERM):
            # A stopped (SIGSTOP) process only acts on the SIGTERM once continued.
            _signal_group(pgid, signal.SIGCONT)
            rec.log.info("child_signalled", pid=child.pid, pgid=pgid, signal="SIGTERM")
        if await self._wait_group_gone(pgid, child, deadline):
            return True
        rec.log.warning(
            "child_kill",
            pid=child.pid,
            pgid=pgid,
            signal="SIGKILL",
            reason="stop grace deadline passed",
            members=guardian.members({pgid}),
        )
        _signal_group(pgid, signal.SIGKILL)
        if await self._wait_group_gone(pgid, child, self._clock() + KILL_WAIT):
            return True
        rec.log.error("child_group_stuck", pgid=pgid, members=guardian.members({pgid}))
        return False

    async def _wait_group_gone(self, pgid: int, child: _Child, deadline: float) -> bool:
        delay = 0.005
        while True:
            if child.exited.done():
                _reap_group(pgid)
                if not group_exists(pgid):
                    return True
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            if child.exited.done():
                await asyncio.sleep(min(delay, remaining))
            else:
                await asyncio.wait({child.exited}, timeout=min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def _run_remote(self, rec: _Instance) -> None:
        """A remote instance: probed only; STARTING until healthy, never spawned, never FATAL."""
        while True:
            # STARTING: poll until healthy.
            while True:
                sup = self._topo.supervisor
                tick = self._clock()
                result = await self._probe_or_end(rec, None, sup.probe_timeout)
                if isinstance(result, _End):
                    self._to_stopped(rec)
                    return
                if result.ok:
                    break
                rec.last_exit = f"not healthy: {result.error}"
                if await self._idle(rec, None, _start_poll(sup) - (self._clock() - tick)):
                    self._to_stopped(rec)
                    return
            self._transition(rec, _S.RUNNING, "GET /health 200")
            self._set_ready(rec, True)
            rec.log.info("remote_ready", url=rec.inst.base_url)
            end = await self._watch_running(rec, None)
            if end.kind is _Ending.STOP:
                self._to_stopped(rec)
                return
            rec.last_exit = end.reason
            self._transition(rec, _S.STARTING, end.reason)
