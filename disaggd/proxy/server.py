"""The OpenAI-compatible front door: prefill leg, decode leg, streaming.

`Proxy.app` is a Quart app served by Hypercorn inside the daemon's event loop
(`Proxy.serve`, no signal handlers of its own). The two inference routes,
``POST /v1/completions`` and ``POST /v1/chat/completions``, are the hot path:
they are answered by a plain ASGI handler placed in front of Quart
(``app.asgi_app``), because Quart's request/response machinery costs about
0.2 ms of CPU per request, a fifth of the proxy's whole budget (issue 7). The
other routes (``/health``, ``/metrics``, ``/v1/models``) are ordinary Quart views.

One request, top to bottom (`Proxy._inference` → `_proxy`):

1. gate: draining → 503; API key; body size → 413; JSON and field types → 400;
2. route: pick a decode (none ready → 503), then decide: disaggregated, or
   ``decode_only`` (short prompt, batch prompt under kv_transfer_params);
3. prefill leg (`_prefill`): the request shaped to only prefill; a 4xx goes back
   to the client as is; a connection error, 5xx, bad body or leg timeout is
   retried on another prefill with a fresh request id; none left → the
   ``prefill_fallback`` policy (``fallback``: the decode prefills locally, or
   503). A prefill that stopped on its one token answers the client itself
   (``prefill_only``);
4. decode leg (`_decode`): the client's own body, plus the prefill's
   ``kv_transfer_params`` where the connector needs them; a non-streaming
   answer is passed through (status and body), a stream is forwarded chunk by
   chunk as it arrives, whole SSE events only;
5. account: metrics, the KV check, one ``request_done`` log line.

Errors before the first byte reach the client as HTTP errors with an OpenAI
error body; after it, as an SSE ``data: {"error": ...}`` event followed by
``data: [DONE]`` (what vLLM itself does). A client that goes away cancels the
request: both legs' upstream connections are closed. The whole request has a
deadline (``request_timeout``): past it the client gets 504 and the upstream
connection is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import hypercorn.asyncio
import hypercorn.config
import quart
from yarl import URL

from disaggd.observe.logs import get_logger
from disaggd.observe.metrics import Metrics
from disaggd.proxy.router import Router, Upstream
from disaggd.topology import ProxySection, Role, Topology, connectors
from disaggd.topology.connectors import Handoff

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFERENCE_ROUTES = (COMPLETIONS, CHAT)

Decision = Literal["disaggregated", "decode_only", "fallback", "prefill_only", "none"]
KVVerdict = Literal["moved", "recomputed", "short_prompt", "unknown"]

#: HTTP keep-alive toward clients, seconds. Longer than common client pools
#: (aiohttp 15 s, httpx 5 s) so that the client, not the proxy, closes an idle
#: connection: a client never sends on a connection the proxy is closing. Not
#: longer: Hypercorn 0.18 keeps a connection the client closed (CLOSE-WAIT) until
#: this timeout, so it bounds how long each closed connection holds a descriptor.
CLIENT_KEEPALIVE = 20.0

#: Seconds Hypercorn gives connections still open when the shutdown trigger fires,
#: before cancelling them (which closes their upstream legs). Short, because the
#: daemon drains first (`stop_accepting`, `wait_drained` up to ``drain_timeout``).
SHUTDOWN_GRACE = 2.0

#: Deadline of the `/v1/models` call to a decode instance, seconds (after connect).
MODELS_TIMEOUT = 5.0

#: Status recorded for a request whose client went away first (nginx's convention).
CLIENT_CLOSED = 499

#: A token id counts as this many characters for ``decode_only_below_chars``.
CHARS_PER_TOKEN = 4

#: Chat content parts that are not text (images, audio) count as this many characters:
#: their prefill is expensive, so such a request is never "short".
NON_TEXT_PART_CHARS = 1 << 20

_DONE = b"data: [DONE]\n\n"
_JSON_CT = b"application/json"
_SSE_CT = "text/event-stream"
_MAX_PENDING = 1 << 20  # bytes of an unterminated SSE event held before giving up on framing

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_raw_decode = json.JSONDecoder().raw_decode

_CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
if hasattr(aiohttp, "ConnectionTimeoutError"):  # aiohttp >= 3.10
    _CONNECT_ERRORS = (*_CONNECT_ERRORS, aiohttp.ConnectionTimeoutError)

log = get_logger("disaggd.proxy")


# -- errors -----------------------------------------------------------------------------------


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error document: ``{"error": {message, type, param, code}}``.

    ``code`` is the HTTP status, as vLLM's own ``ErrorResponse`` carries it.
    """
    return _dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


class HTTPError(Exception):
    """An error the proxy itself answers with, before any byte of a response was sent."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        retry_after: bool = False,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.retry_after = retry_after
        self.headers = tuple(headers)


def bad_request(message: str, param: str | None = None) -> HTTPError:
    """A 400 ``invalid_request_error``."""
    return HTTPError(400, message, "invalid_request_error", param=param)


# -- request shaping (pure) ---------------------------------------------------------------------


def _check_optional(
    req: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str
) -> None:
    value = req.get(key)
    if value is None:
        return
    # bool is an int in Python, not in JSON Schema.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{key}' must be {what}", key)


def parse_request(route: str, raw: bytes) -> dict[str, Any]:
    """Decode and check a completions or chat completions body.

    Only what the proxy itself relies on is checked (shape, ``model``,
    ``prompt``/``messages``, and the fields it reads or rewrites); the engine
    validates the rest and its 400 is passed through.

    Raises:
        HTTPError: 400, with ``param`` naming the offending field.
    """
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise bad_request("the request body must be a JSON object")
    model = req.get("model")
    if model is None:
        raise bad_request("'model' is required", "model")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if route == COMPLETIONS:
        prompt = req.get("prompt")
        if prompt is None:
            raise bad_request("'prompt' is required", "prompt")
        if isinstance(prompt, list):
            # The first element decides the kind; the engine checks the rest.
            if (
                not prompt
                or not isinstance(prompt[0], str | int | list)
                or isinstance(prompt[0], bool)
            ):
                raise bad_request(
                    "'prompt' must be a string, a list of strings, a list of token ids or a "
                    "list of token-id lists (non-empty)",
                    "prompt",
                )
        elif not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string or a list", "prompt")
    else:
        messages = req.get("messages")
        if messages is None:
            raise bad_request("'messages' is required", "messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list", "messages")
        for msg in messages:
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise bad_request("each message must be an object with a 'role'", "messages")
    _check_optional(req, "stream", bool, "a boolean")
    _check_optional(req, "stream_options", dict, "an object")
    if req.get("stream_options") is not None and not req.get("stream"):
        # vLLM's own rule (its 400 would only come after a wasted prefill leg).
        raise bad_request(
            "'stream_options' can only be set when 'stream' is true", "stream_options"
        )
    for key in ("max_tokens", "max_completion_tokens", "n", "min_tokens", "min_completion_tokens"):
        _check_optional(req, key, int, "an integer")
    return req


def prompt_chars(route: str, req: Mapping[str, Any]) -> int:
    """The prompt's length in characters (token ids count `CHARS_PER_TOKEN` each)."""
    if route == COMPLETIONS:
        return _chars(req.get("prompt"))
    total = 0
    for msg in req.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
                else:
                    total += NON_TEXT_PART_CHARS
    return total


