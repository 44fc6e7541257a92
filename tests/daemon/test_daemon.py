"""The daemon as systemd runs it: a real process, real signals, sockets and sd_notify.

Stand-in engines play vLLM; every test starts `python -m disaggd run`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.common import (
    all_gone,
    http_get,
    http_post,
    standin_topology,
    wait_for,
    write_topology,
)
from tests.harness.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def engine_pids(d: DaemonProcess) -> list[int]:
    """Every pid of every instance: API servers and their EngineCore grandchildren."""
    pids = []
    for row in d.status().values():
        pids.append(row["pid"])
        url = f"http://127.0.0.1:{row['port']}/_standin/info"
        status, body = http_get(url)
        if status == 200:
            info = json.loads(body)
            if info.get("engine_pid"):
                pids.append(info["engine_pid"])
    return pids


def stream_completion(
    port: int, prompt: str, max_tokens: int, timeout: float = 60
) -> tuple[int, str]:
    """A streaming completion through the proxy; (status, whole body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps(
            {"model": "standin-model", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        )
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_sigterm_drains_inflight_streams_then_exits_zero(tmp_path: Path) -> None:
    doc = standin_topology(
        tmp_path,
        instance_env={"decode-0": {"STANDIN_TOKEN_DELAY": "0.05"}},
        daemon={"drain_timeout": 30},
    )
    with DaemonProcess(tmp_path, doc).start() as d:
        pids = engine_pids(d)
        port = doc["proxy"]["port"]
        with ThreadPoolExecutor(20) as pool:
            futures = [
                pool.submit(stream_completion, port, f"stream number {i} says hello", 40)
                for i in range(20)
            ]
            # all 20 are streaming (the decode counts them) before the signal
            wait_for(lambda: d.status()["decode-0"]["inflight"] >= 20, 20, what="20 in flight")
            d.signal(signal.SIGTERM)
            wait_for(lambda: "shutdown_started" in d.log(), 10)
            status, body = http_post(
                f"{d.proxy_url}/v1/completions",
                {"model": "standin-model", "prompt": "late", "max_tokens": 2},
            )
            assert status == 503, body
            assert json.loads(body)["error"]["message"]
            results = [f.result(60) for f in futures]
        for status, text in results:
            assert status == 200
            assert text.rstrip().endswith("data: [DONE]")
            assert text.count("data: {") == 40  # every token arrived, nothing cut short
        assert d.wait(60) == 0
        assert all_gone(pids), "a child or grandchild outlived the daemon"
        msgs = d.notify.poll()
        assert any(m.get("STOPPING") == "1" for m in msgs)


def test_second_sigterm_skips_the_drain(tmp_path: Path) -> None:
    doc = standin_topology(
        tmp_path,
        instance_env={"decode-0": {"STANDIN_TOKEN_DELAY": "0.2"}},
        daemon={"drain_timeout": 120},
    )
    with DaemonProcess(tmp_path, doc).start() as d:
        pids = engine_pids(d)
        port = doc["proxy"]["port"]
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(stream_completion, port, "a long one", 500, 120)
            wait_for(lambda: d.status()["decode-0"]["inflight"] >= 1, 20)
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            wait_for(lambda: "shutdown_started" in d.log(), 10)
            d.signal(signal.SIGTERM)
            rc = d.wait(60)
            elapsed = time.monotonic() - started
            fut.result(60)
        assert "shutdown_forced" in d.log()
        assert elapsed < 60  # not the 100 s the stream needs, nor the 120 s drain
        assert rc == 0
        assert all_gone(pids)


def test_sighup_with_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    with DaemonProcess(tmp_path, doc).start() as d:
        before = d.pids()
        good = d.config.read_text()
        d.config.write_text(good + "\n[proxy]\nprot = 1\n")  # duplicate table + unknown key
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload_rejected" in d.log(), 10)
        assert "invalid TOML" in d.log() or "unknown key" in d.log()
        time.sleep(1)
        assert d.pids() == before
        assert all(row["state"] == "RUNNING" for row in d.status().values())
        # the reload command says so too, with a non-zero status
        d.config.write_text(good.replace('name = "decode-1"', 'name = "decode-1"\nprot = 3', 1))
        proc = d.cli("reload")
        assert proc.returncode != 0
        assert "instance[2].prot: unknown key; did you mean 'port'?" in proc.stderr
        assert d.pids() == before
        status, _ = http_post(
            f"{d.proxy_url}/v1/completions",
            {"model": "standin-model", "prompt": "still here", "max_tokens": 3},
        )
        assert status == 200
        msgs = d.notify.poll()
        reloading = [i for i, m in enumerate(msgs) if m.get("RELOADING") == "1"]
        assert reloading and "MONOTONIC_USEC" in msgs[reloading[0]]
        assert any(m.get("READY") == "1" for m in msgs[reloading[0] + 1 :])


def test_reload_restarts_only_the_changed_decode_under_load(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2, instance_env={"decode-1": {"GEN": "1"}})
    with DaemonProcess(tmp_path, doc).start() as d:
        before = d.pids()
        stop = threading.Event()
        outcomes: list[int] = []

        def load() -> None:
            i = 0
            while not stop.is_set():
                status, _ = http_post(
                    f"{d.proxy_url}/v1/completions",
                    {"model": "standin-model", "prompt": f"steady {i}", "max_tokens": 4},
                )
                outcomes.append(status)
                i += 1

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            wait_for(lambda: len(outcomes) > 20, 20)
            doc["instance"][2]["env"] = {"GEN": "2"}
            write_topology(d.config, doc)
            proc = d.cli("reload")
            assert proc.returncode == 0, proc.stderr
            assert "restarted: decode-1" in proc.stdout
            assert "kept: prefill-0, decode-0" in proc.stdout
            n = len(outcomes)
            wait_for(lambda: len(outcomes) > n + 20, 20)
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        after = d.pids()
        assert after["prefill-0"] == before["prefill-0"]
        assert after["decode-0"] == before["decode-0"]
        assert after["decode-1"] != before["decode-1"]
        assert outcomes and all(s == 200 for s in outcomes), sorted(set(outcomes))
        log = d.log()
        assert "reload_plan" in log and "reload_applied" in log


def test_reload_adds_and_removes_instances(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    with DaemonProcess(tmp_path, doc).start() as d:
        before = d.pids()
        removed = doc["instance"].pop(2)  # decode-1
        added = dict(removed, name="decode-9")
        doc["instance"].append(added)
        write_topology(d.config, doc)
        proc = d.cli("reload")
        assert proc.returncode == 0, proc.stderr
        assert "added: decode-9" in proc.stdout and "removed: decode-1" in proc.stdout
        status = d.status()
        assert set(status) == {"prefill-0", "decode-0", "decode-9"}
        assert status["decode-9"]["state"] == "RUNNING"
        assert status["decode-0"]["pid"] == before["decode-0"]
        assert all_gone([before["decode-1"]])


def test_status_and_restart_one_instance(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    with DaemonProcess(tmp_path, doc).start() as d:
        proc = d.cli("status")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:5] == ["INSTANCE", "ROLE", "STATE", "READY", "PID"]
        for name in ("prefill-0", "decode-0", "decode-1"):
            row = next(line for line in lines if line.startswith(name))
            assert "RUNNING" in row
        before = d.pids()
        proc = d.cli("restart", "decode-0")
        assert proc.returncode == 0, proc.stderr
        after = d.pids()
        assert after["decode-0"] != before["decode-0"]
        assert after["decode-1"] == before["decode-1"]
        assert after["prefill-0"] == before["prefill-0"]
        rows = d.status()
        assert rows["decode-0"]["restarts"] >= 1
        # The proxy's view is in the rows: breaker state and cache-aware index size.
        assert {r["breaker"] for r in rows.values()} == {"closed"}
        assert all(r["prefix_blocks"] == 0 for r in rows.values())  # least_outstanding
        proc = d.cli("restart", "nope")
        assert proc.returncode != 0 and "no instance named 'nope'" in proc.stderr


def test_sd_notify_ready_only_after_every_instance(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, instance_env={"decode-0": {"STANDIN_START_DELAY": "2"}})
    # systemd's watchdog: WATCHDOG=1 at half of WATCHDOG_USEC
    with DaemonProcess(tmp_path, doc, env={"WATCHDOG_USEC": "400000"}) as d:
        d.start(wait_ready=False)
        idx = d.notify.wait("READY", timeout=60)
        msgs = d.notify.poll()
        # a STATUS line said what was loading before READY=1
        assert any("loading model" in m.get("STATUS", "") for m in msgs[:idx])
        # at READY=1 every instance is RUNNING
        assert all(row["state"] == "RUNNING" for row in d.status().values())
        assert "ready" in msgs[idx].get("STATUS", "")
        proc = d.cli("reload")
        assert proc.returncode == 0, proc.stderr
        start = d.notify.wait("RELOADING", after=idx + 1)
        d.notify.wait("READY", after=start + 1)
        assert d.stop() == 0
        msgs = d.notify.poll()
        assert msgs[-1].get("STOPPING") == "1" or any(m.get("STOPPING") for m in msgs[start:])
        assert sum(1 for m in msgs if m.get("WATCHDOG") == "1") >= 3


def test_control_socket_is_owner_only(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    with DaemonProcess(tmp_path, doc).start() as d:
        mode = stat.S_IMODE(os.stat(d.socket_path).st_mode)
        assert mode == 0o600
        if os.getuid() != 0:
            pytest.skip("needs root to connect as another user")
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({d.socket_path!r})\n"
            "except PermissionError:\n"
            "    print('refused'); sys.exit(0)\n"
            "print('connected'); sys.exit(1)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr


def test_client_without_daemon(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    path = write_topology(tmp_path / "t.toml", doc)
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "status", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 69
    assert "no daemon" in proc.stderr and "ctl.sock" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "reload", "--socket", str(tmp_path / "x.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 69 and "x.sock" in proc.stderr
    # A file that is not TOML names no socket: say so instead of only "no daemon".
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "reload", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 69
    assert f"{bad} is not valid TOML" in proc.stderr and "--socket" in proc.stderr


def test_stop_command_and_journal_format(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, daemon={"log_format": "auto"})
    d = DaemonProcess(tmp_path, doc, env={"JOURNAL_STREAM": "8:12345"})
    with d.start():
        pids = engine_pids(d)
        proc = d.cli("stop")
        assert proc.returncode == 0, proc.stderr
        assert d.wait(60) == 0
        assert all_gone(pids)
    lines = [line for line in d.log().splitlines() if line]
    assert lines
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines[:5]
    assert any(line.startswith("<6>daemon_ready") for line in lines)
    # child output carries its instance and role, at the child's own level
    child = [line for line in lines if "child_output" in line and "instance=decode-0" in line]
    assert child and all("role=decode" in line for line in child)
    assert any(line.startswith("<6>") and "Starting vLLM API server" in line for line in child)


def test_watch_reloads_on_file_change(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2, daemon={"watch": True})
    with DaemonProcess(tmp_path, doc).start() as d:
        before = d.pids()
        doc["instance"][2]["env"] = {"EDITED": "1"}
        write_topology(d.config, doc)
        wait_for(lambda: "reload_applied" in d.log(), 30)
        after = d.pids()
        assert after["decode-1"] != before["decode-1"]
        assert after["decode-0"] == before["decode-0"]


def test_kill_9_of_the_daemon_leaves_nothing(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    d = DaemonProcess(tmp_path, doc).start()
    try:
        pids = engine_pids(d)
        assert len(pids) == 6
        d.signal(signal.SIGKILL)
        d.wait(10)
        assert all_gone(pids, timeout=10), "children or grandchildren survived kill -9"
    finally:
        d.close()


def test_proxy_port_in_use_fails_fast(tmp_path: Path) -> None:
    import socket as _socket

    doc = standin_topology(tmp_path)
    with _socket.socket() as blocker:
        blocker.bind(("127.0.0.1", doc["proxy"]["port"]))
        blocker.listen()
        d = DaemonProcess(tmp_path, doc)
        with d:
            d.start(wait_ready=False)
            assert d.wait(30) == 1
            log = d.log()
            assert "proxy_port_unavailable" in log
            assert f"cannot listen on 127.0.0.1:{doc['proxy']['port']}" in log
            assert "child_spawned" not in log  # bound before any child starts


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "disaggd.service").read_text()
    # verify checks that ExecStart= binaries exist: point them at this environment's.
    exe = shutil.which("disaggd") or str(Path(sys.executable).parent / "disaggd")
    assert Path(exe).exists()
    (tmp_path / "disaggd.service").write_text(unit.replace("/usr/local/bin/disaggd", exe))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "disaggd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "disaggd.service" not in proc.stderr, proc.stderr  # no warning about our unit
    for line in ("Type=notify", "KillMode=mixed", "ExecReload=", "Restart=on-failure"):
        assert line in unit


def test_an_unset_api_key_variable_is_refused_at_start_and_at_reload(tmp_path: Path) -> None:
    # Every request would be a 401 while /health says 200: the daemon says so and stops (78).
    doc = standin_topology(tmp_path)
    doc["proxy"]["api_key_env"] = "DISAGGD_TEST_UNSET_KEY"
    assert "DISAGGD_TEST_UNSET_KEY" not in os.environ
    with DaemonProcess(tmp_path, doc) as d:
        d.start(wait_ready=False)
        assert d.wait(30) == 78
        log = d.log()
        assert "api_key_missing" in log and "DISAGGD_TEST_UNSET_KEY" in log
        assert "child_spawned" not in log  # refused before anything started
    # A running daemon refuses a reload that names an unset variable, and keeps serving.
    second = tmp_path / "second"
    second.mkdir()
    doc = standin_topology(second)
    with DaemonProcess(second, doc).start() as d:
        before = d.pids()
        doc["proxy"]["api_key_env"] = "DISAGGD_TEST_UNSET_KEY"
        write_topology(d.config, doc)
        proc = d.cli("reload")
        assert proc.returncode == 1 and "DISAGGD_TEST_UNSET_KEY" in proc.stderr, proc.stderr
        assert "nothing changed" in proc.stderr
        assert d.pids() == before
        body = {"model": "standin-model", "prompt": "still open", "max_tokens": 2}
        assert http_post(f"{d.proxy_url}/v1/completions", body)[0] == 200
