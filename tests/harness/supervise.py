"""Supervision test helpers shared by the process-level tests (real children) and the
unit-level ones (fake OS, virtual clock)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from disaggd.supervise.events import InstanceEvent, InstanceStatus
from disaggd.supervise.states import ProcessState
from disaggd.supervise.supervisor import Supervisor
from disaggd.topology import Topology, parse_config
from tests.harness.common import async_wait_for, standin_topology


@pytest.fixture(autouse=True)
def plain_structlog() -> Iterator[None]:
    """Whatever another test configured (a closed stream, a level filter) does not apply here."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


#: Probe settings for tests that are not about liveness: a loaded 2-core machine must not
#: turn a slow answer into a restart that the test did not ask for.
STEADY = {"probe_timeout": 2.0, "probe_failures": 3}


def make_topo(tmp_path: Path, **kwargs: Any) -> Topology:
    kwargs["supervisor"] = {**STEADY, **kwargs.get("supervisor", {})}
    return parse_config(standin_topology(tmp_path, **kwargs), tmp_path / "disaggd.toml")


@dataclass
class Recorder:
    """What the supervisor told its one listener (`on_event`), in order, with the time."""

    events: list[tuple[float, InstanceEvent]] = field(default_factory=list)
    states: list[tuple[float, InstanceStatus]] = field(default_factory=list)
    ready: list[tuple[float, str, bool]] = field(default_factory=list)
    on_state: dict[tuple[str, ProcessState], Any] = field(default_factory=dict)
    seen: dict[tuple[str, ProcessState], list[Any]] = field(default_factory=dict)

    def event(self, event: InstanceEvent) -> None:
        now = time.monotonic()
        self.events.append((now, event))
        assert event.state_changed or event.ready_changed  # no empty events
        assert not event.ready or event.state is ProcessState.RUNNING
        if event.ready_changed:
            self.ready.append((now, event.name, event.ready))
        if event.state_changed:
            status = event.status
            self.states.append((now, status))
            probe = self.on_state.get((status.name, status.state))
            if probe is not None:
                self.seen.setdefault((status.name, status.state), []).append(probe(status))

    def path(self, name: str) -> list[ProcessState]:
        return [s.state for _, s in self.states if s.name == name]

    def first(self, name: str, state: ProcessState, after: float = 0.0) -> float | None:
        for t, s in self.states:
            if s.name == name and s.state is state and t >= after:
                return t
        return None

    def readiness(self, name: str) -> list[bool]:
        return [r for _, n, r in self.ready if n == name]


def supervisor(topo: Topology, rec: Recorder, **kwargs: Any) -> Supervisor:
    return Supervisor(topo, on_event=rec.event, **kwargs)


def events(logs: Sequence[Mapping[str, Any]], event: str, instance: str | None = None) -> list[Any]:
    return [
        e
        for e in logs
        if e["event"] == event and (instance is None or e.get("instance") == instance)
    ]


def fatal_lines(logs: Sequence[Mapping[str, Any]], instance: str | None = None) -> list[Any]:
    """Every log line about an instance going FATAL (there must be one per FATAL)."""
    changes = events(logs, "instance_state", instance)
    return [e for e in changes if e["to_state"] == "FATAL"]


async def wait_state(
    sup: Supervisor, name: str, state: ProcessState, timeout: float = 15.0, **match: Any
) -> InstanceStatus:
    def check() -> InstanceStatus | None:
        st = sup.status(name)
        ok = st.state is state and all(getattr(st, k) == v for k, v in match.items())
        return st if ok else None

    result: InstanceStatus = await async_wait_for(
        check, timeout=timeout, what=f"{name} {state} {match}"
    )
    return result