def _chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(
            len(p) if isinstance(p, str) else _chars(p) if isinstance(p, list) else CHARS_PER_TOKEN
            for p in prompt
        )
    return 0


def is_batch(route: str, req: Mapping[str, Any]) -> bool:
    """True when a completions request carries several prompts."""
    if route != COMPLETIONS:
        return False
    prompt = req.get("prompt")
    return isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list)


#: Keys removed from the prefill leg: vLLM rejects min_tokens > max_tokens, and
#: stream_options without stream (VLLM_FACTS "prefill leg hygiene").
_PREFILL_DROP = ("stream_options", "min_tokens", "min_completion_tokens", "kv_transfer_params")


def prefill_request(req: Mapping[str, Any], kv_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prefill leg's body: the client's request shaped to only prefill.

    ``stream`` false, ``max_tokens`` 1 (and ``max_completion_tokens`` 1 where the
    client sent it, since it overrides ``max_tokens``), ``n`` 1, no
    ``stream_options``/``min_tokens``/``min_completion_tokens``; `kv_params`
    (the connector's prefill ``kv_transfer_params``) when given.
    """
    body = {k: v for k, v in req.items() if k not in _PREFILL_DROP}
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in req:
        body["max_completion_tokens"] = 1
    body["n"] = 1
    if kv_params is not None:
        body["kv_transfer_params"] = dict(kv_params)
    return body


def decode_body(raw: bytes, req: Mapping[str, Any], kv_params: Mapping[str, Any] | None) -> bytes:
    """The decode leg's body: the client's own bytes, plus `kv_params` when given.

    Nothing the client did not send is added (no ``max_tokens``). The client's
    bytes are reused as they are when possible, so a long prompt is not
    serialized again; a ``kv_transfer_params`` the client sent is always removed
    (it would let a client point the decode at any host's KV).
    """
    stripped = raw.strip()
    splice = stripped[:1] == b"{" and stripped[-1:] == b"}" and "kv_transfer_params" not in req
    if splice:
        if kv_params is None:
            return raw
        return stripped[:-1] + b',"kv_transfer_params":' + _dumps(kv_params).encode() + b"}"
    body = {k: v for k, v in req.items() if k != "kv_transfer_params"}
    if kv_params is not None:
        body["kv_transfer_params"] = dict(kv_params)
    return _dumps(body).encode()


def answers_from_prefill(req: Mapping[str, Any], finish_reason: Any) -> bool:
    """Whether a prefill result is the whole answer (its one token ended the request).

    Only when it stopped for a reason other than its length cap, and only when
    the client's request would have stopped there too: one sample, no
    ``min_tokens`` (which the prefill leg drops) and no beam search.
    """
    if finish_reason in (None, "length"):
        return False
    n = req.get("n")
    return (
        (n is None or n == 1)
        and not req.get("min_tokens")
        and not req.get("min_completion_tokens")
        and not req.get("use_beam_search")
        and (req.get("best_of") in (None, 1))
    )


def kv_verdict(usage: Any, block_size: int) -> tuple[KVVerdict, int | None, int | None]:
    """Did the decode load the prompt's KV, judging by its ``usage``?

    Args:
        usage: the decode's ``usage`` object (``prompt_tokens``,
            ``prompt_tokens_details.cached_tokens``), or None.
        block_size: KV block size in tokens; KV moves in whole blocks, so the
            last partial block is always computed by the decode.

    Returns:
        (verdict, prompt_tokens, cached_tokens). verdict: ``short_prompt`` when
        the prompt is shorter than one block, ``moved`` when at least all but
        one block came from cache, ``recomputed`` otherwise, ``unknown`` when the
        usage carries no ``prompt_tokens_details`` (vLLM reports them with
        ``--enable-prompt-tokens-details``).
    """
    if not isinstance(usage, Mapping):
        return "unknown", None, None
    prompt_tokens = usage.get("prompt_tokens")
    if not isinstance(prompt_tokens, int):
        return "unknown", None, None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if not isinstance(cached, int):
        cached = None
    if prompt_tokens < block_size:
        return "short_prompt", prompt_tokens, cached
    if cached is None:
        return "unknown", prompt_tokens, None
    if cached >= prompt_tokens - block_size:
        return "moved", prompt_tokens, cached
    return "recomputed", prompt_tokens, cached


def usage_from(body: bytes) -> dict[str, Any] | None:
    """The last ``"usage": {...}`` object in a response body or SSE tail, or None.

    vLLM puts ``usage`` after ``choices``, so the last occurrence is the real
    one (generated text cannot contain the bare key: its quotes are escaped).
    """
    idx = body.rfind(b'"usage":')
    if idx < 0:
        return None
    start = body.find(b"{", idx)
    if start < 0 or body[idx + 8 : start].strip():
        return None
    try:
        obj, _ = _raw_decode(body[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def sse_event(obj: Any) -> bytes:
    """One SSE event ``data: <json>\\n\\n``."""
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def stream_error_event(message: str, type_: str, code: int) -> bytes:
    """The in-stream error vLLM sends (an error document as an event), then ``[DONE]``."""
    return b"data: " + error_body(message, type_, code) + b"\n\n" + _DONE


def synthesize_stream(route: str, result: Mapping[str, Any], include_usage: bool) -> bytes:
    """An SSE stream equivalent to a non-streaming result, framed as vLLM frames it.

    Completions: one ``text_completion`` chunk per choice. Chat: per choice a
    role chunk then a content chunk carrying the finish reason. Then the usage
    chunk (``choices`` empty) if the client asked for it, then ``[DONE]``.
    """
    head = {
        "id": result.get("id"),
        "object": "text_completion" if route == COMPLETIONS else "chat.completion.chunk",
        "created": result.get("created", int(time.time())),
        "model": result.get("model"),
    }
    out = bytearray()
    for choice in result.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        index = choice.get("index", 0)
        if route == COMPLETIONS:
            out += sse_event(
                {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "text": choice.get("text", ""),
                            "logprobs": choice.get("logprobs"),
                            "finish_reason": choice.get("finish_reason"),
                            "stop_reason": choice.get("stop_reason"),
                        }
                    ],
                }
            )
            continue
        message = choice.get("message")
        message = message if isinstance(message, Mapping) else {}
        out += sse_event(
            {
                **head,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": message.get("role", "assistant"), "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        delta: dict[str, Any] = {"content": message.get("content") or ""}
        for key in ("reasoning_content", "reasoning"):
            if message.get(key):
                delta[key] = message[key]
        tool_calls = message.get("tool_calls")
        if tool_calls:
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(tool_calls) if isinstance(call, dict)
            ]
        out += sse_event(
            {
                **head,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": choice.get("finish_reason"),
                        "stop_reason": choice.get("stop_reason"),
                    }
                ],
            }
        )
    if include_usage and result.get("usage") is not None:
        out += sse_event({**head, "choices": [], "usage": result["usage"]})
    out += _DONE
    return bytes(out)


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What the request path reads from the topology, resolved once per (re)load."""

    proxy: ProxySection
    handoff: Handoff
    kv_check: bool
    block_size: int
    public_model: str
    root_model: str
    api_key: bytes | None
    auth_required: bool
    retry_after: bytes
    connect_timeout: float

    @classmethod
    def from_topology(cls, topo: Topology) -> _Settings:
        p = topo.proxy
        key: bytes | None = None
        if p.api_key_env is not None:
            value = os.environ.get(p.api_key_env, "")
            if value:
                key = value.encode()
            else:
                # Fail closed: a configured but missing key must not open the door.
                log.error("api_key_missing", env=p.api_key_env)
        return cls(
            proxy=p,
            handoff=topo.connector.handoff,
            kv_check=topo.kv_transfer.check,
            block_size=topo.kv_transfer.block_size,
            public_model=topo.model.public_name,
            root_model=topo.model.name,
            api_key=key,
            auth_required=p.api_key_env is not None,
            retry_after=str(p.retry_after).encode(),
            connect_timeout=p.connect_timeout,
        )


# -- one request's state --------------------------------------------------------------------------

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class _Req:
    """One client request: its inputs, and what it has become so far (for the
    reply, the metrics and its log line)."""

    __slots__ = (
        "auth",
        "client_rid",
        "deadline",
        "decision",
        "decode",
        "disconnected",
        "error",
        "kv",
        "last_sent",
        "prefill",
        "prefill_ms",
        "prompt_tokens",
        "raw",
        "req",
        "retries",
        "rid",
        "route",
        "s",
        "send",
        "sending_last",
        "started",
        "status",
        "stream",
        "t0",
        "ttft",
    )

    def __init__(self, route: str, t0: float, s: _Settings, send: Send) -> None:
        self.route = route
        self.t0 = t0
        self.s = s  # one request, one settings snapshot: a reload does not change it midway
        self.send = send
        self.deadline = t0 + s.proxy.request_timeout
        self.req: dict[str, Any] = {}
        self.raw = b""
        self.auth: str | None = None  # forwarded upstream (forward_authorization only)
        self.rid = ""
        self.client_rid: str | None = None
        self.decision: Decision = "none"
        self.prefill: str | None = None
        self.decode: str | None = None
        self.status = 0
        self.started = False  # response headers sent
        self.sending_last = False  # the last body message is being sent: a disconnect is moot
        self.disconnected = False
        self.stream = False
        self.ttft: float | None = None
        self.last_sent = 0.0
        self.retries = 0
        self.prefill_ms: float | None = None
        self.prompt_tokens: int | None = None
        self.error: str | None = None
        self.kv: str | None = None


class _PrefillDone:
    """A successful prefill leg: its parsed result and the id both legs carry."""

    __slots__ = ("result", "rid", "upstream")

    def __init__(self, result: dict[str, Any], rid: str, upstream: Upstream) -> None:
        self.result = result
        self.rid = rid
        self.upstream = upstream


def _new_rid() -> str:
    return os.urandom(16).hex()


def _safe_id(value: str) -> str:
    """Only characters a P2pNccl id parser cannot trip on (no ':' or '_')."""
    return "".join(c for c in value[:64] if c.isalnum() or c == "-")


# -- the proxy ------------------------------------------------------------------------------------


class Proxy:
    """The OpenAI-compatible proxy of one daemon.

    Attributes:
        app: the Quart app (the inference routes are served by an ASGI handler
            installed as ``app.asgi_app``, in front of Quart's own).
    """

    def __init__(self, topo: Topology, router: Router, metrics: Metrics) -> None:
        self._router = router
        self._metrics = metrics
        self._s = _Settings.from_topology(topo)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._retired_sessions: list[aiohttp.ClientSession] = []
        self._urls: dict[tuple[str, str], URL] = {}
        self._accepting = True
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._started = int(time.time())
        # Metric children by label values: `labels()` takes a lock and validates on every
        # call; a dict hit is an order of magnitude cheaper on the hot path.
        self._m_requests: dict[tuple[str, int, str], Any] = {}
        self._m_e2e: dict[tuple[str, str], Any] = {}
        self._m_ttft: dict[tuple[str, str], Any] = {}
        self._m_itl = {r: metrics.itl.labels(r) for r in INFERENCE_ROUTES}
        self._m_kv = {
            v: metrics.kv_check.labels(v)
            for v in ("moved", "recomputed", "short_prompt", "unknown")
        }
        metrics.inflight.set_function(lambda: self._inflight)
        metrics.bind_upstreams(
            lambda: [
                (u.name, u.role.value, u.ready and not u.draining, u.outstanding)
                for u in router.upstreams()
            ]
        )

        app = quart.Quart("disaggd")
        app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does
        app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
        app.add_url_rule("/health", "health", self._health, methods=["GET"])
        app.add_url_rule("/metrics", "metrics", self._metrics_view, methods=["GET"])
        app.add_url_rule("/v1/models", "models", self._models, methods=["GET"])
        app.register_error_handler(404, self._not_found)
        app.register_error_handler(405, self._method_not_allowed)
        self._quart_asgi: ASGIApp = app.asgi_app  # type: ignore[assignment]
        app.asgi_app = self._asgi  # type: ignore[method-assign,assignment]
        self.app = app

    # -- lifecycle ---------------------------------------------------------------------------------

    def update_settings(self, topo: Topology) -> None:
        """Apply a reloaded topology's proxy settings to the next requests.

        Timeouts, fallback policy, thresholds, body limit, API key (its env var
        is read again), connector handoff and model name apply at once;
        requests in flight keep the settings they started with and no
        connection is dropped. A new ``upstream_keepalive`` applies to new
        pooled clients: the current ones are retired (closed by `aclose`).
        Routing policies are the router's (`Router.update_topology`); a new
        listen address needs a restart.
        """
        old = self._s
        self._s = _Settings.from_topology(topo)
        if old.proxy.upstream_keepalive != self._s.proxy.upstream_keepalive:
            self._retired_sessions.extend(self._sessions.values())
            self._sessions = {}

    async def serve(
        self,
        shutdown_trigger: Callable[[], Awaitable[object]],
        *,
        bound: asyncio.Event | None = None,
    ) -> None:
        """Serve on ``[proxy] host:port`` until `shutdown_trigger` returns.

        The socket is bound here, before Hypercorn starts, so that an address in
        use fails at once with the address in the message, and `bound` is set
        as soon as clients can connect. Hypercorn installs no signal handlers
        (a trigger is given). After the trigger, connections still open get
        `SHUTDOWN_GRACE` seconds before they are cancelled (their upstream legs
        closed): the daemon drains first (`stop_accepting`, `wait_drained`).

        Raises:
            OSError: the address cannot be bound.
        """
        p = self._s.proxy
        sock = _listen(p.host, p.port)
        config = hypercorn.config.Config()
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None  # one request_done line per request instead
        config.errorlog = logging.getLogger("disaggd.hypercorn")
        config.keep_alive_timeout = CLIENT_KEEPALIVE
        config.graceful_timeout = SHUTDOWN_GRACE
        log.info("proxy_listening", host=p.host, port=p.port)
        if bound is not None:
            bound.set()
        await hypercorn.asyncio.serve(self.app, config, shutdown_trigger=shutdown_trigger)

    def stop_accepting(self) -> None:
        """Shutdown drain: new requests get 503 (with Retry-After); requests in flight go on."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        """False once `stop_accepting` was called."""
        return self._accepting

    @property
    def inflight(self) -> int:
        """Inference requests being served now."""
        return self._inflight

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False if `timeout` (s) passed first."""
        if self._inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Close every pooled upstream client (and their idle connections)."""
        sessions = [*self._sessions.values(), *self._retired_sessions]
        self._sessions = {}
        self._retired_sessions = []
        for session in sessions:
            await session.close()

    # -- upstream clients --------------------------------------------------------------------------

    def _session(self, up: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get(up.base_url)
        if session is None or session.closed:
            p = self._s.proxy
            connector = aiohttp.TCPConnector(
                # No cap: the engines queue requests themselves, and a pool limit here
                # would add a second, invisible queue.
                limit=0,
                # Below vLLM's (uvicorn's) 5 s keep-alive: a pooled connection is never
                # reused at the moment the server closes it.
                keepalive_timeout=p.upstream_keepalive,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                # Bodies are passed through byte for byte: never ask for compression.
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
                skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._sessions[up.base_url] = session
        return session

    def _url(self, up: Upstream, path: str) -> URL:
        key = (up.base_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(up.base_url + path, encoded=True)
        return url

    def _timeout(self, total: float) -> aiohttp.ClientTimeout:
        ct = self._s.connect_timeout
        return aiohttp.ClientTimeout(total=max(total, 0.001), connect=ct, sock_connect=ct)

    def _error(self, up: Upstream, kind: str) -> None:
        self._metrics.upstream_errors.labels(up.name, kind).inc()

    # -- ASGI entry --------------------------------------------------------------------------------

    async def _asgi(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in INFERENCE_ROUTES:
                await self._inference(scope, receive, send, path)
                return
        await self._quart_asgi(scope, receive, send)

    async def _inference(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send, route: str
    ) -> None:
        st = _Req(route, time.monotonic(), self._s, send)
        self._inflight += 1
        if self._inflight == 1:
            self._drained.clear()
        task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                auth, clen = self._read_headers(scope, st)
                self._gate(scope, st, auth, clen)
                if st.s.proxy.forward_authorization:
                    st.auth = auth
                raw = await self._read_body(receive, st)
                if raw is None:
                    return  # the client went away while sending its body
                st.raw = raw
                st.req = parse_request(route, raw)
                st.stream = st.req.get("stream") is True
                assert task is not None
                watcher = asyncio.get_running_loop().create_task(
                    self._watch_disconnect(receive, task, st)
                )
                await self._proxy(st)
            except HTTPError as err:
                if st.started:  # pragma: no cover - past the first byte errors are in-band
                    raise
                await self._send_error(st, err)
        except asyncio.CancelledError:
            if not st.disconnected:
                raise
            # We cancelled ourselves because the client left; the legs' connections are
            # closed by now (aiohttp closes a connection whose request is cancelled).
            if sys.version_info >= (3, 11) and task is not None:
                task.uncancel()
            st.status = CLIENT_CLOSED
            st.error = "client_disconnected"
        except Exception as exc:  # a bug: still answer, never hang
            log.exception("proxy_bug", request_id=st.rid)
            st.error = f"internal: {exc!r}"
            if not st.started:
                await self._send_error(st, HTTPError(500, "internal proxy error", "server_error"))
            else:
                st.status = 500
        finally:
            if watcher is not None:
                watcher.cancel()
            self._inflight -= 1
            if self._inflight == 0:
                self._drained.set()
            self._account(st)

    def _read_headers(
        self, scope: MutableMapping[str, Any], st: _Req
    ) -> tuple[str | None, int | None]:
        auth: str | None = None
        clen: int | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
            elif name == b"x-request-id":
                rid = value.decode("latin-1").strip()
                if rid and len(rid) <= 256 and rid.isprintable():
                    st.client_rid = rid
            elif name == b"content-length":
                try:
                    clen = int(value)
                except ValueError:
                    clen = None
        st.rid = st.client_rid or _new_rid()
        return auth, clen

    def _gate(
        self, scope: MutableMapping[str, Any], st: _Req, auth: str | None, clen: int | None
    ) -> None:
        if scope["method"] != "POST":
            raise HTTPError(
                405,
                f"method {scope['method']} is not allowed here; use POST",
                "invalid_request_error",
                headers=[(b"allow", b"POST")],
            )
        if not self._accepting:
            raise HTTPError(
                503,
                "the server is shutting down",
                "service_unavailable_error",
                retry_after=True,
                headers=[(b"connection", b"close")],
            )
        if st.s.auth_required:
            check_auth(auth, st.s.api_key)
        if clen is not None and clen > st.s.proxy.max_body_bytes:
            raise _too_large(st.s)

    async def _read_body(self, receive: Receive, st: _Req) -> bytes | None:
        """The whole request body (None: the client left), at most ``max_body_bytes``."""
        limit = st.s.proxy.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                st.disconnected = True
                st.status = CLIENT_CLOSED
                st.error = "client_disconnected"
                return None
            chunk: bytes = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(st.s)
            if not msg.get("more_body", False):
                if chunk:
                    parts.append(chunk)
                # Hypercorn ends a body with an empty message: one part is the usual case.
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if chunk:
                parts.append(chunk)

    async def _watch_disconnect(self, receive: Receive, task: asyncio.Task[Any], st: _Req) -> None:
        """Cancel the request's task when its client goes away (Hypercorn only tells `receive`)."""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not st.sending_last:
                    st.disconnected = True
                    task.cancel()
                return

    # -- the request path ----------------------------------------------------------------------

    async def _proxy(self, st: _Req) -> None:
        router = self._router
        s = st.s
        p = s.proxy
        req = st.req
        decode = router.pick(Role.DECODE)
        if decode is None:
            raise HTTPError(
                503, "no decode instance is ready", "service_unavailable_error", retry_after=True
            )
        router.acquire(decode)
        try:
            disagg = True
            if (
                p.decode_only_below_chars
                and prompt_chars(st.route, req) < p.decode_only_below_chars
            ):
                disagg = False
            elif s.handoff is Handoff.KV_TRANSFER_PARAMS and is_batch(st.route, req):
                # One prefill result carries one set of kv_transfer_params: no batches.
                disagg = False
            kv_params: dict[str, Any] | None = None
            if not disagg:
                st.decision = "decode_only"
            else:
                st.decision = "disaggregated"  # what a prefill's 4xx or a 504 is counted as
                done = await self._prefill(st, decode)
                if done is None:
                    if p.prefill_fallback == "fail":
                        st.decision = "none"
                        raise HTTPError(
                            503,
                            "no prefill instance is ready",
                            "service_unavailable_error",
                            retry_after=True,
                        )
                    st.decision = "fallback"
                    st.error = st.error or "no_prefill"
                    st.rid = self._attempt_rid(st, None, decode)
                else:
                    result = done.result
                    choice = _first_choice(result)
                    finish = choice.get("finish_reason") if choice else None
                    usage = result.get("usage")
                    if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens"), int):
                        st.prompt_tokens = usage["prompt_tokens"]
                    if answers_from_prefill(req, finish):
                        st.decision = "prefill_only"
                        await self._answer_from_prefill(st, done)
                        return
                    st.rid = done.rid
                    if s.handoff is Handoff.KV_TRANSFER_PARAMS:
                        params = result.get("kv_transfer_params")
                        if isinstance(params, dict):
                            kv_params = params
                            if s.kv_check and "remote_prefill_cached_tokens" in params:
                                # With it the decode reports the prefill's cache hits as
                                # its own cached tokens (vllm v1/engine/output_processor.py);
                                # the KV check needs the decode's own count.
                                kv_params = {
                                    k: v
                                    for k, v in params.items()
                                    if k != "remote_prefill_cached_tokens"
                                }
                        else:
                            # Stopped early, or too short for one full block: nothing to
                            # load, the decode computes the prompt itself.
                            st.decision = "fallback"
                            st.error = "no_kv_transfer_params"
            held, decode = decode, None
            await self._decode(st, kv_params, held)  # releases it (or its successor)
        finally:
            if decode is not None:
                router.release(decode)

    def _attempt_rid(self, st: _Req, prefill: Upstream | None, decode: Upstream) -> str:
        """The request id of one attempt: the client's (or a new) id, fresh on every retry.

        Under request-id handoff with both KV addresses known, the P2pNccl id
        (`connectors.p2p_request_id`) that carries them.
        """
        base = st.client_rid or st.rid
        if st.retries:
            base = f"{base}-r{st.retries}"
        if (
            prefill is not None
            and st.s.handoff is Handoff.REQUEST_ID
            and prefill.kv_address
            and decode.kv_address
        ):
            # P2pNccl parses both KV addresses out of the id; a client's id could contain
            # ':' and fool its parser, and two clients could send the same one.
            suffix = base
            if st.client_rid:
                suffix = f"{_safe_id(st.client_rid)}-{os.urandom(4).hex()}"
                if st.retries:
                    suffix = f"{suffix}-r{st.retries}"
            return connectors.p2p_request_id(prefill.kv_address, decode.kv_address, suffix)
        return base

    @staticmethod
    def _leg_headers(rid: str, auth: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "X-Request-Id": rid}
        if auth is not None:
            h["Authorization"] = auth
        return h

    async def _prefill(self, st: _Req, decode: Upstream) -> _PrefillDone | None:
        """Run the prefill leg, retrying other prefills; None when no prefill is left.

        Raises:
            HTTPError: the prefill's own 4xx (passed through), or 504 at the deadline.
        """
        router = self._router
        p = st.s.proxy
        kv = (
            connectors.prefill_kv_transfer_params()
            if st.s.handoff is Handoff.KV_TRANSFER_PARAMS
            else None
        )
        body = _dumps(prefill_request(st.req, kv)).encode()
        tried: list[str] = []
        while True:
            up = router.pick(Role.PREFILL, tried)
            if up is None:
                return None
            if tried:
                st.retries += 1
                self._metrics.retries.labels("prefill").inc()
            rid = st.rid = self._attempt_rid(st, up, decode)
            st.prefill = up.name
            remaining = st.deadline - time.monotonic()
            if remaining <= 0:
                raise _gateway_timeout()
            leg_total = min(p.prefill_timeout, remaining)
            router.acquire(up)
            t = time.monotonic()
            resp: aiohttp.ClientResponse | None = None
            try:
                resp = await self._session(up).post(
                    self._url(up, st.route),
                    data=body,
                    headers=self._leg_headers(rid, st.auth),
                    timeout=self._timeout(leg_total),
                )
                data = await resp.read()
            except _CONNECT_ERRORS as exc:
                self._error(up, "connect")
                st.error = f"prefill_connect:{up.name}: {exc}"
                tried.append(up.name)
                continue
            except asyncio.TimeoutError:
                self._error(up, "timeout")
                st.error = f"prefill_timeout:{up.name}"
                if leg_total >= remaining:
                    raise _gateway_timeout() from None  # the request's own deadline
                tried.append(up.name)
                continue
            except aiohttp.ClientError as exc:
                self._error(up, "disconnect")
                st.error = f"prefill_{type(exc).__name__}:{up.name}"
                tried.append(up.name)
                continue
            finally:
                if resp is not None:
                    _done_with(resp)
                router.release(up)
                elapsed = time.monotonic() - t
                st.prefill_ms = elapsed * 1000.0
                self._metrics.prefill_latency.labels(up.name).observe(elapsed)
            status = resp.status
            if 400 <= status < 500:
                # The request itself is wrong (too long, bad field): the same everywhere.
                self._error(up, "http_4xx")
                st.error = f"prefill_http_{status}:{up.name}"
                raise _Passthrough(status, data, _content_type(resp))
            if status != 200:
                self._error(up, "http_5xx")
                st.error = f"prefill_http_{status}:{up.name}"
                tried.append(up.name)
                continue
            try:
                result = json.loads(data)
                if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
                    raise ValueError("no choices")
                finish = (_first_choice(result) or {}).get("finish_reason")
                if finish in (None, "abort", "error"):
                    # The engine gave up on it (shutting down, internal error): another may not.
                    raise ValueError(f"finish_reason {finish!r}")
            except ValueError:
                self._error(up, "bad_response")
                st.error = f"prefill_bad_response:{up.name}"
                tried.append(up.name)
                continue
            st.error = None  # an earlier attempt's failure was recovered from
            return _PrefillDone(result, rid, up)

    async def _answer_from_prefill(self, st: _Req, done: _PrefillDone) -> None:
        """Reply with the prefill's own result, shaped as the client asked."""
        if st.stream:
            opts = st.req.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            body = synthesize_stream(st.route, done.result, include_usage)
            st.ttft = time.monotonic() - st.t0
            await self._send_whole(st, 200, body, b"text/event-stream; charset=utf-8", length=False)
        else:
            await self._send_whole(st, 200, _dumps(done.result).encode(), _JSON_CT)

    async def _decode(self, st: _Req, kv_params: dict[str, Any] | None, up: Upstream) -> None:
        """Run the decode leg and forward its answer; releases `up` (or its successor).

        A decode that cannot be connected to never saw the request: it is sent
        to another ready decode (except under request-id handoff, whose id names
        this decode's KV address). Any other failure before the first byte is an
        HTTP error (502, 504 at the deadline), after it an in-stream error.
        """
        router = self._router
        body = decode_body(st.raw, st.req, kv_params)
        pinned = st.decision == "disaggregated" and st.s.handoff is Handoff.REQUEST_ID
        tried: list[str] = []
        held: Upstream | None = up
        try:
            if not pinned and (not up.ready or up.draining):
                # Readiness changed during the prefill leg: move to a live one if any.
                other = router.pick(Role.DECODE)
                if other is not None:
                    router.release(up)
                    held = up = other
                    router.acquire(up)
            while True:
                st.decode = up.name
                remaining = st.deadline - time.monotonic()
                if remaining <= 0:
                    raise _gateway_timeout()
                try:
                    resp = await self._session(up).post(
                        self._url(up, st.route),
                        data=body,
                        headers=self._leg_headers(st.rid, st.auth),
                        timeout=self._timeout(remaining),
                    )
                except _CONNECT_ERRORS as exc:
                    self._error(up, "connect")
                    st.error = f"decode_connect:{up.name}"
                    tried.append(up.name)
                    nxt = None if pinned else router.pick(Role.DECODE, tried)
                    if nxt is None:
                        raise HTTPError(
                            502,
                            f"decode instance {up.name} is unreachable: {exc}",
                            "bad_gateway_error",
                        ) from None
                    router.release(up)
                    held = up = nxt
                    router.acquire(up)
                    st.retries += 1
                    self._metrics.retries.labels("decode").inc()
                    st.rid = self._attempt_rid(st, None, up)
                    continue
                except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
                    # A timeout's total is the request's remaining time: the deadline.
                    raise self._decode_failure(st, up, exc) from None
                try:
                    await self._forward(st, resp, up)
                finally:
                    _done_with(resp)
                return
        finally:
            if held is not None:
                router.release(held)

    def _decode_failure(self, st: _Req, up: Upstream, exc: BaseException) -> HTTPError:
        """The client's error for a decode leg that broke before its first byte: 504 at
        the deadline, else 502; counted against `up`."""
        if isinstance(exc, asyncio.TimeoutError):
            self._error(up, "timeout")
            st.error = f"decode_timeout:{up.name}"
            return _gateway_timeout()
        self._error(up, "disconnect")
        st.error = f"decode_{type(exc).__name__}:{up.name}"
        return HTTPError(502, f"decode instance {up.name} failed: {exc}", "bad_gateway_error")

    async def _forward(self, st: _Req, resp: aiohttp.ClientResponse, up: Upstream) -> None:
        """Pass the decode's answer to the client: a stream as it comes, else whole."""
        ctype = resp.headers.get("Content-Type", "application/json")
        if resp.status == 200 and st.stream and ctype.startswith(_SSE_CT):
            await self._pipe_stream(st, resp, up, ctype.encode("latin-1"))
            return
        try:
            data = await resp.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise self._decode_failure(st, up, exc) from None
        if resp.status >= 500:
            self._error(up, "http_5xx")
            st.error = f"decode_http_{resp.status}:{up.name}"
        elif resp.status >= 400:
            self._error(up, "http_4xx")
            st.error = f"decode_http_{resp.status}:{up.name}"
        elif resp.status == 200:
            self._kv_check(st, usage_from(data))
        await self._send_whole(st, resp.status, data, ctype.encode("latin-1"))

    async def _pipe_stream(
        self, st: _Req, resp: aiohttp.ClientResponse, up: Upstream, ctype: bytes
    ) -> None:
        """Forward an SSE stream as it arrives, whole events only.

        The response starts with the first complete event, so a stream that
        fails before any event still gets a proper HTTP error status.
        """
        send = st.send
        content = resp.content
        itl = self._m_itl[st.route]
        pending = b""
        tail = b""
        prev_tail = b""
        failure: HTTPError | None = None
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if pending:
                    chunk = pending + chunk
                    pending = b""
                # Hold back a partial event, so that an upstream cut mid-event never
                # leaves a torn line in front of the error event.
                if not chunk.endswith(b"\n\n"):
                    cut = _event_end(chunk)
                    if cut == 0:
                        if len(chunk) < _MAX_PENDING:
                            pending = chunk
                            continue
                    elif cut < len(chunk):
                        pending = chunk[cut:]
                        chunk = chunk[:cut]
                now = time.monotonic()
                if not st.started:
                    await self._start(st, 200, ctype, None)
                    st.ttft = now - st.t0
                elif not chunk.startswith(_DONE) and b'"choices":[]' not in chunk:
                    # The usage chunk and [DONE] follow the last token at once: not a gap.
                    itl.observe(now - st.last_sent)
                st.last_sent = now
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                prev_tail, tail = tail, chunk
        except asyncio.TimeoutError:
            self._error(up, "timeout")
            st.error = f"decode_timeout:{up.name}"
            failure = _gateway_timeout()
        except aiohttp.ClientError as exc:
            self._error(up, "stream_cut")
            st.error = f"decode_{type(exc).__name__}:{up.name}"
            failure = HTTPError(
                502, f"decode instance {up.name} failed mid-stream: {exc}", "bad_gateway_error"
            )
        if failure is None and not tail.endswith(_DONE):
            self._error(up, "stream_cut")
            st.error = f"decode_stream_cut:{up.name}"
            failure = HTTPError(
                502, f"decode instance {up.name} ended the stream early", "bad_gateway_error"
            )
        if failure is not None:
            if not st.started:
                raise failure
            st.sending_last = True
            await send(
                {
                    "type": "http.response.body",
                    "body": stream_error_event(failure.message, failure.type, failure.status),
                    "more_body": False,
                }
            )
            return
        if st.decision == "disaggregated":
            opts = st.req.get("stream_options")
            with_usage = isinstance(opts, dict) and opts.get("include_usage")
            self._kv_check(st, usage_from(prev_tail + tail) if with_usage else None)
        st.sending_last = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _kv_check(self, st: _Req, usage: dict[str, Any] | None) -> None:
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            st.prompt_tokens = usage["prompt_tokens"]
        if st.decision != "disaggregated" or not st.s.kv_check:
            return
        block = st.s.block_size
        verdict, prompt_tokens, cached = kv_verdict(usage, block)
        st.kv = verdict
        self._m_kv[verdict].inc()
        if verdict == "recomputed":
            log.warning(
                "kv_recomputed",
                request_id=st.rid,
                prefill=st.prefill,
                decode=st.decode,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached,
                block_size=block,
            )

    # -- replies -------------------------------------------------------------------------------

    async def _start(
        self,
        st: _Req,
        status: int,
        ctype: bytes,
        length: int | None,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        headers = [(b"content-type", ctype), (b"x-request-id", st.rid.encode("latin-1"))]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        else:
            headers.append((b"cache-control", b"no-cache"))
        headers.extend(extra)
        st.status = status
        st.started = True
        await st.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_whole(
        self,
        st: _Req,
        status: int,
        body: bytes,
        ctype: bytes,
        extra: Iterable[tuple[bytes, bytes]] = (),
        *,
        length: bool = True,
    ) -> None:
        await self._start(st, status, ctype, len(body) if length else None, extra)
        st.sending_last = True
        await st.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_error(self, st: _Req, err: HTTPError) -> None:
        if isinstance(err, _Passthrough):
            await self._send_whole(st, err.status, err.body, err.ctype)
            return
        extra = list(err.headers)
        if err.retry_after:
            extra.append((b"retry-after", st.s.retry_after))
        if err.status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        if st.error is None:
            st.error = err.message
        body = error_body(err.message, err.type, err.status, err.param)
        await self._send_whole(st, err.status, body, _JSON_CT, extra)

    def _account(self, st: _Req) -> None:
        """Metrics and the one log line of a finished request."""
        e2e = time.monotonic() - st.t0
        decision = st.decision
        key = (st.route, st.status, decision)
        child = self._m_requests.get(key)
        if child is None:
            child = self._m_requests[key] = self._metrics.requests.labels(
                st.route, str(st.status), decision
            )
        child.inc()
        k2 = (st.route, decision)
        hist = self._m_e2e.get(k2)
        if hist is None:
            hist = self._m_e2e[k2] = self._metrics.e2e.labels(st.route, decision)
        hist.observe(e2e)
        if st.ttft is not None:
            hist = self._m_ttft.get(k2)
            if hist is None:
                hist = self._m_ttft[k2] = self._metrics.ttft.labels(st.route, decision)
            hist.observe(st.ttft)
        log.info(
            "request_done",
            request_id=st.rid,
            client_request_id=st.client_rid,
            route=st.route,
            decision=decision,
            prefill=st.prefill,
            decode=st.decode,
            status=st.status,
            stream=st.stream,
            ttft_ms=None if st.ttft is None else round(st.ttft * 1000.0, 2),
            e2e_ms=round(e2e * 1000.0, 2),
            prefill_ms=None if st.prefill_ms is None else round(st.prefill_ms, 2),
            prompt_tokens=st.prompt_tokens,
            retries=st.retries,
            kv=st.kv,
            error=st.error,
        )

    # -- Quart views -----------------------------------------------------------------------------

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> quart.Response:
        return quart.Response(
            _dumps(obj), status=status, content_type="application/json", headers=headers
        )

    async def _health(self) -> quart.Response:
        router = self._router
        prefill = router.ready_count(Role.PREFILL)
        decode = router.ready_count(Role.DECODE)
        missing = [r.value for r, n in ((Role.PREFILL, prefill), (Role.DECODE, decode)) if n == 0]
        body: dict[str, Any] = {"prefill_ready": prefill, "decode_ready": decode}
        if not self._accepting:
            body.update(status="draining", missing=missing)
            return self._json(503, body, {"Retry-After": str(self._s.proxy.retry_after)})
        if missing:
            body.update(status="unavailable", missing=missing)
            return self._json(503, body, {"Retry-After": str(self._s.proxy.retry_after)})
        body.update(status="ok", missing=[])
        return self._json(200, body)

    async def _metrics_view(self) -> quart.Response:
        return quart.Response(self._metrics.render(), status=200, content_type=Metrics.CONTENT_TYPE)

    async def _models(self) -> quart.Response:
        s = self._s
        if s.auth_required:
            try:
                check_auth(quart.request.headers.get("Authorization"), s.api_key)
            except HTTPError as err:
                return self._json(
                    401,
                    json.loads(error_body(err.message, err.type, 401)),
                    {"WWW-Authenticate": "Bearer"},
                )
        up = self._router.pick(Role.DECODE)
        if up is not None:
            headers = {}
            auth = quart.request.headers.get("Authorization")
            if s.proxy.forward_authorization and auth:
                headers["Authorization"] = auth
            try:
                async with self._session(up).get(
                    self._url(up, "/v1/models"),
                    headers=headers,
                    timeout=self._timeout(s.connect_timeout + MODELS_TIMEOUT),
                ) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return quart.Response(data, status=200, content_type="application/json")
                    self._error(up, "http_5xx" if resp.status >= 500 else "http_4xx")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._error(up, "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect")
        # No decode to ask (or it failed): the topology knows the name clients use.
        return self._json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": s.public_model,
                        "object": "model",
                        "created": self._started,
                        "owned_by": "disaggd",
                        "root": s.root_model,
                        "parent": None,
                        "permission": [],
                    }
                ],
            },
        )

    async def _not_found(self, _exc: Exception) -> quart.Response:
        path = quart.request.path
        return self._json(404, json.loads(error_body(f"no route {path}", "not_found_error", 404)))

    async def _method_not_allowed(self, _exc: Exception) -> quart.Response:
        req = quart.request
        return self._json(
            405,
            json.loads(
                error_body(
                    f"method {req.method} is not allowed on {req.path}",
                    "invalid_request_error",
                    405,
                )
            ),
        )


