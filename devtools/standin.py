"""A stand-in for ``vllm serve``: vLLM's HTTP protocol, processes and KV handshakes, no model.

Run it like vLLM::

    python -m devtools.standin serve MODEL --host H --port P \\
        [--served-model-name N ...] [--max-model-len N] [--kv-transfer-config JSON] \\
        [--shutdown-timeout S] [--max-num-seqs N] [any other vllm flag, ignored]
    python -m devtools.standin --model MODEL ...     # api_server style

It binds only after the (optional) start delay, forks a ``VLLM::EngineCore``
grandchild that survives a SIGKILL of the API server, prints vLLM-like log
lines, and answers:

* ``GET /health`` (200 empty, 503 when the engine is dead, draining, or
  ``health_status`` says so), ``GET /ping``, ``GET /version``, ``GET /v1/models``;
* ``POST /v1/completions`` and ``POST /v1/chat/completions``, plain and SSE,
  with deterministic text: token *i* of a prompt is a word picked by a CRC of
  (prompt, i), so every instance answers a prompt alike;
* ``GET /metrics`` with vLLM's metric names;
* ``GET|DELETE /_standin/requests``, ``GET /_standin/info``,
  ``GET|POST /_standin/faults``: introspection and runtime fault switches.

Fault switches are read from ``STANDIN_*`` environment variables at start
(see `Faults`); ``POST /_standin/faults`` sets the same names, lower-case,
at run time:

* ``STANDIN_START_DELAY=S``: "load the model" for S s before binding;
* ``STANDIN_FAIL_START=1``: print an OOM traceback (ERROR lines) and exit 1 unbound;
* ``STANDIN_EXIT_AFTER_REQUESTS=N`` / ``STANDIN_EXIT_AFTER_SECONDS=S`` with
  ``STANDIN_EXIT_CODE=C`` (default 1): exit right after the N-th generation
  response was sent / S s after binding; the engine child is stopped first;
* ``STANDIN_HANG_AFTER_REQUESTS=N``: after N generation requests, block the
  event loop for good (0: once bound); SIGTERM/SIGINT still end it;
* ``STANDIN_FAIL_STATUS=code``, ``STANDIN_FAIL_COUNT=n`` (default unlimited),
  ``STANDIN_FAIL_MATCH=substring``: generation requests answer an OpenAI error;
* ``STANDIN_TOKEN_DELAY=S`` per token, ``STANDIN_PREFILL_DELAY=S`` before the first;
* ``STANDIN_IGNORE_SIGTERM=1``: API server and engine ignore SIGTERM;
* ``STANDIN_FORK_ENGINE=0``: no engine grandchild (default 1);
* ``STANDIN_HEALTH_STATUS=503``: what ``/health`` answers.

* ``STANDIN_PREFILL_TOKEN_DELAY=S`` per prompt token not found in the prefix cache.

Prefix cache (vLLM's automatic prefix caching, off by default):
``STANDIN_PREFIX_CACHE_BLOCKS=N`` keeps at most N blocks of
``STANDIN_PREFIX_BLOCK_TOKENS`` (16) prompt tokens (words), LRU, keyed by chained
hashes, on every instance. A request's leading whole blocks found there are
``usage.prompt_tokens_details.cached_tokens`` (with
``--enable-prompt-tokens-details``, as vLLM; at most all but the last token) and
``vllm:prefix_cache_hits_total`` (tokens; ``vllm:prefix_cache_queries_total``
counts every prompt token looked up); its blocks are then stored.

Other variables: ``STANDIN_SHARED_DIR`` (P2pNccl prefill markers; storage
folder when the connector names none), ``STANDIN_KV_BLOCK_SIZE`` (prefills of
shorter prompts return no params; default 0), ``STANDIN_ACCESS_LOG=0`` (no
per-request line), ``STANDIN_RECORD_LIMIT`` (kept request records, 10000),
``STANDIN_ENGINE_DEATH_EXIT_CODE`` (exit status when the engine child dies on
its own, default 0 like vllm #48966); and vLLM's ``VLLM_HOST_IP``,
``VLLM_NIXL_SIDE_CHANNEL_HOST``/``_PORT``, ``VLLM_MOONCAKE_BOOTSTRAP_PORT``,
``TMPDIR`` (a ``vllm_dist_*`` folder is left there, as vLLM does).

Markers inside a prompt act on that request only: ``[[status=503]]``,
``[[hang]]`` (never answered, not even headers), ``[[slow=0.05]]`` (per-token
delay), ``[[midstream_error]]`` (a stream is cut after up to 3 tokens; a plain
request gets no answer), ``[[stop]]`` / ``[[stop=K]]`` (the K-th token is EOS:
finish_reason "stop", and a prefill returns no ``kv_transfer_params``),
``[[abort=K]]`` (the engine gives up after K tokens, as vLLM does on SIGTERM
without ``--shutdown-timeout``: HTTP 200, finish_reason "abort", ``[DONE]``).

SIGTERM/SIGINT: new requests get 503 and ``/health`` 503; with
``--shutdown-timeout S`` in-flight requests may finish for S s; then (or at
once without it) they end early with HTTP 200, finish_reason "abort" and fewer
tokens; the engine child is stopped; exit 0. A second signal exits at once.

The KV handshake follows the ``kv_connector`` (see disaggd.topology.connectors):
``kv_transfer_params`` signed with an HMAC of the prompt (NIXL, Mooncake),
request-id addressing (P2pNccl), or files in ``shared_storage_path``
(ExampleConnector & co). Each generation request gets a verdict: "prefill",
"hit" (the KV provably came from a prefill of the same prompt), "miss"
(computed locally) or "invalid" (handoff attempted but wrong).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import json
import math
import os
import re
import signal
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

VERSION = "0.0.0+standin"

#: Shared by every stand-in: a decode can check that KV params came from a prefill of the
#: same prompt (the proxy must pass them on untouched and send the same prompt).
_SECRET = b"disaggd-standin-kv-secret"

VERDICT_PREFILL = "prefill"
VERDICT_HIT = "hit"
VERDICT_MISS = "miss"
VERDICT_INVALID = "invalid"

HANDOFF_PARAMS = "kv_transfer_params"
HANDOFF_REQUEST_ID = "request_id"
HANDOFF_STORAGE = "storage"
HANDOFF_CUSTOM = "custom"

_PARAMS_CONNECTORS = frozenset(
    {"NixlConnector", "NixlPullConnector", "NixlPushConnector", "MooncakeConnector"}
)
_REQUEST_ID_CONNECTORS = frozenset({"P2pNcclConnector"})
_STORAGE_CONNECTORS = frozenset(
    {
        "ExampleConnector",
        "SharedStorageConnector",
        "LMCacheConnectorV1",
        "LMCacheMPConnector",
        "MooncakeStoreConnector",
        "OffloadingConnector",
        "SimpleCPUOffloadConnector",
        "DecodeBenchConnector",
    }
)

_WORD_LIST = """
the of and to in is was for on that with as by at from his her they have river stone
light cloud paper garden window engine signal valve copper amber north quiet rapid silver
harbor meadow lantern orbit pixel cedar falcon ember glacier hollow island jasper kernel
lattice marble nectar oasis prism quartz raven saddle timber umbra velvet willow zephyr
anchor beacon canyon delta echo fjord granite
"""
_WORDS = tuple(_WORD_LIST.split())
_WORD_TEXT = tuple(" " + w for w in _WORDS)
_WORD_JSON = tuple(json.dumps(t).encode() for t in _WORD_TEXT)
_EMPTY_JSON = b'""'

_MARKER_RE = re.compile(r"\[\[(status|hang|slow|midstream_error|stop|abort)(?:=([^\]]*))?\]\]")
_P2P_RE = re.compile(r"___prefill_addr_(?P<p>.+?)___decode_addr_(?P<d>[^_]+)(?:_|$)")

_PHRASES = {s.value: s.phrase for s in HTTPStatus}

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


# -- logging: vllm/logger.py's format, one flushed line at a time --------------------------


def log(level: str, where: str, msg: str, *, proc: str = "APIServer", pid: int = 0) -> None:
    """Print one vLLM-style line: ``(APIServer pid=N) INFO mm-dd HH:MM:SS [file:line] msg``.

    ERROR lines go to stderr, the rest to stdout.
    """
    stamp = time.strftime("%m-%d %H:%M:%S")
    line = f"({proc} pid={pid or os.getpid()}) {level} {stamp} [{where}] {msg}\n"
    stream = sys.stderr if level == "ERROR" else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        stream.write(line)
        stream.flush()


def _uvicorn(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(f"(APIServer pid={os.getpid()}) INFO:     {msg}\n")
        sys.stdout.flush()


# -- command line ----------------------------------------------------------------------------


class UsageError(Exception):
    """The command line cannot be used (exit status 2, like argparse)."""


@dataclass(frozen=True)
class Args:
    """The `vllm serve` flags the stand-in understands; the rest are kept in `ignored`."""

    model: str
    host: str | None = None
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    max_model_len: int | None = None
    kv_transfer_config: Mapping[str, Any] | None = None
    shutdown_timeout: float | None = None
    max_num_seqs: int | None = None
    ignored: tuple[str, ...] = ()

    @property
    def public_name(self) -> str:
        """The name `/v1/models` lists first and responses carry."""
        return self.served_model_names[0] if self.served_model_names else self.model


_VALUE_FLAGS = frozenset(
    {
        "--model",
        "--host",
        "--port",
        "--served-model-name",
        "--max-model-len",
        "--kv-transfer-config",
        "--shutdown-timeout",
        "--max-num-seqs",
    }
)


#: vLLM flags that never take a value (so `serve --enforce-eager MODEL` keeps its model).
_BOOL_FLAG_RE = re.compile(
    r"^--(enable-|disable-|no-)|^--(trust-remote-code|enforce-eager|skip-tokenizer-init|"
    r"headless|fully-sharded-loras|use-tqdm-on-load)$"
)


def _looks_like_value(tok: str) -> bool:
    if not tok.startswith("-"):
        return True
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _human_int(raw: str) -> int:
    """``2048``, ``1k``, ``1K`` (1024), ``1m`` like vLLM's --max-model-len."""
    raw = raw.strip()
    mult = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(raw[-1:], 1)
    return int(float(raw[:-1]) * mult) if mult != 1 else int(raw)


