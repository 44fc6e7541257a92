"""HANDING OVER: the topology rendered for other systems (pure: text out, no sockets).

* `llmd` — the endpoints file llm-d's endpoint picker reads with its file discovery;
* `k8s` — Kubernetes manifests (a Deployment and a Service per spawned instance);
* `yamltext` — the small YAML writer both use (scalars always quoted: nothing is guessed);
* `atomic` — the one function here that touches the disk: write a file atomically.

Each renderer takes a validated `Topology` and returns text; `ExportError` says why a
topology cannot be rendered for that target (one `Problem` per reason, like `check`).
"""

from __future__ import annotations

from disaggd.topology import Problem


class ExportError(Exception):
    """A valid topology that the target cannot express.

    Attributes:
        problems: every reason, each with its key path (``instance[1].host``).
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(p.render("<topology>") for p in problems))


__all__ = ["ExportError"]
