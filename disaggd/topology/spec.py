"""The one representation of an instance: `InstanceSpec`, built once per topology.

Everything else reads it: `disaggd check` prints its argv and env, the supervisor
spawns it and checks its ports before each start, validation checks the same ports
for clashes, the router builds its upstream from its addresses, and a reload's
fingerprint is plain spec equality (`disaggd.topology.plan`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from disaggd.topology import connectors
from disaggd.topology.schema import InstanceSection, Role, Topology

_DETAILS_FLAG = "--enable-prompt-tokens-details"


@dataclass(frozen=True)
class InstanceSpec:
    """One instance as the daemon runs it: spawned (argv, env, dirs, ports) or remote (url).

    Two specs are equal exactly when going from one to the other needs a restart:
    that is the reload's fingerprint.

    Attributes:
        name: instance name.
        role: prefill (KV producer) or decode (KV consumer).
        base_url: ``http://host:port`` of its OpenAI server (what the proxy and the
            health probes connect to).
        kv_address: ``host:port`` of its KV endpoint when it has a KV port (P2pNccl
            request-id addressing), else None.
        host: the address it binds (spawned) or its URL's host (remote).
        port: its HTTP port (None when a remote URL names none).
        argv: the full command line; empty for a remote instance.
        env: variables set on top of the daemon's own environment (user env last).
        workdir: its working folder (cwd), kept across restarts; None when remote.
        tmpdir: its TMPDIR, emptied whenever it exits; None when remote.
        ports: ``(kind, port)`` pairs it binds on `host`: ``HTTP`` first, then the
            connector's own (``NIXL side channel``, ...); empty when remote.
    """

    name: str
    role: Role
    base_url: str
    kv_address: str | None
    host: str
    port: int | None
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    tmpdir: Path | None = None
    ports: tuple[tuple[str, int], ...] = ()

    @property
    def spawned(self) -> bool:
        """True when this daemon starts the process (it has a command line)."""
        return bool(self.argv)

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


def bound_ports(topo: Topology, inst: InstanceSection) -> tuple[tuple[str, int], ...]:
    """The ports a spawned instance binds on its host, as ``(kind, port)``.

    ``HTTP`` for its OpenAI server, then the connector's ports (``kv_port`` and the
    ones above it that the connector uses, e.g. one NIXL side channel per TP rank).
    """
    ports: list[tuple[str, int]] = []
    if inst.port is not None:
        ports.append(("HTTP", inst.port))
    conn = topo.connector
    if conn.port_kind is not None and inst.kv_port is not None:
        width = connectors.kv_port_width(conn, inst.args, topo.model.args)
        ports.extend((conn.port_kind, inst.kv_port + k) for k in range(width))
    return tuple(ports)


def build_spec(topo: Topology, inst: InstanceSection) -> InstanceSpec:
    """The `InstanceSpec` of one instance of `topo`.

    A remote instance (``url``) gets its addresses only. A spawned one also gets:

    argv: ``[engine].command`` (``vllm serve MODEL`` by default), ``--host``,
    ``--port``, ``--served-model-name`` (when set), ``[model].args``,
    ``--kv-transfer-config JSON``, then the instance's own ``args`` last.

    env: ``CUDA_VISIBLE_DEVICES`` (from ``gpus``), ``VLLM_HOST_IP``, the
    connector's variables, TMPDIR and caches under the state directory,
    then ``[model].env`` and the instance's ``env`` last.
    """
    kv_address = connectors.kv_address(inst) if inst.kv_port is not None else None
    if not inst.spawned:
        assert inst.url is not None
        url = urlsplit(inst.url)
        return InstanceSpec(
            name=inst.name,
            role=inst.role,
            base_url=inst.base_url,
            kv_address=kv_address,
            host=url.hostname or "",
            port=url.port,
        )
    values = placeholders(topo, inst)
    argv: list[str] = [connectors.expand(part, values) for part in topo.engine.command]
    argv += ["--host", inst.host, "--port", str(inst.port)]
    if topo.model.served_model_name:
        argv += ["--served-model-name", topo.model.served_model_name]
    argv += [connectors.expand(a, values) for a in topo.model.args]
    if (
        topo.kv_transfer.check
        and inst.role is Role.DECODE
        and _DETAILS_FLAG not in (*topo.model.args, *inst.args)
    ):
        # The proxy's KV check reads usage.prompt_tokens_details.cached_tokens.
        argv.append(_DETAILS_FLAG)
    kv_cfg = connectors.kv_transfer_config(topo, inst, values)
    argv += ["--kv-transfer-config", json.dumps(kv_cfg, separators=(",", ":"))]
    argv += [connectors.expand(a, values) for a in inst.args]

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
    return InstanceSpec(
        name=inst.name,
        role=inst.role,
        base_url=inst.base_url,
        kv_address=kv_address,
        host=inst.host,
        port=inst.port,
        argv=tuple(argv),
        env=env,
        workdir=topo.daemon.instance_dir(inst.name),
        tmpdir=tmpdir,
        ports=bound_ports(topo, inst),
    )


def build_specs(topo: Topology) -> dict[str, InstanceSpec]:
    """`build_spec` of every instance, spawned and remote, in file order, by name."""
    return {inst.name: build_spec(topo, inst) for inst in topo.instances}
