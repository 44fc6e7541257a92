"""The daemon's end of the pipe to the guardian (`disaggd.supervise.guardian`).

The guardian is a separate process; this side starts it on the first spawn,
tells it ``+PGID`` / ``-PGID`` as groups come and go, replaces it if it dies
(and tells the new one every live group), and at shutdown closes the pipe so
that it kills whatever is still registered and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time

from disaggd.observe.logs import get_logger
from disaggd.supervise import guardian

log = get_logger(__name__)


class GuardianClient:
    """Registers process groups with a guardian process (started lazily)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgids: set[int] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The guardian's pid, once started."""
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self) -> None:
        """Start a guardian unless one runs (or the client is closed); errors are logged."""
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
        """Group `pgid` exists: kill it if the daemon dies."""
        self._pgids.add(pgid)
        self._send(f"+{pgid}\n")

    def unregister(self, pgid: int) -> None:
        """Group `pgid` is gone: forget it."""
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
