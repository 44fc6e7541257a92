"""The control protocol's streaming reply: lines until the client closes or the server does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from disaggd.daemon.control import ControlServer, Streamed, request, stream


def test_a_stream_ends_when_the_client_closes(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    closed = asyncio.Event()
    produced: list[int] = []

    async def handler(req: dict[str, Any]) -> dict[str, Any] | Streamed:
        if req["command"] != "follow":
            return {"ok": True, "plain": True}

        async def rest() -> AsyncIterator[dict[str, Any]]:
            try:
                for i in range(1_000_000):
                    produced.append(i)
                    yield {"n": i}
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        return Streamed({"ok": True}, rest())

    async def main() -> None:
        server = ControlServer(path, handler)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"command": "follow"}\n')
            assert json.loads(await reader.readline()) == {"ok": True}
            assert json.loads(await reader.readline()) == {"n": 0}
            writer.close()
            await asyncio.wait_for(closed.wait(), 2)  # the producer was closed: unfollowed
            n = len(produced)
            await asyncio.sleep(0.05)
            assert len(produced) == n
            # the blocking client, from a thread: plain replies still work
            reply = await asyncio.to_thread(request, path, {"command": "x"})
            assert reply == {"ok": True, "plain": True}
        finally:
            await server.close()

    asyncio.run(main())


def test_closing_the_server_ends_open_streams(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"

    async def handler(_req: dict[str, Any]) -> dict[str, Any] | Streamed:
        async def rest() -> AsyncIterator[dict[str, Any]]:
            yield {"n": 1}
            await asyncio.Event().wait()  # nothing more, ever
            yield {"n": 2}

        return Streamed({"ok": True}, rest())

    async def main() -> None:
        server = ControlServer(path, handler)
        await server.start()

        def client() -> list[dict[str, Any]]:
            return list(stream(path, {"command": "follow"}))

        got = asyncio.ensure_future(asyncio.to_thread(client))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.close(), 5)
        assert await asyncio.wait_for(got, 5) == [
            {"ok": True},
            {"n": 1},
            {"end": "the daemon is stopping"},
        ]

    asyncio.run(main())
