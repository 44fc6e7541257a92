"""Control commands: one function per verb of the control socket.

Each verb answers a JSON object, ``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}`` (the protocol is in `disaggd.daemon.control`). ``reload`` and
``stop`` take the same paths as SIGHUP and SIGTERM (gunicorn's ctl handlers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from disaggd.daemon.core import Daemon

Reply = dict[str, Any]
Verb = Callable[["Daemon", Reply], Awaitable[Reply]]


async def _status(daemon: Daemon, _req: Reply) -> Reply:
    return daemon.status_reply()


async def _reload(daemon: Daemon, _req: Reply) -> Reply:
    return await daemon.reload(trigger="control")


async def _restart(daemon: Daemon, req: Reply) -> Reply:
    return await daemon.restart(str(req.get("name", "")))


async def _stop(daemon: Daemon, _req: Reply) -> Reply:
    daemon.request_stop()
    return {"ok": True, "message": "stopping: draining requests, then stopping instances"}


async def _ping(_daemon: Daemon, _req: Reply) -> Reply:
    return {"ok": True, "message": "pong"}


#: Every verb the control socket accepts.
VERBS: dict[str, Verb] = {
    "status": _status,
    "reload": _reload,
    "restart": _restart,
    "stop": _stop,
    "ping": _ping,
}


async def dispatch(daemon: Daemon, req: Reply) -> Reply:
    """Run the verb named by ``req["command"]``; an unknown one is an error reply."""
    command = req["command"]
    verb = VERBS.get(command)
    if verb is None:
        return {"ok": False, "error": f"unknown command {command!r}"}
    return await verb(daemon, req)
