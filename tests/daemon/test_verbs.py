"""Per-instance verbs (issue 16) against a real daemon with stand-in engines.

`start`, `stop NAME`, `drain`, `undrain`, `shutdown`, `status NAME`, `logs [-f]`,
what each prints and its exit status, and the races: a stop during a reload, a
start of a FATAL instance, a drain of the last ready decode, a follower across
a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness.common import (
    all_gone,
    http_get,
    http_post,
    pid_alive,
    standin_topology,
    wait_for,
    write_topology,
)
from tests.harness.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(180)

MODEL = "standin-model"


def standin_requests(d: DaemonProcess, name: str) -> int:
    """Generation requests the stand-in `name` has answered."""
    status, body = http_get(f"http://127.0.0.1:{d.status()[name]['port']}/_standin/requests")
    assert status == 200
    return sum(1 for r in json.loads(body) if r["path"].startswith("/v1/"))


def complete(d: DaemonProcess, prompt: str, max_tokens: int = 4) -> tuple[int, bytes]:
    return http_post(
        f"{d.proxy_url}/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens},
        timeout=60,
    )


class Load:
    """Workers sending completions through the proxy until stopped; every status kept."""

    def __init__(self, d: DaemonProcess, workers: int = 4, max_tokens: int = 8) -> None:
        self.d = d
        self.max_tokens = max_tokens
        self.outcomes: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            self.outcomes.append(complete(self.d, f"load {worker}-{i}", self.max_tokens))
            i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def failures(self) -> list[tuple[int, bytes]]:
        return [o for o in self.outcomes if o[0] != 200]


def test_stop_under_load_then_start_again(tmp_path: Path) -> None:
    """Acceptance: `stop decode-1` under load fails no request, the other decode takes
    the load; `start decode-1` brings it back RUNNING and routed, same daemon."""
    doc = standin_topology(
        tmp_path,
        decode=2,
        instance_env={"decode-1": {"STANDIN_TOKEN_DELAY": "0.02"}},
        daemon={"drain_timeout": 30},
    )
    with DaemonProcess(tmp_path, doc).start() as d:
        daemon_pid = d.proc.pid if d.proc else None
        old = d.status()["decode-1"]["pid"]
        with Load(d) as load:
            wait_for(lambda: standin_requests(d, "decode-1") >= 5, 20, what="decode-1 serving")
            proc = d.cli("stop", "decode-1")
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == (
                "decode-1: stopped (drained; stays STOPPED until `disaggd start decode-1`)"
            )
            n = len(load.outcomes)
            wait_for(lambda: len(load.outcomes) > n + 20, 20, what="requests after the stop")
        assert load.outcomes and not load.failures(), load.failures()[:3]
        row = d.status()["decode-1"]
        assert (row["state"], row["held"], row["pid"]) == ("STOPPED", True, None)
        assert all_gone([old])
        before = standin_requests(d, "decode-0")
        assert all(complete(d, f"after stop {i}")[0] == 200 for i in range(6))
        assert standin_requests(d, "decode-0") == before + 6

        text = d.cli("status").stdout
        assert "STOPPED (by hand)" in text
        proc = d.cli("start", "decode-1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("decode-1: started (was STOPPED; pid ")
        row = d.status()["decode-1"]
        assert (row["state"], row["ready"], row["held"]) == ("RUNNING", True, False)
        assert all(complete(d, f"after start {i}")[0] == 200 for i in range(8))
        assert standin_requests(d, "decode-1") > 0  # routed again (a fresh process)
        assert d.proc is not None and d.proc.pid == daemon_pid and d.proc.poll() is None


def test_hand_stop_survives_other_restarts_and_an_unchanged_reload(tmp_path: Path) -> None:
    """Stopped by hand stays STOPPED across a restart of another instance and a reload
    that keeps its spec; a reload that changes its spec starts it (README)."""
    doc = standin_topology(tmp_path, decode=2)
    with DaemonProcess(tmp_path, doc).start() as d:
        assert d.cli("stop", "decode-1").returncode == 0
        assert d.cli("restart", "decode-0").returncode == 0
        assert d.cli("reload").returncode == 0
        assert d.status()["decode-1"]["state"] == "STOPPED"
        proc = d.cli("stop", "decode-1")
        assert (proc.returncode, proc.stdout.strip()) == (0, "decode-1: already stopped (STOPPED)")
        doc["instance"][2]["env"] = {"GEN": "2"}
        write_topology(d.config, doc)
        proc = d.cli("reload")
        assert proc.returncode == 0 and "restarted: decode-1" in proc.stdout, proc.stdout
        row = d.status()["decode-1"]
        assert (row["state"], row["ready"], row["held"]) == ("RUNNING", True, False)


def test_unknown_names_remote_instances_and_no_ops(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=1)
    # A remote decode: the spawned decode-0, reached by URL (probed, routed, not spawned).
    doc["instance"].append(
        {
            "name": "remote-0",
            "role": "decode",
            "url": f"http://127.0.0.1:{doc['instance'][1]['port']}",
        }
    )
    with DaemonProcess(tmp_path, doc).start() as d:
        proc = d.cli("start", "nope", "decode-0")
        assert proc.returncode == 1
        assert "nope: ERROR (no such instance; known: decode-0, prefill-0, remote-0)" in proc.stderr
        assert proc.stdout.strip() == "decode-0: already started (RUNNING)"
        for verb in ("start", "stop"):
            proc = d.cli(verb, "remote-0")
            assert proc.returncode == 1, proc.stdout
            assert proc.stderr.startswith("remote-0: ERROR (remote instance http://127.0.0.1:")
        proc = d.cli("drain", "remote-0")  # routing only: fine for a remote one
        assert proc.returncode == 0 and proc.stdout.startswith("remote-0: drained"), proc.stderr
        proc = d.cli("undrain", "remote-0", "remote-0")
        assert proc.stdout.splitlines() == [
            "remote-0: undrained (routed again)",
            "remote-0: not drained",
        ]
        proc = d.cli("status", "decode-0", "--json")
        assert [r["name"] for r in json.loads(proc.stdout)["instances"]] == ["decode-0"]
        proc = d.cli("status", "nope")
        assert proc.returncode == 1 and "no instance named 'nope'" in proc.stderr
        proc = d.cli("logs", "nope")
        assert proc.returncode == 1 and "no instance named 'nope'" in proc.stderr
        assert d.cli("drain").returncode == 2  # usage: a name is required


def test_shutdown_and_stop_without_a_name_stop_the_daemon(tmp_path: Path) -> None:
    for argv in (("shutdown",), ("stop",)):
        (tmp_path / argv[0]).mkdir()
        doc = standin_topology(tmp_path / argv[0])
        with DaemonProcess(tmp_path / argv[0], doc).start() as d:
            proc = d.cli(*argv)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("stopping: draining requests")
            if argv == ("stop",):
                assert "`disaggd shutdown`" in proc.stderr
            else:
                assert proc.stderr == ""
            assert d.wait(60) == 0


def test_stop_during_a_reload_waits_for_it_and_wins(tmp_path: Path) -> None:
    """A reload restarts decode-0 (slow to load); `stop decode-0` sent meanwhile is
    carried out once the reload is done: the reload succeeds, decode-0 ends STOPPED."""
    doc = standin_topology(tmp_path, decode=2)
    with DaemonProcess(tmp_path, doc).start() as d:
        doc["instance"][1]["env"] = {"STANDIN_START_DELAY": "2"}
        write_topology(d.config, doc)
        reload = subprocess.Popen(
            [sys.executable, "-m", "disaggd", "reload", "-c", str(d.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=d.env,
        )
        try:
            wait_for(lambda: d.status()["decode-0"]["state"] == "STARTING", 20, what="restart")
            stop = d.cli("stop", "decode-0")
            out, err = reload.communicate(timeout=60)
        finally:
            if reload.poll() is None:
                reload.kill()
        assert reload.returncode == 0 and "restarted: decode-0" in out, err
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.startswith("decode-0: stopped (drained;")
        row = d.status()["decode-0"]
        assert (row["state"], row["held"], row["pid"]) == ("STOPPED", True, None)
        assert complete(d, "still served by decode-1")[0] == 200


def test_start_of_a_fatal_instance(tmp_path: Path) -> None:
    """decode-1's port is taken: FATAL. `start` while it still is: an error that says
    why; once the port is free: RUNNING and routed."""
    doc = standin_topology(tmp_path, decode=2)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", doc["instance"][2]["port"]))
    blocker.listen()
    try:
        with DaemonProcess(tmp_path, doc).start(wait_ready=False) as d:
            wait_for(lambda: _state(d, "decode-1") == "FATAL", 30, what="decode-1 FATAL")
            proc = d.cli("start", "decode-1")
            assert proc.returncode == 1
            assert proc.stderr.startswith("decode-1: ERROR (did not become ready: FATAL, port")
            assert "in use" in proc.stderr
            blocker.close()
            proc = d.cli("start", "decode-1")
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("decode-1: started (was FATAL; pid ")
            row = d.status()["decode-1"]
            assert (row["state"], row["ready"], row["failures"]) == ("RUNNING", True, 0)
    finally:
        blocker.close()


def _state(d: DaemonProcess, name: str) -> str | None:
    try:
        return str(d.status()[name]["state"])
    except (AssertionError, KeyError, ValueError):
        return None


def test_drain_of_the_last_ready_decode(tmp_path: Path) -> None:
    """Routing only: the process keeps running; the proxy's /health and its 503 say
    that no decode is ready; `undrain` puts it back."""
    doc = standin_topology(tmp_path, instance_env={"decode-0": {"STANDIN_TOKEN_DELAY": "0.05"}})
    with DaemonProcess(tmp_path, doc).start() as d:
        pid = d.status()["decode-0"]["pid"]
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(complete, d, "a request in flight", 20)
            wait_for(lambda: d.status()["decode-0"]["inflight"] == 1, 10, what="in flight")
            proc = d.cli("drain", "decode-0")
            # drain waits for the requests it holds: the one in flight finished, untouched
            assert inflight.done() and inflight.result()[0] == 200
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == (
            "decode-0: drained (out of rotation; 0 request(s) still in flight); WARNING: no "
            "decode instance is routable now: the proxy answers 503 'no decode instance is "
            "ready' until `disaggd undrain decode-0`"
        )
        status, body = http_get(f"{d.proxy_url}/health")
        health = json.loads(body)
        assert status == 503 and health["missing"] == ["decode"], body
        assert health["why"] == {"decode": "draining: decode-0"}  # the proxy says why
        status, body = complete(d, "refused")
        assert status == 503, body
        assert "no decode instance is ready (draining: decode-0)" in body.decode(), body
        row = d.status()["decode-0"]
        assert (row["state"], row["pid"], row["drained"]) == ("RUNNING", pid, True)
        assert "drained" in d.cli("status").stdout.splitlines()[2]
        assert d.cli("drain", "decode-0").stdout.strip() == "decode-0: already drained"
        # a restart keeps a hand drain: the instance comes back out of rotation
        assert d.cli("restart", "decode-0").returncode == 0
        assert http_get(f"{d.proxy_url}/health")[0] == 503
        proc = d.cli("undrain", "decode-0")
        assert proc.stdout.strip() == "decode-0: undrained (routed again)"
        assert http_get(f"{d.proxy_url}/health")[0] == 200
        assert complete(d, "served again")[0] == 200


class Follower:
    """`disaggd logs NAME -f` in the background; every line it prints, with when."""

    def __init__(self, d: DaemonProcess, name: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disaggd", "logs", name, "-f", *extra, "-c", str(d.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=d.env,
        )
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def seen(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(10)
        self._thread.join(10)
        return rc


def test_logs_tail_and_follow_within_a_second(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    with DaemonProcess(tmp_path, doc).start() as d:
        proc = d.cli("logs", "decode-0", "-n", "3")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 3
        # 2026-12-02 08:34:18.059 stdout  (APIServer pid=...) INFO: ...
        assert all(line[4] == "-" and line[23:31] == " stdout " for line in lines), lines
        proc = d.cli("logs", "decode-0", "-n", "1000", "--json")
        rows = [json.loads(x) for x in proc.stdout.splitlines()]
        assert {"seq", "time", "stream", "line"} <= set(rows[0])
        assert any("Starting vLLM API server" in r["line"] for r in rows)

        follower = Follower(d, "decode-0")
        try:
            port = d.status()["decode-0"]["port"]
            wait_for(lambda: follower.seen("GET /health"), 5, what="the follower streaming")
            for _ in range(3):
                marker = uuid.uuid4().hex
                assert http_get(f"http://127.0.0.1:{port}/v1/models?m={marker}")[0] == 200
                printed = time.monotonic()  # the stand-in printed its access line by now
                wait_for(lambda m=marker: follower.seen(m), 1.0, 0.01, what="line within 1 s")
                seen = follower.seen(marker)
                assert seen is not None and seen - printed < 1.0
        finally:
            rc = follower.interrupt()
        assert rc == 130


def test_logs_follow_across_a_restart(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    with DaemonProcess(tmp_path, doc).start() as d:
        follower = Follower(d, "decode-0", "-n", "0")
        try:
            wait_for(lambda: follower.lines, 5, what="first line")
            old = d.status()["decode-0"]["pid"]
            assert d.cli("restart", "decode-0").returncode == 0
            new = d.status()["decode-0"]["pid"]
            assert new != old and not pid_alive(old)
            wait_for(lambda: follower.seen(f"Started server process [{new}]"), 5, what="new run")
            assert follower.seen(f"(APIServer pid={old})")  # the old run's last lines too
            assert follower.proc.poll() is None  # still following
        finally:
            follower.interrupt()


def test_logs_follow_ends_when_the_daemon_stops(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    with DaemonProcess(tmp_path, doc).start() as d:
        follower = Follower(d, "decode-0", "-n", "0")
        wait_for(lambda: follower.lines, 5, what="first line")
        assert d.cli("shutdown").returncode == 0
        assert follower.proc.wait(60) == 0
        assert follower.proc.stderr is not None
        assert "the daemon is stopping" in follower.proc.stderr.read()
        assert d.wait(60) == 0


def test_child_lines_carry_their_instance_in_the_journal(tmp_path: Path) -> None:
    """Under systemd (stdout is the journal stream), each child line is one native
    journal datagram with INSTANCE= and STREAM= (`journalctl INSTANCE=decode-0`)."""
    from tests.unit.test_journal import parse_datagram

    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal_path = tmp_path / "journal.sock"
    journal.bind(str(journal_path))
    journal.settimeout(0.2)
    entries: list[dict[str, Any]] = []
    done = threading.Event()

    def read() -> None:  # as journald does: at once (a full queue falls back to stdout)
        while not done.is_set():
            try:
                entries.append(parse_datagram(journal.recv(1 << 20)))
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    doc = standin_topology(tmp_path, daemon={"log_format": "auto", "log_level": "info"})
    d = DaemonProcess(tmp_path, doc)
    st = os.stat(d.log_path)  # the daemon's stdout: JOURNAL_STREAM names it, as systemd does
    d.env.update(
        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", DISAGGD_JOURNAL_SOCKET=str(journal_path)
    )
    try:
        with d.start():
            wait_for(
                lambda: any(
                    "Starting vLLM API server" in e.get("MESSAGE", "")
                    and e.get("INSTANCE") == "decode-0"
                    for e in list(entries)
                ),
                10,
            )
    finally:
        done.set()
        reader.join(5)
        journal.close()
    child = [e for e in entries if e.get("DISAGGD_EVENT") == "child_output"]
    decode = [e for e in child if e.get("INSTANCE") == "decode-0"]
    assert decode
    assert all(e["ROLE"] == "decode" and e["STREAM"] in ("stdout", "stderr") for e in decode)
    assert all(e["SYSLOG_IDENTIFIER"] == "disaggd" for e in entries)
    assert any(e.get("DISAGGD_EVENT") == "daemon_ready" and e["PRIORITY"] == "6" for e in entries)
