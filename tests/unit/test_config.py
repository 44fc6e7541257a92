"""The topology schema: every validation failure as a user sees it, and the examples."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from disaggd.cli import EX_CONFIG, EX_USAGE, main
from disaggd.topology import ConfigError, Role, connectors, load_config, parse_config
from disaggd.topology.spec import build_spec, build_specs
from tests.harness.common import dump_toml, short_dir, standin_topology

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted([ROOT / "etc" / "disaggd.toml", *(ROOT / "etc" / "examples").glob("*.toml")])


def minimal(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": {"name": "m"},
        "kv_transfer": {"connector": "NixlConnector"},
        "instance": [
            {"name": "p0", "role": "prefill", "port": 8100},
            {"name": "d0", "role": "decode", "port": 8200},
        ],
    }
    doc.update(sections)
    return doc


def problems_of(doc: dict[str, Any], tmp_path: Path) -> list[str]:
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for line in text.splitlines():
        assert line.startswith(f"{path}: "), line  # every message names the file
    return text.splitlines()


def test_minimal_topology_is_valid_with_safe_defaults() -> None:
    topo = parse_config(minimal())
    assert [i.name for i in topo.instances] == ["p0", "d0"]
    assert all(i.host == "127.0.0.1" for i in topo.instances)
    assert topo.proxy.host == "127.0.0.1"
    assert topo.by_role(Role.PREFILL)[0].name == "p0"
    # NIXL side-channel ports allocated from 5600, one per instance
    assert [i.kv_port for i in topo.instances] == [5600, 5601]


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    doc = minimal(proxy={"prot": 9000})
    doc["instance"][1]["gpu"] = [1]
    lines = problems_of(doc, tmp_path)
    assert any("proxy.prot: unknown key; did you mean 'port'?" in line for line in lines)
    assert any("instance[1].gpu: unknown key; did you mean 'gpus'?" in line for line in lines)


def test_unknown_key_without_a_near_one_lists_the_known(tmp_path: Path) -> None:
    lines = problems_of(minimal(daemon={"zzzz": 1}), tmp_path)
    assert any("daemon.zzzz: unknown key (known keys: control_socket" in line for line in lines)


def test_unknown_section(tmp_path: Path) -> None:
    lines = problems_of(minimal(proxi={"port": 1}), tmp_path)
    assert any("proxi: unknown key; did you mean 'proxy'?" in line for line in lines)


def test_wrong_types_are_named_in_toml_words(tmp_path: Path) -> None:
    doc = minimal(proxy={"port": "abc"})
    doc["model"]["args"] = "--max-model-len 100"
    doc["instance"][0]["env"] = "X=1"
    lines = problems_of(doc, tmp_path)
    assert any("proxy.port: expected an integer (got 'abc')" in line for line in lines)
    assert any("model.args: expected a list (got '--max-model-len 100')" in line for line in lines)
    assert any("instance[0].env: expected a table" in line for line in lines)


def test_numbers_and_flags_are_not_coerced(tmp_path: Path) -> None:
    # A quoted number, a float port or a boolean GPU is a mistake, not a value to guess.
    doc = minimal(supervisor={"stop_grace": True}, daemon={"watch": 1})
    doc["instance"][0]["port"] = "8100"
    doc["instance"][0]["gpus"] = [True, -1]
    doc["instance"][1]["port"] = 8200.0
    lines = problems_of(doc, tmp_path)
    assert any("instance[0].port: expected an integer (got '8100')" in line for line in lines)
    assert any("instance[0].gpus[0]: expected an integer" in line for line in lines)
    assert any(
        "instance[0].gpus[1]:" in line and "greater than or equal to 0" in line for line in lines
    )
    assert any("instance[1].port: expected an integer (got 8200.0)" in line for line in lines)
    assert any("supervisor.stop_grace: expected a number" in line for line in lines)
    assert any("daemon.watch: expected true or false (got 1)" in line for line in lines)
    # An integer where a number of seconds is meant is fine.
    assert parse_config(minimal(supervisor={"stop_grace": 5})).supervisor.stop_grace == 5.0


def test_bad_role_suggests(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"][0]["role"] = "prefil"
    lines = problems_of(doc, tmp_path)
    assert any("instance[0].role" in line and "did you mean 'prefill'?" in line for line in lines)


def test_out_of_range_and_missing(tmp_path: Path) -> None:
    doc = minimal(supervisor={"stop_grace": 0})
    doc["instance"][1]["port"] = 70000
    del doc["instance"][0]["role"]
    lines = problems_of(doc, tmp_path)
    assert any("supervisor.stop_grace:" in line and "greater than 0" in line for line in lines)
    assert any("instance[1].port:" in line and "65535" in line for line in lines)
    assert any("instance[0].role: required key is missing" in line for line in lines)


def test_duplicate_names(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"].append({"name": "p0", "role": "decode", "port": 8300})
    lines = problems_of(doc, tmp_path)
    assert any("instance[2].name: duplicate name 'p0' (also instance[0])" in line for line in lines)


def test_clashing_http_ports_and_proxy_port(tmp_path: Path) -> None:
    doc = minimal(proxy={"port": 8200})
    doc["instance"].append({"name": "p1", "role": "prefill", "port": 8100})
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[1].port: port 8200 (HTTP) of 'd0' is already used by proxy.port" in line
        for line in lines
    )
    assert any(
        "instance[2].port: port 8100 (HTTP) of 'p1' is already used by instance[0].port" in line
        for line in lines
    )


def test_kv_port_clashes_with_http_port(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"][1]["kv_port"] = 8100
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[1].kv_port: port 8100 (NIXL side-channel port) of 'd0' is already used by "
        "instance[0].port" in line
        for line in lines
    )


def test_p2p_ports_span_tensor_parallel_ranks(tmp_path: Path) -> None:
    doc = minimal(kv_transfer={"connector": "P2pNcclConnector"})
    doc["instance"][0].update(kv_port=14579, args=["--tensor-parallel-size", "2"])
    doc["instance"][1].update(kv_port=14580)
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[1].kv_port: port 14580 (P2pNccl KV port)" in line
        and "instance[0].kv_port" in line
        for line in lines
    )


def test_needs_a_prefill_and_a_decode(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"] = [doc["instance"][0]]
    lines = problems_of(doc, tmp_path)
    assert any("at least one decode instance; found none" in line for line in lines)


def test_connector_role_mismatch(tmp_path: Path) -> None:
    doc = minimal(kv_transfer={"connector": "DecodeBenchConnector"})
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[0].role: DecodeBenchConnector cannot serve as a prefill (KV producer)" in line
        for line in lines
    )
    assert not any("instance[1].role" in line for line in lines)
    doc = minimal(kv_transfer={"connector": "P2pNcclConnector"})
    doc["instance"][0]["kv_role"] = "kv_both"
    lines = problems_of(doc, tmp_path)
    assert any("P2pNcclConnector cannot serve as a prefill" in line for line in lines)


def test_unknown_connector_and_custom(tmp_path: Path) -> None:
    lines = problems_of(minimal(kv_transfer={"connector": "NixlConector"}), tmp_path)
    assert any(
        "unknown connector 'NixlConector'. Did you mean 'NixlConnector'?" in x for x in lines
    )
    topo = parse_config(
        minimal(
            kv_transfer={
                "connector": "MyConnector",
                "module_path": "my.module",
                "handoff": "kv_transfer_params",
            }
        )
    )
    assert topo.connector.handoff is connectors.Handoff.KV_TRANSFER_PARAMS
    cfg = json.loads(build_spec(topo, topo.instances[0]).argv[-1])
    assert cfg["kv_connector_module_path"] == "my.module"


def test_example_connector_needs_its_storage_path(tmp_path: Path) -> None:
    lines = problems_of(minimal(kv_transfer={"connector": "ExampleConnector"}), tmp_path)
    assert any(
        "kv_transfer.extra_config.shared_storage_path: ExampleConnector needs" in x for x in lines
    )


def test_remote_instance_is_not_spawned(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"].append({"name": "d-remote", "role": "decode", "url": "http://10.0.0.12:8200"})
    for inst in doc["instance"][:-1]:
        inst["kv_host"] = "10.0.0.11"  # reachable from the remote decode's host
    topo = parse_config(doc)
    remote = topo.instance("d-remote")
    assert not remote.spawned and remote.base_url == "http://10.0.0.12:8200"
    specs = build_specs(topo)
    assert [s.name for s in specs.values() if s.spawned] == ["p0", "d0"]
    assert specs["d-remote"].argv == () and specs["d-remote"].ports == ()
    assert specs["d-remote"].base_url == "http://10.0.0.12:8200"
    doc["instance"][-1]["gpus"] = [3]
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[2]: a remote instance ('url') is not spawned: remove gpus" in x for x in lines
    )
    del doc["instance"][-1]["url"], doc["instance"][-1]["gpus"]
    lines = problems_of(doc, tmp_path)
    assert any("instance[2]: a spawned instance needs 'port'" in x for x in lines)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model\nname = 1")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    doc = minimal(proxy={"prot": 1}, supervisor={"max_failures": "x"})
    doc["instance"][0]["role"] = "x"
    assert len(problems_of(doc, tmp_path)) == 3


def test_relative_paths_are_anchored_at_the_file(tmp_path: Path) -> None:
    doc = minimal(daemon={"state_dir": "state", "control_socket": "run/ctl.sock"})
    tmp_path = short_dir(tmp_path)  # state_dir's sockets must fit (see below)
    path = tmp_path / "sub" / "t.toml"
    path.parent.mkdir()
    path.write_text(dump_toml(doc))
    topo = load_config(path)
    assert topo.daemon.state_dir == (tmp_path / "sub" / "state")
    assert topo.daemon.control_socket == tmp_path / "sub" / "run" / "ctl.sock"


# -- child command composition --------------------------------------------------------------


def seed_kv(role: str) -> dict[str, Any]:
    """The --kv-transfer-config vLLM's disaggregated_prefill.sh passes (shared/VLLM_FACTS.md)."""
    prefill = role == "prefill"
    return {
        "kv_connector": "P2pNcclConnector",
        "kv_role": "kv_producer" if prefill else "kv_consumer",
        "kv_rank": 0 if prefill else 1,
        "kv_parallel_size": 2,
        "kv_buffer_size": 1e9 if prefill else 1e10,
        "kv_port": 14579 if prefill else 14580,
        "kv_connector_extra_config": {
            "http_ip": "127.0.0.1",
            "http_port": "8100" if prefill else "8200",
            "send_type": "PUT_ASYNC",
        },
    }


