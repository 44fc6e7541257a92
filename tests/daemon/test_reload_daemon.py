"""Reload against a running daemon: the races a reload meets (a stop, a failure)."""

from __future__ import annotations

import copy
import json
import signal
import threading
from pathlib import Path

from tests.harness.common import http_post, standin_topology, wait_for, write_topology
from tests.harness.daemon import DaemonProcess


def test_a_stop_during_a_reload_abandons_it_without_failing_the_daemon(tmp_path: Path) -> None:
    # SIGHUP then SIGTERM while the reload's rolling restart is still draining decode-0:
    # the supervisor refuses the restart once shutdown began, and the reload must give up
    # quietly rather than fail the daemon's task group (exit 1, requests cut before their
    # drain). A real daemon, real signals: whichever of the two paths wins the race, the
    # in-flight request completes and the daemon exits 0.
    doc = standin_topology(
        tmp_path,
        instance_env={"decode-0": {"STANDIN_TOKEN_DELAY": "0.05"}},
        daemon={"drain_timeout": 20.0},
    )
    with DaemonProcess(tmp_path, doc).start() as d:
        result: list[tuple[int, bytes]] = []
        body = {"model": "standin-model", "prompt": "long", "max_tokens": 60}
        worker = threading.Thread(
            target=lambda: result.append(http_post(f"{d.proxy_url}/v1/completions", body))
        )
        worker.start()
        wait_for(lambda: d.status()["decode-0"]["inflight"] == 1, 10)
        changed = copy.deepcopy(doc)
        changed["instance"][1]["env"] = {"STANDIN_TOKEN_DELAY": "0.05", "X": "1"}
        write_topology(d.config, changed)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload_plan" in d.log(), 10)
        d.signal(signal.SIGTERM)
        worker.join(30)
        assert d.wait(60) == 0, d.log()
    log = d.log()
    assert "daemon_task_failed" not in log and "reload_failed" not in log, log
    assert result and result[0][0] == 200, result
    assert json.loads(result[0][1])["usage"]["completion_tokens"] == 60
