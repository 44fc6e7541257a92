"""The routing table and its policies, driven directly (no I/O)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from disaggd.proxy.breaker import BreakerState
from disaggd.proxy.router import Router
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role, Topology, parse_config
from disaggd.topology.spec import build_specs
from tests.harness.common import standin_topology


def _topo(tmp_path: Path, prefill: int = 2, decode: int = 3, **proxy: Any) -> Topology:
    return parse_config(standin_topology(tmp_path, prefill=prefill, decode=decode, proxy=proxy))


def _ready_all(router: Router) -> None:
    for up in router.upstreams():
        router.set_ready(up.name, True)


def _names(picks: list[Upstream | None]) -> list[str | None]:
    return [p.name if p else None for p in picks]


def test_one_upstream_per_instance_none_ready(tmp_path: Path) -> None:
    topo = _topo(tmp_path)
    router = Router(topo)
    ups = router.upstreams()
    assert [u.name for u in ups] == [i.name for i in topo.instances]
    assert not any(u.ready or u.draining or u.outstanding for u in ups)
    p0 = ups[0]
    inst = topo.instance("prefill-0")
    assert p0.role is Role.PREFILL and p0.base_url == inst.base_url
    assert p0.kv_address == f"127.0.0.1:{inst.kv_port}"
    assert router.pick(Role.PREFILL) is None and router.pick(Role.DECODE) is None
    assert router.ready_count(Role.PREFILL) == 0


def test_only_ready_not_draining_not_excluded(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path))
    router.set_ready("decode-1", True)
    assert _names([router.pick(Role.DECODE) for _ in range(3)]) == ["decode-1"] * 3
    router.set_ready("decode-2", True)
    router.set_draining("decode-1", True)
    assert router.pick(Role.DECODE).name == "decode-2"  # type: ignore[union-attr]
    assert router.pick(Role.DECODE, exclude=["decode-2"]) is None
    assert router.ready_count(Role.DECODE) == 1
    router.set_draining("decode-1", False)
    assert router.ready_count(Role.DECODE) == 2
    router.set_ready("unknown", True)  # a stale callback is ignored
    router.set_draining("unknown", True)


def test_least_outstanding_with_round_robin_ties(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path))
    _ready_all(router)
    # All idle: ties rotate.
    assert _names([router.pick(Role.DECODE) for _ in range(4)]) == [
        "decode-0",
        "decode-1",
        "decode-2",
        "decode-0",
    ]
    d = {u.name: u for u in router.upstreams()}
    router.acquire(d["decode-0"])
    router.acquire(d["decode-1"])
    assert router.pick(Role.DECODE).name == "decode-2"  # type: ignore[union-attr]
    router.acquire(d["decode-2"])
    router.acquire(d["decode-2"])
    router.release(d["decode-1"])
    assert router.pick(Role.DECODE).name == "decode-1"  # type: ignore[union-attr]
    # Spread under concurrency: pick + acquire, never release.
    router2 = Router(_topo(tmp_path))
    _ready_all(router2)
    counts: dict[str, int] = {}
    for _ in range(30):
        up = router2.pick(Role.DECODE)
        assert up is not None
        router2.acquire(up)
        counts[up.name] = counts.get(up.name, 0) + 1
    assert counts == {"decode-0": 10, "decode-1": 10, "decode-2": 10}


def test_round_robin_ignores_load(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path, decode_policy="round_robin"))
    _ready_all(router)
    d = {u.name: u for u in router.upstreams()}
    for _ in range(5):
        router.acquire(d["decode-0"])
    picks = _names([router.pick(Role.DECODE) for _ in range(6)])
    assert picks == ["decode-0", "decode-1", "decode-2"] * 2
    # Prefill keeps its own policy and cursor.
    assert _names([router.pick(Role.PREFILL) for _ in range(3)]) == [
        "prefill-0",
        "prefill-1",
        "prefill-0",
    ]
    router.set_ready("decode-1", False)
    assert _names([router.pick(Role.DECODE) for _ in range(4)]) == [
        "decode-0",
        "decode-2",
        "decode-0",
        "decode-2",
    ]


def test_release_never_goes_negative(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path))
    up = router.upstreams()[0]
    router.release(up)
    assert up.outstanding == 0


def test_update_topology_adds_keeps_and_drops(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, prefill=1, decode=2)
    router = Router(parse_config(doc))
    _ready_all(router)
    d = {u.name: u for u in router.upstreams()}
    router.acquire(d["decode-1"])

    # decode-1 removed while busy but not draining: dropped (its requests still
    # release the object they hold); decode-2 added, not ready; the rest unchanged.
    new = dict(doc)
    extra = {
        "name": "decode-2",
        "role": "decode",
        "port": doc["instance"][2]["port"] + 7,
        "kv_port": doc["instance"][2]["kv_port"] + 7,
    }
    new["instance"] = [doc["instance"][0], doc["instance"][1], extra]
    new["proxy"] = {**doc["proxy"], "decode_policy": "round_robin"}
    router.update_topology(parse_config(new))
    names = [u.name for u in router.upstreams()]
    assert names == ["prefill-0", "decode-0", "decode-2"]
    assert router.get("decode-0") is d["decode-0"] and d["decode-0"].ready
    assert router.get("decode-2").ready is False  # type: ignore[union-attr]
    router.release(d["decode-1"])
    assert d["decode-1"].outstanding == 0
    # The new policy applies: load is ignored.
    router.set_ready("decode-2", True)
    router.acquire(d["decode-0"])
    assert _names([router.pick(Role.DECODE) for _ in range(2)]) == ["decode-0", "decode-2"]


def test_removed_draining_busy_upstream_stays_until_idle(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, prefill=1, decode=2)
    router = Router(parse_config(doc))
    _ready_all(router)
    busy = router.get("decode-1")
    assert busy is not None
    router.acquire(busy)
    router.set_draining("decode-1", True)
    new = dict(doc)
    new["instance"] = doc["instance"][:2]
    router.update_topology(parse_config(new))
    assert router.get("decode-1") is busy  # listed while its request runs...
    assert router.pick(Role.DECODE, exclude=["decode-0"]) is None  # ...but never picked
    router.release(busy)
    assert router.get("decode-1") is None  # forgotten once idle
    assert [u.name for u in router.upstreams()] == ["prefill-0", "decode-0"]


def test_changed_address_is_a_new_upstream(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, prefill=1, decode=1)
    router = Router(parse_config(doc))
    _ready_all(router)
    old = router.get("decode-0")
    new = dict(doc)
    moved = {**doc["instance"][1], "port": doc["instance"][1]["port"] + 11}
    new["instance"] = [doc["instance"][0], moved]
    router.update_topology(parse_config(new))
    fresh = router.get("decode-0")
    assert fresh is not old and fresh is not None and not fresh.ready
    assert fresh.base_url.endswith(str(moved["port"]))
    assert router.get("prefill-0").ready  # type: ignore[union-attr]


def test_deferred_address_change_keeps_the_old_upstream_until_commit(tmp_path: Path) -> None:
    # A reload restarts changed instances one at a time: until its turn, an instance
    # whose port changed must stay routable and drainable at its old address.
    doc = standin_topology(tmp_path, prefill=1, decode=2)
    router = Router(parse_config(doc))
    _ready_all(router)
    old0, old1 = router.get("decode-0"), router.get("decode-1")
    assert old0 is not None and old1 is not None
    router.acquire(old1)
    new = dict(doc)
    moved = [{**doc["instance"][i], "port": doc["instance"][i]["port"] + 11} for i in (1, 2)]
    new["instance"] = [doc["instance"][0], *moved]
    router.update_topology(parse_config(new), deferred=["decode-0", "decode-1"])
    assert router.get("decode-0") is old0 and router.get("decode-1") is old1
    assert router.ready_count(Role.DECODE) == 2  # nothing left rotation yet
    router.commit("decode-1")
    fresh = router.get("decode-1")
    assert fresh is not old1 and fresh is not None and not fresh.ready
    assert fresh.base_url.endswith(str(moved[1]["port"]))
    assert router.ready_count(Role.DECODE) == 1 and router.get("decode-0") is old0
    router.release(old1)  # a request that held the old upstream finishes as usual
    assert old1.outstanding == 0 and router.get("decode-1") is fresh
    router.commit("decode-1")  # nothing pending any more: no-op
    assert router.get("decode-1") is fresh
    # A later update forgets what an earlier one deferred (a rollout that stopped):
    # decode-0 is back at its old address, and a stale commit must not move it.
    back = dict(doc)
    back["instance"] = [doc["instance"][0], doc["instance"][1], moved[1]]
    router.update_topology(parse_config(back))
    router.commit("decode-0")
    assert router.get("decode-0") is old0


async def test_wait_idle_is_event_driven(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path))
    up = router.get("decode-0")
    assert up is not None
    assert await router.wait_idle("decode-0", 0.01) is True
    assert await router.wait_idle("nope", 0.01) is True
    router.acquire(up)
    router.acquire(up)
    assert await router.wait_idle("decode-0", 0.05) is False
    assert up._idle_waiters == []  # a timed-out waiter leaves nothing behind

    async def finish() -> None:
        await asyncio.sleep(0.05)
        router.release(up)
        await asyncio.sleep(0.05)
        router.release(up)

    task = asyncio.create_task(finish())
    loop = asyncio.get_running_loop()
    t = loop.time()
    assert await router.wait_idle("decode-0", 5) is True
    assert 0.09 <= loop.time() - t < 1
    await task


@pytest.mark.parametrize("role", list(Role))
def test_pick_with_no_instances_of_a_role_after_reload(tmp_path: Path, role: Role) -> None:
    router = Router(_topo(tmp_path))
    _ready_all(router)
    for up in router.upstreams():
        if up.role is role:
            router.set_ready(up.name, False)
    assert router.pick(role) is None
    assert router.ready_count(role) == 0


def test_lease_holds_and_moves(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path))
    d = {u.name: u for u in router.upstreams()}
    with router.hold(d["decode-0"]) as held:
        assert (d["decode-0"].outstanding, d["decode-1"].outstanding) == (1, 0)
        held.move(d["decode-1"])
        assert held.up is d["decode-1"]
        assert (d["decode-0"].outstanding, d["decode-1"].outstanding) == (0, 1)
    assert d["decode-1"].outstanding == 0
    with pytest.raises(RuntimeError), router.hold(d["decode-2"]):
        raise RuntimeError("the lease is released on errors too")
    assert d["decode-2"].outstanding == 0


def test_upstreams_come_from_instance_specs(tmp_path: Path) -> None:

    topo = _topo(tmp_path)
    specs = build_specs(topo)
    got = {u.name: (u.role, u.base_url, u.kv_address) for u in Router(topo).upstreams()}
    assert got == {n: (sp.role, sp.base_url, sp.kv_address) for n, sp in specs.items()}


def test_why_none_names_each_instance_and_its_reason(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path, prefill=1, decode=3, breaker_failures=2))
    assert router.why_none(Role.DECODE) == "not ready: decode-0, decode-1, decode-2"
    _ready_all(router)
    assert router.why_none(Role.DECODE) == ""  # every decode can be picked
    router.set_draining("decode-0", True)
    router.set_ready("decode-2", False)
    up = router.get("decode-1")
    assert up is not None
    router.health.failed(up, "http_5xx")
    router.health.failed(up, "http_5xx")  # the second failure in a row opens its breaker
    assert router.why_none(Role.DECODE) == (
        "draining: decode-0; breaker open: decode-1; not ready: decode-2"
    )


def test_a_passing_health_check_after_unready_closes_the_breaker(tmp_path: Path) -> None:
    router = Router(_topo(tmp_path, prefill=1, decode=2, breaker_failures=1))
    _ready_all(router)
    up = router.get("decode-0")
    assert up is not None
    router.health.failed(up, "connect")  # a partition: its requests fail, the breaker opens
    assert up.tripped and router.breaker_state("decode-0") is BreakerState.OPEN
    router.set_ready("decode-0", True)  # no change of readiness: the breaker stays open
    assert up.tripped
    router.set_ready("decode-0", False)  # the probes noticed
    router.set_ready("decode-0", True)  # ... and the link healed
    assert not up.tripped and router.breaker_state("decode-0") is BreakerState.CLOSED
    assert router.why_none(Role.DECODE) == ""