def parse_args(argv: Sequence[str]) -> Args:
    """Parse a `vllm serve` / api_server command line; unknown flags are ignored.

    An unknown flag takes the next token as its value when that token does not
    look like a flag (``--gpu-memory-utilization 0.8``), so values never become
    the model; vLLM's boolean flags (``--enforce-eager``, ``--enable-*``,
    ``--disable-*``, ``--no-*``, ...) take none.

    Raises:
        UsageError: no model, or a known flag with a bad value.
    """
    positionals: list[str] = []
    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    toks = list(argv)
    i = 0
    while i < len(toks):
        tok = toks[i]
        i += 1
        if _looks_like_value(tok):
            positionals.append(tok)
            continue
        name, eq, inline = tok.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if name in ("-h", "--help"):
            raise UsageError("help")
        if name not in _VALUE_FLAGS:
            ignored.append(tok)
            if eq or _BOOL_FLAG_RE.match(name):
                continue
            if i < len(toks) and _looks_like_value(toks[i]):
                ignored.append(toks[i])
                i += 1
            continue
        if eq:
            got = [inline]
        else:
            got = []
            while i < len(toks) and _looks_like_value(toks[i]):
                got.append(toks[i])
                i += 1
                if name != "--served-model-name":
                    break
            if not got:
                raise UsageError(f"argument {name}: expected a value")
        values[name] = got
    if positionals and positionals[0] == "serve":
        positionals = positionals[1:]
    model = positionals[0] if positionals else (values.get("--model") or [""])[0]
    if not model:
        raise UsageError("the model is required: `serve MODEL` or `--model MODEL`")

    def one(flag: str) -> str | None:
        got = values.get(flag)
        return got[0] if got else None

    try:
        port = int(one("--port") or 8000)
        max_len_raw = one("--max-model-len")
        max_model_len = _human_int(max_len_raw) if max_len_raw else None
        timeout_raw = one("--shutdown-timeout")
        shutdown_timeout = float(timeout_raw) if timeout_raw is not None else None
        seqs_raw = one("--max-num-seqs")
        max_num_seqs = int(seqs_raw) if seqs_raw else None
    except ValueError as exc:
        raise UsageError(f"bad value: {exc}") from None
    kv_raw = one("--kv-transfer-config")
    kv_cfg: Mapping[str, Any] | None = None
    if kv_raw:
        try:
            parsed = json.loads(kv_raw)
        except ValueError as exc:
            raise UsageError(f"argument --kv-transfer-config: invalid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise UsageError("argument --kv-transfer-config: must be a JSON object")
        kv_cfg = parsed
    return Args(
        model=model,
        host=one("--host"),
        port=port,
        served_model_names=tuple(values.get("--served-model-name", ())),
        max_model_len=max_model_len,
        kv_transfer_config=kv_cfg,
        shutdown_timeout=shutdown_timeout if shutdown_timeout else None,
        max_num_seqs=max_num_seqs,
        ignored=tuple(ignored),
    )


# -- fault switches --------------------------------------------------------------------------


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _opt(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        return None if v is None or v == "" else conv(v)

    return convert


@dataclass
class Faults:
    """Injected misbehaviour. Env ``STANDIN_<NAME>`` at start, ``/_standin/faults`` later.

    Counts set at run time (``exit_after_requests``, ``hang_after_requests``)
    count generation requests from that moment; ``exit_after_seconds`` too.
    """

    start_delay: float = 0.0
    fail_start: bool = False
    exit_after_requests: int | None = None
    exit_after_seconds: float | None = None
    exit_code: int = 1
    hang_after_requests: int | None = None
    fail_status: int | None = None
    fail_count: int | None = None
    fail_match: str | None = None
    token_delay: float = 0.0
    prefill_delay: float = 0.0
    prefill_token_delay: float = 0.0
    ignore_sigterm: bool = False
    fork_engine: bool = True
    health_status: int = 200

    _CONVERT: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "start_delay": float,
        "fail_start": _to_bool,
        "exit_after_requests": _opt(int),
        "exit_after_seconds": _opt(float),
        "exit_code": int,
        "hang_after_requests": _opt(int),
        "fail_status": _opt(int),
        "fail_count": _opt(int),
        "fail_match": _opt(str),
        "token_delay": float,
        "prefill_delay": float,
        "prefill_token_delay": float,
        "ignore_sigterm": _to_bool,
        "fork_engine": _to_bool,
        "health_status": int,
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        """Faults from ``STANDIN_*`` variables. Raises ValueError on a bad value."""
        faults = cls()
        faults.update(
            {
                f.name: environ[f"STANDIN_{f.name.upper()}"]
                for f in fields(cls)
                if f"STANDIN_{f.name.upper()}" in environ
            }
        )
        return faults

    def update(self, changes: Mapping[str, Any]) -> list[str]:
        """Apply `changes` (all or nothing); returns the names set.

        Raises:
            ValueError: an unknown name or a value of the wrong type.
        """
        unknown = sorted(set(changes) - set(self._CONVERT))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(self._CONVERT)}")
        converted = {}
        for name, value in changes.items():
            try:
                converted[name] = self._CONVERT[name](value)
            except (TypeError, ValueError):
                raise ValueError(f"fault {name}: bad value {value!r}") from None
        for name, value in converted.items():
            setattr(self, name, value)
        return list(converted)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the KV handshake --------------------------------------------------------------------------


def _sign(engine_id: str, prompt: str) -> str:
    return hmac.new(_SECRET, f"{engine_id}\0{prompt}".encode(), hashlib.sha256).hexdigest()


def _handoff_of(cfg: Mapping[str, Any]) -> str:
    name = str(cfg.get("kv_connector") or "")
    if name in _PARAMS_CONNECTORS:
        return HANDOFF_PARAMS
    if name in _REQUEST_ID_CONNECTORS:
        return HANDOFF_REQUEST_ID
    if name in _STORAGE_CONNECTORS:
        return HANDOFF_STORAGE
    if name == "MultiConnector":
        extra = cfg.get("kv_connector_extra_config") or {}
        kinds = {_handoff_of(m) for m in (extra.get("connectors") or []) if isinstance(m, Mapping)}
        for kind in (HANDOFF_PARAMS, HANDOFF_REQUEST_ID):
            if kind in kinds:
                return kind
        return HANDOFF_STORAGE
    return HANDOFF_CUSTOM


def _storage_path(cfg: Mapping[str, Any], environ: Mapping[str, str]) -> Path | None:
    extra = cfg.get("kv_connector_extra_config") or {}
    path = extra.get("shared_storage_path") if isinstance(extra, Mapping) else None
    if not path and isinstance(extra, Mapping):
        for member in extra.get("connectors") or []:
            inner = member.get("kv_connector_extra_config") if isinstance(member, Mapping) else None
            if isinstance(inner, Mapping) and inner.get("shared_storage_path"):
                path = inner["shared_storage_path"]
                break
    path = path or environ.get("STANDIN_SHARED_DIR")
    return Path(str(path)) if path else None


class KVSide:
    """This instance's end of the KV handshake, from ``--kv-transfer-config`` and env."""

    def __init__(
        self, cfg: Mapping[str, Any] | None, host: str, environ: Mapping[str, str]
    ) -> None:
        cfg = cfg or {}
        self.connector: str | None = cfg.get("kv_connector")
        self.role: str | None = cfg.get("kv_role")
        self.handoff: str | None = _handoff_of(cfg) if self.connector else None
        self.engine_id = str(cfg.get("engine_id") or uuid.uuid4())
        host_ip = environ.get("VLLM_HOST_IP") or ""
        self.side_host = environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST") or host_ip or host
        port = (
            environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
            or environ.get("VLLM_MOONCAKE_BOOTSTRAP_PORT")
            or "0"
        )
        self.side_port = int(port)
        p2p_host = host_ip or str(cfg.get("kv_ip") or "127.0.0.1")
        self.p2p_address = f"{p2p_host}:{int(cfg.get('kv_port') or 14579)}"
        self.storage = _storage_path(cfg, environ)
        shared = environ.get("STANDIN_SHARED_DIR")
        self.marker_dir = Path(shared) if shared else None
        self.block_size = int(environ.get("STANDIN_KV_BLOCK_SIZE") or 0)
        self._next_block = 0

    @property
    def address(self) -> str | None:
        """Where peers reach this instance's KV (host:port), or the storage folder."""
        if self.handoff == HANDOFF_REQUEST_ID:
            return self.p2p_address
        if self.handoff in (HANDOFF_PARAMS, HANDOFF_CUSTOM):
            return f"{self.side_host}:{self.side_port}"
        if self.handoff == HANDOFF_STORAGE:
            return str(self.storage) if self.storage else None
        return None

    def classify(self, gen: GenRequest) -> str:
        """The verdict of a request, decided before generating."""
        if self.handoff in (HANDOFF_PARAMS, HANDOFF_CUSTOM):
            params = gen.kv_params or {}
            if params.get("do_remote_decode"):
                return VERDICT_PREFILL
            if params.get("do_remote_prefill"):
                engine = str(params.get("remote_engine_id") or "")
                sig = str(params.get("standin_sig") or "")
                ok = hmac.compare_digest(sig, _sign(engine, gen.text))
                return VERDICT_HIT if ok else VERDICT_INVALID
            return VERDICT_MISS
        if self.handoff == HANDOFF_REQUEST_ID:
            return self._classify_p2p(gen.rid)
        if self.handoff == HANDOFF_STORAGE:
            return self._classify_storage(gen)
        return VERDICT_MISS

    def _classify_p2p(self, rid: str) -> str:
        m = _P2P_RE.search(rid)
        if m is None:
            return VERDICT_MISS
        as_prefill = m["p"] == self.p2p_address
        as_decode = m["d"] == self.p2p_address
        if self.role == "kv_producer" or (self.role != "kv_consumer" and as_prefill):
            return VERDICT_PREFILL if as_prefill else VERDICT_INVALID
        if not as_decode:
            return VERDICT_INVALID
        if self.marker_dir is not None and not self._marker(rid).exists():
            return VERDICT_INVALID
        return VERDICT_HIT

    def _classify_storage(self, gen: GenRequest) -> str:
        if self.storage is None:
            return VERDICT_MISS
        if self.role == "kv_producer":
            return VERDICT_PREFILL
        try:
            stored = json.loads((self.storage / _prompt_key(gen.text)).read_text())
        except FileNotFoundError:
            return VERDICT_MISS
        except (OSError, ValueError):
            return VERDICT_INVALID
        if not isinstance(stored, dict):
            return VERDICT_INVALID
        sig = _sign(str(stored.get("engine_id")), gen.text)
        ok = hmac.compare_digest(str(stored.get("sig")), sig)
        return VERDICT_HIT if ok else VERDICT_INVALID

    def _marker(self, rid: str) -> Path:
        assert self.marker_dir is not None
        return self.marker_dir / f"p2p-{hashlib.sha256(rid.encode()).hexdigest()}"

    def on_prefilled(self, gen: GenRequest, verdict: str) -> None:
        """The prompt's KV exists now: store it where the connector would."""
        if self.handoff == HANDOFF_STORAGE and self.storage is not None:
            if verdict in (VERDICT_PREFILL, VERDICT_MISS) and self.role != "kv_consumer":
                record = {
                    "engine_id": self.engine_id,
                    "sig": _sign(self.engine_id, gen.text),
                    "prompt_tokens": gen.prompt_tokens,
                }
                _write_atomic(self.storage / _prompt_key(gen.text), json.dumps(record))
        elif (
            self.handoff == HANDOFF_REQUEST_ID
            and verdict == VERDICT_PREFILL
            and self.marker_dir is not None
        ):
            _write_atomic(self._marker(gen.rid), gen.rid)

    def prefill_params(self, gen: GenRequest, finish_reason: str) -> dict[str, Any] | None:
        """``kv_transfer_params`` a prefill returns, or None (vLLM: only when length-capped)."""
        if self.handoff not in (HANDOFF_PARAMS, HANDOFF_CUSTOM) or finish_reason != "length":
            return None
        if gen.prompt_tokens < self.block_size:
            return None
        nblocks = max(1, math.ceil(gen.prompt_tokens / 16))
        first = self._next_block
        self._next_block = (first + nblocks) % 1_000_000
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": list(range(first, first + nblocks)),
            "remote_host": self.side_host,
            "remote_port": self.side_port,
            "remote_request_id": gen.rid,
            "tp_size": 1,
            # vLLM >= 0.30: the prefill's own cache hits, for the decode to report.
            "remote_prefill_cached_tokens": 0,
            "standin_sig": _sign(self.engine_id, gen.text),
        }


