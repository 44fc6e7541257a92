"""Child command composition: the exact argv and env of every spawned instance.

This is the one place that turns a topology into `vllm serve` command lines.
`disaggd check` prints what it returns; the supervisor executes it.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from disaggd.topology import connectors
from disaggd.topology.schema import InstanceSection, Topology

_DETAILS_FLAG = "--enable-prompt-tokens-details"


@dataclass(frozen=True)
class ChildSpec:
    """How to start one instance.

    Attributes:
        name: instance name.
        role: "prefill" or "decode".
        argv: the full command line.
        env: variables set on top of the daemon's own environment (user env last).
        workdir: the instance's working folder (cwd), kept across restarts.
        tmpdir: its TMPDIR, emptied when the instance exits.
    """

    name: str
    role: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    workdir: Path
    tmpdir: Path

    def shell(self) -> str:
        """A line a user can paste into a shell to start the instance by hand."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def placeholders(topo: Topology, inst: InstanceSection | None = None) -> dict[str, str]:
    """Values of ``{state_dir}``, ``{model}``, ``{python}`` and ``{instance}``."""
    values = {
        "state_dir": str(topo.daemon.state_dir),
        "model": topo.model.name,
        "python": sys.executable,
    }
    if inst is not None:
        values["instance"] = inst.name
    return values


def build_child_spec(topo: Topology, inst: InstanceSection) -> ChildSpec:
    """The argv and env of a spawned instance.

    argv: ``[engine].command`` (``vllm serve MODEL`` by default), ``--host``,
    ``--port``, ``--served-model-name`` (when set), ``[model].args``,
    ``--kv-transfer-config JSON``, then the instance's own ``args`` last.

    env: ``CUDA_VISIBLE_DEVICES`` (from ``gpus``), ``VLLM_HOST_IP``, the
    connector's variables, TMPDIR and caches under the state directory,
    then ``[model].env`` and the instance's ``env`` last.

    Raises:
        ValueError: `inst` is a remote instance (it has a ``url``).
    """
    if not inst.spawned:
        raise ValueError(f"instance {inst.name!r} is remote ({inst.url}); nothing to spawn")
    values = placeholders(topo, inst)
    argv: list[str] = [connectors.expand(part, values) for part in topo.engine.command]
    argv += ["--host", inst.host, "--port", str(inst.port)]
    if topo.model.served_model_name:
        argv += ["--served-model-name", topo.model.served_model_name]
    argv += [connectors.expand(a, values) for a in topo.model.args]
    if (
        topo.kv_transfer.check
        and inst.role.value == "decode"
        and _DETAILS_FLAG not in (*topo.model.args, *inst.args)
    ):
        # The proxy's KV check reads usage.prompt_tokens_details.cached_tokens.
        argv.append(_DETAILS_FLAG)
    kv_cfg = connectors.kv_transfer_config(topo, inst, values)
    argv += ["--kv-transfer-config", json.dumps(kv_cfg, separators=(",", ":"))]
    argv += [connectors.expand(a, values) for a in inst.args]

    workdir = topo.daemon.instance_dir(inst.name)
    tmpdir = topo.daemon.tmp_dir(inst.name)
    env: dict[str, str] = {}
    if inst.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in inst.gpus)
    env["VLLM_HOST_IP"] = inst.advertised_kv_host
    env.update(connectors.connector_env(topo, inst))
    # vLLM leaves a /tmp/vllm_dist_* folder behind on every start: keep them where the
    # supervisor can remove them when the instance exits.
    env["TMPDIR"] = str(tmpdir)
    if topo.engine.isolate_caches:
        cache = topo.daemon.state_dir / "cache"
        env["VLLM_CACHE_ROOT"] = str(cache / "vllm")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "torchinductor")
    # Line-buffered child output, so log lines reach the journal as they happen.
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: connectors.expand(v, values) for k, v in topo.model.env.items()})
    env.update({k: connectors.expand(v, values) for k, v in inst.env.items()})
    return ChildSpec(
        name=inst.name,
        role=inst.role.value,
        argv=tuple(argv),
        env=env,
        workdir=workdir,
        tmpdir=tmpdir,
    )


def all_child_specs(topo: Topology) -> list[ChildSpec]:
    """`build_child_spec` of every spawned instance, in file order."""
    return [build_child_spec(topo, i) for i in topo.instances if i.spawned]
