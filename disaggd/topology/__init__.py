"""WHAT runs: the topology file as frozen, validated objects (pure: no sockets, no processes).

* `schema` — the TOML tables as pydantic sections;
* `load` — reading a file, the checks that span sections, `ConfigError`;
* `connectors` — each KV connector: its engine flags and how its two legs are shaped;
* `spec` — the one `InstanceSpec` per instance (argv, env, dirs, ports, addresses);
* `plan` — a reload as a diff of specs.
"""

from __future__ import annotations

from disaggd.topology.load import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Problem,
    load_config,
    parse_config,
)
from disaggd.topology.schema import (
    WILDCARD_HOSTS,
    DaemonSection,
    EngineSection,
    InstanceSection,
    KVTransferSection,
    ModelSection,
    ObserveSection,
    ProxySection,
    Role,
    SupervisorSection,
    Topology,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "WILDCARD_HOSTS",
    "ConfigError",
    "DaemonSection",
    "EngineSection",
    "InstanceSection",
    "KVTransferSection",
    "ModelSection",
    "ObserveSection",
    "Problem",
    "ProxySection",
    "Role",
    "SupervisorSection",
    "Topology",
    "load_config",
    "parse_config",
]
