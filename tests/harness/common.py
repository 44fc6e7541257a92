"""The one shared harness of the test suite: ports, topologies, waiting, HTTP, processes.

Every level (unit, process, http, daemon, e2e) and the benchmark use these; the
stand-in engine is started through `standin_topology` (its ``[engine].command``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

#: The stand-in engine, as an [engine].command.
STANDIN_COMMAND = ["{python}", "-m", "devtools.standin", "serve", "{model}"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


#: Set by tests/conftest.py: a short folder of the session (see `short_dir`).
SHORT_BASE_ENV = "DISAGGD_TEST_SHORT_BASE"


def short_dir(tmp_path: Path) -> Path:
    """A short folder standing for `tmp_path`, for state directories.

    Unix socket paths hold 107 bytes and vLLM binds ZMQ sockets at $TMPDIR/<uuid>,
    so a state directory under pytest's long tmp_path would be refused by validation.
    """
    base = Path(os.environ.get(SHORT_BASE_ENV) or tempfile.gettempdir())
    folder = base / hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def toml_value(v: Any) -> str:
    """A TOML literal for a str, number, bool, list or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
        )
    raise TypeError(type(v))


def dump_toml(doc: Mapping[str, Any]) -> str:
    """Render a topology document (tables of scalars, plus an `instance` array)."""
    lines: list[str] = []
    for section, body in doc.items():
        if section == "instance":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for inst in doc.get("instance", []):
        lines.append("[[instance]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in inst.items()]
        lines.append("")
    text = "\n".join(lines)
    tomllib.loads(text)  # fail here, not in the daemon, if the renderer is wrong
    return text


def standin_topology(
    tmp_path: Path,
    *,
    prefill: int = 1,
    decode: int = 1,
    connector: str = "NixlConnector",
    instance_env: Mapping[str, Mapping[str, str]] | None = None,
    instance_args: Mapping[str, Sequence[str]] | None = None,
    supervisor: Mapping[str, Any] | None = None,
    proxy: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    kv_transfer: Mapping[str, Any] | None = None,
    model_args: Sequence[str] = (),
) -> dict[str, Any]:
    """A topology document whose instances are stand-in engines on free ports.

    Instances are named prefill-0.., decode-0..; fast supervisor timings.
    """
    n = prefill + decode
    ports = free_ports(2 * n + 1)
    instances = []
    for i in range(n):
        role = "prefill" if i < prefill else "decode"
        idx = i if i < prefill else i - prefill
        name = f"{role}-{idx}"
        inst: dict[str, Any] = {
            "name": name,
            "role": role,
            "port": ports[i],
            "kv_port": ports[n + i],
        }
        if instance_env and name in instance_env:
            inst["env"] = dict(instance_env[name])
        if instance_args and name in instance_args:
            inst["args"] = list(instance_args[name])
        instances.append(inst)
    kv: dict[str, Any] = {"connector": connector}
    if connector == "ExampleConnector":
        kv["extra_config"] = {"shared_storage_path": "{state_dir}/kv"}
    kv.update(kv_transfer or {})
    doc: dict[str, Any] = {
        "model": {"name": "standin-model", "args": list(model_args)},
        "engine": {"command": STANDIN_COMMAND},
        "kv_transfer": kv,
        "supervisor": {
            "start_timeout": 20,
            "stop_grace": 5,
            "stable_after": 2,
            "backoff_initial": 0.2,
            "backoff_factor": 2,
            "backoff_max": 1,
            "max_failures": 3,
            "probe_interval": 0.2,
            "probe_timeout": 0.5,
            "probe_failures": 2,
            **(supervisor or {}),
        },
        "proxy": {"host": "127.0.0.1", "port": ports[-1], **(proxy or {})},
        "daemon": {
            "control_socket": str(tmp_path / "ctl.sock"),
            "state_dir": str(short_dir(tmp_path) / "state"),
            "log_format": "logfmt",
            "log_level": "debug",
            **(daemon or {}),
        },
        "instance": instances,
    }
    return doc


def write_topology(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write `doc` as TOML to `path` and return it."""
    path.write_text(dump_toml(doc))
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `predicate` until it returns a truthy value; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """`wait_for` for coroutines: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def processes_with_env(marker: str, value: str) -> list[int]:
    """Pids (other than this one) whose environment has `marker=value`."""
    needle = f"{marker}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def disaggd_argv(*args: str) -> list[str]:
    """argv that runs the disaggd CLI with this interpreter."""
    return [sys.executable, "-m", "disaggd", *args]


# -- HTTP (blocking, stdlib: usable from threads and from the benchmark) ----------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; (status, body) whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(
    url: str,
    body: Mapping[str, Any],
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """POST JSON to `url`; (status, body) whatever the status."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def all_gone(pids: list[int], timeout: float = 15.0) -> bool:
    """True once none of `pids` is alive (within `timeout` s)."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout)
    return not any(pid_alive(p) for p in pids)


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    def closed() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    wait_for(closed, timeout, what=f"port {port} closed")


def now() -> float:
    return time.monotonic()
