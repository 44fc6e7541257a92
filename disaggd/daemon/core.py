"""The composition root: one event loop owns the supervisor, the proxy and the control socket.

Start-up order: the topology was validated by the CLI → open the control
socket → start the children → serve the proxy (its /health answers 503 until
the topology is ready) → tell systemd READY=1 once every instance is RUNNING.

Signals only set events (`disaggd.daemon.signals`). The rooms it composes:
`readiness` (instance events → routing, metrics, STATUS=, READY=1), `rollout`
(a reload plan carried out), `dispatch` (control verbs), `status` (what
`disaggd status` and systemd show).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from disaggd._compat import ExceptionGroup, TaskGroup
from disaggd.daemon import signals
from disaggd.daemon.control import ControlServer, ControlSocketInUse, Streamed
from disaggd.daemon.dispatch import dispatch
from disaggd.daemon.endpoints import EndpointsFile
from disaggd.daemon.readiness import Readiness
from disaggd.daemon.rollout import Outcome, Rollout
from disaggd.daemon.status import status_rows
from disaggd.observe import logs
from disaggd.observe.looplag import LoopLag
from disaggd.observe.metrics import Metrics
from disaggd.observe.sdnotify import Notifier, watchdog_interval
from disaggd.proxy.app import Proxy, bind_listener
from disaggd.proxy.router import Router
from disaggd.supervise.events import InstanceEvent
from disaggd.supervise.supervisor import Supervisor
from disaggd.topology import ConfigError, Role, Topology, load_config
from disaggd.topology.plan import diff
from disaggd.topology.spec import build_specs

log = logs.get_logger("disaggd.daemon")

#: Exit statuses (sysexits.h).
EX_OK = 0
EX_FAILURE = 1
EX_UNAVAILABLE = 69
EX_CONFIG = 78


def run_daemon(
    config_path: Path,
    topo: Topology,
    *,
    log_format: str | None = None,
    log_level: str | None = None,
) -> int:
    """Run the daemon in the foreground until stopped; returns the exit status.

    0 after an orderly shutdown; 1 when something failed to stop or could not
    start (proxy port in use, control socket owned by another daemon).
    """
    logs.configure(log_format or topo.daemon.log_format, log_level or topo.daemon.log_level)
    daemon = Daemon(config_path, topo)
    if _uvloop_wanted():
        import uvloop

        return uvloop.run(daemon.run())
    return asyncio.run(daemon.run())


def _uvloop_wanted() -> bool:
    """uvloop (libuv) unless ``DISAGGD_LOOP=asyncio`` or it is not installed.

    Its transports and scheduling cost the proxy about a tenth less CPU per
    request and per streamed chunk (issue 11, ``bench/results/profile-*.txt``).
    Supervision does not care which loop runs it: a child's exit is seen through
    a pidfd, not asyncio's child watcher (`disaggd.supervise.osapi`).
    """
    if os.environ.get("DISAGGD_LOOP", "uvloop") == "asyncio":
        return False
    return importlib.util.find_spec("uvloop") is not None


class Daemon:
    """One disaggd process: supervisor + proxy + control socket in one loop."""

    def __init__(self, config_path: Path, topo: Topology) -> None:
        self.config_path = Path(config_path).resolve()
        self.topo = topo
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.router = Router(topo)
        self.proxy = Proxy(topo, self.router, self.metrics)
        self.supervisor: Supervisor | None = None
        self.rollout: Rollout | None = None
        self.readiness: Readiness | None = None
        self.endpoints: EndpointsFile | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._proxy_stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        # What the daemon started with: a reload cannot move the proxy's address nor
        # change logging (plan.diff says so).
        self._started_topo = topo

    @property
    def change_lock(self) -> asyncio.Lock:
        """Held by a reload and by `start`/`stop`/`restart NAME`: one change at a time."""
        return self._reload_lock

    @property
    def stopping(self) -> bool:
        """True once the daemon shuts down."""
        return self._stopping

    @property
    def _proxy_url(self) -> str:
        proxy = self._started_topo.proxy
        return f"http://{proxy.host}:{proxy.port}"

    # -- signal-safe entry points: they only set events ------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT/`disaggd stop`: drain and stop; a second call skips the drain."""
        if self._stop.is_set():
            if not self._force.is_set():
                log.warning("shutdown_forced", reason="second stop request: skipping the drain")
            self._force.set()
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: reload the topology file (same path as `disaggd reload`)."""
        self._reload_wanted.set()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; returns the exit status."""
        loop = asyncio.get_running_loop()
        signals.install(loop, self.request_stop, self.request_reload)
        log.info(
            "daemon_starting",
            config=str(self.config_path),
            instances=len(self.topo.instances),
            connector=self.topo.kv_transfer.connector,
        )
        missing = missing_api_key(self.topo)
        if missing:
            # Every request would be a 401 while /health says 200: refuse to start instead
            # (78: systemd's RestartPreventExitStatus, like any other topology error).
            log.error("api_key_missing", reason=missing)
            return EX_CONFIG
        # The proxy's socket is bound before any child starts: a port in use fails at once,
        # and nothing can take it between a check and the bind.
        try:
            listener = bind_listener(self.topo.proxy.host, self.topo.proxy.port)
        except OSError as exc:
            log.error("proxy_port_unavailable", reason=str(exc))
            return EX_FAILURE
        control = ControlServer(self.topo.daemon.control_socket, self._handle_control)
        try:
            await control.start()
        except (ControlSocketInUse, OSError) as exc:
            listener.close()
            return _control_failed(exc, self.topo.daemon.control_socket)
        status = EX_FAILURE
        try:
            status = await self._run_supervised(listener)
        finally:
            await control.close()
            await self.proxy.aclose()
            self.notifier.close()
            signals.remove(loop)
        log.info("daemon_exited", status=status)
        return status

    async def _run_supervised(self, listener: socket.socket) -> int:
        clean_storage(self.topo)
        supervisor = Supervisor(self.topo, on_event=self._on_event)
        # The supervisor's topology: a reload's new one from the start of its rollout.
        self.endpoints = EndpointsFile(lambda: supervisor.topology, supervisor.statuses)
        self.readiness = Readiness(
            self.router, self.metrics, self.notifier, supervisor.statuses, self.endpoints
        )
        async with supervisor:
            self.supervisor = supervisor
            self.rollout = Rollout(supervisor, self.router, build_specs(self.topo))
            background: list[asyncio.Task[Any]] = []
            try:
                async with TaskGroup() as tg:

                    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
                        background.append(tg.create_task(coro, name=name))

                    await supervisor.start_all()
                    bound = asyncio.Event()
                    proxy_task = tg.create_task(
                        self.proxy.serve(self._proxy_stop.wait, sock=listener, bound=bound),
                        name="proxy",
                    )
                    await _first(bound.wait(), self._stop.wait(), proxy_task)
                    spawn(self._reload_loop(), "reload")
                    spawn(LoopLag(self.metrics).run(), "loop-lag")
                    interval = watchdog_interval()
                    if interval:
                        spawn(self._watchdog_loop(interval), "watchdog")
                    if self.topo.daemon.watch:
                        spawn(self._watch_loop(), "watch")
                    await _first(self._stop.wait(), proxy_task)
                    if proxy_task.done() and not self._stop.is_set():
                        log.error("proxy_stopped_unexpectedly")
                        self._force.set()
                    ok = await self._shutdown()
                    for task in background:
                        task.cancel()
            except ExceptionGroup as group:
                for exc in group.exceptions:
                    log.error(
                        "daemon_task_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc
                    )
                await supervisor.shutdown()
                return EX_FAILURE
        return EX_OK if ok else EX_FAILURE

    async def _shutdown(self) -> bool:
        """Drain the proxy, then stop every child; True when nothing was left behind."""
        self._stopping = True
        if self.readiness is not None:
            self.readiness.quiet = True
        self.notifier.stopping()
        self.proxy.stop_accepting()
        inflight = self.proxy.inflight
        log.info(
            "shutdown_started", inflight=inflight, drain_timeout=self.topo.daemon.drain_timeout
        )
        if inflight and not self._force.is_set():
            drained = await _first(
                self.proxy.wait_drained(self.topo.daemon.drain_timeout), self._force.wait()
            )
            log.info("drain_finished", drained=bool(drained), left=self.proxy.inflight)
        self._proxy_stop.set()
        assert self.supervisor is not None
        ok = await self.supervisor.shutdown()
        if not ok:
            log.error("shutdown_incomplete", reason="some child processes could not be stopped")
        return ok

    # -- instance events ----------------------------------------------------------------------

    def _on_event(self, event: InstanceEvent) -> None:
        assert self.readiness is not None
        self.readiness.observe(event)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- reload -----------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload(trigger="SIGHUP")
            except Exception:  # a failed reload must not take the daemon down with it
                log.exception("reload_failed", trigger="SIGHUP")

    async def _watch_loop(self) -> None:
        from watchfiles import awatch

        target = self.config_path
        async for _changes in awatch(
            target.parent,
            watch_filter=lambda _change, path: Path(path) == target,
            debounce=500,
            step=100,
        ):
            log.info("config_changed", path=str(target))
            self._reload_wanted.set()

    async def reload(self, trigger: str = "control") -> dict[str, Any]:
        """Re-read the topology file and apply what changed.

        Returns the control reply: ``{"ok": bool, "plan": {...}, "notes": [...]}``
        or ``{"ok": false, "error": ...}`` when the file is invalid (then nothing
        changes).
        """
        if self._stopping:
            return {"ok": False, "error": "the daemon is shutting down"}
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                return await self._apply_reload(trigger)
            except RuntimeError:
                if not self._stopping:
                    raise
                # A stop came mid-reload: the supervisor refuses new starts; shutdown wins.
                log.warning("reload_abandoned", trigger=trigger, reason="the daemon is stopping")
                return {"ok": False, "error": "the daemon is shutting down: reload abandoned"}
            finally:
                if not self._stopping and self.readiness is not None:
                    self.notifier.ready(status=self.readiness.line())

    async def _apply_reload(self, trigger: str) -> dict[str, Any]:
        assert self.rollout is not None
        log.info("reload_started", trigger=trigger, config=str(self.config_path))
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            problems = [p.render(exc.path) for p in exc.problems]
            log.error("reload_rejected", trigger=trigger, problems=problems)
            return {
                "ok": False,
                "error": "invalid topology, nothing changed:\n" + "\n".join(problems),
            }
        missing = missing_api_key(new)
        if missing:
            log.error("reload_rejected", trigger=trigger, problems=[missing])
            return {"ok": False, "error": f"{missing}; nothing changed"}
        plan = diff(self.rollout.running, new, self.topo, self._started_topo)
        log.info("reload_plan", trigger=trigger, **plan.as_dict())
        outcome = Outcome(
            notes=[f"{key} changed: restart the daemon to apply it" for key in plan.needs_restart]
        )
        self.proxy.update_settings(new)
        await self.rollout.apply(plan, new, outcome)
        self.topo = new
        if self.endpoints is not None:
            self.endpoints.refresh()  # a changed [daemon].endpoints_file applies now
        # A rollout that stopped at an instance that did not come back is a warning:
        # `journalctl -p warning` must show it.
        (log.warning if outcome.failed else log.info)(
            "reload_applied",
            trigger=trigger,
            ok=not outcome.failed,
            notes=outcome.notes,
            **plan.as_dict(),
        )
        reply: dict[str, Any] = {
            "ok": not outcome.failed,
            "plan": plan.as_dict(),
            "notes": outcome.notes,
        }
        if outcome.failed:
            reply["error"] = "; ".join(outcome.notes)
        return reply

    # -- control commands ------------------------------------------------------------------

    async def _handle_control(self, req: dict[str, Any]) -> dict[str, Any] | Streamed:
        return await dispatch(self, req)

    def status_reply(self) -> dict[str, Any]:
        """The ``status`` control reply: every instance, and the proxy."""
        assert self.supervisor is not None
        ups = self.router.upstreams()
        inflight = {u.name: u.outstanding for u in ups}
        routing = {
            u.name: {
                "breaker": u.breaker.state.value,
                "breaker_reason": u.breaker.reason or None,
                "prefix_blocks": self.router.cache.blocks(u.name),
            }
            for u in ups
        }
        return {
            "ok": True,
            "config": str(self.config_path),
            "stopping": self._stopping,
            "instances": status_rows(self.supervisor.statuses(), inflight, routing),
            "proxy": {
                "url": self._proxy_url,
                "inflight": self.proxy.inflight,
                "healthy": all(self.router.ready_count(role) > 0 for role in Role),
            },
        }

    async def restart(self, name: str) -> dict[str, Any]:
        """``disaggd restart NAME``: drain it, restart it (clears FATAL), undrain it."""
        assert self.supervisor is not None and self.rollout is not None
        if self._stopping:
            return {"ok": False, "error": "the daemon is shutting down"}
        try:
            self.supervisor.status(name)
        except KeyError:
            known = ", ".join(s.name for s in self.supervisor.statuses())
            return {"ok": False, "error": f"no instance named {name!r} (known: {known})"}
        return await self.rollout.restart(name, self.topo.daemon.drain_timeout)

