"""A real `disaggd run` process for tests: started, observed through sd_notify, stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.harness.common import wait_for, write_topology


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        """Read every datagram that arrived; returns all messages so far."""
        while self.sock.fileno() != -1:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
        return self.messages

    def wait(self, key: str, value: str = "1", timeout: float = 60.0, after: int = 0) -> int:
        """Index of the first message (from `after`) with key=value."""

        def found() -> int | None:
            for idx, msg in enumerate(self.poll()[after:], start=after):
                if msg.get(key) == value:
                    return idx + 1  # +1 so that index 0 is truthy
            return None

        return int(wait_for(found, timeout, what=f"sd_notify {key}={value}")) - 1

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """`python -m disaggd run -c FILE` with a notify socket and its output in a file."""

    def __init__(
        self, tmp_path: Path, doc: Mapping[str, Any], env: Mapping[str, str] | None = None
    ):
        self.tmp_path = tmp_path
        self.doc = doc
        self.config = write_topology(tmp_path / "disaggd.toml", doc)
        self.log_path = tmp_path / "daemon.log"
        self.notify = NotifySocket(tmp_path / "notify.sock")
        self.env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.doc['proxy']['port']}"

    @property
    def socket_path(self) -> str:
        return str(self.doc["daemon"]["control_socket"])

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> DaemonProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disaggd", "run", "-c", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            try:
                self.notify.wait("READY", timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"daemon not ready; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a control command against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "disaggd", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """`disaggd status --json`, by instance name (socket given: the file may be bad)."""
        proc = self.cli("status", "--json", "--socket", self.socket_path)
        assert proc.returncode == 0, proc.stderr
        return {row["name"]: row for row in json.loads(proc.stdout)["instances"]}

    def pids(self) -> dict[str, int]:
        return {name: row["pid"] for name, row in self.status().items()}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not go. Returns the exit status."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(10)
        elif self.proc is not None:
            rc = self.proc.returncode
        self.notify.poll()  # keep what systemd would have received, up to the end
        return rc

    def close(self) -> None:
        self.stop()
        self._log.close()
        self.notify.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
