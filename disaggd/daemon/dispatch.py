"""Control commands: one function per verb of the control socket.

Each verb answers a JSON object, ``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}`` (the protocol is in `disaggd.daemon.control`). ``reload`` and
``shutdown`` take the same paths as SIGHUP and SIGTERM (gunicorn's ctl handlers).

Per-instance verbs (``start``, ``stop``, ``drain``, ``undrain``) take
``"names": [...]`` and answer one result per name, in order::

    {"ok": all ok, "results": [{"name": N, "ok": bool, "message": "..."}, ...]}

A no-op (start of a RUNNING instance, stop of a STOPPED one) is ok, with a
message that says so (supervisorctl's "already started"); an unknown name or a
change that cannot be made (start of a remote instance) is not. ``start``,
``stop`` and ``restart`` run one at a time with reloads (`Daemon.change_lock`):
one sent during a reload is carried out once the reload is done, so the
instance ends as the verb says whatever the reload did to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from disaggd.daemon.control import Streamed
from disaggd.daemon.status import annotate_rows
from disaggd.supervise.states import ProcessState

if TYPE_CHECKING:
    from disaggd.daemon.core import Daemon
    from disaggd.supervise.output import Follower

Reply = dict[str, Any]
Verb = Callable[["Daemon", Reply], Awaitable["Reply | Streamed"]]
#: One name's result of a per-instance verb: (ok, message).
Result = tuple[bool, str]

_S = ProcessState

#: `disaggd logs` without ``-n``.
DEFAULT_LOG_LINES = 10


async def _status(daemon: Daemon, req: Reply) -> Reply:
    reply = daemon.status_reply()
    assert daemon.rollout is not None
    annotate_rows(
        reply["instances"], daemon.rollout.hand_drained, daemon.metrics.kv_by_decode.counts()
    )
    names = _names(req)
    if names:
        unknown = [n for n in names if n not in {r["name"] for r in reply["instances"]}]
        if unknown:
            return {"ok": False, "error": _unknown(daemon, unknown)}
        reply["instances"] = [r for r in reply["instances"] if r["name"] in names]
    return reply


async def _reload(daemon: Daemon, _req: Reply) -> Reply:
    return await daemon.reload(trigger="control")


async def _restart(daemon: Daemon, req: Reply) -> Reply:
    async with daemon.change_lock:
        return await daemon.restart(str(req.get("name", "")))


async def _shutdown(daemon: Daemon, _req: Reply) -> Reply:
    daemon.request_stop()
    return {"ok": True, "message": "stopping: draining requests, then stopping instances"}


async def _stop(daemon: Daemon, req: Reply) -> Reply:
    """``stop`` with names stops those instances; without, the daemon (as before 0.x)."""
    if not _names(req):
        return await _shutdown(daemon, req)
    return await _each(daemon, req, _stop_one, locked=True)


async def _start(daemon: Daemon, req: Reply) -> Reply:
    return await _each(daemon, req, _start_one, locked=True)


async def _drain(daemon: Daemon, req: Reply) -> Reply:
    return await _each(daemon, req, _drain_one, locked=False)


async def _undrain(daemon: Daemon, req: Reply) -> Reply:
    return await _each(daemon, req, _undrain_one, locked=False)


async def _logs(daemon: Daemon, req: Reply) -> Reply | Streamed:
    """``{"command": "logs", "name": N, "lines": n, "follow": bool}``.

    Answers ``{"ok": true, "name": N, "lines": [{"seq", "time", "stream", "line"}, ...]}``;
    with ``follow``, then one object per new line (same shape), ``{"dropped": k}``
    when k lines were lost because the reader was too slow, and ``{"end": REASON}``.
    """
    assert daemon.supervisor is not None
    name = str(req.get("name", ""))
    try:
        ring = daemon.supervisor.output(name)
    except KeyError:
        return {"ok": False, "error": _unknown(daemon, [name])}
    lines = req.get("lines", DEFAULT_LOG_LINES)
    count = lines if isinstance(lines, int) and lines >= 0 else DEFAULT_LOG_LINES
    # Backlog and follower are taken in the same loop step: no line falls between them.
    first = {"ok": True, "name": name, "lines": [x.as_dict() for x in ring.tail(count)]}
    if not req.get("follow"):
        return first
    follower = ring.follow()

    async def rest() -> AsyncIterator[Reply]:
        try:
            async for item in _followed(follower):
                yield item
        finally:
            ring.unfollow(follower)

    return Streamed(first, rest())


async def _followed(follower: Follower) -> AsyncIterator[Reply]:
    while True:
        batch = await follower.next()
        if batch.dropped:
            yield {"dropped": batch.dropped}
        for line in batch.lines:
            yield line.as_dict()
        if batch.ended:
            yield {"end": batch.ended}
            return


async def _ping(_daemon: Daemon, _req: Reply) -> Reply:
    return {"ok": True, "message": "pong"}


#: Every verb the control socket accepts.
VERBS: dict[str, Verb] = {
    "status": _status,
    "reload": _reload,
    "restart": _restart,
    "start": _start,
    "stop": _stop,
    "drain": _drain,
    "undrain": _undrain,
    "logs": _logs,
    "shutdown": _shutdown,
    "ping": _ping,
}


async def dispatch(daemon: Daemon, req: Reply) -> Reply | Streamed:
    """Run the verb named by ``req["command"]``; an unknown one is an error reply."""
    command = req["command"]
    verb = VERBS.get(command)
    if verb is None:
        return {"ok": False, "error": f"unknown command {command!r}"}
    return await verb(daemon, req)


# -- per-instance verbs ------------------------------------------------------------------------

One = Callable[["Daemon", str], Awaitable[Result]]


def _names(req: Reply) -> list[str]:
    names = req.get("names") or []
    return [str(n) for n in names] if isinstance(names, list) else [str(names)]


def _unknown(daemon: Daemon, names: list[str]) -> str:
    assert daemon.supervisor is not None
    known = ", ".join(s.name for s in daemon.supervisor.statuses())
    which = ", ".join(repr(n) for n in names)
    return f"no instance named {which} (known: {known})"


async def _each(daemon: Daemon, req: Reply, one: One, *, locked: bool) -> Reply:
    """Run `one` for every name in order; unknown names fail without touching the rest."""
    assert daemon.supervisor is not None
    names = _names(req)
    if not names:
        return {"ok": False, "error": "name at least one instance"}
    if daemon.stopping:
        return {"ok": False, "error": "the daemon is shutting down"}
    known = {s.name for s in daemon.supervisor.statuses()}
    results: list[Reply] = []
    for name in names:
        if name not in known:
            ok, message = False, f"ERROR (no such instance; known: {', '.join(sorted(known))})"
        elif locked:
            async with daemon.change_lock:
                ok, message = await _guarded(daemon, name, one)
        else:
            ok, message = await _guarded(daemon, name, one)
        results.append({"name": name, "ok": ok, "message": message})
    return {"ok": all(r["ok"] for r in results), "results": results}


async def _guarded(daemon: Daemon, name: str, one: One) -> Result:
    """`one`, except for an instance that a reload removed or a shutdown that began meanwhile."""
    assert daemon.supervisor is not None
    if daemon.stopping:
        return False, "ERROR (the daemon is shutting down)"
    try:
        daemon.supervisor.status(name)
    except KeyError:
        return False, "ERROR (no such instance any more: a reload removed it)"
    try:
        return await one(daemon, name)
    except RuntimeError:  # the supervisor refuses starts once the daemon is stopping
        return False, "ERROR (the daemon is shutting down)"


async def _stop_one(daemon: Daemon, name: str) -> Result:
    assert daemon.supervisor is not None and daemon.rollout is not None
    st = daemon.supervisor.status(name)
    if not st.spawned:
        return False, f"ERROR (remote instance {st.url}: not spawned here; `disaggd drain {name}`)"
    if st.state in (_S.STOPPED, _S.FATAL) and st.pid is None:
        await daemon.supervisor.stop(name)  # held from now on, even when FATAL
        return True, f"already stopped ({st.state.value})"
    idle, gone = await daemon.rollout.stop(name, daemon.topo.daemon.drain_timeout)
    after = daemon.supervisor.status(name)
    if not gone:
        return False, f"ERROR (its process group did not exit; {after.state.value})"
    drained = "drained" if idle else "drain timed out: requests in flight were cut short"
    return True, f"stopped ({drained}; stays STOPPED until `disaggd start {name}`)"


async def _start_one(daemon: Daemon, name: str) -> Result:
    assert daemon.supervisor is not None and daemon.rollout is not None
    st = daemon.supervisor.status(name)
    if not st.spawned:
        return False, f"ERROR (remote instance {st.url}: not spawned here, cannot be started)"
    if st.state not in (_S.STOPPED, _S.FATAL):
        if st.held:  # a stop is still under way
            return False, f"ERROR (being stopped: {st.state.value}; try again)"
        return True, f"already started ({st.state.value})"
    was = st.state.value
    ok = await daemon.rollout.start(name)
    after = daemon.supervisor.status(name)
    if not ok:
        why = after.last_exit or after.state.value
        return False, f"ERROR (did not become ready: {after.state.value}, {why})"
    drained = "; drained by hand: `disaggd undrain` routes it" if name in _hand(daemon) else ""
    return True, f"started (was {was}; pid {after.pid}, ready){drained}"


async def _drain_one(daemon: Daemon, name: str) -> Result:
    assert daemon.rollout is not None
    if name in _hand(daemon):
        return True, "already drained"
    daemon.rollout.set_hand_drained(name, True)
    # Let the requests it holds finish (bounded), so that the reply means "safe now".
    await daemon.router.wait_idle(name, daemon.topo.daemon.drain_timeout)
    up = daemon.router.get(name)
    left = up.outstanding if up is not None else 0
    message = f"drained (out of rotation; {left} request(s) still in flight)"
    role = up.role if up is not None else None
    if role is not None and daemon.router.ready_count(role) == 0:
        message += f"; WARNING: {_none_routable(daemon, role.value)} until `disaggd undrain {name}`"
    return True, message


def _none_routable(daemon: Daemon, role: str) -> str:
    """What the proxy does once no instance of `role` can be picked (README's contract)."""
    if role == "prefill" and daemon.topo.proxy.prefill_fallback == "decode":
        return (
            "no prefill instance is routable now: requests are served decode-only "
            "(prefill_fallback = \"decode\")"
        )
    return (
        f"no {role} instance is routable now: the proxy answers 503 "
        f"'no {role} instance is ready'"
    )


async def _undrain_one(daemon: Daemon, name: str) -> Result:
    assert daemon.rollout is not None and daemon.supervisor is not None
    if name not in _hand(daemon):
        return True, "not drained"
    daemon.rollout.set_hand_drained(name, False)
    st = daemon.supervisor.status(name)
    if not st.ready:
        return True, f"undrained (routed once ready; now {st.state.value})"
    return True, "undrained (routed again)"


def _hand(daemon: Daemon) -> set[str]:
    assert daemon.rollout is not None
    return daemon.rollout.hand_drained
