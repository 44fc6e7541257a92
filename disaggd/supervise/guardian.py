"""The guardian: kills the daemon's process groups when the daemon dies.

The parent-death signal (``PR_SET_PDEATHSIG``) reaches only the daemon's
direct children; a `vllm serve` killed that way leaves its EngineCore and
workers alive (vllm #55510). This tiny process closes that gap:

* the supervisor starts it once, in its own session, with a pipe on its stdin;
* the supervisor writes ``+PGID`` when it spawns a process group and ``-PGID``
  when that group is entirely gone;
* at end of file (the daemon died, even by SIGKILL, or closed the pipe at a
  clean shutdown) it SIGKILLs every group still registered, kills any member
  of those groups it can find under /proc, and exits.

It ignores SIGINT, SIGTERM and SIGHUP so that a signal aimed at the daemon's
terminal or service does not take it away before it has done its job; end of
file is its only way out. Standard library only, nothing imported beyond
``os``/``signal``/``sys``/``time``: it must start fast and stay small. Run it
as ``python -S path/to/guardian.py`` (see `command`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

#: How long the guardian keeps looking for group members after the first SIGKILL, seconds.
SWEEP_SECONDS = 5.0

#: Signals the guardian ignores: only end of file ends it.
IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def command(python: str = sys.executable) -> list[str]:
    """argv that starts the guardian (``-S``: no site import, faster and smaller)."""
    return [python, "-S", os.path.abspath(__file__)]


def start() -> subprocess.Popen[bytes]:
    """Start a guardian with a pipe on its stdin (`Popen.stdin`); the caller owns it.

    It runs in its own session, so a Ctrl-C or SIGHUP aimed at the daemon's
    process group misses it, and it is started with the `IGNORED` signals
    blocked (a blocked mask survives exec), so that a SIGTERM in the
    milliseconds before it has installed SIG_IGN cannot end it either. No
    PDEATHSIG, of course: it has to outlive the daemon.

    Raises:
        OSError: it could not be started.
    """
    import subprocess  # here, not at the top: the guardian itself never needs it

    old = signal.pthread_sigmask(signal.SIG_BLOCK, IGNORED)
    try:
        return subprocess.Popen(
            command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def members(pgids: set[int]) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is in `pgids`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, ...
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) in pgids:
            found.append(int(entry))
    return found


def _kill(target: int, *, group: bool) -> bool:
    """SIGKILL a group or a process; False when it was already gone."""
    try:
        (os.killpg if group else os.kill)(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_groups(pgids: set[int], sweep: float = SWEEP_SECONDS) -> None:
    """SIGKILL every group in `pgids`, then every member still found, until none is left."""
    if not pgids:
        return
    for pgid in pgids:
        _kill(pgid, group=True)
    deadline = time.monotonic() + sweep
    while True:
        left = members(pgids)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            _kill(pid, group=False)
        time.sleep(0.05)


def apply(line: bytes, pgids: set[int]) -> None:
    """Apply one ``+PGID`` / ``-PGID`` line to `pgids`; anything else is ignored."""
    text = line.strip()
    if len(text) < 2 or text[:1] not in (b"+", b"-") or not text[1:].isdigit():
        return
    pgid = int(text[1:])
    if pgid <= 1:
        return  # never the whole system, never init's group
    if text[:1] == b"+":
        pgids.add(pgid)
    else:
        pgids.discard(pgid)


def main(fd: int = 0) -> int:
    """Read registrations from `fd` until end of file, then kill what is registered."""
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    # Blocked by `start` until now; a signal that came meanwhile is pending and now ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED)
    pgids: set[int] = set()
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            apply(line, pgids)
    kill_groups(pgids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