class PrefixCache:
    """vLLM's automatic prefix caching, modelled: whole blocks of `block` prompt tokens
    (words), chained hashes, at most `capacity` blocks, least recently used evicted
    first (a prompt's tail before its head, as vLLM frees blocks in reverse order)."""

    def __init__(self, capacity: int, block: int) -> None:
        self.capacity = capacity
        self.block = max(1, block)
        self.blocks: dict[int, None] = {}  # insertion order = recency (oldest first)
        self.queries = 0
        self.hits = 0
        self.evicted = 0

    def lookup(self, text: str) -> int:
        """Prompt tokens of `text` found cached (whole leading blocks, not the last
        token); then its whole blocks are stored as just used."""
        if self.capacity <= 0:
            return 0
        words = text.split()
        b = self.block
        hashes: list[int] = []
        h = 0
        for i in range(0, len(words) // b * b, b):
            h = hash((h, " ".join(words[i : i + b])))
            hashes.append(h)
        usable = (len(words) - 1) // b if words else 0
        hit = 0
        while hit < min(usable, len(hashes)) and hashes[hit] in self.blocks:
            hit += 1
        for h in reversed(hashes):
            self.blocks.pop(h, None)
            self.blocks[h] = None
        while len(self.blocks) > self.capacity:
            del self.blocks[next(iter(self.blocks))]
            self.evicted += 1
        self.queries += len(words)
        self.hits += hit * b
        return hit * b

    def as_dict(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "block": self.block,
            "blocks": len(self.blocks),
            "queries": self.queries,
            "hits": self.hits,
            "evicted": self.evicted,
        }


def _prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        log("WARNING", "standin.py:0", f"cannot store KV at {path}: {exc}")


# -- requests ------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request vLLM would refuse: becomes an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass
class GenRequest:
    """A validated generation request."""

    chat: bool
    rid: str
    prompts: list[str]
    prompt_tokens: int
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    kv_params: Mapping[str, Any] | None
    status: int | None = None
    hang: bool = False
    slow: float | None = None
    midstream_error: bool = False
    stop_after: int | None = None
    abort_after: int | None = None
    cached: int = 0  # prompt tokens found in the prefix cache

    @property
    def text(self) -> str:
        """The whole prompt as one string (what KV handshakes are keyed by)."""
        return self.prompts[0] if len(self.prompts) == 1 else "\n".join(self.prompts)

    @property
    def tokens(self) -> int:
        """Tokens each choice generates (the EOS included when `stop_after` applies)."""
        if self.stop_after is not None and self.stop_after <= self.max_tokens:
            return self.stop_after
        return self.max_tokens

    @property
    def eos(self) -> bool:
        """The last token is a stop token: finish_reason "stop", no text."""
        return self.stop_after is not None and self.stop_after <= self.max_tokens


def _validation(loc: str, msg: str) -> RequestError:
    return RequestError(400, f"1 validation error:\n  {{'loc': ('body', '{loc}'), 'msg': '{msg}'}}")


def _int_field(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _validation(key, "Input should be a valid integer")
    if value < minimum:
        raise RequestError(400, f"{key} must be at least {minimum}, got {value}.", key)
    return value


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _validation("messages", "Input should be a non-empty list")
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _validation("messages", "Each message needs a string 'role'")
        content = msg.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
        else:
            raise _validation("messages", "content should be a string or a list of parts")
    return "\n".join(parts)


def _completion_prompts(prompt: Any) -> tuple[list[str], int]:
    """(prompt texts, prompt tokens) of a completions ``prompt``."""
    if isinstance(prompt, str):
        return [prompt], len(prompt.split())
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [" ".join(map(str, prompt))], len(prompt)
        if all(isinstance(p, str) for p in prompt):
            return list(prompt), sum(len(p.split()) for p in prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [" ".join(map(str, p)) for p in prompt], sum(len(p) for p in prompt)
    raise _validation("prompt", "Input should be a string, a list of strings or token ids")


def parse_request(
    body: Any,
    *,
    chat: bool,
    rid: str,
    served: Sequence[str],
    max_model_len: int | None,
) -> GenRequest:
    """Validate a completions / chat body like vLLM does.

    Raises:
        RequestError: 400 for invalid bodies and too-long contexts, 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _validation("model", "Input should be a valid string")
    if model is not None and model not in served:
        raise RequestError(404, f"The model `{model}` does not exist.", "model")
    if chat:
        if "messages" not in body:
            raise _validation("messages", "Field required")
        prompts = [_chat_text(body["messages"])]
        prompt_tokens = len(prompts[0].split())
    else:
        if "prompt" not in body:
            raise _validation("prompt", "Field required")
        prompts, prompt_tokens = _completion_prompts(body["prompt"])
        if prompt_tokens == 0:
            raise RequestError(400, "The prompt cannot be empty.", "prompt")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _validation("stream", "Input should be a valid boolean")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _validation("stream_options", "Input should be a valid dictionary")
        if not stream:
            raise RequestError(
                400, "Stream options can only be defined when `stream=True`.", "stream_options"
            )
    max_tokens = _int_field(body, "max_tokens", 1)
    max_completion = _int_field(body, "max_completion_tokens", 1)
    if max_completion is not None:
        max_tokens = max_completion
    min_tokens = _int_field(body, "min_tokens", 0)
    n = _int_field(body, "n", 1) or 1
    kv_params = body.get("kv_transfer_params")
    if kv_params is not None and not isinstance(kv_params, dict):
        raise _validation("kv_transfer_params", "Input should be a valid dictionary")
    if max_model_len is not None:
        if prompt_tokens >= max_model_len:
            raise RequestError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"you requested {prompt_tokens} tokens in the messages, Please reduce the "
                "length of the messages.",
            )
        if max_tokens is None:
            max_tokens = min(16, max_model_len - prompt_tokens)
        elif prompt_tokens + max_tokens > max_model_len:
            raise RequestError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
            )
    if max_tokens is None:
        max_tokens = 16
    if min_tokens is not None and min_tokens > max_tokens:
        raise RequestError(
            400,
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
            "min_tokens",
        )
    gen = GenRequest(
        chat=chat,
        rid=rid,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        n=n,
        stream=stream,
        include_usage=bool(stream and stream_options and stream_options.get("include_usage")),
        kv_params=kv_params,
    )
    text = gen.text
    if "[[" in text:
        for m in _MARKER_RE.finditer(text):
            key, value = m[1], m[2]
            with contextlib.suppress(TypeError, ValueError):
                if key == "status":
                    gen.status = int(value)
                elif key == "hang":
                    gen.hang = True
                elif key == "slow":
                    gen.slow = float(value)
                elif key == "midstream_error":
                    gen.midstream_error = True
                elif key == "stop":
                    gen.stop_after = max(1, int(value)) if value else 1
                elif key == "abort":
                    gen.abort_after = max(0, int(value))
    return gen


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _word(seed: int, i: int) -> int:
    return zlib.crc32(i.to_bytes(4, "little"), seed) % len(_WORDS)


def completion_text(prompt: str, tokens: int) -> str:
    """The text the stand-in generates for `prompt` in `tokens` tokens (no EOS)."""
    seed = _seed(prompt)
    return "".join(_WORD_TEXT[_word(seed, i)] for i in range(tokens))


# -- the engine grandchild --------------------------------------------------------------------


def _set_comm(name: str) -> None:
    """prctl(PR_SET_NAME): what ps/top show, like setproctitle("VLLM::EngineCore")."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)


def fork_engine(model: str, ignore_sigterm: bool) -> int:
    """Fork the ``VLLM::EngineCore`` stand-in: it sleeps until killed.

    Same process group; no parent-death signal, so a SIGKILL of the API server
    leaves it running (vllm #55510). Returns its pid once the child has its
    name and signal dispositions (a handshake over a pipe, as vLLM's front-end
    waits for its engine).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        with contextlib.suppress(OSError):
            os.read(ready_r, 1)  # EOF if the child died first
        os.close(ready_r)
        return pid
    code = 0
    try:
        os.close(ready_r)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _set_comm("VLLM::EngineCore")
        os.write(ready_w, b"1")
        os.close(ready_w)
        proc = "EngineCore_DP0"
        log("INFO", "core.py:644", "Waiting for init message from front-end.", proc=proc)
        log(
            "INFO",
            "core.py:77",
            f"Initializing a V1 LLM engine (v{VERSION}) with config: model='{model}'",
            proc=proc,
        )
        while True:
            time.sleep(3600)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


# -- the server --------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Standin:
    """One stand-in API server: HTTP app, metrics, faults, engine child, shutdown."""

    def __init__(
        self, args: Args, faults: Faults, environ: Mapping[str, str] | None = None
    ) -> None:
        environ = os.environ if environ is None else environ
        self.args = args
        self.faults = faults
        self.served = args.served_model_names or (args.model,)
        self.name = args.public_name
        host = args.host or "0.0.0.0"
        self.connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.kv = KVSide(args.kv_transfer_config, self.connect_host, environ)
        self.prefix = PrefixCache(
            int(environ.get("STANDIN_PREFIX_CACHE_BLOCKS") or 0),
            int(environ.get("STANDIN_PREFIX_BLOCK_TOKENS") or 16),
        )
        self.access_log = _to_bool(environ.get("STANDIN_ACCESS_LOG", "1"))
        self.engine_death_exit_code = int(environ.get("STANDIN_ENGINE_DEATH_EXIT_CODE") or 0)
        self.records: deque[dict[str, Any]] = deque(
            maxlen=int(environ.get("STANDIN_RECORD_LIMIT") or 10000)
        )
        self.engine_pid: int | None = None
        self.engine_reaped = False
        self.dead = False
        self.stopping = False
        self.cut = False
        self.inflight = 0
        self.received = 0
        self.completed = 0
        self.verdicts: dict[str, int] = dict.fromkeys(
            (VERDICT_PREFILL, VERDICT_HIT, VERDICT_MISS, VERDICT_INVALID), 0
        )
        self._exit_base = 0
        self._hang_base = 0
        self._exit_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._rc = 0
        self._seqs = asyncio.Semaphore(args.max_num_seqs) if args.max_num_seqs else None
        self._created = int(time.time())
        # Events bind to the running loop on first use (Python >= 3.10).
        self._done = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut_event = asyncio.Event()
        self._init_metrics()

    # -- metrics ---------------------------------------------------------------------------

    def _init_metrics(self) -> None:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        reg = self.registry = CollectorRegistry(auto_describe=False)
        ml = ["model_name"]

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, [*ml, *extra], registry=reg)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ml, registry=reg).labels(self.name)

        self.m_running = gauge("vllm:num_requests_running", "Requests in model execution.")
        self.m_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.m_prompt = counter("vllm:prompt_tokens_total", "Prefill tokens.").labels(self.name)
        self.m_gen = counter("vllm:generation_tokens_total", "Generation tokens.").labels(self.name)
        self.m_ext_queries = counter(
            "vllm:external_prefix_cache_queries_total", "External prefix cache queries (tokens)."
        ).labels(self.name)
        self.m_ext_hits = counter(
            "vllm:external_prefix_cache_hits_total", "External prefix cache hits (tokens)."
        ).labels(self.name)
        self.m_pc_queries = counter(
            "vllm:prefix_cache_queries_total", "Prefix cache queries (tokens)."
        ).labels(self.name)
        self.m_pc_hits = counter(
            "vllm:prefix_cache_hits_total", "Prefix cache hits (tokens)."
        ).labels(self.name)
        by_source = counter(
            "vllm:prompt_tokens_by_source_total", "Prompt tokens by source.", ["source"]
        )
        self.m_src = {
            s: by_source.labels(self.name, s)
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")
        }
        success = counter("vllm:request_success_total", "Finished requests.", ["finished_reason"])
        self.m_success = {r: success.labels(self.name, r) for r in ("stop", "length", "abort")}
        self.m_requests = counter("standin_requests_total", "Generation requests received.").labels(
            self.name
        )
        self.m_invalid = counter(
            "standin_kv_invalid_total", "Requests whose KV handoff was attempted but wrong."
        ).labels(self.name)
        verdicts = counter("standin_kv_verdicts_total", "Requests by KV verdict.", ["verdict"])
        self.m_verdicts = {v: verdicts.labels(self.name, v) for v in self.verdicts}

    def _account(self, gen: GenRequest, verdict: str) -> None:
        p = gen.prompt_tokens
        local = gen.cached
        self.verdicts[verdict] += 1
        self.m_verdicts[verdict].inc()
        self.m_prompt.inc(p)
        if self.prefix.capacity > 0:
            self.m_pc_queries.inc(p)
            self.m_pc_hits.inc(local)
            self.m_src["local_cache_hit"].inc(local)
        if self.kv.handoff is not None:
            self.m_ext_queries.inc(p - local)
        if verdict == VERDICT_HIT:
            self.m_ext_hits.inc(p - local)
            self.m_src["external_kv_transfer"].inc(p - local)
        else:
            self.m_src["local_compute"].inc(p - local)
        if verdict == VERDICT_INVALID:
            self.m_invalid.inc()
            log(
                "WARNING",
                "kv_connector.py:212",
                f"KV transfer for request {gen.rid} failed ({self.kv.connector}); "
                "recomputing the prompt locally",
            )
        elif verdict == VERDICT_HIT and self.kv.handoff == HANDOFF_STORAGE:
            log("INFO", "example_connector.py:236", "External Cache Hit!")

    # -- app ---------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/version", self.version)
        r.add_get("/v1/models", self.models)
        r.add_get("/metrics", self.metrics)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/_standin/requests", self.get_requests)
        r.add_delete("/_standin/requests", self.clear_requests)
        r.add_get("/_standin/info", self.info)
        r.add_get("/_standin/faults", self.get_faults)
        r.add_post("/_standin/faults", self.set_faults)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_standin/"):
            return await handler(request)
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": None,
            "request_id": request.headers.get("X-Request-Id"),
            "verdict": None,
            "status": None,
        }
        self.records.append(entry)
        request["standin_entry"] = entry
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            entry["status"] = status
            if self.access_log:
                peer = request.transport.get_extra_info("peername") if request.transport else None
                where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"
                phrase = _PHRASES.get(status, "")
                _uvicorn(
                    f'{where} - "{request.method} {request.path_qs} HTTP/1.1" {status} {phrase}'
                )

    async def health(self, request: web.Request) -> web.Response:
        if self.dead or self.stopping:
            return web.Response(status=503)
        return web.Response(status=self.faults.health_status)

    async def version(self, request: web.Request) -> web.Response:
        return _json_response({"version": VERSION})

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": self.args.model,
                "parent": None,
                "max_model_len": self.args.max_model_len,
            }
            for name in self.served
        ]
        return _json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        self.m_running.set(self.inflight - self._waiting())
        self.m_waiting.set(self._waiting())
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    def _waiting(self) -> int:
        if self._seqs is None or self.args.max_num_seqs is None:
            return 0
        return max(0, self.inflight - self.args.max_num_seqs)

    async def get_requests(self, request: web.Request) -> web.Response:
        path = request.query.get("path")
        return _json_response([e for e in self.records if path is None or e["path"] == path])

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.records.clear()
        return _json_response([])

    async def info(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "pid": os.getpid(),
                "model": self.args.model,
                "served_model_names": list(self.served),
                "host": self.args.host,
                "port": self.args.port,
                "kv_connector": self.kv.connector,
                "handoff": self.kv.handoff,
                "role": self.kv.role,
                "engine_id": self.kv.engine_id,
                "kv_address": self.kv.address,
                "engine_pid": self.engine_pid,
                "engine_alive": self.engine_pid is not None and not self.engine_reaped,
                "dead": self.dead,
                "stopping": self.stopping,
                "counters": {
                    "received": self.received,
                    "completed": self.completed,
                    "inflight": self.inflight,
                    "kv_invalid": self.verdicts[VERDICT_INVALID],
                    "verdicts": dict(self.verdicts),
                },
                "faults": self.faults.as_dict(),
                "prefix_cache": self.prefix.as_dict(),
            }
        )

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json_response(self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            names = self.faults.update(changes)
        except ValueError as exc:
            return _json_response(error_body(400, str(exc)), 400)
        loop = asyncio.get_running_loop()
        if "exit_after_requests" in names:
            self._exit_base = self.completed
        if "hang_after_requests" in names:
            self._hang_base = self.completed
            if self.faults.hang_after_requests == 0:
                # Answer this request first, then wedge.
                loop.call_later(0.05, self._hang)
        if "exit_after_seconds" in names:
            self._arm_exit_timer()
        log("WARNING", "standin.py:0", f"faults set at run time: {changes}")
        return _json_response(self.faults.as_dict())

    # -- generation ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _send_error(
        self,
        request: web.Request,
        status: int,
        message: str,
        rid: str,
        param: str | None = None,
    ) -> web.StreamResponse:
        rid = rid or uuid.uuid4().hex
        resp = _json_response(error_body(status, message, param), status, {"X-Request-Id": rid})
        with contextlib.suppress(ConnectionError):  # the client left; aiohttp copes
            await resp.prepare(request)
            await resp.write_eof()
        return resp

    def _injected_status(self, gen: GenRequest) -> int | None:
        if gen.status:
            return gen.status
        f = self.faults
        if not f.fail_status or (f.fail_count is not None and f.fail_count <= 0):
            return None
        if f.fail_match and f.fail_match not in gen.text:
            return None
        if f.fail_count is not None:
            f.fail_count -= 1
        return f.fail_status

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        entry = request.get("standin_entry")
        self.received += 1
        self.m_requests.inc()
        rid = request.headers.get("X-Request-Id") or ""
        try:
            if self.stopping or self.dead:
                why = "engine is dead" if self.dead else "server is shutting down"
                return await self._send_error(request, 503, f"Service unavailable: {why}.", rid)
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return await self._send_error(request, 400, f"JSON decode error: {exc}", rid)
            if entry is not None:
                entry["body"] = body
            if not rid:
                given = body.get("request_id") if isinstance(body, dict) else None
                rid = given if isinstance(given, str) and given else uuid.uuid4().hex
            try:
                gen = parse_request(
                    body,
                    chat=chat,
                    rid=rid,
                    served=self.served,
                    max_model_len=self.args.max_model_len,
                )
            except RequestError as exc:
                return await self._send_error(request, exc.status, exc.message, rid, exc.param)
            status = self._injected_status(gen)
            if status:
                log("ERROR", "serving_engine.py:540", f"Injected failure {status} for {rid}")
                return await self._send_error(request, status, f"standin: injected {status}", rid)
            return await self._run(request, gen, entry)
        finally:
            self.completed += 1
            self._after_request(request)

    async def _run(
        self, request: web.Request, gen: GenRequest, entry: dict[str, Any] | None
    ) -> web.StreamResponse:
        self.inflight += 1
        self._idle.clear()
        waited = False
        try:
            if self._seqs is not None:
                waited = True
                await self._seqs.acquire()
            verdict = self.kv.classify(gen)
            if entry is not None:
                entry["verdict"] = verdict
            gen.cached = min(self.prefix.lookup(gen.text), gen.prompt_tokens)
            self._account(gen, verdict)
            if gen.midstream_error and not gen.stream:
                await self._pause(self.faults.prefill_delay)
                await self._cut_connection(request, gen)
                raise web.HTTPInternalServerError()  # nobody will read it: the socket is gone
            if gen.stream:
                resp, finish, produced = await self._stream(request, gen, verdict)
            else:
                resp, finish, produced = await self._complete(request, gen, verdict)
            if entry is not None:
                entry.update(
                    finish_reason=finish,
                    prompt_tokens=gen.prompt_tokens,
                    completion_tokens=produced,
                )
            return resp
        finally:
            if waited and self._seqs is not None:
                self._seqs.release()
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by a shutdown."""
        if seconds <= 0 or self.cut:
            return
        if seconds < 0.05:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._cut_event.wait(), seconds)

    async def _hang_request(self, gen: GenRequest) -> None:
        if gen.hang:
            log("WARNING", "standin.py:0", f"request {gen.rid} will never be answered ([[hang]])")
            await self._cut_event.wait()

    async def _prefill(self, gen: GenRequest, verdict: str) -> None:
        computed = 0 if verdict == VERDICT_HIT else gen.prompt_tokens - gen.cached
        await self._pause(self.faults.prefill_delay + computed * self.faults.prefill_token_delay)
        self.kv.on_prefilled(gen, verdict)

    def _finish(self, gen: GenRequest, produced: int) -> str:
        n_choices = gen.n * len(gen.prompts)
        self.m_gen.inc(produced * n_choices)
        reason = "abort" if produced < gen.tokens else ("stop" if gen.eos else "length")
        self.m_success[reason].inc()
        return reason

    def _choices(self, gen: GenRequest) -> list[tuple[int, int]]:
        """(choice index, seed) of every choice: n per prompt, prompts in order."""
        return [
            (pi * gen.n + j, _seed(p)) for pi, p in enumerate(gen.prompts) for j in range(gen.n)
        ]

    def _usage(self, gen: GenRequest, produced: int, verdict: str) -> dict[str, Any]:
        completion = produced * gen.n * len(gen.prompts)
        usage: dict[str, Any] = {
            "prompt_tokens": gen.prompt_tokens,
            "total_tokens": gen.prompt_tokens + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": None,
        }
        if "--enable-prompt-tokens-details" in self.args.ignored:
            # Like vLLM: tokens not computed here (local prefix cache + external KV).
            cached = gen.prompt_tokens if verdict == VERDICT_HIT else gen.cached
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    async def _complete(
        self, request: web.Request, gen: GenRequest, verdict: str
    ) -> tuple[web.StreamResponse, str, int]:
        await self._hang_request(gen)
        await self._prefill(gen, verdict)
        delay = gen.slow if gen.slow is not None else self.faults.token_delay
        ntok = gen.tokens
        produced = ntok if gen.abort_after is None else min(ntok, gen.abort_after)
        if delay > 0 and not self.cut:
            start = time.monotonic()
            await self._pause(ntok * delay)
            if self.cut:
                produced = min(ntok, int((time.monotonic() - start) / delay))
        elif self.cut:
            produced = 0
        reason = self._finish(gen, produced)
        text_tokens = produced - 1 if (gen.eos and produced == ntok) else produced
        choices: list[dict[str, Any]] = []
        for index, seed in self._choices(gen):
            text = "".join(_WORD_TEXT[_word(seed, i)] for i in range(text_tokens))
            if gen.chat:
                choices.append(
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "reasoning_content": None,
                            "tool_calls": [],
                        },
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        kv_params = self.kv.prefill_params(gen, reason) if verdict == VERDICT_PREFILL else None
        body: dict[str, Any] = {
            "id": ("chatcmpl-" if gen.chat else "cmpl-") + gen.rid,
            "object": "chat.completion" if gen.chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": self._usage(gen, produced, verdict),
            "prompt_logprobs": None,
            "kv_transfer_params": kv_params,
        }
        resp = _json_response(body, headers={"X-Request-Id": gen.rid})
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError
            log("INFO", "serving_completion.py:410", f"client disconnected from {gen.rid}: {exc}")
        return resp, reason, produced

    async def _stream(
        self, request: web.Request, gen: GenRequest, verdict: str
    ) -> tuple[web.StreamResponse, str, int]:
        await self._hang_request(gen)
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Request-Id": gen.rid,
            },
        )
        rid = ("chatcmpl-" if gen.chat else "cmpl-") + gen.rid
        created = int(time.time())
        obj = "chat.completion.chunk" if gen.chat else "text_completion"
        choices = self._choices(gen)

        def chunk(index: int, piece: Any, finish: str | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": index}
            if gen.chat:
                choice["delta"] = piece
            else:
                choice["text"] = piece
            choice["logprobs"] = None
            choice["finish_reason"] = finish
            choice["stop_reason"] = None
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.name,
                "choices": [choice],
            }

        def event(obj_: Any) -> bytes:
            return b"data: " + json.dumps(obj_, separators=(",", ":")).encode() + b"\n\n"

        # Token chunks are a fixed head and tail around the token's JSON string.
        marker = "@@TOKEN@@"
        templates = []
        for index, seed in choices:
            proto = event(chunk(index, {"content": marker} if gen.chat else marker, None))
            head, tail = proto.split(json.dumps(marker).encode())
            templates.append((index, head, tail, seed))

        produced = 0
        ntok = gen.tokens
        delay = gen.slow if gen.slow is not None else self.faults.token_delay
        limit = min(ntok, 3) if gen.midstream_error else ntok
        if gen.abort_after is not None:
            limit = min(limit, gen.abort_after)
        try:
            await resp.prepare(request)  # headers now, like uvicorn; tokens after the prefill
            await self._prefill(gen, verdict)
            if gen.chat:
                # vLLM sends the role once the first output exists.
                await resp.write(
                    b"".join(
                        event(chunk(i, {"role": "assistant", "content": ""}, None))
                        for i, _ in choices
                    )
                )
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while produced < limit and not self.cut:
                if delay > 0:
                    due = t0 + (produced + 1) * delay
                    now = loop.time()
                    if now < due:
                        await self._pause(due - now)
                        if self.cut:
                            break
                        now = loop.time()
                    upto = min(limit, max(produced + 1, int((now - t0) / delay)))
                else:
                    upto = min(limit, produced + 64)
                parts: list[bytes] = []
                for i in range(produced, upto):
                    last = i == ntok - 1
                    for index, head, tail, seed in templates:
                        if last:
                            text = "" if gen.eos else _WORD_TEXT[_word(seed, i)]
                            piece: Any = {"content": text} if gen.chat else text
                            reason = "stop" if gen.eos else "length"
                            parts.append(event(chunk(index, piece, reason)))
                        else:
                            parts.append(head + _WORD_JSON[_word(seed, i)] + tail)
                await resp.write(b"".join(parts))
                produced = upto
                if delay <= 0:
                    await asyncio.sleep(0)
            if gen.midstream_error:
                await self._cut_connection(request, gen)
                return resp, "abort", produced
            reason = self._finish(gen, produced)
            tail_parts: list[bytes] = []
            if reason == "abort":
                piece = {"content": ""} if gen.chat else ""
                tail_parts += [event(chunk(i, piece, "abort")) for i, _ in choices]
            if gen.include_usage:
                usage = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.name,
                    "choices": [],
                    "usage": self._usage(gen, produced, verdict),
                }
                tail_parts.append(event(usage))
            tail_parts.append(b"data: [DONE]\n\n")
            await resp.write(b"".join(tail_parts))
            await resp.write_eof()
            return resp, reason, produced
        except (ConnectionError, RuntimeError) as exc:
            # The client went away (aiohttp raises ClientConnectionResetError, a
            # ConnectionResetError, or RuntimeError on a closed transport).
            log("INFO", "serving_completion.py:410", f"client disconnected from {gen.rid}: {exc}")
            self.m_success["abort"].inc()
            return resp, "abort", produced

    async def _cut_connection(self, request: web.Request, gen: GenRequest) -> None:
        transport = request.transport
        if transport is None:
            return
        # Let the tokens reach the kernel first, so the client sees them before the cut.
        for _ in range(200):
            if transport.is_closing() or transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        log(
            "ERROR",
            "serving_completion.py:502",
            f"Error in streaming {gen.rid}: connection cut ([[midstream_error]])",
        )
        transport.abort()

    # -- lifecycle faults ------------------------------------------------------------------------

    def _after_request(self, request: web.Request) -> None:
        f = self.faults
        if f.exit_after_requests is not None and (
            self.completed - self._exit_base >= f.exit_after_requests
        ):
            self._spawn(self._exit_after_flush(request))
        elif f.hang_after_requests is not None and (
            self.completed - self._hang_base >= f.hang_after_requests
        ):
            asyncio.get_running_loop().call_soon(self._hang)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exit_after_flush(self, request: web.Request) -> None:
        transport = request.transport
        for _ in range(200):
            if transport is None or transport.is_closing():
                break
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        self.exit_now(self.faults.exit_code, f"served {self.completed} requests")

    def _arm_exit_timer(self) -> None:
        if self._exit_timer is not None:
            self._exit_timer.cancel()
            self._exit_timer = None
        seconds = self.faults.exit_after_seconds
        if seconds is not None:
            self._exit_timer = asyncio.get_running_loop().call_later(
                seconds, self.exit_now, self.faults.exit_code, f"ran for {seconds} s"
            )

    def exit_now(self, code: int, why: str) -> NoReturn:
        """An unrequested exit (injected crash): no draining, engine stopped, status `code`."""
        if code:
            log("ERROR", "core.py:719", f"EngineCore encountered a fatal error: injected ({why}).")
            log("ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.")
        else:
            log("INFO", "launcher.py:110", f"Shutting down FastAPI HTTP server ({why}).")
        self.stop_engine()
        os._exit(code)

    def _hang(self) -> None:
        """Block the event loop for good: the port stays open, nothing is answered.

        SIGTERM/SIGINT still end the process (exit 0) unless ignore_sigterm is set.
        """
        log(
            "WARNING",
            "standin.py:0",
            "engine wedged: no request will be answered any more (fault injection: hang)",
        )
        got: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            if signum == signal.SIGTERM and self.faults.ignore_sigterm:
                log("WARNING", "standin.py:0", "SIGTERM received and ignored (hung)")
                return
            got.append(signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not got:
            time.sleep(0.05)
        self.exit_now(0, f"signal {got[0]} while hung")

    # -- engine and signals ----------------------------------------------------------------------

    def stop_engine(self) -> None:
        """Terminate and reap the engine grandchild (SIGTERM, SIGKILL after 1 s)."""
        pid = self.engine_pid
        if pid is None or self.engine_reaped:
            return
        self.engine_reaped = True
        sig = signal.SIGKILL if self.faults.ignore_sigterm else signal.SIGTERM
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 1.0
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                return
            time.sleep(0.005)

    def _on_sigchld(self) -> None:
        pid = self.engine_pid
        if pid is None or self.engine_reaped:
            return
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if not done:
            return
        self.engine_reaped = True
        if self.stopping:
            return
        self.dead = True
        log(
            "ERROR",
            "core_client.py:564",
            f"Engine core proc EngineCore_DP0 died unexpectedly "
            f"(wait status {status}), shutting down client.",
        )
        asyncio.get_running_loop().call_later(
            0.2, self.exit_now, self.engine_death_exit_code, "engine died"
        )

    def _on_signal(self, signame: str) -> None:
        if signame == "SIGTERM" and self.faults.ignore_sigterm:
            log(
                "WARNING",
                "launcher.py:98",
                "Received SIGTERM; ignoring it (STANDIN_IGNORE_SIGTERM): SIGKILL needed",
            )
            return
        if self.stopping:
            log("WARNING", "launcher.py:101", f"Received {signame} again; exiting now")
            self.exit_now(0, "second signal")
        self.stopping = True
        self._spawn(self._shutdown(signame))

    async def _shutdown(self, signame: str) -> None:
        _uvicorn("Shutting down")
        timeout = self.args.shutdown_timeout
        if timeout and self.inflight:
            log(
                "INFO",
                "launcher.py:121",
                f"Received {signame}: draining {self.inflight} "
                f"in-flight requests for up to {timeout} s",
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        # Like vLLM without --shutdown-timeout: what is in flight ends now, with HTTP 200.
        self.cut = True
        self._cut_event.set()
        if self.inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        if self._runner is not None:
            _uvicorn("Waiting for application shutdown.")
            await self._runner.cleanup()
            _uvicorn("Application shutdown complete.")
        self.stop_engine()
        _uvicorn(f"Finished server process [{os.getpid()}]")
        self._done.set()

    async def serve(self) -> int:
        """Run until a signal (returns 0) or a bind failure (returns 1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
        self._on_sigchld()  # the engine may have died before the handler existed
        if self.faults.start_delay > 0:
            log("INFO", "gpu_model_runner.py:2602", f"Starting to load model {self.args.model}...")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._done.wait(), self.faults.start_delay)
            if self.stopping:
                await self._done.wait()
                return 0
        log(
            "INFO",
            "gpu_model_runner.py:2653",
            f"Model loading took 0.0000 GiB and {self.faults.start_delay:.2f} seconds",
        )
        if self.kv.connector:
            log(
                "INFO",
                "factory.py:51",
                f"Creating v1 connector with name: {self.kv.connector} "
                f"and engine_id: {self.kv.engine_id}",
            )
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        host = self.args.host or "0.0.0.0"
        site = web.TCPSite(self._runner, host, self.args.port, backlog=2048)
        try:
            await site.start()
        except OSError as exc:
            log(
                "ERROR",
                "api_server.py:1971",
                f"[Errno {exc.errno}] error while attempting to "
                f"bind on address ('{host}', {self.args.port}): {exc.strerror}",
            )
            await self._runner.cleanup()
            self.stop_engine()
            return 1
        log(
            "INFO",
            "api_server.py:1971",
            f"Starting vLLM API server 0 on http://{host}:{self.args.port}",
        )
        log(
            "INFO",
            "launcher.py:37",
            "Available routes are: /health, /ping, /version, "
            "/v1/models, /metrics, /v1/completions, /v1/chat/completions, /_standin/*",
        )
        _uvicorn(f"Started server process [{os.getpid()}]")
        _uvicorn("Waiting for application startup.")
        _uvicorn("Application startup complete.")
        if self.faults.exit_after_seconds is not None:
            self._arm_exit_timer()
        if self.faults.hang_after_requests == 0:
            loop.call_soon(self._hang)
        await self._done.wait()
        return self._rc


def _fail_start(args: Args) -> int:
    """What a vLLM start that runs out of GPU memory prints; exit status 1."""
    proc = "EngineCore_DP0"
    log(
        "INFO",
        "core.py:77",
        f"Initializing a V1 LLM engine (v{VERSION}) with config: model='{args.model}'",
        proc=proc,
    )
    log("WARNING", "utils.py:185", "Not enough memory for CUDA graphs; this may be slow", proc=proc)
    log("ERROR", "core.py:708", "EngineCore failed to start.", proc=proc)
    trace = (
        "Traceback (most recent call last):\n"
        '  File "vllm/v1/engine/core.py", line 699, in run_engine_core\n'
        "    engine_core = EngineCoreProc(*args, **kwargs)\n"
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total "
        "capacity; 77.80 GiB already allocated) [standin: STANDIN_FAIL_START]\n"
    )
    sys.stderr.write(trace)
    log(
        "ERROR",
        "api_server.py:1990",
        "RuntimeError: Engine core initialization failed. "
        "See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}",
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devtools.standin``; returns the exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        if str(exc) == "help":
            print(__doc__)
            return 0
        print(
            f"usage: python -m devtools.standin serve MODEL [options]\nerror: {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        faults = Faults.from_env(os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log("INFO", "api_server.py:1896", f"vLLM API server version {VERSION}")
    shown: dict[str, Any] = {"model_tag": args.model, "host": args.host, "port": args.port}
    if args.served_model_names:
        shown["served_model_name"] = list(args.served_model_names)
    if args.max_model_len:
        shown["max_model_len"] = args.max_model_len
    if args.kv_transfer_config:
        shown["kv_transfer_config"] = dict(args.kv_transfer_config)
    log("INFO", "utils.py:328", f"non-default args: {shown}")
    if args.ignored:
        log("WARNING", "arg_utils.py:1802", f"standin ignores these flags: {list(args.ignored)}")
    if faults.fail_start:
        return _fail_start(args)
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir:
        # vLLM leaves one of these behind on every start, even after a clean shutdown.
        with contextlib.suppress(OSError):
            (Path(tmpdir) / f"vllm_dist_{uuid.uuid4().hex}").mkdir(parents=True)
    server = Standin(args, faults)
    if faults.fork_engine:
        server.engine_pid = fork_engine(args.model, faults.ignore_sigterm)
    try:
        return asyncio.run(server.serve())
    finally:
        server.stop_engine()
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
