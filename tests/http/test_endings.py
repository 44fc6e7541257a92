"""Honest endings: an answer the engine aborted (HTTP 200, finish_reason "abort", [DONE])
reaches the client as an error, never as a 200 that looks complete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.harness.proxy import MODEL, Cluster, serve_proxy, sse_events, standin_cluster

PROMPT = "the quick brown fox jumps over the lazy dog " * 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "endings", prefill=1, decode=1)


async def _post(base: str, body: dict[str, Any], route: str = "/v1/completions") -> Any:
    async with aiohttp.ClientSession() as s, s.post(base + route, json=body) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_aborted_stream_ends_with_error_event(
    cluster: Cluster, usage: bool, route: str
) -> None:
    text = "[[abort=3]] " + PROMPT
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "stream": True}
    if route == "/v1/completions":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with serve_proxy(cluster.topology()) as px:
        status, data = await _post(px.base, body, route)
        cut = px.metric("disaggd_upstream_errors_total", instance="decode-0", kind="stream_cut")
    assert status == 200  # the head was sent with the first token
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1, events
    err = events[-2]["error"]
    assert err["code"] == 502, err
    # The tokens before the cut reach the client, then the error.
    finishes = [c.get("finish_reason") for e in events[:-2] for c in e.get("choices", [])]
    assert "abort" in finishes
    assert cut == 1


async def test_complete_stream_is_untouched(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "stream": True}
    async with serve_proxy(cluster.topology()) as px:
        status, data = await _post(px.base, body)
        cut = px.metric("disaggd_upstream_errors_total", kind="stream_cut")
    assert status == 200 and cut == 0
    events = sse_events(data)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_aborted_before_any_token_is_502(cluster: Cluster) -> None:
    """[[abort=0]]: the prefill leg's one token is fine; the decode stream aborts at once
    (one abort chunk and [DONE] in one read: the client still sees an error)."""
    body = {"model": MODEL, "prompt": "[[abort=0]] " + PROMPT, "max_tokens": 10, "stream": True}
    async with serve_proxy(cluster.topology(prefill_fallback="decode")) as px:
        status, data = await _post(px.base, body)
    if status == 200:
        events = sse_events(data)
        assert "error" in events[-2], events
    else:
        assert status >= 500 and "error" in json.loads(data)


async def test_aborted_whole_answer_is_502(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "[[abort=3]] " + PROMPT, "max_tokens": 10}
    async with serve_proxy(cluster.topology()) as px:
        status, data = await _post(px.base, body)
        cut = px.metric("disaggd_upstream_errors_total", instance="decode-0", kind="stream_cut")
    assert status == 502, data
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 502
    assert cut == 1