def test_check_of_the_production_example_matches_the_seed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "-c", str(ROOT / "etc" / "disaggd.toml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["instances"]}
    assert list(rows) == ["prefill-0", "decode-0"]
    for name, role, port, gpu in (
        ("prefill-0", "prefill", 8100, "0"),
        ("decode-0", "decode", 8200, "1"),
    ):
        argv = rows[name]["argv"]
        env = rows[name]["env"]
        assert argv[:3] == ["vllm", "serve", "meta-llama/Meta-Llama-3.1-8B-Instruct"]
        assert argv[argv.index("--port") + 1] == str(port)
        for flag in ("--max-model-len", "--gpu-memory-utilization", "--trust-remote-code"):
            assert flag in argv
        assert argv[argv.index("--max-model-len") + 1] == "100"
        kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        expected = seed_kv(role)
        for key, value in expected.items():
            assert kv[key] == value, key
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        assert env["VLLM_HOST_IP"] == "127.0.0.1"
        assert env["VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"] == "1"
        # the pasteable line round-trips to the same argv
        assert shlex.split(rows[name]["shell"])[-len(argv) :] == argv


def test_user_args_and_env_come_last(tmp_path: Path) -> None:
    doc = minimal(model={"name": "m", "args": ["--a", "1"], "env": {"X": "model", "Y": "model"}})
    doc["instance"][0].update(args=["--a", "2"], env={"Y": "inst", "TMPDIR": "/x"}, gpus=[2, 3])
    topo = parse_config(doc)
    spec = build_spec(topo, topo.instances[0])
    assert spec.argv[-2:] == ("--a", "2")
    assert spec.argv.index("--kv-transfer-config") > spec.argv.index("--a")
    assert spec.env["X"] == "model" and spec.env["Y"] == "inst"
    assert spec.env["TMPDIR"] == "/x"  # the user's word is last
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert list(spec.env)[-1] in ("Y", "TMPDIR")


def test_nixl_env_and_engine_id() -> None:
    topo = parse_config(minimal())
    specs = build_specs(topo).values()
    ports = {s.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for s in specs}
    assert ports == {"5600", "5601"}
    for spec in specs:
        kv = json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])
        assert kv["engine_id"] == spec.name
        assert kv["kv_role"] == ("kv_producer" if spec.role == "prefill" else "kv_consumer")
        assert "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION" not in spec.env


