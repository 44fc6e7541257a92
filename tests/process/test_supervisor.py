"""The supervisor with real processes and real signals (stand-in engines on 127.0.0.1).

Every test drives a `Supervisor` in this process, except the daemon-death test,
which runs one in a child process and SIGKILLs that. Timings come from
`standin_topology` (probe every 0.2 s, deadline 0.5 s, 2 failures; backoff 0.2 s
doubling to 1 s; 3 failures to FATAL; 5 s grace) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from disaggd.supervise import guardian
from disaggd.supervise.child import read_lines
from disaggd.supervise.osapi import LinuxOs
from disaggd.supervise.states import ProcessState
from disaggd.supervise.supervisor import Supervisor
from disaggd.topology import parse_config
from disaggd.topology.spec import build_spec
from tests.harness.common import (
    async_wait_for,
    free_port,
    pid_alive,
    standin_topology,
    wait_for,
    write_topology,
)
from tests.harness.supervise import (  # noqa: F401 - plain_structlog is a fixture
    STEADY,
    Recorder,
    events,
    fatal_lines,
    make_topo,
    plain_structlog,
    supervisor,
    wait_state,
)

S = ProcessState
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test if they are still alive (a failed test's leftovers)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


def start_detached(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    """A process in its own session (a "remote" engine the supervisor does not own)."""
    return subprocess.Popen(argv, start_new_session=True, cwd=cwd)


async def standin_info(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_standin/info") as resp:
        resp.raise_for_status()
        data: dict[str, Any] = await resp.json()
        return data


# -- start, readiness, stop --------------------------------------------------------------------


async def test_two_prefill_two_decode_reach_running_and_ready(tmp_path: Path) -> None:
    topo = make_topo(tmp_path, prefill=2, decode=2)
    rec = Recorder()
    names = ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    async with supervisor(topo, rec) as sup:
        t0 = time.monotonic()
        await sup.start_all()
        # Launched, not ready: start_all does not wait for /health.
        assert [s.state for s in sup.statuses()] == [S.STARTING] * 4
        assert not any(s.ready for s in sup.statuses())
        assert await sup.wait_ready(timeout=20)
        ready_after = time.monotonic() - t0

        statuses = sup.statuses()
        assert [s.name for s in statuses] == names
        children: list[int] = []
        for st in statuses:
            assert st.state is S.RUNNING and st.ready and st.spawned
            assert st.pid is not None and pid_alive(st.pid)
            assert os.getpgid(st.pid) == st.pid == os.getsid(st.pid)  # own session and group
            assert st.url == f"http://127.0.0.1:{st.port}"
            assert (st.restarts, st.failures, st.last_exit) == (0, 0, None)
            assert st.uptime is not None and st.uptime >= 0
            info = await standin_info(st.url)
            assert info["pid"] == st.pid
            engine = info["engine_pid"]
            assert pid_alive(engine) and os.getpgid(engine) == st.pid
            children += [st.pid, engine]
        assert sorted((n, r) for _, n, r in rec.ready) == sorted((n, True) for n in names)
        assert sup.guardian_pid is not None and pid_alive(sup.guardian_pid)
        guardian_pid = sup.guardian_pid
        with pytest.raises(KeyError):
            sup.status("nope")
        with pytest.raises(KeyError):
            await sup.wait_ready(["nope"])

        t1 = time.monotonic()
        assert await sup.shutdown() is True
        stop_took = time.monotonic() - t1
        assert await sup.shutdown() is True  # idempotent
        for st in sup.statuses():
            assert st.state is S.STOPPED and not st.ready and st.pid is None
        assert not [p for p in children if pid_alive(p)]
        assert not pid_alive(guardian_pid)
        with pytest.raises(RuntimeError):
            await sup.start_all()
    for name in names:
        assert rec.path(name) == [S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED]
        assert rec.readiness(name) == [True, False]
    print(f"2P2D ready after {ready_after:.2f}s, stopped in {stop_took:.2f}s")


async def test_kill9_of_main_process_restarts_after_backoff_without_the_orphan(
    tmp_path: Path, reap: list[int]
) -> None:
    topo = make_topo(tmp_path)
    rec = Recorder()
    old: dict[str, int] = {}
    # At the moment the new start begins: is anything of the old group left?
    rec.on_state[("decode-0", S.STARTING)] = lambda st: (
        st.restarts,
        [p for p in old.values() if pid_alive(p)],
    )
    async with supervisor(topo, rec) as sup:
        await sup.start_all()
        assert await sup.wait_ready(timeout=20)
        prefill_pid = sup.status("prefill-0").pid
        st = sup.status("decode-0")
        assert st.pid is not None
        info = await standin_info(st.url)
        old = {"main": st.pid, "engine": info["engine_pid"]}
        reap += old.values()

        t_kill = time.monotonic()
        os.kill(old["main"], signal.SIGKILL)
        new = await wait_state(sup, "decode-0", S.RUNNING, restarts=1, ready=True)

        assert new.last_exit == "killed by SIGKILL"
        assert new.failures == 1
        assert new.pid not in (None, old["main"])
        assert rec.path("decode-0") == [
            S.STARTING,
            S.RUNNING,
            S.EXITED,
            S.BACKOFF,
            S.STARTING,
            S.RUNNING,
        ]
        t_exit = rec.first("decode-0", S.EXITED, after=t_kill)
        t_backoff = rec.first("decode-0", S.BACKOFF, after=t_kill)
        t_restart = rec.first("decode-0", S.STARTING, after=t_kill)
        assert t_exit is not None and t_backoff is not None and t_restart is not None
        assert t_exit - t_kill < 1.0  # the exit is awaited, not polled
        assert t_restart - t_backoff >= topo.supervisor.backoff_initial - 0.01
        # The orphaned EngineCore was gone before the new start.
        assert rec.seen[("decode-0", S.STARTING)][-1] == (1, [])
        assert not pid_alive(old["engine"])
        info = await standin_info(new.url)
        assert info["engine_pid"] != old["engine"] and pid_alive(info["engine_pid"])
        assert rec.readiness("decode-0") == [True, False, True]
        # The other instance did not notice.
        other = sup.status("prefill-0")
        assert other.pid == prefill_pid and other.restarts == 0 and other.ready
    print(
        f"kill -9 → EXITED {t_exit - t_kill:.3f}s, RUNNING again {time.monotonic() - t_kill:.2f}s"
    )


async def test_exit_status_0_nobody_asked_for_is_a_crash(tmp_path: Path) -> None:
    topo = make_topo(
        tmp_path,
        instance_env={"decode-0": {"STANDIN_EXIT_AFTER_REQUESTS": "1", "STANDIN_EXIT_CODE": "0"}},
    )
    rec = Recorder()
    async with supervisor(topo, rec) as sup:
        await sup.start_all()
        assert await sup.wait_ready(timeout=20)
        st = sup.status("decode-0")
        body = {"model": "standin-model", "prompt": "hello", "max_tokens": 2}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{st.url}/v1/completions", json=body) as resp,
        ):
            assert resp.status == 200
        after = await wait_state(sup, "decode-0", S.RUNNING, restarts=1, ready=True)
        assert after.last_exit == "exited with status 0 (unexpected)"
        assert after.failures == 1
        assert rec.path("decode-0")[:5] == [S.STARTING, S.RUNNING, S.EXITED, S.BACKOFF, S.STARTING]


async def test_always_failing_start_goes_fatal_with_its_output_while_others_run(
    tmp_path: Path,
) -> None:
    topo = make_topo(tmp_path, instance_env={"decode-0": {"STANDIN_FAIL_START": "1"}})
    rec = Recorder()
    with capture_logs() as logs:
        async with supervisor(topo, rec) as sup:
            await sup.start_all()
            assert await sup.wait_ready(["prefill-0"], timeout=20)
            prefill_pid = sup.status("prefill-0").pid
            # False as soon as decode-0 is FATAL (not at the timeout).
            assert await sup.wait_ready(timeout=60) is False
            st = sup.status("decode-0")
            assert st.state is S.FATAL and not st.ready and st.pid is None
            assert st.failures == topo.supervisor.max_failures == 3
            assert st.restarts == 2
            assert st.last_exit == "exited with status 1 (unexpected)"
            assert any("EngineCore failed to start" in line for line in st.last_output)
            assert rec.path("decode-0") == [
                S.STARTING,
                S.BACKOFF,
                S.STARTING,
                S.BACKOFF,
                S.STARTING,
                S.FATAL,
            ]
            # FATAL is final: nothing was spawned after the third failure (that nothing ever
            # will be is proven on the virtual clock: test_fake_crash_loop_...).
            assert len(events(logs, "child_spawned", "decode-0")) == 3
            # The others keep running.
            other = sup.status("prefill-0")
            assert other.state is S.RUNNING and other.ready and other.pid == prefill_pid
            assert other.restarts == 0

            # restart() clears FATAL and the failure count; here with a fixed section.
            fixed = topo.instance("decode-0").model_copy(update={"env": {}})
            assert await sup.restart("decode-0", fixed, topo) is True
            st = sup.status("decode-0")
            assert st.state is S.RUNNING and st.ready and st.failures == 0 and st.restarts == 3

    # FATAL is logged once: the state change itself, at error level, with the report.
    fatal = fatal_lines(logs, "decode-0")
    assert len(fatal) == 1
    assert fatal[0]["log_level"] == "error" and fatal[0]["role"] == "decode"
    assert fatal[0]["from_state"] == "STARTING"
    assert fatal[0]["reason"] == "exited with status 1 (unexpected); 3 failures in a row"
    assert fatal[0]["failures"] == 3
    assert fatal[0]["last_exit"] == "exited with status 1 (unexpected)"
    assert fatal[0]["hint"] == "not restarted until `disaggd restart decode-0` or a reload"
    assert any("EngineCore failed to start" in line for line in fatal[0]["last_output"])
    assert not [e for e in logs if e["log_level"] == "error" and "fatal" in e["event"]]
    # Child output is re-emitted line by line with its instance, role, stream and level.
    out = events(logs, "child_output", "decode-0")
    assert out and all({"role", "stream", "line"} <= set(e) for e in out)
    errors = [e for e in out if "EngineCore failed to start" in e["line"]]
    assert errors and errors[0]["log_level"] == "error"
    # Every state change is logged with the edge, the pid and a reason.
    for e in events(logs, "instance_state"):
        assert {"instance", "role", "pid", "from_state", "to_state", "reason"} <= set(e)


async def test_start_timeout_kills_and_counts_a_failure(tmp_path: Path) -> None:
    topo = make_topo(
        tmp_path,
        decode=1,
        instance_env={"decode-0": {"STANDIN_HEALTH_STATUS": "503"}},
        supervisor={"start_timeout": 1, "max_failures": 2},
    )
    rec = Recorder()
    pids: list[int] = []
    rec.on_state[("decode-0", S.STOPPING)] = lambda st: pids.append(st.pid)
    async with supervisor(topo, rec) as sup:
        await sup.start_all()
        assert await sup.wait_ready(["decode-0"], timeout=15) is False
        st = sup.status("decode-0")
        assert st.state is S.FATAL and st.last_exit == "not ready within 1s"
        assert rec.path("decode-0") == [
            S.STARTING,
            S.STOPPING,
            S.BACKOFF,
            S.STARTING,
            S.STOPPING,
            S.FATAL,
        ]
        assert len(pids) == 2 and not [p for p in pids if pid_alive(p)]


# -- liveness ----------------------------------------------------------------------------------


async def test_sigstopped_child_is_detected_by_the_deadline_and_restarted(
    tmp_path: Path, reap: list[int]
) -> None:
    # Fast enough to measure, slow enough that load alone does not trip it.
    topo = make_topo(tmp_path, supervisor={"probe_timeout": 1.0, "probe_failures": 2})
    sup_cfg = topo.supervisor
    rec = Recorder()
    async with supervisor(topo, rec) as sup:
        await sup.start_all()
        assert await sup.wait_ready(timeout=20)
        st = sup.status("decode-0")
        assert st.pid is not None
        engine = (await standin_info(st.url))["engine_pid"]
        reap += [st.pid, engine]
        t0 = time.monotonic()
        os.kill(st.pid, signal.SIGSTOP)
        try:
            await async_wait_for(
                lambda: rec.readiness("decode-0")[-1:] == [False], timeout=10, what="not ready"
            )
            detected = next(t for t, n, r in rec.ready if n == "decode-0" and not r) - t0
            bound = (sup_cfg.probe_timeout + sup_cfg.probe_interval) * sup_cfg.probe_failures
            assert sup_cfg.probe_timeout * sup_cfg.probe_failures <= detected <= bound + 1.0
            new = await wait_state(sup, "decode-0", S.RUNNING, restarts=1, ready=True)
        finally:
            if pid_alive(st.pid):
                os.kill(st.pid, signal.SIGCONT)
        assert new.last_exit == "unhealthy: 2 probes failed (timeout)"
        assert new.failures == 1 and new.pid != st.pid
        assert not pid_alive(st.pid) and not pid_alive(engine)
        path = rec.path("decode-0")
        assert path[:5] == [S.STARTING, S.RUNNING, S.STOPPING, S.BACKOFF, S.STARTING]
    print(f"SIGSTOP detected after {detected:.2f}s (bound {bound:.2f}s)")


# -- stopping ----------------------------------------------------------------------------------


async def test_child_ignoring_sigterm_is_killed_at_the_grace_deadline(tmp_path: Path) -> None:
    grace = 3.0
    topo = make_topo(
        tmp_path,
        instance_env={"decode-0": {"STANDIN_IGNORE_SIGTERM": "1"}},
        supervisor={**STEADY, "stop_grace": grace},
    )
    rec = Recorder()
    with capture_logs() as logs:
        async with supervisor(topo, rec) as sup:
            await sup.start_all()
            assert await sup.wait_ready(timeout=20)
            pids = []
            for st in sup.statuses():
                assert st.pid is not None
                pids += [st.pid, (await standin_info(st.url))["engine_pid"]]
            t0 = time.monotonic()
            assert await sup.shutdown() is True
            took = time.monotonic() - t0
            assert not [p for p in pids if pid_alive(p)]
    assert grace - 0.05 <= took < grace + 2.0, took
    kills = events(logs, "child_kill")
    assert [(e["instance"], e["signal"]) for e in kills] == [("decode-0", "SIGKILL")]
    # The polite one was not held up by the other: one deadline, stopped concurrently.
    t_prefill = rec.first("prefill-0", S.STOPPED, after=t0)
    assert t_prefill is not None and t_prefill - t0 < grace - 0.1
    print(f"SIGTERM-ignoring child gone {took:.2f}s after shutdown (grace {grace}s)")


class StuckGroupOs(LinuxOs):
    """The real OS, except that one process group never disappears (as if stuck in D state)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck: int | None = None

    def group_exists(self, pgid: int) -> bool:
        return pgid == self.stuck or super().group_exists(pgid)


