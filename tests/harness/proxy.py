"""Stand-in engines as plain subprocesses, and a `Proxy` served in the test's own loop.

A `Cluster` starts the spawned instances of a topology document (stand-in
engines, no supervisor) and stops them; tests build proxies in front of it with
any `[proxy]` settings (`Cluster.topology`) and drive readiness themselves
(`Router.set_ready`), as the supervisor would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from disaggd.observe.metrics import Metrics
from disaggd.proxy.app import Proxy, bind_listener
from disaggd.proxy.router import Router
from disaggd.topology import Topology, parse_config
from disaggd.topology.spec import build_spec
from tests.harness.common import free_port, standin_topology

MODEL = "standin-model"


def running(c: Cluster) -> Iterator[Cluster]:
    """A module fixture's body: `c` started, yielded, then stopped (even on failure)."""
    c.start()
    try:
        yield c
    finally:
        c.stop()


def standin_cluster(
    factory: pytest.TempPathFactory,
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    **topology: Any,
) -> Iterator[Cluster]:
    """`running` for the stand-in engines of ``standin_topology(tmp, **topology)``."""
    tmp = factory.mktemp(name)
    yield from running(Cluster(tmp, standin_topology(tmp, **topology), env=env))


class Cluster:
    """The spawned instances of one topology document, running as stand-ins."""

    def __init__(self, tmp: Path, doc: dict[str, Any], env: Mapping[str, str] | None = None):
        self.doc = doc
        self.tmp = tmp
        self.base_topo = parse_config(doc, tmp / "topology.toml")
        self.env = dict(env or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout: float = 20.0) -> None:
        for inst in self.base_topo.instances:
            if not inst.spawned:
                continue
            spec = build_spec(self.base_topo, inst)
            spec.workdir.mkdir(parents=True, exist_ok=True)
            spec.tmpdir.mkdir(parents=True, exist_ok=True)
            env = {
                **os.environ,
                **spec.env,
                # One process per instance (no EngineCore grandchild) and quiet access logs:
                # the proxy is under test here, not process supervision.
                "STANDIN_FORK_ENGINE": "0",
                "STANDIN_ACCESS_LOG": "0",
                **self.env,
            }
            log = (spec.workdir / "output.log").open("ab")
            self.procs[inst.name] = subprocess.Popen(
                spec.argv, env=env, cwd=spec.workdir, stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
        deadline = time.monotonic() + timeout
        for name in self.procs:
            url = self.base_topo.instance(name).base_url + "/health"
            while True:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"stand-in {name} exited: {self.output(name)}")
                try:
                    with urllib.request.urlopen(url, timeout=1) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stand-in {name} not healthy: {self.output(name)}")
                time.sleep(0.05)

    def output(self, name: str) -> str:
        spec = build_spec(self.base_topo, self.base_topo.instance(name))
        path = spec.workdir / "output.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by pid
                proc.wait()
        self.procs.clear()

    def topology(self, **proxy: Any) -> Topology:
        """The cluster's topology with `[proxy]` settings changed and a fresh proxy port."""
        doc = json.loads(json.dumps(self.doc))
        # The stand-ins do not bind their KV ports, so a "free" port may be one of them.
        taken = {p for i in doc["instance"] for p in (i.get("port"), i.get("kv_port"))}
        port = free_port()
        while port in taken:
            port = free_port()
        doc["proxy"] = {**doc.get("proxy", {}), "port": port, **proxy}
        return parse_config(doc, self.tmp / "topology.toml")

    def port(self, name: str) -> int:
        port = self.base_topo.instance(name).port
        assert port is not None
        return port

    def url(self, name: str) -> str:
        return self.base_topo.instance(name).base_url

    # -- the stand-ins' own introspection (fresh connection each time: no pooled
    # connections to an instance that would count as the proxy's) --------------------------

    async def _call(self, method: str, name: str, path: str, body: Any = None) -> Any:
        conn = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=conn) as s,
            s.request(method, self.url(name) + path, json=body) as r,
        ):
            assert r.status == 200, await r.text()
            return await r.json()

    async def records(self, name: str, path: str | None = None) -> list[dict[str, Any]]:
        """Generation requests instance `name` received (health probes left out)."""
        recs = await self._call("GET", name, "/_standin/requests")
        return [
            r
            for r in recs
            if r["path"].startswith("/v1/")
            and r["path"] != "/v1/models"
            and (path is None or r["path"] == path)
        ]

    async def clear(self) -> None:
        for name in self.procs:
            await self._call("DELETE", name, "/_standin/requests")

    async def faults(self, name: str, **changes: Any) -> None:
        await self._call("POST", name, "/_standin/faults", changes)

    async def reset_faults(self) -> None:
        for name in self.procs:
            await self.faults(
                name,
                fail_status=None,
                fail_count=None,
                fail_match=None,
                token_delay=0.0,
                prefill_delay=0.0,
            )

    async def info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("GET", name, "/_standin/info")
        return info

    async def inflight(self, name: str) -> int:
        return int((await self.info(name))["counters"]["inflight"])


@dataclass
class Running:
    """A proxy serving in the current event loop."""

    proxy: Proxy
    router: Router
    metrics: Metrics
    topo: Topology
    base: str

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in the proxy's exposition (0.0 when absent)."""
        return metric_value(self.metrics.render().decode(), name, **labels)


@contextlib.asynccontextmanager
async def serve_proxy(
    topo: Topology, ready: Collection[str] | None = None
) -> AsyncIterator[Running]:
    """Serve a `Proxy` for `topo` in this loop; instances in `ready` (default: all) are ready."""
    import asyncio

    router = Router(topo)
    metrics = Metrics()
    proxy = Proxy(topo, router, metrics)
    for inst in topo.instances:
        if ready is None or inst.name in ready:
            router.set_ready(inst.name, True)
    stop = asyncio.Event()
    bound = asyncio.Event()
    # Bound before serving, as the daemon does before its children start.
    sock = bind_listener(topo.proxy.host, topo.proxy.port)
    task = asyncio.create_task(proxy.serve(stop.wait, sock=sock, bound=bound))
    await asyncio.wait_for(bound.wait(), 5)
    try:
        yield Running(proxy, router, metrics, topo, f"http://127.0.0.1:{topo.proxy.port}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await proxy.aclose()


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose remote end is 127.0.0.1:`port`.

    The proxy's connections to an upstream; 0 proves that it closed them (a
    stand-in that has not noticed yet still holds its end, in CLOSE_WAIT).
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    remote, state = parts[2], parts[3]
                    if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                        count += 1
        except FileNotFoundError:
            continue
    return count


def sse_events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body: JSON objects, and the string "[DONE]"."""
    out: list[Any] = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
