"""``[daemon].endpoints_file`` follows a real daemon: spawn, crash and restart, reload, stop.

The file is read back as llm-d's file discovery reads it (`tests.harness.llmd`): it must
list exactly the ready instances, with their role labels, at every step.
"""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.harness.common import free_port, standin_topology, wait_for, write_topology
from tests.harness.daemon import DaemonProcess
from tests.harness.llmd import read_endpoints_file

pytestmark = pytest.mark.timeout(180)


def listed(path: Path) -> dict[str, str]:
    """Endpoint name → role, as llm-d would read the file now ({} while it is absent)."""
    if not path.exists():
        return {}
    return {e["name"]: e["labels"]["llm-d.ai/role"] for e in read_endpoints_file(path)}


def test_endpoints_file_follows_spawn_crash_reload_and_stop(tmp_path: Path) -> None:
    ep = tmp_path / "llm-d" / "endpoints.yaml"
    doc: dict[str, Any] = standin_topology(tmp_path, daemon={"endpoints_file": str(ep)})
    with DaemonProcess(tmp_path, doc).start() as d:
        both = {"prefill-0": "prefill", "decode-0": "decode"}
        wait_for(lambda: listed(ep) == both, 10, what="both instances listed")
        entries = {e["name"]: e for e in read_endpoints_file(ep)}
        assert entries["decode-0"]["port"] == doc["instance"][1]["port"]
        assert entries["decode-0"]["address"] == "127.0.0.1"
        rows = d.status()
        assert rows["decode-0"]["labels"] == {"llm-d.ai/role": "decode"}

        # A crash: the instance leaves the file at once, and comes back once ready.
        os.kill(rows["decode-0"]["pid"], signal.SIGKILL)
        wait_for(lambda: "decode-0" not in listed(ep), 10, what="crashed decode removed")
        wait_for(lambda: listed(ep) == both, 30, what="restarted decode listed again")
        assert d.status()["decode-0"]["restarts"] >= 1

        # A reload that adds a decode and moves the file: the new path lists all three,
        # the old one lists nothing (a picker still watching it stops sending here).
        moved = tmp_path / "moved.yaml"
        changed = copy.deepcopy(doc)
        changed["daemon"]["endpoints_file"] = str(moved)
        changed["instance"].append(
            {"name": "decode-1", "role": "decode", "port": free_port(), "kv_port": free_port()}
        )
        write_topology(d.config, changed)
        reload = d.cli("reload")
        assert reload.returncode == 0, reload.stderr
        assert listed(moved) == {**both, "decode-1": "decode"}
        assert listed(ep) == {}

        # A reload that removes it again: gone from the file.
        write_topology(d.config, {**changed, "instance": doc["instance"]})
        assert d.cli("reload").returncode == 0
        wait_for(lambda: listed(moved) == both, 10, what="removed decode unlisted")

        assert d.stop() == 0, d.log()
    # After the daemon stops, the file lists no endpoint.
    assert listed(moved) == {}
    assert "endpoints_file_failed" not in d.log()
