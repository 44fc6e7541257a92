"""The client's request: routes, headers, body, the checks the proxy relies on.

Only what the proxy itself reads or rewrites is checked here (shape, ``model``,
``prompt``/``messages``, the fields it reshapes for the prefill leg); the engine
validates the rest and its 400 is passed through.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from disaggd.proxy.errors import HTTPError, bad_request, too_large

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFERENCE_ROUTES = (COMPLETIONS, CHAT)

#: A token id counts as this many characters for ``decode_only_below_chars``.
CHARS_PER_TOKEN = 4

#: Chat content parts that are not text (images, audio) count as this many characters:
#: their prefill is expensive, so such a request is never "short".
NON_TEXT_PART_CHARS = 1 << 20

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "min_tokens", "min_completion_tokens")

#: Least value of the integer fields, as vLLM's SamplingParams._verify_args checks them
#: (vllm/sampling_params.py: n >= 1, max_tokens >= 1, min_tokens >= 0): refused here
#: before any leg, not after a wasted prefill.
_INT_MIN = {"max_tokens": 1, "max_completion_tokens": 1, "n": 1}

#: Largest value any of them may take: beyond any context length (and int32).
_INT_MAX = (1 << 31) - 1

_NUMBER_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


class Head:
    """What the proxy reads from the request's headers (one pass over them).

    Attributes:
        method: the HTTP method.
        auth: the ``Authorization`` value, or None.
        client_rid: the client's ``X-Request-Id`` when usable (printable, at most
            256 characters), else None.
        length: ``Content-Length`` when present and numeric, else None.
        prefiller: llm-d's ``x-prefiller-host-port`` (several lines joined with ``,``),
            else None (`disaggd.proxy.prefiller`).
        traceparent / tracestate: W3C Trace Context, as sent, else None
            (`disaggd.observe.tracing`; several tracestate lines joined with ``,``).
    """

    __slots__ = ("auth", "client_rid", "length", "method", "prefiller", "traceparent", "tracestate")

    def __init__(self, scope: Scope) -> None:
        self.method: str = scope["method"]
        self.auth: str | None = None
        self.client_rid: str | None = None
        self.length: int | None = None
        self.prefiller: str | None = None
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                self.auth = value.decode("latin-1")
            elif name == b"x-request-id":
                rid = value.decode("latin-1").strip()
                if rid and len(rid) <= 256 and rid.isprintable():
                    self.client_rid = rid
            elif name == b"content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.length = None
            elif name == b"traceparent":
                self.traceparent = value.decode("latin-1")
            elif name == b"tracestate":
                self.tracestate = _joined(self.tracestate, value)
            elif name == b"x-prefiller-host-port":
                self.prefiller = _joined(self.prefiller, value)


def _joined(prev: str | None, value: bytes) -> str:
    """A repeated header's lines as one comma-separated value (RFC 9110 5.3)."""
    text = value.decode("latin-1")
    return text if prev is None else f"{prev},{text}"


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


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, at most `limit` bytes; None when the client left first.

    Raises:
        HTTPError: 413 past `limit`.
    """
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk: bytes = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if chunk:
            parts.append(chunk)
        if not msg.get("more_body", False):
            # Hypercorn ends a body with an empty message: one part is the usual case.
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _check_optional(
    req: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str
) -> None:
    value = req.get(key)
    if value is None:
        return
    # bool is an int in Python, not in JSON Schema.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{key}' must be {what}", key)


def _check_prompt(req: Mapping[str, Any]) -> None:
    prompt = req.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(prompt, list):
        # The first element decides the kind; the engine checks the rest.
        first = prompt[0] if prompt else None
        if not isinstance(first, str | int | list) or isinstance(first, bool):
            raise bad_request(
                "'prompt' must be a string, a list of strings, a list of token ids or a "
                "list of token-id lists (non-empty)",
                "prompt",
            )
    elif not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string or a list", "prompt")


def _check_messages(req: Mapping[str, Any]) -> None:
    messages = req.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request("each message must be an object with a 'role'", "messages")


def parse_request(route: str, raw: bytes) -> dict[str, Any]:
    """Decode and check a completions or chat completions body.

    Args:
        route: `COMPLETIONS` or `CHAT`.
        raw: the body bytes (JSON).

    Returns:
        The decoded object, as the client sent it.

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
        _check_prompt(req)
    else:
        _check_messages(req)
    _check_optional(req, "stream", bool, "a boolean")
    _check_optional(req, "stream_options", dict, "an object")
    if req.get("stream_options") is not None and not req.get("stream"):
        # vLLM's own rule (vllm/entrypoints/openai/protocol.py, validate_stream_options):
        # its 400 would only come after a wasted prefill leg.
        raise bad_request(
            "'stream_options' can only be set when 'stream' is true", "stream_options"
        )
    _check_values(req)
    return req


def _check_values(req: Mapping[str, Any]) -> None:
    """Types and ranges that need no model: integer fields, sampling numbers."""
    for key in _INT_FIELDS:
        _check_optional(req, key, int, "an integer")
        value = req.get(key)
        if value is not None and not _INT_MIN.get(key, 0) <= value <= _INT_MAX:
            raise bad_request(
                f"'{key}' must be between {_INT_MIN.get(key, 0)} and {_INT_MAX}, got {value}", key
            )
    for key in _NUMBER_FIELDS:
        _check_optional(req, key, (int, float), "a number")


def prompt_chars(route: str, req: Mapping[str, Any]) -> int:
    """The prompt's length in characters (token ids count `CHARS_PER_TOKEN` each;
    non-text chat parts `NON_TEXT_PART_CHARS`)."""
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


def include_usage(req: Mapping[str, Any]) -> bool:
    """Whether a streaming client asked for the usage chunk (``stream_options.include_usage``)."""
    opts = req.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


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
