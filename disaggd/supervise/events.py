"""What the supervisor tells the rest of the daemon: snapshots and instance events.

One stream: every change of an instance's state or readiness is one
`InstanceEvent`, delivered in the event loop, in order, to the one listener
given as ``Supervisor(topo, on_event=...)``. The daemon turns it into routing
(``router.set_ready``), metrics, systemd ``STATUS=`` and ``READY=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from disaggd.supervise.states import ProcessState


@dataclass(frozen=True)
class InstanceStatus:
    """A snapshot of one instance.

    Attributes:
        name: instance name.
        role: "prefill" or "decode".
        state: its process state.
        spawned: False for a remote instance (``url``).
        url: base URL of its OpenAI server (from its spec).
        port: its HTTP port (None when a remote URL gives none).
        pid: the child's main pid while its process group exists, else None.
        ready: RUNNING and healthy: the router may send it requests.
        since: monotonic time (s) it entered `state`.
        uptime: seconds since it became RUNNING; None unless RUNNING.
        restarts: starts after the first one (automatic or requested).
        failures: failures in a row without a stable run (reset after ``stable_after`` s).
        last_exit: why it last stopped or failed, e.g. ``killed by SIGKILL``,
            ``unhealthy: 3 probes failed (timeout)``, ``port 8100 (HTTP) in use``.
        last_output: the last lines of the child's stdout and stderr.
        held: stopped by hand (`disaggd stop NAME`); stays STOPPED until started.
    """

    name: str
    role: str
    state: ProcessState
    spawned: bool
    url: str
    port: int | None
    pid: int | None
    ready: bool
    since: float
    uptime: float | None
    restarts: int
    failures: int
    last_exit: str | None
    last_output: tuple[str, ...]
    held: bool = False


@dataclass(frozen=True)
class InstanceEvent:
    """One change of an instance: its state, its readiness, or both at once.

    Attributes:
        status: the instance right after the change.
        previous: its state before the change (== ``status.state`` when only
            readiness changed).
        was_ready: its readiness before the change.
        reason: why (``GET /health 200``, ``stop requested``, ``killed by SIGKILL; ...``).
    """

    status: InstanceStatus
    previous: ProcessState
    was_ready: bool
    reason: str

    @property
    def name(self) -> str:
        """The instance's name."""
        return self.status.name

    @property
    def state(self) -> ProcessState:
        """Its state now."""
        return self.status.state

    @property
    def ready(self) -> bool:
        """Its readiness now (True only while RUNNING and healthy)."""
        return self.status.ready

    @property
    def state_changed(self) -> bool:
        """True when the state changed (``previous -> state``)."""
        return self.previous is not self.status.state

    @property
    def ready_changed(self) -> bool:
        """True when readiness changed (the router must be told)."""
        return self.was_ready != self.status.ready


#: The one listener channel: called in the event loop; must not block; errors are logged.
EventListener = Callable[[InstanceEvent], None]
