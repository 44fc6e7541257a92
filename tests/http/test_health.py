"""Health probes against a real HTTP server: 200, 503, a hang, a closed port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from disaggd.supervise import health
from tests.harness.common import free_port


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, object]]]:
    behaviour: dict[str, object] = {"status": 200, "hang": False}
    release = asyncio.Event()

    async def handle(_request: web.Request) -> web.Response:
        if behaviour["hang"]:
            await release.wait()
        return web.Response(status=int(behaviour["status"]))  # type: ignore[call-overload]

    app = web.Application()
    app.router.add_get("/health", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", behaviour
    finally:
        release.set()
        await runner.cleanup()


async def test_ok(server: tuple[str, dict[str, object]]) -> None:
    url, _ = server
    async with health.new_session() as session:
        result = await health.probe(session, url, 2.0)
    assert result.ok and result.status == 200 and result.error is None
    assert 0 <= result.elapsed < 2.0


async def test_503_is_not_ok(server: tuple[str, dict[str, object]]) -> None:
    url, behaviour = server
    behaviour["status"] = 503
    async with health.new_session() as session:
        result = await health.probe(session, url, 2.0)
    assert not result.ok and result.status == 503 and result.error == "status 503"


async def test_deadline(server: tuple[str, dict[str, object]]) -> None:
    url, behaviour = server
    behaviour["hang"] = True
    async with health.new_session() as session:
        result = await health.probe(session, url, 0.3)
    assert not result.ok and result.status is None and result.error == "timeout"
    assert 0.3 <= result.elapsed < 1.5


async def test_refused() -> None:
    async with health.new_session() as session:
        result = await health.probe(session, f"http://127.0.0.1:{free_port()}", 2.0)
    assert not result.ok and result.status is None
    assert result.error is not None and "refused" in result.error


async def test_injected_clock(server: tuple[str, dict[str, object]]) -> None:
    url, _ = server
    ticks = iter([10.0, 12.5])
    async with health.new_session() as session:
        result = await health.probe(session, url, 2.0, clock=lambda: next(ticks))
    assert result.elapsed == 2.5