async def test_a_group_that_survives_sigkill_is_fatal_not_restarted(tmp_path: Path) -> None:
    """A process stuck in the kernel cannot be simulated unprivileged: the OS seam pretends."""
    topo = make_topo(tmp_path, supervisor={"stop_grace": 0.5})
    fake = StuckGroupOs()
    rec = Recorder()
    with capture_logs() as logs:
        async with supervisor(topo, rec, os_api=fake, kill_wait=0.3) as sup:
            await sup.start_all()
            assert await sup.wait_ready(timeout=20)
            stuck = sup.status("decode-0").pid
            assert stuck is not None
            fake.stuck = stuck
            os.kill(stuck, signal.SIGKILL)
            st = await wait_state(sup, "decode-0", S.FATAL)
            assert st.last_exit == "killed by SIGKILL" and st.failures == 0
            assert sup.status("prefill-0").ready
            assert await sup.shutdown() is False  # not everything could be confirmed gone
    assert rec.path("decode-0") == [S.STARTING, S.RUNNING, S.EXITED, S.FATAL]
    fatal = fatal_lines(logs, "decode-0")
    assert len(fatal) == 1 and fatal[0]["from_state"] == "EXITED"
    assert fatal[0]["reason"] == "killed by SIGKILL; its old process group survived SIGKILL"
    stuck_lines = events(logs, "child_group_stuck", "decode-0")
    assert len(stuck_lines) == 1 and stuck_lines[0]["pgid"] == stuck
    assert len(events(logs, "child_spawned", "decode-0")) == 1


