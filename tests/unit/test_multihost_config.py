"""Topologies spanning hosts: a remote peer must be able to reach a spawned instance's KV side.

The rule (disaggd.topology.load `_remote_kv_host_problems`): with a connector that moves KV
over the network, a spawned instance that a remote instance on another host connects to for
KV may not advertise a loopback address. Peers connect to the prefill with
``kv_transfer_params`` connectors (NIXL, Mooncake), to both sides with P2pNccl.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from disaggd.topology import ConfigError, load_config, parse_config
from disaggd.topology.spec import build_specs
from tests.harness.common import disaggd_argv, dump_toml

SIDE = "VLLM_NIXL_SIDE_CHANNEL_HOST"


def doc_with_remote(
    connector: str = "NixlConnector",
    prefill: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
    remote: dict[str, Any] | None = None,
    model_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """p0 and d0 spawned here, plus one remote instance (a decode on 10.0.0.12 by default)."""
    return {
        "model": {"name": "m", "env": dict(model_env or {})},
        "kv_transfer": {"connector": connector},
        "instance": [
            {"name": "p0", "role": "prefill", "port": 8100, **(prefill or {})},
            {"name": "d0", "role": "decode", "port": 8200, **(decode or {})},
            {"name": "far", "role": "decode", "url": "http://10.0.0.12:8200", **(remote or {})},
        ],
    }


def problems_of(doc: dict[str, Any], tmp_path: Path) -> list[str]:
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).splitlines()


def test_loopback_prefill_with_a_remote_decode_is_refused(tmp_path: Path) -> None:
    lines = problems_of(doc_with_remote(), tmp_path)
    assert len(lines) == 1, lines  # the decode d0 is not reached by anyone: no problem
    line = lines[0]
    assert line.startswith(f"{tmp_path / 't.toml'}: instance[0].host: 'p0' advertises its ")
    assert "NIXL side-channel port at 127.0.0.1, a loopback address" in line
    assert "the remote decode 'far' connects to it from another host" in line
    assert "set instance[0].kv_host (or host)" in line


@pytest.mark.parametrize(
    ("prefill", "key", "shown"),
    [
        ({"host": "127.0.0.5"}, "instance[0].host", "127.0.0.5"),
        ({"host": "0.0.0.0"}, "instance[0].host", "127.0.0.1"),  # a wildcard advertises loopback
        ({"host": "::1"}, "instance[0].host", "::1"),
        ({"host": "10.0.0.11", "kv_host": "localhost"}, "instance[0].kv_host", "localhost"),
        ({"host": "10.0.0.11", "env": {SIDE: "127.0.0.1"}}, f"instance[0].env.{SIDE}", "127.0.0.1"),
    ],
)
def test_every_way_of_advertising_loopback(
    tmp_path: Path, prefill: dict[str, Any], key: str, shown: str
) -> None:
    lines = problems_of(doc_with_remote(prefill=prefill), tmp_path)
    assert (
        len(lines) == 1
        and f": {key}: 'p0' advertises its NIXL side-channel port at {shown}," in (lines[0])
    ), lines


def test_model_env_side_channel_host_counts(tmp_path: Path) -> None:
    lines = problems_of(
        doc_with_remote(prefill={"host": "10.0.0.11"}, model_env={SIDE: "127.0.0.1"}), tmp_path
    )
    assert len(lines) == 1 and f": model.env.{SIDE}: 'p0' advertises" in lines[0], lines
    # the instance's own env wins over [model].env, as in the spawned environment
    ok = doc_with_remote(model_env={SIDE: "127.0.0.1"}, prefill={"env": {SIDE: "10.0.0.11"}})
    topo = parse_config(ok)
    assert build_specs(topo)["p0"].env[SIDE] == "10.0.0.11"


@pytest.mark.parametrize(
    "prefill",
    [{"host": "10.0.0.11"}, {"kv_host": "10.0.0.11"}, {"host": "0.0.0.0", "kv_host": "p0.lan"}],
)
def test_routable_kv_host_is_accepted(prefill: dict[str, Any]) -> None:
    topo = parse_config(doc_with_remote(prefill=prefill))
    spec = build_specs(topo)["p0"]
    assert spec.env[SIDE] == topo.instance("p0").advertised_kv_host != "127.0.0.1"


@pytest.mark.parametrize(
    "remote",
    [
        {"url": "http://127.0.0.1:9200"},  # "remote" on this host reaches our loopback
        {"url": "http://localhost:9200"},
        {"url": "http://10.0.0.12:8200", "kv_host": "127.0.0.1"},  # its KV side is here too
        {"role": "prefill"},  # a remote prefill does not connect to our NIXL side channel
    ],
)
def test_no_remote_peer_reaching_in_is_accepted(remote: dict[str, Any]) -> None:
    parse_config(doc_with_remote(remote=remote))


def test_connectors_without_a_network_kv_side_are_not_concerned() -> None:
    doc = doc_with_remote("ExampleConnector")
    doc["kv_transfer"]["extra_config"] = {"shared_storage_path": "/shared/kv"}
    parse_config(doc)


def test_p2pnccl_checks_both_directions(tmp_path: Path) -> None:
    # P2pNccl addresses both sides: a remote prefill reaches the local decode too
    doc = doc_with_remote(
        "P2pNcclConnector",
        prefill={"host": "10.0.0.11"},
        remote={"role": "prefill", "kv_port": 14579},
    )
    lines = problems_of(doc, tmp_path)
    assert len(lines) == 1, lines
    assert ": instance[1].host: 'd0' advertises its P2pNccl KV port at 127.0.0.1" in lines[0]
    assert "the remote prefill 'far'" in lines[0]
    doc["instance"][1]["kv_host"] = "10.0.0.11"
    parse_config(doc)


def test_mooncake_prefill_bootstrap_must_be_routable(tmp_path: Path) -> None:
    lines = problems_of(doc_with_remote("MooncakeConnector"), tmp_path)
    assert (
        len(lines) == 1 and "'p0' advertises its Mooncake bootstrap port at 127.0.0.1" in (lines[0])
    ), lines


def test_disaggd_check_exits_78_naming_the_instance(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(doc_with_remote()))
    proc = subprocess.run(
        disaggd_argv("check", "-c", str(path)), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"{path}: instance[0].host: 'p0' advertises" in proc.stderr
