"""``[daemon].endpoints_file``: llm-d's endpoints file, kept in step with the instances.

What it lists: the instances that are **ready** now (RUNNING and healthy, remote ones
while their probe passes) — exactly the ones disaggd's own router would send a request
to. Not the others, not even with a state label: llm-d's endpoint picker routes to every
endpoint the file lists (its filters select by role, not by state), so a loading or
crashed instance in the file would get requests.

When it is written: on every instance event that changes the set of ready instances or
their addresses (spawn, restart, crash, stop, reload; `Readiness.observe` calls
`EndpointsFile.refresh`), and after each reload (a changed key applies at once).
Atomically (temporary file, fsync, rename: what llm-d's watcher expects). A rewrite
that would not change a byte is skipped, so the picker does not reload for nothing.

When the key moves to another path or is removed, the old file is rewritten with no
endpoints and left in place: a picker still watching it stops sending requests here
(a missing file would leave it with the endpoints it had). After the daemon stops,
the file lists no endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from disaggd.export import ExportError, llmd, yamltext
from disaggd.export.atomic import write_atomic
from disaggd.observe.logs import get_logger
from disaggd.supervise.events import InstanceStatus
from disaggd.topology import Topology

log = get_logger("disaggd.daemon")


class EndpointsFile:
    """Keeps ``[daemon].endpoints_file`` equal to the ready instances of the topology.

    Args:
        topology: the topology the daemon runs now (read at each refresh, so a
            reload's new path and addresses apply).
        statuses: the supervisor's snapshot of every instance.
    """

    def __init__(
        self,
        topology: Callable[[], Topology],
        statuses: Callable[[], list[InstanceStatus]],
    ) -> None:
        self._topology = topology
        self._statuses = statuses
        self._path: Path | None = None
        self._written: str | None = None

    def refresh(self) -> None:
        """Rewrite the file if what it should say changed; never raises (logs instead)."""
        topo = self._topology()
        path = topo.daemon.endpoints_file
        if self._path is not None and path != self._path:
            self._retire(self._path)
        self._path = path
        if path is None:
            return
        ready = {s.name for s in self._statuses() if s.ready}
        try:
            text = llmd.render(topo, ready)
        except ExportError as exc:  # validation refuses such a topology; say it anyway
            log.error("endpoints_file_failed", path=str(path), error=str(exc))
            return
        if text == self._written:
            return
        self._write(path, text, ready=sorted(ready))

    def _retire(self, path: Path) -> None:
        """Leave `path` listing nothing: this daemon no longer keeps it."""
        self._write(path, yamltext.dump({"endpoints": []}), ready=[])
        self._written = None

    def _write(self, path: Path, text: str, *, ready: list[str]) -> None:
        try:
            write_atomic(path, text)
        except OSError as exc:
            log.error("endpoints_file_failed", path=str(path), error=str(exc))
            self._written = None
            return
        self._written = text
        log.info("endpoints_file_written", path=str(path), ready=ready)
