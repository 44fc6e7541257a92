"""Server-sent events as vLLM frames them: event boundaries, and a stream made from a result."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from disaggd.proxy.errors import DONE, dumps
from disaggd.proxy.request import COMPLETIONS

SSE_CT = "text/event-stream"


def sse_event(obj: Any) -> bytes:
    """One SSE event ``data: <json>\\n\\n``."""
    return b"data: " + dumps(obj).encode() + b"\n\n"


def event_end(chunk: bytes) -> int:
    """Offset just past the last complete SSE event in `chunk` (0: none)."""
    lf = chunk.rfind(b"\n\n")
    crlf = chunk.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _completion_chunk(head: Mapping[str, Any], choice: Mapping[str, Any]) -> bytes:
    return sse_event(
        {
            **head,
            "choices": [
                {
                    "index": choice.get("index", 0),
                    "text": choice.get("text", ""),
                    "logprobs": choice.get("logprobs"),
                    "finish_reason": choice.get("finish_reason"),
                    "stop_reason": choice.get("stop_reason"),
                }
            ],
        }
    )


def _chat_chunks(head: Mapping[str, Any], choice: Mapping[str, Any]) -> bytes:
    """A role chunk, then a content chunk carrying the finish reason."""
    index = choice.get("index", 0)
    message = choice.get("message")
    message = message if isinstance(message, Mapping) else {}
    role = {"role": message.get("role", "assistant"), "content": ""}
    first = sse_event(
        {
            **head,
            "choices": [{"index": index, "delta": role, "logprobs": None, "finish_reason": None}],
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
    last = {
        "index": index,
        "delta": delta,
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice.get("finish_reason"),
        "stop_reason": choice.get("stop_reason"),
    }
    return first + sse_event({**head, "choices": [last]})


def synthesize_stream(route: str, result: Mapping[str, Any], include_usage: bool) -> bytes:
    """An SSE stream equivalent to a non-streaming result, framed as vLLM frames it.

    Completions: one ``text_completion`` chunk per choice. Chat: per choice a
    role chunk then a content chunk carrying the finish reason. Then the usage
    chunk (``choices`` empty) if the client asked for it, then ``[DONE]``.
    Source: vllm/entrypoints/openai/serving_completion.py and serving_chat.py
    (``completion_stream_generator``, ``chat_completion_stream_generator``).
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
        out += (
            _completion_chunk(head, choice) if route == COMPLETIONS else _chat_chunks(head, choice)
        )
    if include_usage and result.get("usage") is not None:
        out += sse_event({**head, "choices": [], "usage": result["usage"]})
    out += DONE
    return bytes(out)
