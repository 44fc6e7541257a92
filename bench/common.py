"""What every benchmark part uses: the load generator as a process, the daemon, /proc figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from disaggd.daemon import control
from tests.harness.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 16
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the load generator -------------------------------------------------------------------------


def loadgen_argv(url: str, *, prefill_url: str | None = None, **opts: Any) -> list[str]:
    """argv of `bench.loadgen`; keyword options become ``--key value`` (True: a flag)."""
    argv = [sys.executable, "-m", "bench.loadgen", "--url", url]
    if prefill_url:
        argv += ["--prefill-url", prefill_url]
    opts.setdefault("max_tokens", MAX_TOKENS)
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def run_loadgen(argv: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run the load generator to the end; its JSON result."""
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


class BackgroundLoad:
    """The load generator running until `stop` (SIGTERM: in-flight requests finish)."""

    def __init__(self, url: str, concurrency: int, limit: float = 300.0):
        argv = loadgen_argv(
            url, concurrency=concurrency, duration=limit, warmup=0, records=True, timeout=60
        )
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> dict[str, Any]:
        """Stop sending, wait for the requests in flight; the JSON result (with records)."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({self.proc.returncode}): {err[-2000:]}")
        result: dict[str, Any] = json.loads(out)
        return result

    def __enter__(self) -> BackgroundLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by pid
            self.proc.communicate()


# -- the daemon ----------------------------------------------------------------------------------


def start_daemon(
    tmp: Path, doc: dict[str, Any], stack: contextlib.ExitStack, timeout: float = 90.0
) -> DaemonProcess:
    """`disaggd run` on `doc`, ready (sd_notify READY=1); stopped when `stack` closes."""
    tmp.mkdir(parents=True, exist_ok=True)
    daemon = stack.enter_context(DaemonProcess(tmp, doc))
    daemon.start(timeout=timeout)
    return daemon


def daemon_pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def status(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    """The daemon's instances by name (from its control socket; no CLI process)."""
    reply = control.request(Path(daemon.socket_path), {"command": "status"}, 10.0)
    return {row["name"]: row for row in reply["instances"]}


# -- Prometheus ----------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the Prometheus samples `name` whose labels include `labels`; None: no sample."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in want)
    ]
    return sum(values) if values else None


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


# -- /proc ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat(5) fields 14 and 15


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError, IndexError, ValueError),
                open(f"/proc/{entry}/stat") as f,
            ):
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """`cpu_seconds` summed over `pids`; a process that is gone counts 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def status_mb(pid: int, key: str) -> float:
    """A ``Vm*`` line of /proc/PID/status (VmRSS, VmHWM), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


class RssSampler:
    """Peak VmRSS of a process (and the proxy's in-flight count) while a block runs."""

    def __init__(self, pid: int, control_socket: str | None = None, period: float = 0.02):
        self.pid = pid
        self.socket = control_socket
        self.period = period
        self.peak_mb = 0.0
        self.peak_inflight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_mb = max(self.peak_mb, status_mb(self.pid, "VmRSS"))
            if self.socket is not None and n % 5 == 0:
                with contextlib.suppress(control.ControlUnavailable, OSError):
                    reply = control.request(Path(self.socket), {"command": "status"}, 2.0)
                    inflight = int((reply.get("proxy") or {}).get("inflight") or 0)
                    self.peak_inflight = max(self.peak_inflight, inflight)
            n += 1
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
