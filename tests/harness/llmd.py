"""A reader of llm-d's endpoints file, written from llm-d's documented format only.

Sources: llm-d/llm-d-router pkg/epp/framework/plugins/datalayer/discovery/file/README.md
("Inputs Consumed", "Limitations") and plugin.go beside it (``EndpointsFile``,
``EndpointEntry``, ``load``). What its loader checks, this reader checks: a mapping
with an ``endpoints`` list; each entry a unique ``name``, a literal IPv4 ``address``, a
``port`` that is a *string* holding an integer 1-65535, ``labels`` mapping strings to
strings; ``namespace`` defaults to ``default`` and ``metricsHost`` to ``address:port``;
the file holds at most 1 MiB. It shares no code with disaggd's writer.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20


def read_endpoints(text: str) -> list[dict[str, Any]]:
    """The entries of an endpoints file, with llm-d's defaults filled in; ValueError if bad."""
    if len(text.encode()) > MAX_BYTES:
        raise ValueError("endpoints file exceeds 1 MiB")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise ValueError(f"expected a mapping with an 'endpoints' list, got {doc!r}")
    seen: set[tuple[str, str]] = set()
    out = []
    for entry in doc["endpoints"]:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"entry without a name: {entry!r}")
        address = entry.get("address")
        ipaddress.IPv4Address(address)
        port = entry.get("port")
        if not isinstance(port, str) or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"endpoint {name!r}: invalid port {port!r} (a string 1-65535)")
        labels = entry.get("labels") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError(f"endpoint {name!r}: labels must map strings to strings")
        namespace = entry.get("namespace") or "default"
        if (namespace, name) in seen:
            raise ValueError(f"endpoint {name!r}: duplicate")
        seen.add((namespace, name))
        out.append(
            {
                "name": name,
                "namespace": namespace,
                "address": address,
                "port": int(port),
                "metricsHost": entry.get("metricsHost") or f"{address}:{port}",
                "labels": labels,
            }
        )
    return out


def read_endpoints_file(path: Path) -> list[dict[str, Any]]:
    """`read_endpoints` of a file."""
    return read_endpoints(Path(path).read_text(encoding="utf-8"))


def by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Entries by endpoint name."""
    return {e["name"]: e for e in entries}