# -- ports and files ---------------------------------------------------------------------------


async def test_port_in_use_is_a_clear_fatal_error_without_a_spawn_loop(tmp_path: Path) -> None:
    topo = make_topo(tmp_path)
    http_port = topo.instance("decode-0").port
    kv_port = topo.instance("prefill-0").kv_port
    assert http_port is not None and kv_port is not None
    squatters = []
    for port in (http_port, kv_port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", port))
        s.listen()
        squatters.append(s)
    try:
        with capture_logs() as logs:
            async with Supervisor(topo, port_wait=0.5) as sup:
                await sup.start_all()
                assert await sup.wait_ready(timeout=10) is False
                await async_wait_for(
                    lambda: all(s.state is S.FATAL for s in sup.statuses()), timeout=10
                )
                decode = sup.status("decode-0")
                prefill = sup.status("prefill-0")
                assert decode.last_exit == f"port {http_port} (HTTP) in use on 127.0.0.1"
                assert prefill.last_exit == (
                    f"port {kv_port} (NIXL side-channel port) in use on 127.0.0.1"
                )
                assert decode.failures == prefill.failures == 0
                assert not events(logs, "child_spawned")  # nothing was ever spawned
                for s in squatters:
                    s.close()
                squatters.clear()
                # Fixed by the operator: restart() starts it.
                assert await sup.restart("decode-0") is True
                assert sup.status("decode-0").state is S.RUNNING
    finally:
        for s in squatters:
            s.close()
    fatal = {e["instance"]: e for e in fatal_lines(logs)}
    assert len(fatal_lines(logs)) == 2
    assert fatal["decode-0"]["log_level"] == "error"
    assert fatal["decode-0"]["from_state"] == "STARTING"
    assert fatal["decode-0"]["reason"] == f"port {http_port} (HTTP) in use on 127.0.0.1"
    assert len(events(logs, "child_spawned", "decode-0")) == 1
    assert not events(logs, "child_spawned", "prefill-0")


async def test_tmpdir_is_emptied_after_each_exit_and_caches_are_kept(tmp_path: Path) -> None:
    topo = make_topo(tmp_path)
    spec = build_spec(topo, topo.instance("decode-0"))
    cache = topo.daemon.state_dir / "cache" / "vllm" / "kept"
    rec = Recorder()
    rec.on_state[("decode-0", S.BACKOFF)] = lambda _st: sorted(os.listdir(spec.tmpdir))
    async with supervisor(topo, rec) as sup:
        await sup.start_all()
        assert await sup.wait_ready(timeout=20)
        assert spec.workdir.is_dir() and spec.tmpdir.is_dir()
        (spec.tmpdir / "vllm_dist_1234").mkdir()
        (spec.tmpdir / "vllm_dist_1234" / "shm").write_text("x")
        (spec.tmpdir / "torch.lock").write_text("x")
        (spec.workdir / "kept.txt").write_text("x")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("x")
        pid = sup.status("decode-0").pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_state(sup, "decode-0", S.RUNNING, restarts=1, ready=True)
        assert rec.seen[("decode-0", S.BACKOFF)] == [[]]  # emptied before the backoff
        (spec.tmpdir / "vllm_dist_5678").mkdir()
    assert sup.status("decode-0").state is S.STOPPED
    assert spec.tmpdir.is_dir() and os.listdir(spec.tmpdir) == []
    assert (spec.workdir / "kept.txt").exists() and cache.exists()


# -- remote instances, reload operations -------------------------------------------------------


async def test_remote_instance_is_probed_never_spawned_never_fatal(
    tmp_path: Path, reap: list[int]
) -> None:
    doc = standin_topology(tmp_path, supervisor=STEADY)
    port = free_port()
    doc["instance"][1] = {"name": "decode-0", "role": "decode", "url": f"http://127.0.0.1:{port}"}
    topo = parse_config(doc, tmp_path / "disaggd.toml")
    rec = Recorder()
    argv = [sys.executable, "-m", "devtools.standin", "serve", "m", "--port", str(port)]
    argv += ["--host", "127.0.0.1"]
    remote: subprocess.Popen[bytes] | None = None
    try:
        with capture_logs() as logs:
            async with supervisor(topo, rec) as sup:
                await sup.start_all()
                assert await sup.wait_ready(["prefill-0"], timeout=20)
                st = sup.status("decode-0")
                assert st.state is S.STARTING and not st.ready and not st.spawned
                assert st.pid is None and st.port == port
                remote = start_detached(argv, tmp_path)
                reap.append(remote.pid)
                assert await sup.wait_ready(["decode-0"], timeout=20)
                # Gone: not ready, back to STARTING, probed on; never FATAL.
                os.killpg(remote.pid, signal.SIGTERM)
                remote.wait(timeout=10)
                gone = await wait_state(sup, "decode-0", S.STARTING, ready=False)
                assert gone.failures == 0 and gone.restarts == 0
                # Probed on, never FATAL however long it stays away: proven on the virtual
                # clock (test_fake_remote_...); here, that it comes back.
                remote = start_detached(argv, tmp_path)
                reap.append(remote.pid)
                assert await sup.wait_ready(["decode-0"], timeout=20)
        assert rec.path("decode-0") == [
            S.STARTING,
            S.RUNNING,
            S.STARTING,
            S.RUNNING,
            S.STOPPING,
            S.STOPPED,
        ]
        assert rec.readiness("decode-0") == [True, False, True, False]
        assert not events(logs, "child_spawned", "decode-0")
        unhealthy = next(
            e for e in events(logs, "instance_state", "decode-0") if e["from_state"] == "RUNNING"
        )
        assert unhealthy["to_state"] == "STARTING"
        failures = topo.supervisor.probe_failures
        assert unhealthy["reason"] == f"unhealthy: {failures} probes failed (connection refused)"
    finally:
        if remote is not None and remote.poll() is None:
            os.killpg(remote.pid, signal.SIGTERM)
            remote.wait(timeout=10)


async def test_add_restart_remove_and_update_topology(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, prefill=2, decode=1, supervisor=STEADY)
    full = parse_config(doc, tmp_path / "disaggd.toml")
    small = parse_config(
        {**doc, "instance": [i for i in doc["instance"] if i["name"] != "prefill-1"]},
        tmp_path / "disaggd.toml",
    )
    async with Supervisor(small) as sup:
        await sup.start_all()
        assert await sup.wait_ready(timeout=20)
        assert [s.name for s in sup.statuses()] == ["prefill-0", "decode-0"]

        await sup.add(full.instance("prefill-1"), full)
        sup.update_topology(full)
        assert sup.topology is full
        assert await sup.wait_ready(["prefill-1"], timeout=20)
        with pytest.raises(ValueError):
            await sup.add(full.instance("prefill-1"), full)

        # A guardian that dies is replaced at the next spawn, and told every live group.
        dead_guardian = sup.guardian_pid
        assert dead_guardian is not None
        os.kill(dead_guardian, signal.SIGKILL)
        before = sup.status("prefill-0")
        assert await sup.restart("prefill-0") is True
        assert sup.guardian_pid not in (None, dead_guardian)
        assert sup.guardian_pid is not None and pid_alive(sup.guardian_pid)
        after = sup.status("prefill-0")
        assert after.pid != before.pid and after.restarts == 1 and after.ready
        assert before.pid is not None and not pid_alive(before.pid)
        assert await sup.restart("prefill-0", wait=False) is True
        assert sup.status("prefill-0").state is S.STARTING
        assert await sup.wait_ready(["prefill-0"], timeout=20)

        gone = sup.status("prefill-1").pid
        assert gone is not None
        await sup.remove("prefill-1")
        assert not pid_alive(gone)
        with pytest.raises(KeyError):
            sup.status("prefill-1")
        assert [s.name for s in sup.statuses()] == ["prefill-0", "decode-0"]


# -- the daemon's own death --------------------------------------------------------------------

HARNESS = """
import asyncio, json, sys
from disaggd.observe import logs
from disaggd.topology import load_config
from disaggd.supervise.supervisor import Supervisor

async def main() -> None:
    logs.configure("logfmt", "info", stream=sys.stderr)
    async with Supervisor(load_config(sys.argv[1])) as sup:
        await sup.start_all()
        ready = await sup.wait_ready(timeout=30)
        pids = {s.name: s.pid for s in sup.statuses()}
        urls = {s.name: s.url for s in sup.statuses()}
        print(json.dumps({"ready": ready, "pids": pids, "urls": urls,
                          "guardian": sup.guardian_pid}), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_sigkill_of_the_daemon_leaves_no_child_and_no_grandchild(tmp_path: Path) -> None:
    path = write_topology(tmp_path / "disaggd.toml", standin_topology(tmp_path, supervisor=STEADY))
    stderr = (tmp_path / "harness.log").open("wb")
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(path)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=REPO,
    )
    everything: list[int] = []
    try:
        assert harness.stdout is not None
        readable, _, _ = select.select([harness.stdout], [], [], 30)
        assert readable, (tmp_path / "harness.log").read_text()
        report = json.loads(harness.stdout.readline())
        assert report["ready"] is True
        import urllib.request

        for name, url in report["urls"].items():
            with urllib.request.urlopen(f"{url}/_standin/info", timeout=5) as resp:
                info = json.load(resp)
            assert info["pid"] == report["pids"][name]
            everything += [info["pid"], info["engine_pid"]]
        everything.append(report["guardian"])
        assert all(pid_alive(p) for p in everything)

        os.kill(harness.pid, signal.SIGKILL)
        harness.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(
            lambda: not [p for p in everything if pid_alive(p)],
            timeout=5,
            what="children, grandchildren and the guardian to die",
        )
        took = time.monotonic() - t0
        print(f"everything gone {took:.2f}s after kill -9 of the daemon")
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        for pid in everything:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        stderr.close()


def test_guardian_kills_registered_groups_at_end_of_file(tmp_path: Path) -> None:
    # A group with a leader and a grandchild (sh forks two sleeps).
    group = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True, cwd=tmp_path
    )
    keeper = guardian.start()
    try:
        # At once, before it has even started Python: blocked, then ignored.
        for sig in guardian.IGNORED:
            keeper.send_signal(sig)
        assert keeper.stdin is not None
        wait_for(lambda: len(guardian.members({group.pid})) == 3, timeout=5)
        members = guardian.members({group.pid})
        keeper.stdin.write(f"+{group.pid}\n+999999\n-999999\ngarbage\n".encode())
        keeper.stdin.flush()
        time.sleep(0.3)
        assert keeper.poll() is None
        assert all(pid_alive(p) for p in members)
        keeper.stdin.close()
        assert keeper.wait(timeout=5) == 0
        group.wait(timeout=5)
        wait_for(lambda: not [p for p in members if pid_alive(p)], timeout=5)
    finally:
        for proc in (group, keeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in guardian.members({group.pid}):
            os.kill(pid, signal.SIGKILL)


# -- output reading ----------------------------------------------------------------------------


async def test_read_lines_survives_lines_longer_than_the_limit() -> None:
    # Whole over-long lines already buffered: delivered whole, no stray empty line.
    reader = asyncio.StreamReader(limit=16)
    reader.feed_data(b"short\n" + b"x" * 100 + b"\nafter\n" + b"y" * 40 + b"\nlast")
    reader.feed_eof()
    lines: list[bytes] = []
    await read_lines(reader, lines.append)
    assert lines == [b"short", b"x" * 100, b"after", b"y" * 40, b"last"]

    # An over-long line still arriving: delivered in pieces, nothing lost, no exception.
    reader = asyncio.StreamReader(limit=16)
    lines = []
    task = asyncio.create_task(read_lines(reader, lines.append))
    for _ in range(10):
        reader.feed_data(b"z" * 10)
        await asyncio.sleep(0)
    reader.feed_data(b"\nend\n")
    reader.feed_eof()
    await task
    assert len(lines) > 2 and lines[-1] == b"end" and b"" not in lines
    assert b"".join(lines[:-1]) == b"z" * 100


async def test_fast_writer_does_not_starve_the_loop(tmp_path: Path) -> None:
    reader = asyncio.StreamReader(limit=1 << 16)
    reader.feed_data(b"line\n" * 50_000)
    reader.feed_eof()
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    count = 0

    def on_line(_: bytes) -> None:
        nonlocal count
        count += 1

    await read_lines(reader, on_line)
    done.set()
    await task
    assert count == 50_000
    assert ticks > 100  # the loop ran other tasks meanwhile
