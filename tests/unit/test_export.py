"""`disaggd export`: llm-d's endpoints file and Kubernetes manifests, as pure renderers.

The endpoints file is read back by a reader written from llm-d's documented format
(`tests.harness.llmd`); the manifests are validated against Kubernetes' own JSON
schemas, offline (the `kubernetes-validate` package ships them).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from disaggd.cli import EX_CONFIG, EX_OK, main
from disaggd.daemon.endpoints import EndpointsFile
from disaggd.daemon.status import status_rows
from disaggd.export import ExportError, k8s, llmd, yamltext
from disaggd.export.atomic import write_atomic
from disaggd.supervise.events import InstanceStatus
from disaggd.supervise.states import ProcessState
from disaggd.topology import ConfigError, Topology, load_config, parse_config
from disaggd.topology.spec import build_spec
from tests.harness.common import dump_toml, short_dir
from tests.harness.llmd import by_name, read_endpoints, read_endpoints_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted([ROOT / "etc" / "disaggd.toml", *(ROOT / "etc" / "examples").glob("*.toml")])
#: The newest Kubernetes whose schemas the package ships (strict: no unknown fields).
K8S_VERSION = kubernetes_validate.latest_version()


def topo_of(tmp_path: Path, **daemon: Any) -> Topology:
    doc: dict[str, Any] = {
        "model": {"name": "org/model", "served_model_name": "m"},
        "kv_transfer": {"connector": "NixlConnector"},
        "daemon": {"state_dir": str(short_dir(tmp_path) / "s"), **daemon},
        "instance": [
            {"name": "prefill-0", "role": "prefill", "host": "10.0.0.5", "port": 8100},
            {"name": "decode_A", "role": "decode", "port": 8200, "gpus": [2, 3]},
            {
                "name": "decode-b",
                "role": "decode",
                "host": "0.0.0.0",
                "kv_host": "10.0.0.6",
                "port": 8201,
            },
            {"name": "remote-p", "role": "prefill", "url": "http://10.0.0.9:9100"},
        ],
    }
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(doc))
    return load_config(path)


# -- the YAML writer ----------------------------------------------------------------------


def test_yaml_writer_round_trips_through_a_real_parser() -> None:
    doc = {
        "a": "on",
        "yes": "8000",
        "n": None,
        "t": True,
        "i": 3,
        "f": 0.5,
        "0755": "0755",
        "weird: key": 'quote " and \\ and\nnewline',
        "empty_map": {},
        "empty_list": [],
        "list": [{"x": [1, {"y": "z"}]}, "s", [], {}, ["nested"]],
        "llm-d.ai/role": "prefill",
    }
    assert yaml.safe_load(yamltext.dump(doc)) == doc
    docs = list(yaml.safe_load_all(yamltext.comment("a\nb") + yamltext.dump_all([doc, {"k": 1}])))
    assert docs == [doc, {"k": 1}]


# -- llm-d's endpoints file ---------------------------------------------------------------


def test_endpoints_file_round_trips_through_llm_d_reader(tmp_path: Path) -> None:
    topo = topo_of(tmp_path)
    entries = by_name(read_endpoints(llmd.render(topo, source="t.toml")))
    assert list(entries) == ["prefill-0", "decode_A", "decode-b", "remote-p"]
    expected = {
        "prefill-0": ("10.0.0.5", 8100, "prefill"),
        "decode_A": ("127.0.0.1", 8200, "decode"),  # loopback: reached on this host
        "decode-b": ("10.0.0.6", 8201, "decode"),  # wildcard host: its kv_host
        "remote-p": ("10.0.0.9", 9100, "prefill"),  # a remote instance: its URL
    }
    for name, (address, port, role) in expected.items():
        entry = entries[name]
        assert (entry["address"], entry["port"]) == (address, port)
        assert entry["labels"] == {"llm-d.ai/role": role, "model": "m"}
        assert entry["namespace"] == "default"
        assert entry["metricsHost"] == f"{address}:{port}"  # vLLM's /metrics on its port


def test_endpoints_file_lists_only_the_ready_instances(tmp_path: Path) -> None:
    topo = topo_of(tmp_path)
    text = llmd.render(topo, ready={"decode-b"})
    assert [e["name"] for e in read_endpoints(text)] == ["decode-b"]
    assert read_endpoints(llmd.render(topo, ready=set())) == []
    # Same instances, same bytes: the daemon skips a rewrite that changes nothing.
    assert llmd.render(topo, ready={"decode-b"}) == text


def test_endpoints_file_refuses_a_hostname(tmp_path: Path) -> None:
    doc = {
        "model": {"name": "m"},
        "instance": [
            {"name": "p", "role": "prefill", "port": 8100, "host": "gpu-a.local"},
            {"name": "d", "role": "decode", "url": "http://gpu-b:8200"},
        ],
    }
    topo = parse_config(doc)  # fine without an endpoints file...
    with pytest.raises(ExportError) as info:
        llmd.render(topo)
    assert [p.key for p in info.value.problems] == ["instance[0].host", "instance[1].url"]
    assert "literal IPv4" in info.value.problems[0].reason
    # ... and refused by validation when the daemon must keep one.
    with pytest.raises(ConfigError) as cfg:
        parse_config({**doc, "daemon": {"endpoints_file": "/run/ep.yaml"}})
    assert [p.key for p in cfg.value.problems] == ["instance[0].host", "instance[1].url"]


def test_endpoints_file_key_is_anchored_at_the_topology_file(tmp_path: Path) -> None:
    topo = topo_of(tmp_path, endpoints_file="llm-d/endpoints.yaml")
    assert topo.daemon.endpoints_file == tmp_path / "llm-d" / "endpoints.yaml"
    with pytest.raises(ConfigError) as info:
        topo_of(tmp_path, endpoints_file=".")
    assert [p.key for p in info.value.problems] == ["daemon.endpoints_file"]


# -- Kubernetes manifests ----------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_manifests_of_every_example_validate_against_kubernetes_schema(path: Path) -> None:
    topo = load_config(path)
    text = k8s.render(topo, namespace="llm", image="vllm/vllm-openai:v0.19.1", source=str(path))
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(docs) == 2 * sum(1 for i in topo.instances if i.spawned)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == "llm"


def test_manifests_validate_with_gpus_and_odd_names(tmp_path: Path) -> None:
    for doc in k8s.manifests(topo_of(tmp_path)):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name
    )
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_pod_runs_the_argv_and_env_check_prints(tmp_path: Path) -> None:
    topo = topo_of(tmp_path)
    docs = k8s.manifests(topo)
    inst = topo.instance("decode_A")
    spec = build_spec(topo, inst)
    c = _container(docs, "decode-a")
    # Same argv, except the bind address (a pod is reached at its IP).
    expected = list(spec.argv)
    expected[expected.index("--host") + 1] = "0.0.0.0"
    assert c["command"] == expected
    env = {e["name"]: e for e in c["env"]}
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    for key, value in spec.env.items():
        if key == "CUDA_VISIBLE_DEVICES":
            assert key not in env  # the device plugin numbers the pod's GPUs from 0
        elif key in ("VLLM_HOST_IP", "VLLM_NIXL_SIDE_CHANNEL_HOST"):
            assert env[key]["valueFrom"] == pod_ip
        else:
            assert env[key]["value"] == value
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert c["workingDir"] == str(spec.workdir)
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {str(spec.tmpdir), "/dev/shm"}
    sup = topo.supervisor
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= (
        sup.start_timeout
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["failureThreshold"] == sup.probe_failures
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
        ("http", 8200),
        ("kv-0", inst.kv_port),
    ]


def test_roles_are_llm_d_labels_and_remote_instances_are_left_out(tmp_path: Path) -> None:
    docs = k8s.manifests(topo_of(tmp_path))
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "remote-p") not in names
    assert ("Service", "decode-b") in names
    for doc in docs:
        role = doc["metadata"]["labels"]["llm-d.ai/role"]
        assert role in ("prefill", "decode")
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["metadata"]["labels"]["llm-d.ai/role"] == role
        else:
            assert doc["spec"]["ports"][0] == {
                "name": "http",
                "port": 8100 if role == "prefill" else doc["spec"]["ports"][0]["port"],
                "targetPort": "http",
                "protocol": "TCP",
            }


def test_python_placeholder_becomes_the_images_python(tmp_path: Path) -> None:
    doc = {
        "model": {"name": "m"},
        "engine": {"command": ["{python}", "-m", "vllm.entrypoints.openai.api_server", "{model}"]},
        "instance": [
            {"name": "p", "role": "prefill", "port": 8100},
            {"name": "d", "role": "decode", "port": 8200},
        ],
    }
    c = _container(k8s.manifests(parse_config(doc)), "p")
    assert c["command"][0] == "python3" and sys.executable not in c["command"]


def test_names_that_clash_in_kubernetes_are_refused() -> None:
    doc = {
        "model": {"name": "m"},
        "instance": [
            {"name": "p_0", "role": "prefill", "port": 8100},
            {"name": "P.0", "role": "prefill", "port": 8101},
            {"name": "0d", "role": "decode", "port": 8200},
        ],
    }
    with pytest.raises(ExportError) as info:
        k8s.manifests(parse_config(doc))
    assert [p.key for p in info.value.problems] == ["instance[1].name"]
    assert k8s.k8s_name("0d") == "vllm-0d"


# -- the command line --------------------------------------------------------------------


def test_cli_export_to_stdout_and_to_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ROOT / "etc" / "examples" / "gpu-nixl-2p2d.toml"
    assert main(["export", "llm-d", "-c", str(config)]) == EX_OK
    out = capsys.readouterr().out
    assert [e["labels"]["llm-d.ai/role"] for e in read_endpoints(out)] == [
        "prefill",
        "prefill",
        "decode",
        "decode",
    ]
    target = tmp_path / "out" / "k8s.yaml"
    rc = main(["export", "k8s", "-c", str(config), "-o", str(target), "--namespace", "ns"])
    assert rc == EX_OK and capsys.readouterr().out == ""
    docs = list(yaml.safe_load_all(target.read_text()))
    assert {d["metadata"]["namespace"] for d in docs} == {"ns"}
    assert {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in docs[::2]} == {
        k8s.DEFAULT_IMAGE
    }


def test_cli_export_exits_78_on_a_bad_topology(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "m"\n')
    assert main(["export", "k8s", "-c", str(bad)]) == EX_CONFIG
    assert "invalid topology" in capsys.readouterr().err
    hostname = tmp_path / "h.toml"
    hostname.write_text(
        dump_toml(
            {
                "model": {"name": "m"},
                "instance": [
                    {"name": "p", "role": "prefill", "port": 8100, "host": "gpu-a"},
                    {"name": "d", "role": "decode", "port": 8200},
                ],
            }
        )
    )
    assert main(["export", "llm-d", "-c", str(hostname)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "cannot export to llm-d" in err and "instance[0].host" in err


# -- the atomic writer and the daemon's keeper -------------------------------------------


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "d" / "f.yaml"
    write_atomic(path, "one\n")
    first = path.stat().st_ino
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert path.stat().st_ino != first  # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["f.yaml"]
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir", "x")  # a folder cannot be replaced by a file
    assert os.listdir(tmp_path / "dir") == []
    assert sorted(os.listdir(tmp_path)) == ["d", "dir"]


def _status(name: str, role: str, ready: bool) -> InstanceStatus:
    state = ProcessState.RUNNING if ready else ProcessState.STARTING
    return InstanceStatus(
        name=name,
        role=role,
        state=state,
        spawned=True,
        url="http://127.0.0.1:1",
        port=1,
        pid=None,
        ready=ready,
        since=0.0,
        uptime=None,
        restarts=0,
        failures=0,
        last_exit=None,
        last_output=(),
    )


def test_keeper_follows_readiness_and_a_moved_path(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    topo = [topo_of(tmp_path, endpoints_file=str(first))]
    statuses = [_status("prefill-0", "prefill", True), _status("decode-b", "decode", False)]
    keeper = EndpointsFile(lambda: topo[0], lambda: statuses)
    keeper.refresh()
    assert [e["name"] for e in read_endpoints_file(first)] == ["prefill-0"]
    inode = first.stat().st_ino
    keeper.refresh()  # nothing changed: no rewrite (no needless reload in llm-d)
    assert first.stat().st_ino == inode
    statuses[1] = _status("decode-b", "decode", True)
    keeper.refresh()
    assert [e["name"] for e in read_endpoints_file(first)] == ["prefill-0", "decode-b"]
    second = tmp_path / "b" / "b.yaml"
    topo[0] = topo_of(tmp_path, endpoints_file=str(second))
    keeper.refresh()
    assert read_endpoints_file(first) == []  # the old path lists nothing, and stays
    assert len(read_endpoints_file(second)) == 2
    topo[0] = topo_of(tmp_path)
    keeper.refresh()
    assert read_endpoints_file(second) == []


def test_status_rows_carry_the_role_labels() -> None:
    rows = status_rows([_status("p", "prefill", True), _status("d", "decode", False)], {})
    assert [r["labels"] for r in rows] == [
        {"llm-d.ai/role": "prefill"},
        {"llm-d.ai/role": "decode"},
    ]
    json.dumps(rows)
