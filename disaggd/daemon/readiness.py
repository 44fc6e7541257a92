"""From instance events to what the outside sees: routing, metrics, STATUS= and READY=1.

The supervisor emits one event per change of an instance (its state or its
readiness). `Readiness.observe` is the one handler: it tells the router, the
metrics and systemd (FATAL itself is logged once, by the supervisor), and
sends ``READY=1`` the first time the whole topology is
up — edge-triggered by the events, never polled.
"""

from __future__ import annotations

from collections.abc import Callable

from disaggd.daemon.endpoints import EndpointsFile
from disaggd.daemon.status import status_line
from disaggd.observe.logs import get_logger
from disaggd.observe.metrics import Metrics
from disaggd.observe.sdnotify import Notifier
from disaggd.proxy.router import Router
from disaggd.supervise.events import InstanceEvent, InstanceStatus
from disaggd.supervise.states import ProcessState
from disaggd.topology import Role

log = get_logger("disaggd.daemon")

class Readiness:
    """Turns instance events into routing, metrics and systemd notifications.

    Args:
        router: gets every readiness change at once (`Router.set_ready`).
        metrics: gets every state change (`Metrics.observe_instance`).
        notifier: systemd's notify socket (STATUS=, READY=1).
        statuses: the supervisor's current snapshot of every instance, for STATUS=.
        endpoints: llm-d's endpoints file (``[daemon].endpoints_file``), refreshed on
            every event, shutdown included.
    """

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        notifier: Notifier,
        statuses: Callable[[], list[InstanceStatus]],
        endpoints: EndpointsFile | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._notifier = notifier
        self._statuses = statuses
        self._endpoints = endpoints
        self.ready_sent = False
        #: Set while the daemon shuts down: STATUS= then says "stopping" (sdnotify).
        self.quiet = False

    def observe(self, event: InstanceEvent) -> None:
        """Handle one event of the supervisor (state, readiness or both changed)."""
        status = event.status
        if event.ready_changed:
            self._router.set_ready(status.name, status.ready)
        if event.state_changed:
            self._metrics.observe_instance(status.name, status.role, status.state.value)
        if self._endpoints is not None:
            self._endpoints.refresh()
        if self.quiet:
            return
        line = self.line()
        if not self.ready_sent and self.topology_ready():
            self.ready_sent = True
            self._notifier.ready(status=line)
            log.info("daemon_ready", status=line)
        else:
            self._notifier.status(line)

    def line(self) -> str:
        """systemd's STATUS= text for the current snapshot."""
        return status_line(self._statuses())

    def topology_ready(self) -> bool:
        """Every live (not FATAL, not stopped by hand) instance ready, and each role served."""
        live = [s for s in self._statuses() if s.state is not ProcessState.FATAL and not s.held]
        if not all(s.ready for s in live):
            return False
        return all(self._router.ready_count(role) > 0 for role in Role)
