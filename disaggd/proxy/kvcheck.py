"""The KV check: did the decode load the prompt's KV, or compute it again?

Read from the decode's own ``usage`` (``prompt_tokens`` and
``prompt_tokens_details.cached_tokens``, which vLLM reports with
``--enable-prompt-tokens-details``): the KV a connector loaded counts as cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

KVVerdict = Literal["moved", "recomputed", "short_prompt", "unknown"]

#: Every verdict, in the order the ``disaggd_kv_check_total{verdict}`` series are made.
VERDICTS: tuple[KVVerdict, ...] = ("moved", "recomputed", "short_prompt", "unknown")

_raw_decode = json.JSONDecoder().raw_decode


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

    vLLM puts ``usage`` after ``choices`` (vllm/entrypoints/openai/protocol.py,
    ``CompletionResponse``), so the last occurrence is the real one (generated
    text cannot contain the bare key: its quotes are escaped).
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
