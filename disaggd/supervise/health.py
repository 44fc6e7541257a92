"""Readiness and liveness probes of one instance (no routing decisions here).

vLLM's ``GET /health`` answers 200 while the engine is alive and 503 when it is
dead or draining; the port is not even open until the model is loaded. The
routes that answer with a dead engine (``/v1/models``, ``/version``) are not
health checks. A stopped or wedged process can still accept the TCP
connection, so every probe has a deadline: a probe that does not finish in
time is a failed probe.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

#: The path probed; 200 means healthy.
HEALTH_PATH = "/health"


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe.

    Attributes:
        ok: the instance answered 200 in time.
        status: the HTTP status, or None when no response came.
        error: why it is not ok ("status 503", "timeout", "connection refused", ...),
            None when ok.
        elapsed: seconds the probe took.
    """

    ok: bool
    status: int | None
    error: str | None
    elapsed: float


def new_session() -> aiohttp.ClientSession:
    """A session suited to probes: no pooled connections, no proxy from the environment.

    Pooled keep-alive connections would turn the first probe after a restart
    into a "server disconnected" failure; one connection per probe is cheap.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        trust_env=False,
    )


async def _get_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def probe(
    session: aiohttp.ClientSession,
    base_url: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> ProbeResult:
    """``GET {base_url}/health`` with a deadline of `timeout` seconds.

    Never raises (except on cancellation): a 503, a refused connection or a
    missed deadline is a result with ``ok=False`` and the reason in ``error``.
    """
    start = clock()
    status: int | None = None
    error: str | None
    try:
        status = await asyncio.wait_for(_get_status(session, base_url + HEALTH_PATH), timeout)
    except asyncio.TimeoutError:
        error = "timeout"
    except aiohttp.ClientConnectorError as exc:
        code = exc.os_error.errno
        error = os.strerror(code).lower() if code else str(exc.os_error)
    except aiohttp.ServerDisconnectedError:
        error = "server disconnected"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        error = None if status == 200 else f"status {status}"
    return ProbeResult(ok=error is None, status=status, error=error, elapsed=clock() - start)
