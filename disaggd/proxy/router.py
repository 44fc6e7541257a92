"""Which instance gets the next request: the routing table and its policies.

The router is the proxy's view of the instances: for each one an `Upstream`
with its address, whether it is ready (set by the supervisor the moment
readiness changes), whether it is draining (a reload or shutdown is taking it
out), and how many requests it holds right now. It does no I/O and never
awaits, except `wait_idle`, which waits for an event that `release` sets.

Policies, per role (``[proxy] prefill_policy`` / ``decode_policy``):

* ``least_outstanding`` (default): the eligible upstream with the fewest
  requests in flight; ties are broken round robin, so that an idle xPyD
  deployment still spreads requests over every instance;
* ``round_robin``: the next eligible upstream after the last one picked;
* ``cache_aware``: by prompt prefix, within a balance rule (`disaggd.proxy.prefix`).

Eligible means ready, not draining, not excluded by the caller (a retry
excludes the instances that already failed this request), under its role's
in-flight limit (``[proxy] prefill_max_inflight`` / ``decode_max_inflight``),
and with its breaker letting requests through (`disaggd.proxy.breaker`: fed by
`succeeded`, `failed` and the stall check, which opens the breaker of an
instance whose requests have waited ``stall_timeout`` s with no answer at all).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Collection
from typing import Literal

from disaggd.observe.logs import get_logger
from disaggd.proxy.breaker import BreakerState
from disaggd.proxy.passive import PassiveHealth
from disaggd.proxy.prefix import PrefixRouting, RouteKey
from disaggd.proxy.upstream import Lease, Upstream, upstream_for
from disaggd.topology import Role, Topology
from disaggd.topology.spec import build_specs

Policy = Literal["least_outstanding", "round_robin", "cache_aware"]

log = get_logger("disaggd.proxy")


class Router:
    """The routing table: upstreams by role, their state and the pick policies."""

    def __init__(self, topo: Topology) -> None:
        """One `Upstream` per instance of `topo` (spawned or remote), none ready."""
        self._by_name: dict[str, Upstream] = {}
        self._by_role: dict[Role, list[Upstream]] = {Role.PREFILL: [], Role.DECODE: []}
        # Where the next scan starts, per role: round robin and tie breaking.
        self._cursor: dict[Role, int] = {Role.PREFILL: 0, Role.DECODE: 0}
        # Deferred address changes (`update_topology`), swapped in by `commit`.
        self._pending: dict[str, Upstream] = {}
        self._policy: dict[Role, Policy] = {
            Role.PREFILL: "least_outstanding",
            Role.DECODE: "least_outstanding",
        }
        self._limit: dict[Role, int] = {Role.PREFILL: 0, Role.DECODE: 0}
        self._breaker = (0, 1.0)  # (threshold, cooldown)
        # Requests waiting for a slot under the in-flight limit (`wait_slot`), per role.
        self._slot_waiters: dict[Role, deque[asyncio.Future[None]]] = {
            Role.PREFILL: deque(),
            Role.DECODE: deque(),
        }
        #: Passive health: what the legs report (sent, answered, succeeded, failed).
        self.health = PassiveHealth(self._wake)
        self.cache = PrefixRouting()  # prefix index and sessions (cache_aware, affinity)
        for name, spec in build_specs(topo).items():
            self._by_name[name] = upstream_for(spec)
        self._apply_policies(topo)
        self._reindex()

    # -- configuration -----------------------------------------------------------------------

    def update_topology(self, topo: Topology, *, deferred: Collection[str] = ()) -> None:
        """Apply a reloaded topology.

        New instances are added (not ready). An instance whose address, role or
        KV address changed becomes a new, not-ready upstream (requests in flight
        on the old one finish against the old address) — unless it is named in
        `deferred` (a reload restarts it later, one at a time): then its current
        upstream stays in rotation, drainable, until `commit` swaps in the new
        one. Instances no longer in the topology are dropped, except a draining
        one that still has requests in flight: it stays listed (never picked)
        until `release` brings it to 0. Unchanged instances keep their state.
        Policies apply from the next pick.
        """
        wanted = build_specs(topo)
        table: dict[str, Upstream] = {}
        self._pending = {}
        for name, spec in wanted.items():
            fresh = upstream_for(spec)
            old = self._by_name.get(name)
            if old is not None and not old._retired:
                same = (old.role, old.base_url, old.kv_address) == (
                    fresh.role,
                    fresh.base_url,
                    fresh.kv_address,
                )
                if same or name in deferred:
                    table[name] = old
                    if not same:
                        self._pending[name] = fresh
                    continue
            table[name] = fresh
        for name, old in self._by_name.items():
            if name not in wanted and old.draining and old.outstanding > 0:
                old._retired = True
                table[name] = old
        self._by_name = table
        self._apply_policies(topo)
        self._reindex()

    def commit(self, name: str) -> None:
        """Swap in the new upstream of a `deferred` instance (no-op when it has none).

        Called once the old one is drained, just before the instance restarts:
        the new upstream starts not ready; requests still holding the old one
        release it as usual.
        """
        fresh = self._pending.pop(name, None)
        if fresh is None or name not in self._by_name:
            return
        self._by_name[name] = fresh
        self._reindex()

    def _apply_policies(self, topo: Topology) -> None:
        p = topo.proxy
        self._policy[Role.PREFILL] = p.prefill_policy
        self._policy[Role.DECODE] = p.decode_policy
        self._limit[Role.PREFILL] = p.prefill_max_inflight
        self._limit[Role.DECODE] = p.decode_max_inflight
        self._breaker = (p.breaker_failures, p.breaker_cooldown)
        self.health.stall = p.stall_timeout
        self.cache.configure(p)
        for up in self._by_name.values():
            up.breaker.threshold, up.breaker.cooldown = self._breaker

    def _reindex(self) -> None:
        self.cache.retain(self._by_name)
        for up in self._by_name.values():
            up.breaker.threshold, up.breaker.cooldown = self._breaker
        for role in Role:
            ups = [u for u in self._by_name.values() if u.role is role]
            self._by_role[role] = ups
            if ups:
                self._cursor[role] %= len(ups)
            else:
                self._cursor[role] = 0

    # -- state changes (supervisor, reload) -----------------------------------------------------

    def set_ready(self, name: str, ready: bool) -> None:
        """Mark an instance ready or not; unknown names are ignored (a stale callback)."""
        up = self._by_name.get(name)
        if up is None:
            return
        was, up.ready = up.ready, ready
        if not ready:
            self.cache.forget(name)  # a restarted engine's cache is empty
            return
        if not was and up.breaker.success() is not None:
            # Back from not ready (restarted, or a partition healed): the health check
            # just passed, so the passive breaker's old verdict is stale (Envoy's
            # outlier detection un-ejects on a passing active check the same way).
            up.tripped = False
            log.info("breaker_closed", instance=name, reason="health check passed")
        self._wake(up.role)

    def set_draining(self, name: str, draining: bool) -> None:
        """Take an instance out of (or back into) rotation; requests in flight continue."""
        up = self._by_name.get(name)
        if up is not None:
            up.draining = draining

    # -- the request path ------------------------------------------------------------------------

    def pick(
        self, role: Role, exclude: Collection[str] = (), key: RouteKey | None = None
    ) -> Upstream | None:
        """The upstream of `role` that gets the next request, or None if none is eligible.

        Eligible: ready, not draining, name not in `exclude`. The caller should
        `acquire` the result before its first await, so that concurrent picks see it.
        With the request's `key`, a role routed by prefix or session is chosen by
        `PrefixRouting.choose` among the eligible ones.
        """
        ups = self._by_role[role]
        n = len(ups)
        start = self._cursor[role]
        least = self._policy[role] != "round_robin"
        keyed: list[Upstream] | None = [] if key and self.cache.tracks(role) else None
        limit = self._limit[role]
        now = time.monotonic()
        best: Upstream | None = None
        for k in range(n):
            idx = start + k
            if idx >= n:
                idx -= n
            up = ups[idx]
            if not self._routable(up, now) or (exclude and up.name in exclude):
                continue
            if limit and up.outstanding >= limit:
                continue
            if keyed is not None:
                keyed.append(up)
            elif best is None or (least and up.outstanding < best.outstanding):
                best = up
                if not least or up.outstanding == 0:
                    break  # nothing can beat it; the scan order already did the tie breaking
        if keyed is not None:
            best = self.cache.choose(role, keyed, key)  # type: ignore[arg-type]  # key is set
        if best is not None:
            self._took(role, best, now)
        return best

    def _took(self, role: Role, best: Upstream, now: float) -> None:
        """`best` was picked: the cursor moves past it; an open breaker lets it through
        as its one trial."""
        ups = self._by_role[role]
        idx = ups.index(best) + 1
        self._cursor[role] = idx if idx < len(ups) else 0
        if best.tripped:
            best.breaker.trial_started(now)
            log.info("breaker_trial", instance=best.name)

    def _routable(self, up: Upstream, now: float) -> bool:
        """Ready, not draining, not stalled, breaker letting requests through."""
        if not up.ready or up.draining:
            return False
        self.health.check_stall(up, now)
        return not up.tripped or up.breaker.can_pass(now)

    def full(self, role: Role, exclude: Collection[str] = ()) -> bool:
        """True when an instance of `role` could take a request but for its in-flight limit."""
        limit = self._limit[role]
        if not limit:
            return False
        now = time.monotonic()
        return any(
            self._routable(up, now) and up.name not in exclude and up.outstanding >= limit
            for up in self._by_role[role]
        )

    def routable_count(self, role: Role) -> int:
        """Upstreams of `role` a request could go to now or after a wait for a slot."""
        now = time.monotonic()
        return sum(1 for up in self._by_role[role] if self._routable(up, now))

    async def wait_slot(self, role: Role, timeout: float) -> bool:
        """Wait until a request of `role` is released (a slot may be free); False on timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._slot_waiters[role]
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if fut in waiters:
                waiters.remove(fut)
        return True

    def queued(self, role: Role) -> int:
        """Requests waiting for a slot of `role` now."""
        return len(self._slot_waiters[role])

    def _wake(self, role: Role) -> None:
        waiters = self._slot_waiters[role]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def breaker_state(self, name: str) -> BreakerState | None:
        """The breaker state of instance `name`, or None when unknown."""
        up = self._by_name.get(name)
        return None if up is None else up.breaker.state

    def hold(self, up: Upstream) -> Lease:
        """A `Lease` on `up`: ``with router.hold(up) as held:`` counts it in flight."""
        return Lease(self, up)

    def acquire(self, up: Upstream) -> None:
        """Count one more request in flight on `up`."""
        up.outstanding += 1

    def release(self, up: Upstream) -> None:
        """Count one request less on `up`; wakes `wait_idle` waiters when it reaches 0."""
        up.outstanding -= 1
        if self._slot_waiters[up.role]:
            self._wake(up.role)
        if up.outstanding <= 0:
            up.outstanding = 0
            if up._idle_waiters:
                for ev in up._idle_waiters:
                    ev.set()
                up._idle_waiters.clear()
            if up._retired and self._by_name.get(up.name) is up:
                del self._by_name[up.name]
                self._reindex()

    def ready_count(self, role: Role) -> int:
        """Upstreams of `role` that can be picked now (ready and not draining)."""
        return sum(1 for u in self._by_role[role] if u.ready and not u.draining)

    def why_none(self, role: Role) -> str:
        """Why no upstream of `role` can be picked, for the 503 and ``/health``: e.g.
        ``draining: decode-0; not ready: decode-1``, or ``none configured``."""
        ups = self._by_role[role]
        if not ups:
            return "none configured"
        groups = (
            ("draining", [u.name for u in ups if u.ready and u.draining]),
            ("breaker open", [u.name for u in ups if u.ready and not u.draining and u.tripped]),
            ("not ready", [u.name for u in ups if not u.ready]),
        )
        return "; ".join(f"{what}: {', '.join(names)}" for what, names in groups if names)

    def upstreams(self) -> list[Upstream]:
        """Every upstream, in topology order (retired ones last)."""
        return list(self._by_name.values())

    def get(self, name: str) -> Upstream | None:
        """The upstream called `name`, or None."""
        return self._by_name.get(name)

    async def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait until upstream `name` has no request in flight.

        Args:
            name: the instance.
            timeout: seconds to wait at most.

        Returns:
            True once it is idle (or unknown: nothing can be in flight on it),
            False if `timeout` passed first.
        """
        up = self._by_name.get(name)
        deadline = time.monotonic() + timeout
        while up is not None and up.outstanding > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ev = asyncio.Event()
            up._idle_waiters.append(ev)
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            finally:
                if ev in up._idle_waiters:
                    up._idle_waiters.remove(ev)
        return True
