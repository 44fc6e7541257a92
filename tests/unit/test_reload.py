"""Reload as a diff of two topologies (pure)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from disaggd.topology import parse_config
from disaggd.topology.plan import diff
from disaggd.topology.spec import InstanceSpec, build_specs
from tests.harness.common import standin_topology


def running_of(doc: dict[str, Any]) -> dict[str, InstanceSpec]:
    return build_specs(parse_config(doc))


def test_identical_topology_is_an_empty_plan(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    topo = parse_config(doc)
    plan = diff(running_of(doc), parse_config(copy.deepcopy(doc)), topo)
    assert plan.empty
    assert plan.kept == ("prefill-0", "decode-0", "decode-1")


def test_changed_added_removed(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    old = parse_config(doc)
    new_doc = copy.deepcopy(doc)
    new_doc["instance"][1]["args"] = ["--max-model-len", "200"]  # decode-0 changes
    gone = new_doc["instance"].pop(2)  # decode-1 removed
    new_doc["instance"].append(dict(gone, name="decode-7"))  # added on the freed ports
    plan = diff(running_of(doc), parse_config(new_doc), old)
    assert plan.kept == ("prefill-0",)
    assert plan.restarted == ("decode-0",)
    assert plan.added == ("decode-7",)
    assert plan.removed == ("decode-1",)
    assert plan.settings == ()


def test_env_change_restarts_and_settings_apply_in_place(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    old = parse_config(doc)
    new_doc = copy.deepcopy(doc)
    new_doc["instance"][0]["env"] = {"X": "1"}
    new_doc["proxy"]["request_timeout"] = 5
    new_doc["supervisor"]["probe_interval"] = 1
    plan = diff(running_of(doc), parse_config(new_doc), old)
    assert plan.restarted == ("prefill-0",)
    assert set(plan.settings) == {"proxy", "supervisor"}
    assert plan.needs_restart == ()


def test_proxy_only_change_restarts_nothing(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, decode=2)
    new_doc = copy.deepcopy(doc)
    new_doc["proxy"]["decode_policy"] = "round_robin"
    plan = diff(running_of(doc), parse_config(new_doc), parse_config(doc))
    assert plan.restarted == plan.added == plan.removed == ()
    assert plan.settings == ("proxy",)


def test_control_socket_change_needs_a_restart(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    new_doc = copy.deepcopy(doc)
    new_doc["daemon"]["control_socket"] = str(tmp_path / "other.sock")
    plan = diff(running_of(doc), parse_config(new_doc), parse_config(doc))
    assert plan.needs_restart == ("daemon.control_socket",)


def test_listen_address_and_logging_changes_need_a_restart(tmp_path: Path) -> None:
    # The proxy keeps the socket it bound at start; logging is configured once.
    doc = standin_topology(tmp_path)
    new_doc = copy.deepcopy(doc)
    new_doc["proxy"]["port"] = doc["proxy"]["port"] + 1
    new_doc["daemon"]["log_level"] = "info"
    plan = diff(running_of(doc), parse_config(new_doc), parse_config(doc))
    assert plan.needs_restart == ("proxy.port", "daemon.log_level")
    assert plan.settings == ("proxy", "daemon")
    # Changed back by a later reload: what the daemon started with is what counts.
    plan = diff(running_of(doc), parse_config(doc), parse_config(new_doc), parse_config(doc))
    assert plan.needs_restart == ()


def test_remote_instance_fingerprint_is_its_url(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path)
    doc["instance"].append({"name": "remote-d", "role": "decode", "url": "http://10.1.2.3:8200"})
    for inst in doc["instance"][:-1]:
        inst["kv_host"] = "10.1.2.1"  # reachable from the remote peer's host
    new_doc = copy.deepcopy(doc)
    new_doc["instance"][-1]["url"] = "http://10.1.2.4:8200"
    plan = diff(running_of(doc), parse_config(new_doc), parse_config(doc))
    assert plan.restarted == ("remote-d",)
