"""Errors the proxy answers with, in the OpenAI error shape.

vLLM's own ``ErrorResponse`` (vllm/entrypoints/openai/protocol.py) is
``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP
status; the proxy's own errors use the same shape, so a client cannot tell
which hop refused it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

#: The compact JSON encoder the whole proxy uses (str out; ``.encode()`` for bytes).
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

JSON_CT = b"application/json"
DONE = b"data: [DONE]\n\n"


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error document: ``{"error": {message, type, param, code}}``.

    ``code`` is the HTTP status, as vLLM's own ``ErrorResponse`` carries it.
    """
    return dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def stream_error_event(message: str, type_: str, code: int) -> bytes:
    """The in-stream error vLLM sends (an error document as an event), then ``[DONE]``.

    Source: vllm/entrypoints/openai/serving_completion.py (``data: {error}`` then
    ``data: [DONE]`` when generation fails mid-stream).
    """
    return b"data: " + error_body(message, type_, code) + b"\n\n" + DONE


class HTTPError(Exception):
    """An error the proxy itself answers with, before any byte of a response was sent.

    Attributes:
        status: the HTTP status.
        message, type, param: the OpenAI error document's fields.
        retry_after: add ``Retry-After`` (``[proxy] retry_after`` seconds).
        headers: extra response headers, as (lowercase name, value) bytes.
    """

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


class Passthrough(HTTPError):
    """An upstream's own error reply (status, body, content type), passed through as is."""

    def __init__(self, status: int, body: bytes, ctype: bytes) -> None:
        super().__init__(status, "upstream error", "upstream_error")
        self.body = body
        self.ctype = ctype


def bad_request(message: str, param: str | None = None) -> HTTPError:
    """A 400 ``invalid_request_error``."""
    return HTTPError(400, message, "invalid_request_error", param=param)


def gateway_timeout() -> HTTPError:
    """504: the request's own deadline (``[proxy] request_timeout``) passed."""
    return HTTPError(504, "the request timed out", "timeout_error")


def unavailable(message: str) -> HTTPError:
    """503 with ``Retry-After``: nothing to route to now; try again later."""
    return HTTPError(503, message, "service_unavailable_error", retry_after=True)


def too_large(limit: int) -> HTTPError:
    """413: the body is over ``[proxy] max_body_bytes`` (`limit`, bytes)."""
    return HTTPError(413, f"the request body is larger than {limit} bytes", "invalid_request_error")


def body_timeout(seconds: float) -> HTTPError:
    """408: the request body did not arrive within ``[proxy] body_timeout`` (`seconds`)."""
    return HTTPError(
        408,
        f"the request body was not received within {seconds:g} s",
        "invalid_request_error",
        headers=[(b"connection", b"close")],
    )


def unencodable(exc: BaseException) -> HTTPError:
    """400 for input Python can decode but not use: nesting too deep, lone surrogates."""
    if isinstance(exc, RecursionError):
        return bad_request("the request body is nested too deeply")
    return bad_request("the request body holds text that is not valid Unicode (a lone surrogate?)")