class _Passthrough(HTTPError):
    """An upstream's own error reply (status, body, content type), passed through as is."""

    def __init__(self, status: int, body: bytes, ctype: bytes) -> None:
        super().__init__(status, "upstream error", "upstream_error")
        self.body = body
        self.ctype = ctype


def check_auth(header: str | None, key: bytes | None) -> None:
    """Check ``Authorization: Bearer <key>`` in constant time.

    Raises:
        HTTPError: 401 when the header is missing, malformed or wrong, or when
            no key is configured although one is required.
    """
    if header is None or key is None or header[:7].lower() != "bearer ":
        raise HTTPError(401, "missing or invalid API key", "authentication_error")
    if not hmac.compare_digest(header[7:].strip().encode("latin-1", "replace"), key):
        raise HTTPError(401, "missing or invalid API key", "authentication_error")


def _too_large(s: _Settings) -> HTTPError:
    return HTTPError(
        413,
        f"the request body is larger than {s.proxy.max_body_bytes} bytes",
        "invalid_request_error",
    )


def _gateway_timeout() -> HTTPError:
    return HTTPError(504, "the request timed out", "timeout_error")


def _event_end(chunk: bytes) -> int:
    """Offset just past the last complete SSE event in `chunk` (0: none)."""
    lf = chunk.rfind(b"\n\n")
    crlf = chunk.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _done_with(resp: aiohttp.ClientResponse) -> None:
    """Give a connection back to the pool, or close it when its response was not read
    to the end: closing is how an upstream learns that its request was abandoned."""
    if resp.content.is_eof():
        resp.release()
    else:
        resp.close()


def _first_choice(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        return choices[0]
    return None


def _content_type(resp: aiohttp.ClientResponse) -> bytes:
    return resp.headers.get("Content-Type", "application/json").encode("latin-1")


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
