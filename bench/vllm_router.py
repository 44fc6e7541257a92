"""vLLM's own P/D router (``vllm-router`` on PyPI, Rust) as a way of the overhead benchmark.

It lives in its own virtual environment, ``.venv-vllm-router/`` at the repository root
(git-ignored by ``.venv-*/``), created on first use with the package index's
``vllm-router==VERSION``; a venv that holds another version is reinstalled. It is started as

    vllm-router --host 127.0.0.1 --port P --vllm-pd-disaggregation \\
        --prefill PREFILL_URL --decode DECODE_URL --kv-connector nixl \\
        --policy round_robin --prometheus-host 127.0.0.1 --prometheus-port M \\
        --log-level warning --worker-startup-check-interval 1

in front of the same stand-in engines as disaggd (NIXL-style handoff: the prefill leg gets
``kv_transfer_params={"do_remote_decode": true, ...}`` and ``max_tokens`` 1, the decode leg
the params the prefill returned). ``round_robin`` because there is one engine per role and
disaggd has no cache-aware policy either: the router's default, ``cache_aware``, would keep a
prefix tree of every prompt. Its whole process (the Python launcher runs the Rust router
in-process) and any children count for CPU and memory.

Anything that goes wrong (no network for pip, no wheel for this platform, no ``/health``
answer) raises `Unavailable` with the reason; the benchmark prints it and goes on without
this way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from bench.common import ROOT
from tests.harness.common import free_ports

PACKAGE = "vllm-router"
#: Checked with ``pip index versions vllm-router`` (0.1.9 ... 0.1.17) and measured here.
VERSION = "0.1.17"
DEFAULT_VENV = ROOT / ".venv-vllm-router"


class Unavailable(RuntimeError):
    """vllm-router cannot be installed or started here; the message says why."""


def _installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    proc = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version('{PACKAGE}'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure(venv: Path = DEFAULT_VENV, log: IO[str] | None = None) -> Path:
    """The ``vllm-router`` executable of `venv`, installed there first if need be."""
    exe = venv / "bin" / "vllm-router"
    if _installed_version(venv) == VERSION and exe.exists():
        return exe
    print(f"  installing {PACKAGE}=={VERSION} into {venv} ...", flush=True)
    steps = []
    if not (venv / "bin" / "python").exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    steps.append(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{PACKAGE}=={VERSION}"]
    )
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{' '.join(argv[:4])} ...: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise Unavailable(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {tail}")
    if _installed_version(venv) != VERSION or not exe.exists():
        raise Unavailable(f"{PACKAGE}=={VERSION} is not in {venv} after pip install")
    return exe


class VllmRouter:
    """One ``vllm-router`` process in P/D mode; `stop` (or the context's end) ends it."""

    def __init__(self, exe: Path, prefill_url: str, decode_url: str, log_path: Path):
        self.exe = exe
        self.port, self.metrics_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            str(exe),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--vllm-pd-disaggregation",
            "--prefill", prefill_url,
            "--decode", decode_url,
            "--kv-connector", "nixl",
            "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(self.metrics_port),
            "--log-level", "warning",
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> VllmRouter:
        """Start it and wait for ``GET /health`` 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as exc:
                raise Unavailable(f"{self.exe}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"vllm-router exited {self.proc.returncode}: {self.log_tail()}")
            if _healthy(self.url):
                return self
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"vllm-router gave no /health in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to its own process group (it was started in a new session), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VllmRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