def test_placeholders_and_state_dir(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, connector="ExampleConnector")
    topo = parse_config(doc)
    spec = build_spec(topo, topo.instances[0])
    assert spec.argv[0] == sys.executable
    kv = json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])
    state = Path(doc["daemon"]["state_dir"])
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == str(state / "kv")
    assert spec.env["TMPDIR"] == str(state / "instances" / "prefill-0" / "tmp")
    assert spec.env["VLLM_CACHE_ROOT"].startswith(str(state))


# -- examples and the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_round_trips(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = load_config(path)
    # validated -> dumped -> validated again gives the same topology
    again = parse_config(topo.model_dump(by_alias=True, mode="json"), path)
    assert again == topo
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# topology OK")
    for inst in topo.instances:
        assert f"# {inst.name} ({inst.role.value}" in out


def test_cli_config_error_exit_status_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[model]\nname = "m"\n[proxy]\nprot = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EX_CONFIG == 78
    assert "Traceback" not in proc.stderr
    assert f"{path}: proxy.prot: unknown key; did you mean 'port'?" in proc.stderr


def test_cli_usage_error_is_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "--bogus"])
    assert info.value.code == EX_USAGE
    assert main([]) == EX_USAGE


def test_help_imports_no_engine_nor_server() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from disaggd.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('vllm', 'torch', 'transformers', 'quart', 'aiohttp', 'pydantic'))\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # How fast it is belongs to bench/; what it imports decides it.
    assert proc.stdout.strip() == "[]"


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("disaggd ")


