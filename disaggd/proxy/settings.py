"""What the proxy reads from the topology, resolved once per (re)load, and what a
drain changes: the admission gate and the in-flight count."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from disaggd.observe.logs import get_logger
from disaggd.proxy.handoff import StorageHandoff, handoff_for
from disaggd.topology import ProxySection, Topology

log = get_logger("disaggd.proxy")


@dataclass(frozen=True)
class Settings:
    """One snapshot of the proxy's settings; a request keeps the one it started with.

    Attributes:
        proxy: the ``[proxy]`` section (timeouts in seconds, sizes in bytes).
        handoff: how this connector's two legs are shaped.
        kv_check: run the KV check on disaggregated requests.
        block_size: KV block size, tokens.
        public_model / root_model: the model name clients use / the engine's model.
        api_key: the key clients must present (read from ``api_key_env``), or None.
        auth_required: ``api_key_env`` is set (a missing key then refuses everyone).
        retry_after: the ``Retry-After`` header value, seconds as bytes.
        connect_timeout: seconds to connect to an upstream.
    """

    proxy: ProxySection
    handoff: StorageHandoff
    kv_check: bool
    block_size: int
    public_model: str
    root_model: str
    api_key: bytes | None
    auth_required: bool
    retry_after: bytes
    connect_timeout: float

    @classmethod
    def from_topology(cls, topo: Topology) -> Settings:
        """Resolve `topo` (the API key's environment variable is read now)."""
        p = topo.proxy
        key: bytes | None = None
        if p.api_key_env is not None:
            value = os.environ.get(p.api_key_env, "")
            if value:
                key = value.encode()
            else:
                # Fail closed: a configured but missing key must not open the door.
                log.error("api_key_missing", env=p.api_key_env)
        return cls(
            proxy=p,
            handoff=handoff_for(topo.connector.handoff, topo.kv_transfer.check),
            kv_check=topo.kv_transfer.check,
            block_size=topo.kv_transfer.block_size,
            public_model=topo.model.public_name,
            root_model=topo.model.name,
            api_key=key,
            auth_required=p.api_key_env is not None,
            retry_after=str(p.retry_after).encode(),
            connect_timeout=p.connect_timeout,
        )


class Live:
    """What changes while the proxy serves: its settings (reload) and admission (drain).

    Attributes:
        settings: the snapshot new requests take.
        accepting: False once draining: new inference requests get 503.
        inflight: inference requests being served now.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accepting = True
        self.inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def enter(self) -> None:
        """Count one more request in flight."""
        self.inflight += 1
        if self.inflight == 1:
            self._drained.clear()

    def leave(self) -> None:
        """Count one request less; wakes `wait_drained` at 0."""
        self.inflight -= 1
        if self.inflight == 0:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if `timeout` (s) passed first."""
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
