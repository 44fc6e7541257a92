"""One supervised instance's record, and the one method that changes it.

`Instance.change` is supervisord's ``change_state``: the only place where an
instance's state or readiness is written. It checks the edge against
`disaggd.supervise.states.TRANSITIONS`, keeps readiness True only while
RUNNING, logs the change once (a FATAL one at error level, with the child's
last output), and emits one `InstanceEvent`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from disaggd.observe.logs import get_logger
from disaggd.supervise.events import InstanceEvent, InstanceStatus
from disaggd.supervise.output import OutputRing
from disaggd.supervise.states import ProcessState, check_transition
from disaggd.topology.spec import InstanceSpec

#: Output lines attached to crash and FATAL log events.
REPORT_LINES = 20

_S = ProcessState


class Instance:
    """Mutable state of one supervised instance (owned by the supervisor and its life task).

    Args:
        spec: what to run (or probe).
        output_lines: how many lines of child output to keep.
        now: monotonic seconds; the time it entered STOPPED.
        emit: where `change` sends its `InstanceEvent`.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        output_lines: int,
        now: float,
        emit: Callable[[InstanceEvent], None],
    ) -> None:
        self.spec = spec
        self.state = _S.STOPPED
        self.ready = False
        self.since = now
        self.running_since: float | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.failures = 0
        self.last_exit: str | None = None
        self.output = OutputRing(output_lines)
        #: Stopped by hand (`disaggd stop NAME`): nothing starts it again but `start`,
        #: `restart` or a reload that changes its spec.
        self.held = False
        self.runner: asyncio.Task[None] | None = None
        self.stop_requested: asyncio.Future[None] | None = None
        self.stop_deadline: float | None = None
        self.group_gone = True
        self.lock = asyncio.Lock()
        self.log: Any = get_logger(__name__, instance=spec.name, role=spec.role.value)
        self._emit = emit

    @property
    def name(self) -> str:
        """The instance's name."""
        return self.spec.name

    def stopping(self) -> bool:
        """True once a stop has been asked for this life."""
        return self.stop_requested is not None and self.stop_requested.done()

    def idle(self) -> bool:
        """True when no life task runs for it (never started, stopped, FATAL)."""
        return self.runner is None or self.runner.done()

    def report(self) -> list[str]:
        """The last `REPORT_LINES` lines of output, for crash and FATAL log lines."""
        return list(self.output.texts(REPORT_LINES))

    def status(self, now: float) -> InstanceStatus:
        """A snapshot at monotonic time `now`."""
        spec = self.spec
        uptime = None
        if self.state is _S.RUNNING and self.running_since is not None:
            uptime = now - self.running_since
        return InstanceStatus(
            name=spec.name,
            role=spec.role.value,
            state=self.state,
            spawned=spec.spawned,
            url=spec.base_url,
            port=spec.port,
            pid=self.pid,
            ready=self.ready,
            since=self.since,
            uptime=uptime,
            restarts=self.restarts,
            failures=self.failures,
            last_exit=self.last_exit,
            last_output=self.output.texts(),
            held=self.held,
        )

    def change(
        self,
        state: ProcessState | None,
        reason: str,
        now: float,
        *,
        ready: bool = False,
    ) -> None:
        """Change state (None: keep it) and readiness; log it and emit one event.

        Readiness is True only when asked for and the (new) state is RUNNING. A
        call that changes nothing emits nothing.

        Raises:
            IllegalTransition: the edge is not in `disaggd.supervise.states.TRANSITIONS`.
        """
        old, was_ready = self.state, self.ready
        new = old if state is None else state
        if new is not old:
            check_transition(old, new)
        ready = ready and new is _S.RUNNING
        if new is old and ready == was_ready:
            return
        self.ready = ready
        if new is not old:
            self.state = new
            self.since = now
            if new is _S.RUNNING:
                self.running_since = now
            elif old is _S.RUNNING:
                self.running_since = None
            self._log_state(old, new, reason)
        if ready != was_ready:
            self.log.info("instance_ready" if ready else "instance_not_ready", pid=self.pid)
        self._emit(InstanceEvent(self.status(now), old, was_ready, reason))

    def _log_state(self, old: ProcessState, new: ProcessState, reason: str) -> None:
        fields: dict[str, Any] = {
            "pid": self.pid,
            "from_state": old.value,
            "to_state": new.value,
            "reason": reason,
        }
        if new is not _S.FATAL:
            self.log.info("instance_state", **fields)
            return
        # The one FATAL line: everything an operator needs to act on it.
        self.log.error(
            "instance_state",
            **fields,
            failures=self.failures,
            last_exit=self.last_exit,
            last_output=self.report(),
            hint=f"not restarted until `disaggd restart {self.name}` or a reload",
        )
