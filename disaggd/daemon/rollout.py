"""Rollout of a reload: apply a `ReloadPlan` to the running supervisor and router.

The plan (`disaggd.topology.plan.diff`) says what changed; this module does it,
in an order that keeps every role served (gunicorn's HUP, supervisord's
``update``):

1. removed instances are drained (no new requests, bounded wait for the ones in
   flight), then stopped and forgotten;
2. changed instances restart one at a time, each drained first and ready again
   before the next goes down; the rollout stops at the first that does not come
   back (the others keep their old spec);
3. added instances start, and the rollout waits (bounded) until they are ready.

Settings sections (``[proxy]``, ``[supervisor]``, ...) apply in place before step 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from disaggd.observe.logs import get_logger
from disaggd.proxy.router import Router
from disaggd.supervise.supervisor import Supervisor
from disaggd.topology import Topology
from disaggd.topology.plan import ReloadPlan
from disaggd.topology.spec import InstanceSpec, build_spec

log = get_logger("disaggd.rollout")


@dataclass
class Outcome:
    """How a rollout went.

    Attributes:
        failed: a restarted instance did not come back (the rollout stopped there).
        notes: what the user should know, one sentence each.
    """

    failed: bool = False
    notes: list[str] = field(default_factory=list)


class Rollout:
    """Applies reload plans; owns the record of what each instance runs now.

    Args:
        supervisor: the running supervisor.
        router: the proxy's routing table.
        running: instance name → the `InstanceSpec` it runs now (updated in place
            as instances restart, start and stop; `disaggd.topology.plan.diff`
            compares a new topology against it).
    """

    def __init__(
        self, supervisor: Supervisor, router: Router, running: dict[str, InstanceSpec]
    ) -> None:
        self.supervisor = supervisor
        self.router = router
        self.running = running

    async def drain(self, name: str, timeout: float) -> None:
        """Route nothing new to `name` and wait (at most `timeout` s) for its requests."""
        self.router.set_draining(name, True)
        try:
            idle = await self.router.wait_idle(name, timeout)
        except KeyError:
            idle = True
        if not idle:
            log.warning("drain_timeout", instance=name, timeout=timeout)

    async def apply(self, plan: ReloadPlan, new: Topology, outcome: Outcome) -> None:
        """Carry out `plan` towards `new`, adding to `outcome` what went wrong.

        The caller has already applied the settings sections.
        """
        # Removed instances stop taking requests before the router forgets them.
        for name in plan.removed:
            self.router.set_draining(name, True)
        # A restarted instance keeps its current upstream (still routable, drainable)
        # until its turn in the rolling restart, even when its address changes.
        self.router.update_topology(new, deferred=plan.restarted)
        self.supervisor.update_topology(new)
        drain = new.daemon.drain_timeout
        for name in plan.removed:
            await self.drain(name, drain)
            await self.supervisor.remove(name)
            del self.running[name]
        await self._rolling_restart(new, plan, drain, outcome)
        for name in plan.added:
            await self.supervisor.add(new.instance(name), new)
            self.running[name] = build_spec(new, new.instance(name))
        if plan.added:
            ok = await self.supervisor.wait_ready(plan.added, timeout=new.supervisor.start_timeout)
            if not ok:
                outcome.notes.append("an added instance did not become ready: see `disaggd status`")

    async def _rolling_restart(
        self, new: Topology, plan: ReloadPlan, drain: float, outcome: Outcome
    ) -> None:
        """Restart changed instances one at a time, each ready before the next goes down.

        Stops at the first that does not come back (the rest keep their old spec).
        """
        for idx, name in enumerate(plan.restarted):
            inst = new.instance(name)
            await self.drain(name, drain)
            self.router.commit(name)  # its new address, if it changed (not ready yet)
            ok = await self.supervisor.restart(name, inst, new, wait=True)
            self.router.set_draining(name, False)
            self.running[name] = build_spec(new, inst)
            if not ok:
                left = plan.restarted[idx + 1 :]
                untouched = (
                    f"not restarted: {', '.join(left)} (still on the old spec)"
                    if left
                    else "no other instance was touched"
                )
                outcome.failed = True
                outcome.notes.append(f"{name} did not become ready with its new spec; {untouched}")
                return

    async def restart(self, name: str, drain: float) -> dict[str, Any]:
        """`disaggd restart NAME`: drain, restart with the same spec, undrain; a control reply."""
        log.info("restart_requested", instance=name)
        await self.drain(name, drain)
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

