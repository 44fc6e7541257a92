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

import contextlib
import difflib
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from disaggd._compat import tomllib
from disaggd.topology import connectors
from disaggd.topology.schema import WILDCARD_HOSTS, InstanceSection, Role, Topology
from disaggd.topology.spec import bound_ports

#: Where `disaggd run` looks for its topology when ``-c`` is not given.
DEFAULT_CONFIG_PATH = Path("/etc/disaggd/disaggd.toml")


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
    endpoints_file = topo.daemon.endpoints_file
    daemon = topo.daemon.model_copy(
        update={
            "state_dir": _anchor(topo.daemon.state_dir, base),
            "control_socket": _anchor(topo.daemon.control_socket, base),
            "endpoints_file": _anchor(endpoints_file, base) if endpoints_file else None,
        }
    )
    return topo.model_copy(update={"instances": tuple(instances), "daemon": daemon, "model": model})


def _anchor(p: Path, base: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


# -- pass 2: the topology as a whole ----------------------------------------------------------


def _topology_problems(topo: Topology) -> Iterator[Problem]:
    """Every check that spans sections, in the order a reader of the file meets them."""
    yield from _name_problems(topo)
    yield from _port_problems(topo)
    yield from _socket_path_problems(topo)
    yield from _connector_problems(topo)
    for idx, inst in enumerate(topo.instances):
        yield from _instance_connector_problems(topo, idx, inst)
    yield from _remote_kv_host_problems(topo)
    if topo.daemon.endpoints_file is not None:
        yield from endpoint_problems(topo)


def _name_problems(topo: Topology) -> Iterator[Problem]:
    """Unique instance names; at least one prefill and one decode."""
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


def _connector_problems(topo: Topology) -> Iterator[Problem]:
    """A known connector (or a custom one with module path and handoff), its extra config."""
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


def _instance_connector_problems(
    topo: Topology, idx: int, inst: InstanceSection
) -> Iterator[Problem]:
    """What the connector needs of one instance: a KV role it supports, its port as kv_port."""
    spec = topo.connector
    kv_role = connectors.kv_role_for(inst.role.value, inst.kv_role)
    if kv_role not in spec.roles:
        what = "a prefill (KV producer)" if inst.role is Role.PREFILL else "a decode (KV consumer)"
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
    if not inst.spawned and spec.handoff is connectors.Handoff.REQUEST_ID and inst.kv_port is None:
        yield Problem(f"instance[{idx}].kv_port", "a remote P2pNccl instance needs kv_port")


def _port_problems(topo: Topology) -> Iterator[Problem]:
    """Every port this host will bind must be distinct (HTTP, KV/side channel, proxy).

    The ports are `bound_ports`, the same ones the supervisor checks before a spawn.
    """
    owners: dict[int, str] = {topo.proxy.port: "proxy.port (the proxy)"}
    for idx, inst in enumerate(topo.instances):
        if not inst.spawned:
            continue
        for kind, port in bound_ports(topo, inst):
            label = f"instance[{idx}].{'port' if kind == 'HTTP' else 'kv_port'}"
            if port in owners:
                yield Problem(
                    label,
                    f"port {port} ({kind}) of '{inst.name}' is already used by {owners[port]}",
                )
            else:
                owners[port] = f"{label} ({inst.name} {'HTTP port' if kind == 'HTTP' else kind})"


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


def _remote_kv_host_problems(topo: Topology) -> Iterator[Problem]:
    """A spawned instance that a remote peer must reach for KV may not advertise loopback.

    With a connector that moves KV over the network (``port_kind``: NIXL side channel,
    Mooncake bootstrap, P2pNccl), a peer connects to the address an instance advertises:
    ``[model|instance].env.VLLM_NIXL_SIDE_CHANNEL_HOST`` (NIXL), else ``kv_host``, else
    ``host`` (a wildcard host advertises 127.0.0.1). With ``kv_transfer_params`` the decode
    connects to the prefill (its ``remote_host``); with P2pNccl each side to the other.
    A remote instance (``url`` not on loopback) that is sent 127.0.0.1 connects to itself:
    so a spawned instance it must reach, advertising a loopback address, is an error.
    """
    spec = topo.connector
    if spec.port_kind is None:
        return

    def loopback(host: str) -> bool:
        host = host.strip("[]").lower()
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(host).is_loopback
        return host == "localhost" or host.endswith(".localhost")

    remote = {}  # role -> the first remote instance of that role on another host
    for inst in reversed(topo.instances):
        if not inst.spawned and not loopback(inst.advertised_kv_host):
            remote[inst.role] = inst.name
    env_key = "VLLM_NIXL_SIDE_CHANNEL_HOST" if spec.name.startswith("Nixl") else ""
    both_ways = spec.handoff is connectors.Handoff.REQUEST_ID
    for idx, inst in enumerate(topo.instances):
        other = Role.DECODE if inst.role is Role.PREFILL else Role.PREFILL
        peer = remote.get(other)
        if not inst.spawned or peer is None or not (both_ways or inst.role is Role.PREFILL):
            continue
        key = f"instance[{idx}].{'kv_host' if inst.kv_host else 'host'}"
        host = inst.advertised_kv_host
        envs = ((f"instance[{idx}].env", inst.env), ("model.env", topo.model.env))
        key, host = next(
            ((f"{where}.{env_key}", env[env_key]) for where, env in envs if env_key in env),
            (key, host),
        )
        if loopback(host):
            yield Problem(
                key,
                f"'{inst.name}' advertises its {spec.port_kind} at {host}, a loopback "
                f"address, but the remote {other} '{peer}' connects to it from another host "
                f"(and would reach itself): set instance[{idx}].kv_host (or host) to an "
                f"address of this host that '{peer}' can route to",
            )


def endpoint_problems(topo: Topology) -> Iterator[Problem]:
    """What keeps `topo` out of llm-d's endpoints file (``[daemon].endpoints_file``).

    llm-d's file discovery takes a literal IPv4 address per endpoint and resolves no
    hostname (llm-d/llm-d-router, pkg/epp/framework/plugins/datalayer/discovery/file/
    README.md): each instance's `InstanceSection.reach_host` must be one.
    """
    for idx, inst in enumerate(topo.instances):
        host = inst.reach_host
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not inst.spawned:
                key = f"instance[{idx}].url"
            elif inst.host in WILDCARD_HOSTS:
                key = f"instance[{idx}].kv_host"
            else:
                key = f"instance[{idx}].host"
            yield Problem(
                key,
                f"'{inst.name}' is reached at {host!r}, but llm-d's endpoints file takes a "
                "literal IPv4 address (its file discovery resolves no hostname)",
            )
