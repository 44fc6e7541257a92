"""Signals only set events (gunicorn's arbiter, uvicorn's server).

SIGTERM/SIGINT → stop (drain, then teardown; a second one skips the drain);
SIGHUP → reload (the same path as `disaggd reload`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

_STOP = (signal.SIGTERM, signal.SIGINT)
_RELOAD = (signal.SIGHUP,)


def install(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None], on_reload: Callable[[], None]
) -> None:
    """Route the daemon's signals to `on_stop` and `on_reload` (both signal-safe setters)."""
    for sig in _STOP:
        loop.add_signal_handler(sig, on_stop)
    for sig in _RELOAD:
        loop.add_signal_handler(sig, on_reload)


def remove(loop: asyncio.AbstractEventLoop) -> None:
    """Undo `install`."""
    for sig in (*_STOP, *_RELOAD):
        loop.remove_signal_handler(sig)
