"""The proxy's HTTP clients toward the instances: one pooled aiohttp session per base URL."""

from __future__ import annotations

import aiohttp
from yarl import URL

from disaggd.proxy.upstream import Upstream


def client_timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    """A leg's timeout: `total` seconds for the whole leg (at least 1 ms), `connect` to connect."""
    return aiohttp.ClientTimeout(total=max(total, 0.001), connect=connect, sock_connect=connect)


def done_with(resp: aiohttp.ClientResponse) -> None:
    """Give a connection back to the pool, or close it when its response was not read
    to the end: closing is how an upstream learns that its request was abandoned."""
    if resp.content.is_eof():
        resp.release()
    else:
        resp.close()


class Upstreams:
    """Pooled clients, one per instance base URL, created on first use.

    Args:
        keepalive: seconds an idle pooled connection is kept (``upstream_keepalive``).
    """

    def __init__(self, keepalive: float) -> None:
        self._keepalive = keepalive
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._retired: list[aiohttp.ClientSession] = []
        self._urls: dict[tuple[str, str], URL] = {}

    def set_keepalive(self, keepalive: float) -> None:
        """Use `keepalive` for new clients; the current ones are retired (closed by `aclose`),
        so that connections in use are never dropped."""
        if keepalive != self._keepalive:
            self._keepalive = keepalive
            self._retired.extend(self._sessions.values())
            self._sessions = {}

    def session(self, up: Upstream) -> aiohttp.ClientSession:
        """The pooled client of `up`."""
        session = self._sessions.get(up.base_url)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                # No cap: the engines queue requests themselves, and a pool limit here
                # would add a second, invisible queue.
                limit=0,
                # Below vLLM's (uvicorn's) 5 s keep-alive: a pooled connection is never
                # reused at the moment the server closes it.
                keepalive_timeout=self._keepalive,
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

    def url(self, up: Upstream, path: str) -> URL:
        """``base_url + path`` as a parsed URL (cached: parsing costs per request)."""
        key = (up.base_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(up.base_url + path, encoded=True)
        return url

    async def aclose(self) -> None:
        """Close every client (and their idle connections)."""
        sessions = [*self._sessions.values(), *self._retired]
        self._sessions = {}
        self._retired = []
        for session in sessions:
            await session.close()
