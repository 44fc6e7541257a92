"""llm-d's endpoints file: the topology as its endpoint picker's file discovery reads it.

The format, from llm-d's own sources (read, not copied):

* llm-d/llm-d-router ``pkg/epp/framework/plugins/datalayer/discovery/file/plugin.go``
  (``EndpointEntry``, ``EndpointsFile``) and its ``README.md`` next to it: a YAML or JSON
  document ``{endpoints: [...]}``; each entry has ``name`` (unique in the file),
  ``address`` (a literal IPv4 address: hostnames are not resolved), ``port`` (an integer
  1-65535 *written as a string*), optional ``namespace`` (default ``default``),
  ``metricsHost`` (default ``address:port``: vLLM serves ``/metrics`` on its HTTP port)
  and ``labels`` (string to string). The file is capped at 1 MiB. With
  ``watchFile: true`` the picker reloads on every change and re-attaches after an
  atomic rename; a file it cannot read or parse keeps the endpoints it had.
* llm-d/llm-d-router ``pkg/epp/framework/plugins/scheduling/filter/bylabel/roles.go``:
  the role label ``llm-d.ai/role``, ``prefill`` or ``decode`` (the prefill and decode
  filters select by it).
* llm-d/llm-d ``guides/no-kubernetes-deployment/README.md`` and
  ``router/epp/endpoints.yaml``: the ``model`` label names the served model name, and
  the file is best rewritten by atomic rename.

disaggd writes ``name`` (the instance name), ``address``, ``port`` and the labels
``llm-d.ai/role`` and ``model``; namespace and metricsHost keep their defaults.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from disaggd.export import ExportError, yamltext
from disaggd.topology import Problem, Topology
from disaggd.topology.load import endpoint_problems

#: The label llm-d's prefill and decode filters select by (bylabel/roles.go).
ROLE_LABEL = "llm-d.ai/role"
#: The label llm-d's no-Kubernetes guide sets to the served model name.
MODEL_LABEL = "model"
#: llm-d's file discovery refuses a larger file.
MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    """One entry of the endpoints file.

    Attributes:
        name: unique in the file (the instance name).
        address: a literal IPv4 address.
        port: the instance's HTTP port (1-65535).
        labels: ``llm-d.ai/role`` and ``model``.
    """

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)

    def as_entry(self) -> dict[str, Any]:
        """The entry as the file holds it (``port`` is a string there)."""
        return {
            "name": self.name,
            "address": self.address,
            "port": str(self.port),
            "labels": dict(self.labels),
        }


def role_labels(role: str) -> dict[str, str]:
    """The llm-d labels of an instance of `role` (``prefill`` or ``decode``)."""
    return {ROLE_LABEL: role}


def endpoints(topo: Topology, ready: Collection[str] | None = None) -> list[Endpoint]:
    """Every instance of `topo` (spawned and remote), in file order, as an `Endpoint`.

    Args:
        ready: when given, only the instances named in it (the daemon passes the
            ready ones).

    Raises:
        ExportError: an instance's address is not a literal IPv4 address, or it has
            no port (`disaggd.topology.load.endpoint_problems`).
    """
    problems = list(endpoint_problems(topo))
    if problems:
        raise ExportError(problems)
    out = []
    for inst in topo.instances:
        if ready is not None and inst.name not in ready:
            continue
        port = inst.port if inst.port is not None else _url_port(inst.base_url)
        labels = {**role_labels(inst.role.value), MODEL_LABEL: topo.model.public_name}
        out.append(Endpoint(inst.name, inst.reach_host, port, labels))
    return out


def _url_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def render(topo: Topology, ready: Collection[str] | None = None, *, source: str = "") -> str:
    """The endpoints file's text (YAML) for `topo`; see `endpoints` for `ready`.

    `source` (the topology file) goes into the header comment. No timestamp is
    written: the same instances give the same bytes, so a rewrite that changes
    nothing can be skipped.

    Raises:
        ExportError: as `endpoints`; or the file would pass llm-d's 1 MiB limit.
    """
    entries = [e.as_entry() for e in endpoints(topo, ready)]
    head = "llm-d endpoints file (file-discovery plugin), written by disaggd"
    if source:
        head += f" from {source}"
    if ready is not None:
        head += "\nlists the instances that are ready now; rewritten atomically on each change"
    body = yamltext.dump({"endpoints": entries})
    text = yamltext.comment(head + "\ndo not edit: disaggd overwrites it") + body
    if len(text.encode()) > MAX_BYTES:
        raise ExportError([Problem("instance", "the endpoints file would pass llm-d's 1 MiB")])
    return text
