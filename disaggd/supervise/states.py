"""Process states of a supervised instance and the legal edges between them.

Dependency-free on purpose: the supervisor, the status command and the tests
all speak in these names (supervisord's), and the one table below is the only
place that says which change is legal.

The life of a spawned instance::

    STOPPED -> STARTING -> RUNNING                      spawned, then GET /health 200
    RUNNING -> EXITED -> BACKOFF -> STARTING            exited unasked (any status)
    STARTING -> BACKOFF -> STARTING                     exited while starting
    STARTING | RUNNING -> STOPPING -> BACKOFF           start timeout | failed probes
    ... -> FATAL                                        too many failures in a row,
                                                        or cannot be spawned (port in use)
    FATAL -> STARTING                                   operator restart or reload
    STARTING | RUNNING -> STOPPING -> STOPPED           stop requested
    BACKOFF | EXITED -> STOPPED                         stop requested meanwhile

A remote instance (``url``) only ever goes STARTING <-> RUNNING, and to
STOPPING -> STOPPED when the supervisor stops.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType


class ProcessState(str, Enum):
    """Where an instance is in its life (supervisord's names)."""

    #: Not started, or stopped on request.
    STOPPED = "STOPPED"
    #: Spawned (or, for a remote instance, probed) but not yet healthy.
    STARTING = "STARTING"
    #: Healthy at least once since it started; `ready` says whether it is healthy now.
    RUNNING = "RUNNING"
    #: Failed; waiting out the restart delay (the old process group is gone first).
    BACKOFF = "BACKOFF"
    #: Being stopped: SIGTERM sent to its group, SIGKILL at the deadline.
    STOPPING = "STOPPING"
    #: Its process exited while RUNNING without being asked to (a crash, whatever the status).
    EXITED = "EXITED"
    #: Failed too often in a row (or cannot be spawned); left alone until an operator acts.
    FATAL = "FATAL"

    def __str__(self) -> str:
        return self.value


_S = ProcessState

#: The legal edges: ``TRANSITIONS[old]`` is the set of states `old` may change to.
TRANSITIONS: Mapping[ProcessState, frozenset[ProcessState]] = MappingProxyType(
    {
        # start_all / add / restart.
        _S.STOPPED: frozenset({_S.STARTING}),
        # healthy | crashed while starting | stop requested or start timeout (kill first)
        # | cannot be spawned (port in use) or the last allowed failure.
        _S.STARTING: frozenset({_S.RUNNING, _S.BACKOFF, _S.STOPPING, _S.FATAL}),
        # stop requested or unhealthy (kill first) | exited unasked | a remote instance
        # that stopped answering goes back to being probed until healthy.
        _S.RUNNING: frozenset({_S.STOPPING, _S.EXITED, _S.STARTING}),
        # delay over | stop requested during the delay.
        _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPED}),
        # stopped on request | killed after a start timeout or failed probes: a failure.
        _S.STOPPING: frozenset({_S.STOPPED, _S.BACKOFF, _S.FATAL}),
        # restart after the delay | too many failures | stop requested meanwhile.
        _S.EXITED: frozenset({_S.BACKOFF, _S.FATAL, _S.STOPPED}),
        # operator restart or reload.
        _S.FATAL: frozenset({_S.STARTING}),
    }
)


class IllegalTransition(Exception):
    """A state change that `TRANSITIONS` does not allow (a supervisor bug)."""

    def __init__(self, old: ProcessState, new: ProcessState) -> None:
        self.old = old
        self.new = new
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "nothing"
        super().__init__(f"illegal state change {old.value} -> {new.value} (allowed: {allowed})")


def check_transition(old: ProcessState, new: ProcessState) -> None:
    """Check that `old` may change to `new`.

    Raises:
        IllegalTransition: the edge is not in `TRANSITIONS`.
    """
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)
