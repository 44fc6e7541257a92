"""Reload as a diff: what changed between the running topology and a new one.

Like supervisord's ``diff_to_active`` (supervisor/supervisord.py), a reload is
computed, not improvised: every instance is kept, restarted, added or removed,
and every changed setting section is named. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from disaggd.topology.schema import Topology
from disaggd.topology.spec import InstanceSpec, build_specs


@dataclass(frozen=True)
class ReloadPlan:
    """The outcome of comparing two topologies.

    Attributes:
        kept: instances whose spec did not change (left running, same pid).
        restarted: instances whose spec changed (restarted one at a time).
        added: instances only in the new topology.
        removed: instances only in the old topology (drained, then stopped).
        settings: sections applied in place (``proxy``, ``supervisor``, ...).
        needs_restart: settings a reload cannot apply (the daemon must restart).
    """

    kept: tuple[str, ...]
    restarted: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    settings: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when nothing at all changes."""
        return not (self.restarted or self.added or self.removed or self.settings)

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-ready form for the control reply and the log."""
        return {
            "kept": list(self.kept),
            "restarted": list(self.restarted),
            "added": list(self.added),
            "removed": list(self.removed),
            "settings": list(self.settings),
            "needs_restart": list(self.needs_restart),
        }


#: Settings read once at start-up: a reload cannot apply them (the proxy keeps its
#: listening socket, logging is configured once, the file watcher starts with the daemon).
_NEEDS_RESTART = (
    ("proxy", ("host", "port")),
    ("daemon", ("control_socket", "state_dir", "log_format", "log_level", "watch")),
    ("observe", ("otlp_endpoint",)),
)


def diff(
    running: Mapping[str, InstanceSpec],
    new: Topology,
    old: Topology,
    started: Topology | None = None,
) -> ReloadPlan:
    """Compare what runs now with `new`.

    Args:
        running: instance name -> the `InstanceSpec` that instance runs now (after a
            partly failed reload this differs from `old`'s); an instance restarts
            exactly when its spec differs.
        new: the freshly loaded topology.
        old: the topology the daemon's settings come from now.
        started: the topology the daemon started with (default `old`): what
            ``needs_restart`` compares, since a reload never applies those keys.
    """
    new_fps = build_specs(new)
    kept = tuple(n for n in new_fps if n in running and running[n] == new_fps[n])
    restarted = tuple(n for n in new_fps if n in running and running[n] != new_fps[n])
    added = tuple(n for n in new_fps if n not in running)
    removed = tuple(n for n in running if n not in new_fps)
    settings = tuple(
        section
        for section in ("proxy", "supervisor", "kv_transfer", "daemon")
        if getattr(old, section) != getattr(new, section)
    )
    needs_restart = tuple(
        f"{section}.{key}"
        for section, keys in _NEEDS_RESTART
        for key in keys
        if getattr(getattr(started or old, section), key) != getattr(getattr(new, section), key)
    )
    return ReloadPlan(kept, restarted, added, removed, settings, needs_restart)
