"""What each vLLM KV connector needs, in one place.

For every connector disaggd knows, this module answers three questions:

* which KV roles it supports (``kv_producer`` for prefill, ``kv_consumer`` for
  decode; vllm/config/kv_transfer.py, ``KVTransferConfig.kv_role``);
* what a spawned instance needs: its ``--kv-transfer-config`` JSON and its
  environment (ports, host, request-id randomisation);
* how the proxy hands a request from prefill to decode (`Handoff`).

Sources: vllm/distributed/kv_transfer/kv_connector/factory.py (registered
names), vLLM's tests/v1/kv_connector/nixl_integration/toy_proxy_server.py
(``kv_transfer_params``), examples/online_serving/disaggregated_serving_p2p_nccl_xpyd
(request-id addressing), vllm #42839 / PR #34415 (request-id randomisation).

This module imports nothing from vLLM.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from disaggd.topology.schema import InstanceSection, KVTransferSection, Topology

CUSTOM = "<custom>"

#: Read by disaggd.vllm_plugin inside vLLM processes (microseconds).
NIXL_PROGRESS_DELAY_ENV = "DISAGGD_NIXL_PROGRESS_DELAY_US"

KV_PRODUCER = "kv_producer"
KV_CONSUMER = "kv_consumer"
KV_BOTH = "kv_both"


class Handoff(str, Enum):
    """How the two legs of a disaggregated request are tied together."""

    #: Prefill gets ``kv_transfer_params={"do_remote_decode": true, ...}`` and
    #: returns params that the decode leg must carry (NIXL, Mooncake).
    KV_TRANSFER_PARAMS = "kv_transfer_params"
    #: Both legs carry an ``X-Request-Id`` that encodes both KV addresses (P2pNccl).
    REQUEST_ID = "request_id"
    #: The prefill stores KV keyed by the prompt; the decode loads it (Example, LMCache).
    STORAGE = "storage"


@dataclass(frozen=True)
class ConnectorSpec:
    """Facts about one KV connector.

    Attributes:
        name: the registered ``kv_connector`` name (or `CUSTOM`).
        handoff: how the proxy shapes the two legs.
        roles: KV roles the connector accepts in a P/D deployment.
        port_kind: what the per-instance ``kv_port`` means, or None if unused.
        default_port_base: the first port allocated when an instance gives none.
        port_env: env var that carries ``kv_port`` (NIXL, Mooncake), if any.
        kv_port_in_json: ``kv_port`` goes into ``--kv-transfer-config`` (P2pNccl).
        width_flag: `vllm serve` flag whose value is the number of consecutive
            ports an instance occupies from ``kv_port`` (one per rank).
        stable_engine_id: set ``engine_id`` to the instance name, so the
            ``remote_engine_id`` a prefill returns names it.
        note: said to users whose role does not fit.
    """

    name: str
    handoff: Handoff
    roles: frozenset[str]
    port_kind: str | None = None
    default_port_base: int = 0
    port_env: str | None = None
    kv_port_in_json: bool = False
    width_flag: tuple[str, ...] = ()
    stable_engine_id: bool = False
    required_extra: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    note: str = ""

    def check_extra_config(self, kv: KVTransferSection) -> Iterator[tuple[str, str]]:
        """Problems with ``[kv_transfer]`` for this connector, as (key, reason)."""
        for key in self.required_extra:
            if key not in kv.extra_config:
                yield (
                    f"extra_config.{key}",
                    f"{self.name} needs kv_connector_extra_config.{key}",
                )
        if self.name == "MultiConnector":
            members = kv.extra_config.get("connectors")
            if not isinstance(members, list) or not members:
                yield (
                    "extra_config.connectors",
                    "MultiConnector needs a non-empty list of connector tables",
                )


_ALL_ROLES = frozenset({KV_PRODUCER, KV_CONSUMER, KV_BOTH})
_PD_ROLES = frozenset({KV_PRODUCER, KV_CONSUMER})

_NIXL = ConnectorSpec(
    "NixlConnector",
    Handoff.KV_TRANSFER_PARAMS,
    # kv_both works but is deprecated for NIXL: the proxy decides who prefills.
    _ALL_ROLES,
    port_kind="NIXL side-channel port",
    default_port_base=5600,
    port_env="VLLM_NIXL_SIDE_CHANNEL_PORT",
    # Data-parallel ranks listen on base + rank.
    width_flag=("--data-parallel-size", "-dp"),
    stable_engine_id=True,
)

_STORAGE = ConnectorSpec("ExampleConnector", Handoff.STORAGE, _ALL_ROLES)

_NOT_PD = "it keeps KV inside one instance (offloading) and does not move it from prefill to decode"

_SPECS: dict[str, ConnectorSpec] = {
    spec.name: spec
    for spec in (
        _NIXL,
        replace(_NIXL, name="NixlPullConnector"),
        replace(_NIXL, name="NixlPushConnector"),
        ConnectorSpec(
            "MooncakeConnector",
            Handoff.KV_TRANSFER_PARAMS,
            _PD_ROLES,
            port_kind="Mooncake bootstrap port",
            default_port_base=8998,
            port_env="VLLM_MOONCAKE_BOOTSTRAP_PORT",
            stable_engine_id=True,
        ),
        ConnectorSpec(
            "P2pNcclConnector",
            Handoff.REQUEST_ID,
            _PD_ROLES,
            port_kind="P2pNccl KV port",
            default_port_base=14579,
            kv_port_in_json=True,
            # One ZMQ/NCCL port per tensor-parallel rank: kv_port + rank.
            width_flag=("--tensor-parallel-size", "-tp"),
            # Since vLLM 0.14 each engine appends a random suffix to request ids and
            # P2pNccl then never finds its peer (vllm #42839, PR #34415).
            extra_env={"VLLM_DISABLE_REQUEST_ID_RANDOMIZATION": "1"},
        ),
        replace(_STORAGE, required_extra=("shared_storage_path",)),
        replace(_STORAGE, name="SharedStorageConnector", required_extra=("shared_storage_path",)),
        replace(_STORAGE, name="LMCacheConnectorV1"),
        replace(_STORAGE, name="LMCacheMPConnector"),
        replace(_STORAGE, name="MooncakeStoreConnector"),
        replace(_STORAGE, name="MultiConnector"),
        ConnectorSpec("OffloadingConnector", Handoff.STORAGE, frozenset(), note=_NOT_PD),
        ConnectorSpec("SimpleCPUOffloadConnector", Handoff.STORAGE, frozenset(), note=_NOT_PD),
        ConnectorSpec(
            "DecodeBenchConnector",
            Handoff.STORAGE,
            frozenset({KV_CONSUMER, KV_BOTH}),
            note="it fills a decode's KV with dummy values for benchmarks; it has no prefill side",
        ),
    )
}


def known_names() -> list[str]:
    """Connector names disaggd knows how to hand off for."""
    return sorted(_SPECS)


def lookup(name: str, kv: KVTransferSection) -> ConnectorSpec:
    """The spec of connector `name` as configured in `kv`.

    A name disaggd does not know is accepted as a custom connector when
    ``[kv_transfer] handoff`` says how to hand off; otherwise the spec's name
    is `CUSTOM` and config validation reports it.
    """
    spec = _SPECS.get(name)
    if spec is not None:
        if spec.name == "MultiConnector":
            return _multi(kv)
        if kv.handoff is not None and kv.handoff is not spec.handoff:
            return ConnectorSpec(name, kv.handoff, spec.roles, note=spec.note)
        return spec
    if kv.handoff is None:
        return ConnectorSpec(CUSTOM, Handoff.STORAGE, _ALL_ROLES)
    return ConnectorSpec(name, kv.handoff, _ALL_ROLES)


def _multi(kv: KVTransferSection) -> ConnectorSpec:
    """MultiConnector hands off like the most demanding of its members."""
    members = kv.extra_config.get("connectors")
    handoff = Handoff.STORAGE
    if isinstance(members, list):
        for member in members:
            name = member.get("kv_connector") if isinstance(member, Mapping) else None
            inner = _SPECS.get(str(name))
            if inner is not None and inner.handoff is not Handoff.STORAGE:
                handoff = inner.handoff
    if kv.handoff is not None:
        handoff = kv.handoff
    return ConnectorSpec("MultiConnector", handoff, _ALL_ROLES)


def kv_role_for(role: str, override: str | None = None) -> str:
    """The ``kv_role`` an instance of `role` ("prefill" | "decode") runs with."""
    if override:
        return override
    return KV_PRODUCER if role == "prefill" else KV_CONSUMER


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last ``--flag V`` / ``--flag=V`` among `args`, or None."""
    value: str | None = None
    for idx, arg in enumerate(args):
        for name in names:
            if arg == name and idx + 1 < len(args):
                value = args[idx + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def kv_port_width(spec: ConnectorSpec, inst_args: Sequence[str], model_args: Sequence[str]) -> int:
    """How many consecutive ports from ``kv_port`` an instance occupies (>= 1)."""
    if not spec.width_flag:
        return 1
    raw = flag_value([*model_args, *inst_args], spec.width_flag)
    try:
        return max(1, int(raw)) if raw is not None else 1
    except ValueError:
        return 1


def expand(value: Any, placeholders: Mapping[str, str]) -> Any:
    """Replace ``{name}`` placeholders in every string inside `value` (JSON-like)."""
    if isinstance(value, str):
        for key, repl in placeholders.items():
            value = value.replace("{" + key + "}", repl)
        return value
    if isinstance(value, Mapping):
        return {k: expand(v, placeholders) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [expand(v, placeholders) for v in value]
    return value


def kv_transfer_config(
    topo: Topology, inst: InstanceSection, placeholders: Mapping[str, str]
) -> dict[str, Any]:
    """The ``--kv-transfer-config`` object for one instance.

    Shape: vllm/config/kv_transfer.py ``KVTransferConfig``; the P2pNccl fields
    (``kv_rank``, ``kv_parallel_size``, ``http_ip``/``http_port``, ``send_type``)
    follow vLLM's examples/online_serving/disaggregated_prefill.sh.
    """
    kv = topo.kv_transfer
    spec = topo.connector
    cfg: dict[str, Any] = {
        "kv_connector": kv.connector,
        "kv_role": kv_role_for(inst.role.value, inst.kv_role),
    }
    extra = dict(expand(dict(kv.extra_config), placeholders))
    if spec.handoff is Handoff.REQUEST_ID:
        cfg["kv_rank"] = list(topo.instances).index(inst)
        cfg["kv_parallel_size"] = len(topo.instances)
        extra = {
            "http_ip": inst.advertised_kv_host,
            "http_port": str(inst.port),
            "send_type": "PUT_ASYNC",
            **extra,
        }
    buffer_size = inst.kv_buffer_size or kv.buffer_size
    if buffer_size is not None:
        cfg["kv_buffer_size"] = buffer_size
    if spec.kv_port_in_json and inst.kv_port is not None:
        cfg["kv_port"] = inst.kv_port
    if kv.buffer_device is not None:
        cfg["kv_buffer_device"] = kv.buffer_device
    if spec.stable_engine_id:
        cfg["engine_id"] = inst.name
    if kv.module_path is not None:
        cfg["kv_connector_module_path"] = kv.module_path
    if kv.load_failure_policy is not None:
        cfg["kv_load_failure_policy"] = kv.load_failure_policy
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return cfg


def connector_env(topo: Topology, inst: InstanceSection) -> dict[str, str]:
    """Environment the connector needs on one instance (before user env)."""
    spec = topo.connector
    env = dict(spec.extra_env)
    if spec.port_env is not None and inst.kv_port is not None:
        env[spec.port_env] = str(inst.kv_port)
    if spec.name.startswith("Nixl"):
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = inst.advertised_kv_host
        if topo.kv_transfer.buffer_device == "cpu":
            # nixl 1.5 starts its progress thread with pthrDelay=0: it busy-polls a whole
            # core per instance while idle. disaggd's vLLM plugin (disaggd.vllm_plugin)
            # raises the delay when this is set; transfers still wake the thread at once.
            env[NIXL_PROGRESS_DELAY_ENV] = "1000"
    return env


# -- the proxy side ---------------------------------------------------------------------------


def prefill_kv_transfer_params() -> dict[str, Any]:
    """``kv_transfer_params`` of a prefill leg that asks for a remote decode.

    Source: vLLM tests/v1/kv_connector/nixl_integration/toy_proxy_server.py.
    """
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def p2p_request_id(prefill_kv_addr: str, decode_kv_addr: str, suffix: str | None = None) -> str:
    """The request id P2pNccl parses both KV addresses out of.

    Format (vLLM examples/online_serving/disaggregated_serving_p2p_nccl_xpyd/
    disagg_proxy_p2p_nccl_xpyd.py):
    ``___prefill_addr_{host:port}___decode_addr_{host:port}_{uuid}``.
    """
    return (
        f"___prefill_addr_{prefill_kv_addr}___decode_addr_{decode_kv_addr}_"
        f"{suffix or uuid.uuid4().hex}"
    )


def kv_address(inst: InstanceSection) -> str:
    """``host:port`` of an instance's KV endpoint (P2pNccl ZMQ address)."""
    return f"{inst.advertised_kv_host}:{inst.kv_port}"


def decode_kv_transfer_params(
    returned: Mapping[str, Any], *, own_cached_tokens: bool
) -> dict[str, Any]:
    """The decode leg's ``kv_transfer_params``: what the prefill returned.

    With ``own_cached_tokens`` the prefill's ``remote_prefill_cached_tokens`` is
    left out: with it the decode reports the prefill's cache hits as its own
    cached tokens (vllm/v1/engine/output_processor.py), and the proxy's KV check
    needs the decode's own count.
    """
    if own_cached_tokens and "remote_prefill_cached_tokens" in returned:
        return {k: v for k, v in returned.items() if k != "remote_prefill_cached_tokens"}
    return dict(returned)