def test_kv_check_asks_decodes_for_their_cached_tokens() -> None:
    topo = parse_config(minimal())
    p0, d0 = (build_spec(topo, i) for i in topo.instances)
    assert "--enable-prompt-tokens-details" in d0.argv
    assert "--enable-prompt-tokens-details" not in p0.argv
    topo = parse_config(minimal(kv_transfer={"connector": "NixlConnector", "check": False}))
    assert "--enable-prompt-tokens-details" not in build_spec(topo, topo.instances[1]).argv


def test_nixl_on_cpu_tames_the_progress_thread() -> None:
    topo = parse_config(minimal(kv_transfer={"connector": "NixlConnector", "buffer_device": "cpu"}))
    specs = build_specs(topo).values()
    assert all(s.env[connectors.NIXL_PROGRESS_DELAY_ENV] == "1000" for s in specs)
    topo = parse_config(minimal())
    assert all(connectors.NIXL_PROGRESS_DELAY_ENV not in s.env for s in build_specs(topo).values())


def test_relative_model_path_is_anchored_at_the_file(tmp_path: Path) -> None:
    doc = minimal(model={"name": "../models/tiny"})
    path = tmp_path / "etc" / "t.toml"
    path.parent.mkdir()
    path.write_text(dump_toml(doc))
    assert load_config(path).model.name == str(tmp_path / "models" / "tiny")
    doc = minimal(model={"name": "org/model"})
    path.write_text(dump_toml(doc))
    assert load_config(path).model.name == "org/model"


def test_socket_paths_that_would_not_fit(tmp_path: Path) -> None:
    """vLLM binds ZMQ sockets at $TMPDIR/<uuid>: a Unix socket path holds 107 bytes."""
    deep = "/srv/" + "d" * 60
    lines = problems_of(minimal(daemon={"state_dir": deep, "control_socket": deep * 2}), tmp_path)
    assert any(
        "daemon.control_socket: 130 bytes long; a Unix socket path holds at most 107" in x
        for x in lines
    )
    (line,) = [x for x in lines if "daemon.state_dir" in x]  # one line, not one per instance
    assert f"too long for vLLM: 'p0' gets TMPDIR={deep}/instances/p0/tmp (82 bytes)" in line
    assert "keep TMPDIR within 70 bytes" in line
    doc = minimal(daemon={"state_dir": deep})
    doc["instance"][0]["env"] = {"TMPDIR": "/t"}
    doc["instance"][1]["env"] = {"TMPDIR": "/t"}
    parse_config(doc)  # the instances' own TMPDIR is short: fine


def test_connector_port_env_is_set_through_kv_port(tmp_path: Path) -> None:
    doc = minimal()
    doc["instance"][0]["env"] = {"VLLM_NIXL_SIDE_CHANNEL_PORT": "8200"}
    lines = problems_of(doc, tmp_path)
    assert any(
        "instance[0].env.VLLM_NIXL_SIDE_CHANNEL_PORT: set instance[0].kv_port instead" in x
        for x in lines
    )
