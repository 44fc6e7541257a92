"""Kubernetes manifests for a topology: a Deployment and a Service per spawned instance.

Each pod runs the instance's `InstanceSpec` argv and env — what ``disaggd check``
prints — with the few changes a pod needs, made here on purpose and listed in the
file's header:

* ``--host`` becomes ``0.0.0.0``: the Service and the kubelet's probes reach the pod's
  IP, not its loopback;
* ``CUDA_VISIBLE_DEVICES`` is dropped: ``gpus`` becomes the ``nvidia.com/gpu`` limit
  and the device plugin numbers the pod's GPUs from 0;
* ``VLLM_HOST_IP`` and ``VLLM_NIXL_SIDE_CHANNEL_HOST`` (the KV side's advertised
  address) come from the pod's IP (downward API), unless the topology's env sets them;
* ``{python}`` (the daemon's interpreter) becomes ``python3`` of the image;
* the instance's TMPDIR and the cache folders under ``[daemon].state_dir`` are
  ``emptyDir`` volumes mounted at the same paths, so the env stays as ``check`` shows.

Roles are llm-d's labels (``llm-d.ai/role``: prefill/decode; llm-d/llm-d-router
pkg/epp/framework/plugins/scheduling/filter/bylabel/roles.go). Probes follow
``[supervisor]``: a startupProbe on ``/health`` for up to ``start_timeout``, a
readinessProbe on ``/v1/models`` (llm-d's no-Kubernetes guide waits for it) and a
livenessProbe on ``/health`` every ``probe_interval``, ``probe_failures`` in a row.
Remote instances (``url``) run elsewhere and get nothing. disaggd's own proxy is not
rendered: in Kubernetes, llm-d's gateway and endpoint picker take its place.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from disaggd.export import ExportError, yamltext
from disaggd.export.llmd import ROLE_LABEL
from disaggd.topology import InstanceSection, Problem, Topology
from disaggd.topology.spec import InstanceSpec, build_spec

DEFAULT_IMAGE = "vllm/vllm-openai:latest"
GPU_RESOURCE = "nvidia.com/gpu"
#: Env that names this host's address for the KV side: the pod's IP in a cluster.
POD_IP_ENV = ("VLLM_HOST_IP", "VLLM_NIXL_SIDE_CHANNEL_HOST")
#: Seconds between two startup probes.
STARTUP_PERIOD = 10


def k8s_name(name: str) -> str:
    """An instance name as a DNS-1035 label (a Service name): ``Prefill_0`` → ``prefill-0``."""
    out = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if not out[:1].isalpha():
        out = f"vllm-{out}"
    return out[:63].rstrip("-")


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def _probes(topo: Topology) -> dict[str, Any]:
    sup = topo.supervisor

    def get(path: str) -> dict[str, Any]:
        return {"path": path, "port": "http"}

    steady = {
        "periodSeconds": _seconds(sup.probe_interval),
        "timeoutSeconds": _seconds(sup.probe_timeout),
        "failureThreshold": sup.probe_failures,
    }
    return {
        "startupProbe": {
            "httpGet": get("/health"),
            "periodSeconds": STARTUP_PERIOD,
            "timeoutSeconds": _seconds(sup.probe_timeout),
            "failureThreshold": _seconds(sup.start_timeout / STARTUP_PERIOD),
        },
        "readinessProbe": {"httpGet": get("/v1/models"), **steady},
        "livenessProbe": {"httpGet": get("/health"), **steady},
    }


def _argv(spec: InstanceSpec) -> list[str]:
    argv = list(spec.argv)
    if argv and argv[0] == sys.executable:
        argv[0] = "python3"
    for idx, arg in enumerate(argv[:-1]):
        if arg == "--host":
            argv[idx + 1] = "0.0.0.0"
    return argv


def _env(topo: Topology, inst: InstanceSection, spec: InstanceSpec) -> list[dict[str, Any]]:
    user = {**topo.model.env, **inst.env}
    out: list[dict[str, Any]] = []
    for key, value in spec.env.items():
        if key == "CUDA_VISIBLE_DEVICES" and key not in user:
            continue
        if key in POD_IP_ENV and key not in user:
            out.append({"name": key, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        else:
            out.append({"name": key, "value": value})
    return out


def _ports(spec: InstanceSpec) -> list[tuple[str, int]]:
    """``(port name, port)``: ``http``, then ``kv-0``, ``kv-1``... (names of 15 at most)."""
    out = []
    for idx, (kind, port) in enumerate(spec.ports):
        out.append(("http" if kind == "HTTP" else f"kv-{idx - 1}", port))
    return out


def _volumes(topo: Topology, spec: InstanceSpec) -> tuple[list[Any], list[Any]]:
    """(volumes, mounts): TMPDIR and caches as emptyDir at their paths, /dev/shm in memory."""
    mounts = [("tmp", str(spec.tmpdir)), ("shm", "/dev/shm")]
    if topo.engine.isolate_caches:
        mounts.append(("cache", str(topo.daemon.state_dir / "cache")))
    volumes = [
        {"name": name, "emptyDir": {"medium": "Memory"} if name == "shm" else {}}
        for name, _ in mounts
    ]
    return volumes, [{"name": name, "mountPath": path} for name, path in mounts]


def _labels(inst: InstanceSection, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": inst.role.value,
        ROLE_LABEL: inst.role.value,
    }


def _meta(name: str, labels: dict[str, str], namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels
    return meta


def _deployment(
    topo: Topology, inst: InstanceSection, name: str, namespace: str | None, image: str
) -> dict[str, Any]:
    spec = build_spec(topo, inst)
    labels = _labels(inst, name)
    volumes, mounts = _volumes(topo, spec)
    container: dict[str, Any] = {
        "name": "vllm",
        "image": image,
        "command": _argv(spec),
        "env": _env(topo, inst, spec),
        "workingDir": str(spec.workdir),
        "ports": [{"name": n, "containerPort": p} for n, p in _ports(spec)],
        **_probes(topo),
        "volumeMounts": mounts,
    }
    if inst.gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: len(inst.gpus)}}
    pod = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": _seconds(topo.supervisor.stop_grace),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            **_meta(name, labels, namespace),
            "annotations": {"disaggd/instance": inst.name, "disaggd/model": topo.model.name},
        },
        "spec": {
            "replicas": 1,
            # One pod at a time: the new one needs the old one's GPUs.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _service(
    topo: Topology, inst: InstanceSection, name: str, namespace: str | None
) -> dict[str, Any]:
    spec = build_spec(topo, inst)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, _labels(inst, name), namespace),
        "spec": {
            "selector": {"app.kubernetes.io/instance": name},
            "ports": [
                {"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in _ports(spec)
            ],
        },
    }


def _names(topo: Topology) -> dict[str, str]:
    """Instance name → Kubernetes name, for spawned instances; raises on a clash."""
    names: dict[str, str] = {}
    problems = []
    for idx, inst in enumerate(topo.instances):
        if not inst.spawned:
            continue
        name = k8s_name(inst.name)
        clash = next((other for other, n in names.items() if n == name), None)
        if clash is not None:
            problems.append(
                Problem(
                    f"instance[{idx}].name",
                    f"'{inst.name}' and '{clash}' both become '{name}' in Kubernetes",
                )
            )
        names[inst.name] = name
    if problems:
        raise ExportError(problems)
    return names


def manifests(
    topo: Topology, *, namespace: str | None = None, image: str = DEFAULT_IMAGE
) -> list[dict[str, Any]]:
    """Deployment then Service of each spawned instance, in file order.

    Raises:
        ExportError: two instance names become the same Kubernetes name.
    """
    names = _names(topo)
    docs: list[dict[str, Any]] = []
    for inst in topo.instances:
        if inst.name in names:
            docs.append(_deployment(topo, inst, names[inst.name], namespace, image))
            docs.append(_service(topo, inst, names[inst.name], namespace))
    return docs


def render(
    topo: Topology,
    *,
    namespace: str | None = None,
    image: str = DEFAULT_IMAGE,
    source: str = "",
) -> str:
    """`manifests` as multi-document YAML, with a header that says what differs from `check`.

    Raises:
        ExportError: as `manifests`.
    """
    docs = manifests(topo, namespace=namespace, image=image)
    head = [
        f"Kubernetes manifests written by disaggd{f' from {source}' if source else ''}:",
        "one Deployment and one Service per instance; argv and env as `disaggd check`",
        "prints them, except: --host 0.0.0.0; no CUDA_VISIBLE_DEVICES (gpus are the",
        f"{GPU_RESOURCE} limit); VLLM_HOST_IP and VLLM_NIXL_SIDE_CHANNEL_HOST from the",
        "pod IP; TMPDIR and caches are emptyDir volumes at the same paths.",
        "disaggd's proxy is not rendered: put llm-d's gateway and endpoint picker in front",
        f"(pods are labelled {ROLE_LABEL}=prefill|decode).",
    ]
    if topo.model.name.startswith("/"):
        head.append(f"The model is a local folder: mount it in each pod at {topo.model.name}.")
    head += [
        f"Remote instance {inst.name} ({inst.url}) runs elsewhere: not rendered."
        for inst in topo.instances
        if not inst.spawned
    ]
    return yamltext.comment("\n".join(head)) + yamltext.dump_all(docs)
