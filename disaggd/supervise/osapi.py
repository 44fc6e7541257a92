"""The operating system as the supervisor sees it: one small seam tests can fake.

Everything the supervisor asks of Linux goes through `OsApi`: spawn a child in
its own session that dies with us, signal / probe / reap a process group, ask
whether a port is taken, become a child subreaper, prepare and empty an
instance's folders, and keep the guardian told which groups exist. `LinuxOs` is
the real one; a test passes its own (``Supervisor(topo, os_api=fake)``) to drive
crash loops, stuck groups and busy ports without processes or wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from disaggd.supervise import guardian
from disaggd.supervise.guardian_client import GuardianClient
from disaggd.topology.spec import InstanceSpec

#: Longest line read from a child in one piece; longer lines are split, never lost.
READ_LIMIT = 256 * 1024


class ChildProcess(Protocol):
    """A spawned child: the leader of its own process group (pgid == pid).

    Attributes:
        pid: its pid, also its process group id.
        exited: resolves to its return code (negative: killed by that signal) the
            moment it is reaped.
        stdout, stderr: its output, or None when not piped.
    """

    pid: int
    exited: asyncio.Future[int]
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    def close(self) -> None:
        """Release the transport (pipes) once the group is gone."""


class OsApi(Protocol):
    """The OS calls of the supervisor (Linux semantics; see `LinuxOs`)."""

    async def spawn(self, spec: InstanceSpec) -> ChildProcess:
        """Start ``spec.argv`` with ``spec.env`` in ``spec.workdir``, in a new session.

        The child dies with the daemon and is registered with the guardian.

        Raises:
            OSError, subprocess.SubprocessError: it could not be started.
        """

    def signal_group(self, pgid: int, sig: int) -> bool:
        """Send `sig` to group `pgid`; False when the group no longer exists."""

    def group_exists(self, pgid: int) -> bool:
        """True while any process of group `pgid` exists, zombies included."""

    def reap_group(self, pgid: int) -> None:
        """Reap exited members of `pgid` that are our children (after the leader's reaping)."""

    def release_group(self, pgid: int) -> None:
        """Group `pgid` is gone for good: the guardian need not watch it any more."""

    def group_members(self, pgid: int) -> list[int]:
        """Pids of the live members of group `pgid` (for logs)."""

    def port_in_use(self, host: str, port: int) -> bool:
        """True when `port` on `host` cannot be bound because something holds it."""

    def set_subreaper(self, enabled: bool) -> bool | None:
        """Become a child subreaper (or stop); the previous setting, None if unsupported."""

    def prepare_dirs(self, spec: InstanceSpec) -> None:
        """Create the instance's workdir and tmpdir; empty the tmpdir.

        Raises:
            OSError: a folder cannot be created.
        """

    def empty_dir(self, path: Path) -> None:
        """Remove everything inside `path` (not `path` itself); errors are ignored."""

    @property
    def guardian_pid(self) -> int | None:
        """Pid of the guardian process, once a child has been spawned."""

    async def close(self) -> None:
        """Release the guardian: it kills whatever group is still registered."""


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


def signal_group(pgid: int, sig: int) -> bool:
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
    return signal_group(pgid, 0)


def reap_group(pgid: int) -> None:
    """Reap exited members of `pgid` that are our children (reparented orphans).

    Only called once the group leader has been reaped (`ChildProcess.exited`):
    ``waitid`` on the group would otherwise steal the leader's exit status.
    """
    while True:
        try:
            info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return
        if info is None:
            return


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


def empty_dir(path: Path) -> None:
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


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


def _pidfd_open(pid: int) -> int | None:
    """A pidfd of `pid` (readable once it exits), or None where the kernel has none (< 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class _Spawned:
    """A `ChildProcess` started by `subprocess.Popen`, its exit seen through a pidfd.

    Not asyncio's subprocess transport, for two reasons. Its ``Process.wait()``
    also waits for the pipes to close (cpython gh-119710), and an orphaned
    EngineCore keeps them open: that would hide the crash of the API server for
    as long as its orphan lives. And it needs asyncio's own child watcher, which
    other event loops (uvloop, chosen for the proxy's sake) replace with theirs.
    A pidfd becomes readable the moment the process exits, on any loop
    (``add_reader``), and names that process only (no pid reuse); `exited`
    resolves once we have reaped it here, so `reap_group` never steals it.
    """

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.pid: int = popen.pid
        self.exited: asyncio.Future[int] = loop.create_future()
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._popen = popen  # held until reaped: a dropped Popen may be reaped by subprocess
        self._loop = loop
        self._pipes: list[asyncio.BaseTransport] = []
        self._pidfd = _pidfd_open(popen.pid)
        self._poll: asyncio.TimerHandle | None = None
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._reap)
        else:  # pragma: no cover - kernels before 5.3
            self._reap()

    async def connect(self) -> None:
        """Read the child's stdout and stderr through the loop."""
        for name in ("stdout", "stderr"):
            pipe = getattr(self._popen, name)
            if pipe is None:
                continue
            reader = asyncio.StreamReader(limit=READ_LIMIT, loop=self._loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
            transport, _ = await self._loop.connect_read_pipe(
                functools.partial(_same, protocol), pipe
            )
            self._pipes.append(transport)
            setattr(self, name, reader)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            pid, status = self.pid, -1
        if pid == 0:  # still running: only the pidless fallback gets here
            self._poll = self._loop.call_later(0.05, self._reap)
            return
        rc = os.waitstatus_to_exitcode(status) if status != -1 else -1
        self._popen.returncode = rc
        self._close_pidfd()
        if not self.exited.done():
            self.exited.set_result(rc)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poll is not None:
            self._poll.cancel()

    def close(self) -> None:
        for transport in self._pipes:
            transport.close()
        if self.exited.done():
            self._close_pidfd()


class LinuxOs:
    """The real `OsApi`: prctl, killpg, waitid, bind, and a guardian process."""

    def __init__(self) -> None:
        self._guardian = GuardianClient()

    async def spawn(self, spec: InstanceSpec) -> ChildProcess:
        loop = asyncio.get_running_loop()
        parent = os.getpid()
        # fork+exec in the loop, as asyncio's own subprocess_exec does: no thread to wait on.
        popen = subprocess.Popen(  # noqa: ASYNC220
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **spec.env},
            cwd=str(spec.workdir),
            start_new_session=True,
            # prctl and getppid only: takes no lock a thread could hold across the fork.
            preexec_fn=lambda: _die_with_parent(parent),  # noqa: PLW1509
        )
        child = _Spawned(popen, loop)
        # start_new_session: the child leads its own session and group.
        self._guardian.register(child.pid)
        await child.connect()
        return child

    def signal_group(self, pgid: int, sig: int) -> bool:
        return signal_group(pgid, sig)

    def group_exists(self, pgid: int) -> bool:
        return group_exists(pgid)

    def reap_group(self, pgid: int) -> None:
        reap_group(pgid)

    def release_group(self, pgid: int) -> None:
        self._guardian.unregister(pgid)

    def group_members(self, pgid: int) -> list[int]:
        return guardian.members({pgid})

    def port_in_use(self, host: str, port: int) -> bool:
        return port_in_use(host, port)

    def set_subreaper(self, enabled: bool) -> bool | None:
        return set_subreaper(enabled)

    def prepare_dirs(self, spec: InstanceSpec) -> None:
        assert spec.workdir is not None and spec.tmpdir is not None
        spec.workdir.mkdir(parents=True, exist_ok=True)
        spec.tmpdir.mkdir(parents=True, exist_ok=True)
        empty_dir(spec.tmpdir)  # left over if the daemon itself was killed

    def empty_dir(self, path: Path) -> None:
        empty_dir(path)

    @property
    def guardian_pid(self) -> int | None:
        return self._guardian.pid

    async def close(self) -> None:
        await self._guardian.close()
