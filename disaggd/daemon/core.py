"""The composition root: one event loop owns the supervisor, the proxy and the control socket.

Start-up order: the topology was validated by the CLI → open the control
socket → start the children → serve the proxy (its /health answers 503 until
the topology is ready) → tell systemd READY=1 once every instance is RUNNING.

Signals only set events (gunicorn's arbiter, uvicorn's server):
SIGTERM/SIGINT → `request_stop` (drain, then teardown; a second one skips the
drain), SIGHUP → `request_reload` (the same path as `disaggd reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from disaggd._compat import ExceptionGroup, TaskGroup
from disaggd.daemon.control import ControlServer, ControlSocketInUse
from disaggd.observe import logs
from disaggd.observe.metrics import Metrics
from disaggd.observe.sdnotify import Notifier, watchdog_interval
from disaggd.proxy.router import Router
from disaggd.proxy.server import Proxy
from disaggd.supervise.states import ProcessState
from disaggd.supervise.supervisor import InstanceStatus, Supervisor, port_in_use
from disaggd.topology import ConfigError, Role, Topology, load_config
from disaggd.topology.plan import ReloadPlan, diff
from disaggd.topology.spec import InstanceSpec, build_spec, build_specs

log = logs.get_logger("disaggd.daemon")

#: Exit statuses (sysexits.h).
EX_OK = 0
EX_FAILURE = 1
EX_UNAVAILABLE = 69


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
    return asyncio.run(daemon.run())


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
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._proxy_stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._ready_sent = False
        # What the daemon started with: a reload cannot move the proxy's address nor
        # change logging (reload.diff says so).
        self._started_topo = topo
        self._running: dict[str, InstanceSpec] = build_specs(topo)

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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info(
            "daemon_starting",
            config=str(self.config_path),
            instances=len(self.topo.instances),
            connector=self.topo.kv_transfer.connector,
        )
        problem = _proxy_port_problem(self.topo)
        if problem:
            log.error("proxy_port_unavailable", reason=problem)
            return EX_FAILURE
        control = ControlServer(self.topo.daemon.control_socket, self._handle_control)
        try:
            await control.start()
        except ControlSocketInUse as exc:
            log.error("control_socket_in_use", error=str(exc))
            return EX_UNAVAILABLE
        except OSError as exc:
            log.error(
                "control_socket_failed", path=str(self.topo.daemon.control_socket), error=str(exc)
            )
            return EX_FAILURE
        status = EX_FAILURE
        try:
            status = await self._run_supervised()
        finally:
            await control.close()
            await self.proxy.aclose()
            self.notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("daemon_exited", status=status)
        return status

    async def _run_supervised(self) -> int:
        self._clean_storage()
        supervisor = Supervisor(
            self.topo,
            on_ready_change=self._on_ready_change,
            on_state_change=self._on_state_change,
        )
        async with supervisor:
            self.supervisor = supervisor
            background: list[asyncio.Task[Any]] = []
            try:
                async with TaskGroup() as tg:

                    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
                        background.append(tg.create_task(coro, name=name))

                    await supervisor.start_all()
                    bound = asyncio.Event()
                    proxy_task = tg.create_task(
                        self.proxy.serve(self._proxy_stop.wait, bound=bound), name="proxy"
                    )
                    await _first(bound.wait(), self._stop.wait(), proxy_task)
                    if bound.is_set():
                        log.info(
                            "proxy_listening",
                            url=self._proxy_url,
                        )
                    spawn(self._readiness_loop(), "readiness")
                    spawn(self._reload_loop(), "reload")
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

    # -- readiness, status, systemd --------------------------------------------------------

    def _on_ready_change(self, name: str, ready: bool) -> None:
        self.router.set_ready(name, ready)

    def _on_state_change(self, status: InstanceStatus) -> None:
        self.metrics.observe_instance(status.name, status.role, status.state.value)
        if status.state is ProcessState.FATAL:
            log.error(
                "instance_fatal",
                instance=status.name,
                role=status.role,
                last_exit=status.last_exit,
                last_output="\n".join(status.last_output[-20:]),
            )
        if not self._stopping:
            self.notifier.status(self._status_line())

    def _status_line(self) -> str:
        if self.supervisor is None:
            return "starting"
        statuses = self.supervisor.statuses()
        ready = sum(1 for s in statuses if s.ready)
        words = []
        for s in statuses:
            if s.state is ProcessState.STARTING:
                words.append(f"{s.name} loading model")
            elif s.state in (ProcessState.BACKOFF, ProcessState.EXITED):
                words.append(f"{s.name} restarting")
            elif s.state is ProcessState.FATAL:
                words.append(f"{s.name} FATAL")
        head = ", ".join(words)
        tail = f"{ready}/{len(statuses)} ready"
        return f"{head}, {tail}" if head else f"serving, {tail}"

    def _topology_ready(self) -> bool:
        """Every instance RUNNING, or every live one RUNNING with each role covered."""
        assert self.supervisor is not None
        statuses = self.supervisor.statuses()
        live = [s for s in statuses if s.state is not ProcessState.FATAL]
        if not all(s.ready for s in live):
            return False
        return all(self.router.ready_count(role) > 0 for role in Role)

    async def _readiness_loop(self) -> None:
        """READY=1 once the whole topology is up (edge-triggered by router changes)."""
        while not self._ready_sent:
            if self._topology_ready():
                self._ready_sent = True
                line = self._status_line()
                self.notifier.ready(status=line)
                log.info("daemon_ready", status=line)
                return
            await asyncio.sleep(0.1)

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
                if not self._stopping:
                    self.notifier.ready(status=self._status_line())

    async def _apply_reload(self, trigger: str) -> dict[str, Any]:
        assert self.supervisor is not None
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
        plan = diff(self._running, new, self.topo, self._started_topo)
        log.info("reload_plan", trigger=trigger, **plan.as_dict())
        notes = [f"{key} changed: restart the daemon to apply it" for key in plan.needs_restart]
        # Removed instances stop taking requests before the router forgets them.
        for name in plan.removed:
            self.router.set_draining(name, True)
        self.proxy.update_settings(new)
        # A restarted instance keeps its current upstream (still routable, drainable)
        # until its turn in the rolling restart, even when its address changes.
        self.router.update_topology(new, deferred=plan.restarted)
        self.supervisor.update_topology(new)
        drain = new.daemon.drain_timeout
        for name in plan.removed:
            await self._drain(name, drain)
            await self.supervisor.remove(name)
            del self._running[name]
        failed = await self._rolling_restart(new, plan, drain, notes)
        for name in plan.added:
            await self.supervisor.add(new.instance(name), new)
            self._running[name] = build_spec(new, new.instance(name))
        if plan.added:
            ok = await self.supervisor.wait_ready(plan.added, timeout=new.supervisor.start_timeout)
            if not ok:
                notes.append("an added instance did not become ready: see `disaggd status`")
        self.topo = new
        log.info("reload_applied", trigger=trigger, ok=not failed, notes=notes, **plan.as_dict())
        reply: dict[str, Any] = {"ok": not failed, "plan": plan.as_dict(), "notes": notes}
        if failed:
            reply["error"] = "; ".join(notes)
        return reply

    async def _rolling_restart(
        self, new: Topology, plan: ReloadPlan, drain: float, notes: list[str]
    ) -> bool:
        """Restart changed instances one at a time, each ready before the next goes down.

        Returns True when the rollout stopped because an instance did not come back.
        """
        assert self.supervisor is not None
        for idx, name in enumerate(plan.restarted):
            inst = new.instance(name)
            await self._drain(name, drain)
            self.router.commit(name)  # its new address, if it changed (not ready yet)
            ok = await self.supervisor.restart(name, inst, new, wait=True)
            self.router.set_draining(name, False)
            self._running[name] = build_spec(new, inst)
            if not ok:
                left = plan.restarted[idx + 1 :]
                notes.append(
                    f"{name} did not become ready with its new spec; "
                    + (
                        f"not restarted: {', '.join(left)} (still on the old spec)"
                        if left
                        else "no other instance was touched"
                    )
                )
                return True
        return False

    async def _drain(self, name: str, timeout: float) -> None:
        """Route nothing new to `name` and wait (bounded) for its in-flight requests."""
        self.router.set_draining(name, True)
        try:
            idle = await self.router.wait_idle(name, timeout)
        except KeyError:
            idle = True
        if not idle:
            log.warning("drain_timeout", instance=name, timeout=timeout)

    # -- control commands ------------------------------------------------------------------

    async def _handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        command = req["command"]
        if command == "status":
            return self._status_reply()
        if command == "reload":
            return await self.reload(trigger="control")
        if command == "restart":
            return await self._restart(str(req.get("name", "")))
        if command == "stop":
            self.request_stop()
            return {"ok": True, "message": "stopping: draining requests, then stopping instances"}
        if command == "ping":
            return {"ok": True, "message": "pong"}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _status_reply(self) -> dict[str, Any]:
        assert self.supervisor is not None
        inflight = {u.name: u.outstanding for u in self.router.upstreams()}
        rows = []
        for s in self.supervisor.statuses():
            rows.append(
                {
                    "name": s.name,
                    "role": s.role,
                    "state": s.state.value,
                    "ready": s.ready,
                    "pid": s.pid,
                    "port": s.port,
                    "url": s.url,
                    "spawned": s.spawned,
                    "uptime": s.uptime,
                    "restarts": s.restarts,
                    "failures": s.failures,
                    "inflight": inflight.get(s.name, 0),
                    "last_exit": s.last_exit,
                    "last_output": list(s.last_output[-10:]),
                }
            )
        return {
            "ok": True,
            "config": str(self.config_path),
            "stopping": self._stopping,
            "instances": rows,
            "proxy": {
                "url": self._proxy_url,
                "inflight": self.proxy.inflight,
                "healthy": all(self.router.ready_count(role) > 0 for role in Role),
            },
        }

    async def _restart(self, name: str) -> dict[str, Any]:
        assert self.supervisor is not None
        if self._stopping:
            return {"ok": False, "error": "the daemon is shutting down"}
        try:
            self.supervisor.status(name)
        except KeyError:
            known = ", ".join(s.name for s in self.supervisor.statuses())
            return {"ok": False, "error": f"no instance named {name!r} (known: {known})"}
        log.info("restart_requested", instance=name)
        await self._drain(name, self.topo.daemon.drain_timeout)
        try:
            ok = await self.supervisor.restart(name, wait=True)
        finally:
            self.router.set_draining(name, False)
        status = self.supervisor.status(name)
        if not ok:
            return {
                "ok": False,
                "error": f"{name} did not become ready: {status.last_exit or status.state.value}",
            }
        return {"ok": True, "message": f"{name} restarted (pid {status.pid})"}

    # -- housekeeping ----------------------------------------------------------------------

    def _clean_storage(self) -> None:
        """Empty a storage connector's folder when it lies in our state directory.

        ExampleConnector never deletes what it writes; a folder inside the state
        directory belongs to this daemon and starts empty (topology says so).
        """
        raw = self.topo.kv_transfer.extra_config.get("shared_storage_path")
        if not isinstance(raw, str):
            return
        from disaggd.topology.connectors import expand
        from disaggd.topology.spec import placeholders

        path = Path(expand(raw, placeholders(self.topo))).resolve()
        state = self.topo.daemon.state_dir.resolve()
        if state not in path.parents:
            return
        import shutil

        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            log.info("kv_storage_cleaned", path=str(path))
        path.mkdir(parents=True, exist_ok=True)


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


def _proxy_port_problem(topo: Topology) -> str | None:
    """Why the proxy could not bind its port, or None (checked before any child starts)."""
    host, port = topo.proxy.host, topo.proxy.port
    if port_in_use(host, port):
        return f"proxy port {host}:{port} is already in use by another process"
    return None
