"""Honest endings: was an answer the engine's finished answer, or was it cut short?

vLLM ends a request it gave up on (SIGTERM without ``--shutdown-timeout``, an
engine abort) like a finished one: HTTP 200, a last choice whose
``finish_reason`` is ``"abort"`` (or no finish reason at all: "fewer tokens"),
then a clean ``data: [DONE]`` (docs/vllm-cpu-notes.md, "SIGTERM with a request
in flight"; vllm/entrypoints/openai/serving_completion.py and serving_chat.py
write the output's ``finish_reason`` as is, and ``[DONE]`` whatever it was).
A client cannot tell that from a complete answer, so the proxy judges the end
here, once per answer, off the per-chunk path:

* a stream: `last_chunk` looks at the events just before ``[DONE]`` (the relay
  calls it only for the chunk that ends with ``[DONE]``);
* a whole answer: `answer_aborted` looks for ``"finish_reason": "abort"``.

A cut answer reaches the client as an error (in-stream event, or 502), never as
a 200 that looks complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from disaggd.observe.logs import get_logger

log = get_logger("disaggd.proxy")

#: The finish reason vLLM gives a request it aborted (vllm/v1/engine: FinishReason.ABORT).
ABORT = "abort"


def _events(data: bytes) -> list[bytes]:
    """The ``data:`` payloads of complete SSE events in `data`, in order."""
    out: list[bytes] = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def _finish_reasons(event: Mapping[str, Any]) -> list[Any] | None:
    """The finish reasons of an event's choices; None for an event with no choices
    (the usage chunk) or that is not a chunk at all (an error event)."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    return [c.get("finish_reason") if isinstance(c, Mapping) else None for c in choices]


def last_finish(data: bytes) -> tuple[bool, Any]:
    """Judge the end of a stream from its last bytes (they end with ``[DONE]``).

    Args:
        data: the tail of the stream: at least the last event with choices
            before ``[DONE]`` when it fits (the relay passes its last two chunks).

    Returns:
        (cut, finish_reason): cut is True when the last choice event before
        ``[DONE]`` carries ``"abort"`` or no finish reason. An in-stream error
        event (vLLM's own) or a tail with no choice event in it is not judged cut:
        the former already tells the client, the latter cannot be judged.
    """
    for payload in reversed(_events(data)):
        if payload == b"[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            return False, None  # an event cut at the front of the window: cannot judge
        if not isinstance(event, Mapping):
            return False, None
        if "error" in event:
            return False, None
        reasons = _finish_reasons(event)
        if reasons is None:
            continue  # the usage chunk follows the last token
        cut = any(r == ABORT for r in reasons) or all(r is None for r in reasons)
        return cut, reasons[-1]
    return False, None


def last_chunk(request_id: str, decode: str | None, tail: bytes, last: bytes) -> bytes:
    """The stream's last chunk to send: `last` as is, or without its ``[DONE]`` when the
    stream was cut short (the relay's caller then ends it with an error event).

    Args:
        request_id: for the log line.
        decode: the decode instance's name, for the log line.
        tail: the chunk sent before `last` (the abort chunk may come in an earlier read).
        last: the chunk that ends with ``[DONE]``.
    """
    # [DONE] may come alone, after the chunk with the last choice.
    cut, reason = last_finish(tail + last)
    if not cut:
        return last
    log.warning("stream_ended_early", request_id=request_id, decode=decode, finish=reason)
    return last[: last.rfind(b"data: [DONE]")]


def answer_aborted(request_id: str, decode: str | None, data: bytes) -> bool:
    """True when a whole (non-streamed) answer has a choice the engine aborted.

    A bytes search first: the parse happens only for answers that mention it.
    """
    if b'"abort"' not in data:
        return False
    try:
        result = json.loads(data)
    except ValueError:
        return False
    reasons = _finish_reasons(result) if isinstance(result, Mapping) else None
    if not reasons or ABORT not in reasons:
        return False
    log.warning("answer_ended_early", request_id=request_id, decode=decode, finish=ABORT)
    return True
