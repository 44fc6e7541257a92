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
        #: Drained by hand (`disaggd drain NAME`): out of rotation until `undrain`.
        self.hand_drained: set[str] = set()
        # Drained by a restart, stop or reload in progress: back in rotation at `release`.
        self._taken: set[str] = set()

    def _route(self, name: str) -> None:
        """Tell the router whether `name` is out of rotation, for any of the two reasons."""
        self.router.set_draining(name, name in self.hand_drained or name in self._taken)

    def set_hand_drained(self, name: str, drained: bool) -> None:
        """`disaggd drain NAME` / `undrain NAME`: routing only, the process is untouched.

        An undrain while a restart or stop has the instance out of rotation takes
        effect when that is done (`release`), never earlier.
        """
        if drained:
            self.hand_drained.add(name)
        else:
            self.hand_drained.discard(name)
        self._route(name)

    async def drain(self, name: str, timeout: float) -> bool:
        """Route nothing new to `name` and wait (at most `timeout` s) for its requests.

        Returns:
            True when nothing is in flight on it any more.
        """
        self._taken.add(name)
        self._route(name)
        idle = await self.router.wait_idle(name, timeout)
        if not idle:
            log.warning("drain_timeout", instance=name, timeout=timeout)
        return idle

    def release(self, name: str) -> None:
        """The end of a `drain` by a restart or stop: routed again unless drained by hand."""
        self._taken.discard(name)
        self._route(name)

    async def apply(self, plan: ReloadPlan, new: Topology, outcome: Outcome) -> None:
        """Carry out `plan` towards `new`, adding to `outcome` what went wrong.

        The caller has already applied the settings sections.
        """
        # Removed instances stop taking requests before the router forgets them.
        for name in plan.removed:
            self.hand_drained.discard(name)
            self.router.set_draining(name, True)
        # A restarted instance keeps its current upstream (still routable, drainable)
        # until its turn in the rolling restart, even when its address changes.
        self.router.update_topology(new, deferred=plan.restarted)
        self.supervisor.update_topology(new)
        drain = new.daemon.drain_timeout
        for name in plan.removed:
            await self.drain(name, drain)
            await self.supervisor.remove(name)
            self._taken.discard(name)
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
            self.release(name)
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
            self.release(name)
        status = self.supervisor.status(name)
        if not ok:
            return {
                "ok": False,
                "error": f"{name} did not become ready: {status.last_exit or status.state.value}",
            }
        return {"ok": True, "message": f"{name} restarted (pid {status.pid})"}

    async def stop(self, name: str, drain: float) -> tuple[bool, bool]:
        """`disaggd stop NAME`: drain (at most `drain` s), then stop it; it stays STOPPED.

        Returns:
            (drained: nothing was in flight when it was stopped, gone: its process
            group is gone).
        """
        log.info("stop_requested", instance=name)
        try:
            idle = await self.drain(name, drain)
            gone = await self.supervisor.stop(name)
        finally:
            self.release(name)
        return idle, gone

    async def start(self, name: str) -> bool:
        """`disaggd start NAME`: start it and wait until it is ready (``start_timeout``)."""
        log.info("start_requested", instance=name)
        return await self.supervisor.start(name, wait=True)

