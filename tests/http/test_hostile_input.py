"""Hostile input never reaches a proxy 500: each is a 4xx in the API's error shape,
refused before any leg, and the proxy serves a normal request afterwards."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.harness.proxy import MODEL, Cluster, serve_proxy, standin_cluster

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "hostile", prefill=1, decode=1)


def _bodies() -> list[bytes]:
    deep = b'{"model":"' + MODEL.encode() + b'","prompt":"x","max_tokens":2,"logit_bias":'
    out = [
        deep + b"[" * 1000 + b"]" * 1000 + b"}",
        deep + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
        b"[" * 100000,
        json.dumps({"model": MODEL, "prompt": "\ud800 lone"}).encode(),
        b'{"model":"' + MODEL.encode() + b'","prompt":"x\\udc00y","max_tokens":2}',
        b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"\\ud83d"}]}',
        b"\xff\xfe\x00",
        b"",
        b"null",
        b'"just a string"',
    ]
    base = {"model": MODEL, "prompt": PROMPT}
    bad_values: list[dict[str, Any]] = [
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"max_tokens": 1 << 40},
        {"max_tokens": "10"},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"n": 0},
        {"n": -3},
        {"min_tokens": -1},
        {"temperature": "hot"},
        {"top_p": [1]},
        {"stream": "yes"},
        {"stream_options": {"include_usage": True}},
        {"prompt": None},
        {"prompt": 5},
        {"prompt": [True]},
        {"model": 7},
    ]
    out += [json.dumps({**base, **v}).encode() for v in bad_values]
    return out


def _flipped() -> list[bytes]:
    """Random byte-flips of a valid body: no 5xx whatever they become."""
    out = []
    base = {"model": MODEL, "prompt": PROMPT}
    rng = random.Random(13)
    valid = json.dumps({**base, "max_tokens": 2}).encode()
    for _ in range(60):
        b = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


async def _fire(base: str, bodies: list[bytes]) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as s:
        for body in bodies:
            for route in ("/v1/completions", "/v1/chat/completions"):
                async with s.post(
                    base + route, data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    data = await r.read()
                    statuses.append(r.status)
                    assert r.status < 500, (r.status, body[:200], data[:300])
                    if r.status >= 400:
                        err = json.loads(data)["error"]
                        assert set(err) == {"message", "type", "param", "code"}
        ok = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        async with s.post(base + "/v1/completions", json=ok) as r:
            assert r.status == 200  # served normally after the batch
    return statuses


async def test_hostile_bodies_are_4xx_before_any_leg(cluster: Cluster) -> None:
    await cluster.clear()
    async with serve_proxy(cluster.topology()) as px:
        statuses = await _fire(px.base, _bodies())
    assert all(400 <= st < 500 for st in statuses), statuses
    # Refused before any leg: only the final normal request reached an engine.
    assert len(await cluster.records("prefill-0")) == 1


async def test_byte_flipped_bodies_never_5xx(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology()) as px:
        await _fire(px.base, _flipped())
        assert px.metric("disaggd_requests_total", status="500") == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/health", "/nowhere"])
async def test_websocket_upgrade_is_refused_not_500(cluster: Cluster, path: str) -> None:
    async with serve_proxy(cluster.topology()) as px:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.topo.proxy.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    status = int(head.split()[1])
    assert 400 <= status < 500, head


async def test_trickled_body_gets_408(cluster: Cluster) -> None:
    async with serve_proxy(cluster.topology(body_timeout=0.5)) as px:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.topo.proxy.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert px.proxy.inflight == 0
    assert int(head.split()[1]) == 408, head
