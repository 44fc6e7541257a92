"""One instance as the proxy sees it (`Upstream`), and one request's hold on it (`Lease`).

The router (`disaggd.proxy.router`) keeps the table of upstreams and its policies;
this module is the row and the handle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from disaggd.proxy.breaker import Breaker
from disaggd.topology import Role
from disaggd.topology.spec import InstanceSpec

if TYPE_CHECKING:
    from disaggd.proxy.router import Router


@dataclass(eq=False)
class Upstream:
    """One instance as the proxy sees it.

    Attributes:
        name: the instance name from the topology.
        role: prefill or decode.
        base_url: ``http://host:port`` of its OpenAI server.
        kv_address: ``host:port`` of its KV endpoint (request-id handoff), or None.
        ready: the supervisor (or health prober) says it answers requests.
        draining: being taken out: never picked, requests in flight continue.
        outstanding: requests this proxy has in flight on it right now.
        breaker: its passive-health breaker; ``tripped`` mirrors "not closed".
        waiting: legs sent to it that have no answer yet; ``progress_at`` is when
            it last answered anything (or when it began to owe an answer).
    """

    name: str
    role: Role
    base_url: str
    kv_address: str | None
    ready: bool = False
    draining: bool = False
    outstanding: int = 0
    breaker: Breaker = field(default_factory=lambda: Breaker(0, 1.0), repr=False)
    tripped: bool = False
    waiting: int = 0
    progress_at: float = 0.0
    # Tasks waiting for an answer from it (`sent`), cancelled when it stalls.
    _waiters: set[asyncio.Task[Any]] = field(default_factory=set, repr=False, init=False)
    # The stall check's timer: armed while something waits on it (`Router.sent`).
    _stall_timer: asyncio.TimerHandle | None = field(default=None, repr=False, init=False)
    # Waiters of `Router.wait_idle`, woken when `outstanding` drops to 0.
    _idle_waiters: list[asyncio.Event] = field(default_factory=list, repr=False, init=False)
    # Removed from the topology but still serving requests: forgotten once idle.
    _retired: bool = field(default=False, repr=False, init=False)


def upstream_for(spec: InstanceSpec) -> Upstream:
    """A fresh, not-ready upstream for an instance's spec."""
    return Upstream(
        name=spec.name, role=spec.role, base_url=spec.base_url, kv_address=spec.kv_address
    )


class Lease:
    """One request's hold on an upstream: counted in flight from enter to exit.

    `move` hands the hold to another upstream (the old one is released, the new
    one acquired), so the one ``with`` block that took the lease always releases
    whichever upstream it holds at the end.

    Attributes:
        up: the upstream held now.
    """

    __slots__ = ("_router", "up")

    def __init__(self, router: Router, up: Upstream) -> None:
        self._router = router
        self.up = up

    def __enter__(self) -> Lease:
        self._router.acquire(self.up)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._router.release(self.up)

    def move(self, other: Upstream) -> None:
        """Hold `other` instead of the current upstream."""
        self._router.release(self.up)
        self.up = other
        self._router.acquire(other)