def clean_storage(topo: Topology) -> None:
    """Empty a storage connector's folder when it lies in our state directory.

    ExampleConnector never deletes what it writes; a folder inside the state
    directory belongs to this daemon and starts empty (topology says so).
    """
    raw = topo.kv_transfer.extra_config.get("shared_storage_path")
    if not isinstance(raw, str):
        return
    from disaggd.topology.connectors import expand
    from disaggd.topology.spec import placeholders

    path = Path(expand(raw, placeholders(topo))).resolve()
    state = topo.daemon.state_dir.resolve()
    if state not in path.parents:
        return
    import shutil

    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        log.info("kv_storage_cleaned", path=str(path))
    path.mkdir(parents=True, exist_ok=True)


def missing_api_key(topo: Topology) -> str | None:
    """Why the proxy could serve no one: ``[proxy].api_key_env`` names an unset variable.

    The daemon's environment is read at start (systemd's ``EnvironmentFile=``); a reload
    cannot bring a new variable in.
    """
    env = topo.proxy.api_key_env
    if env is None or os.environ.get(env):
        return None
    return (
        f"proxy.api_key_env names {env}, which is not set (or empty) in the daemon's "
        "environment: every request would be refused"
    )


async def _first(*aws: Any) -> Any:
    """Wait for the first of several awaitables; cancel the rest; return its result."""
    tasks = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    owned = [t for t, a in zip(tasks, aws, strict=True) if t is not a]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in owned:
            if not task.done():
                task.cancel()
        for task in owned:
            with contextlib.suppress(BaseException):
                await task
    first = next(iter(done))
    if first.cancelled():
        return None
    exc = first.exception()
    return None if exc is not None else first.result()


def _control_failed(exc: OSError | ControlSocketInUse, path: Path) -> int:
    """Log why the control socket could not be opened; the exit status that says so."""
    if isinstance(exc, ControlSocketInUse):
        log.error("control_socket_in_use", error=str(exc))
        return EX_UNAVAILABLE
    log.error("control_socket_failed", path=str(path), error=str(exc))
    return EX_FAILURE
