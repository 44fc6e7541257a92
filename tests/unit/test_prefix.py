"""Prefix-aware routing, driven directly: the prompt as blocks, the bounded index,
the balance rule, the choice, and the router's hook (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from disaggd.proxy.prefix import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    Balance,
    BlockLru,
    PrefixRouting,
    RouteKey,
    block_hashes,
    render,
    route_key,
    session_of,
)
from disaggd.proxy.router import Router
from disaggd.topology import Role, parse_config
from tests.harness.common import standin_topology


@dataclass
class Fake:
    name: str
    outstanding: int = 0


def _routing(**proxy: object) -> PrefixRouting:
    topo = parse_config(
        standin_topology(Path("/tmp"), proxy={"prefill_policy": "cache_aware", **proxy})
    )
    r = PrefixRouting()
    r.configure(topo.proxy)
    return r


def _key(text: str, session: str | None = None) -> RouteKey:
    return RouteKey(block_hashes(text), session)


# -- the prompt as blocks ------------------------------------------------------------------------


def test_whole_blocks_only_chained_and_capped() -> None:
    assert block_hashes("x" * (BLOCK_CHARS - 1)) == []
    a = block_hashes("a" * BLOCK_CHARS * 3)
    assert len(a) == 3 and len(set(a)) == 3  # same block text, different place in the chain
    b = block_hashes("b" * BLOCK_CHARS + "a" * BLOCK_CHARS * 2)
    assert a[1:] != b[1:]  # equal blocks after a different prefix do not match
    assert len(block_hashes("z" * BLOCK_CHARS * (MAX_BLOCKS + 10))) == MAX_BLOCKS


def test_next_chat_turn_extends_the_previous_text() -> None:
    turn1 = {
        "messages": [{"role": "system", "content": "s" * 200}, {"role": "user", "content": "hi"}]
    }
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "yo"}]}
    t1, t2 = render(True, turn1), render(True, turn2)
    assert t2.startswith(t1)
    h1, h2 = block_hashes(t1), block_hashes(t2)
    assert h2[: len(h1)] == h1
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q" * 70}]}]}
    assert render(True, parts) == "user\x1f" + "q" * 70 + "\x1e"


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("abc", "abc"),
        (["ab", "cd"], "ab\x1ecd"),
        ([1, 22, 333], "1 22 333"),
        ([[1], [2]], "1\x1e2"),
    ],
)
def test_completion_prompts_render(prompt: object, text: str) -> None:
    assert render(False, {"prompt": prompt}) == text


def test_session_header_then_user_field() -> None:
    assert session_of([(b"x-session-id", b" conv-1 ")], {"user": "u"}) == "conv-1"
    assert session_of([(b"x-session-id", b"x" * 300)], {"user": "u"}) == "u"
    assert session_of([], {"user": 5}) is None


def test_no_key_when_nothing_routes_by_it() -> None:
    r = PrefixRouting()
    assert route_key(False, {"prompt": "p" * 500}, [], r) is None
    r = _routing()
    key = route_key(False, {"prompt": "p" * 500}, [(b"x-session-id", b"s")], r)
    assert key is not None and len(key.hashes) == 500 // BLOCK_CHARS and key.session is None


# -- the index ------------------------------------------------------------------------------------


def test_lru_tail_goes_before_head() -> None:
    lru = BlockLru(4)
    lru.add([1, 2, 3])
    lru.add([7, 8])  # over by one: the oldest is 3, the tail of the first prompt
    assert len(lru) == 4 and lru.evicted == 1
    assert lru.match([1, 2, 3]) == 2 and lru.match([7, 8]) == 2


def test_index_stays_bounded_over_100k_distinct_prompts() -> None:
    r = _routing(prefix_index_blocks=5000)
    ups = [Fake("prefill-0"), Fake("prefill-1")]
    added = 0
    for i in range(100_000):
        key = _key(f"{i:08d}" * (3 * BLOCK_CHARS // 8))  # 3 blocks, distinct from block one
        added += len(key.hashes)
        assert r.choose(Role.PREFILL, ups[i % 2 :] + ups[: i % 2], key) is not None
    sizes = r.sizes()
    assert set(sizes) == {"prefill-0", "prefill-1"}
    assert all(n == 5000 for n in sizes.values())
    evicted = sum(lru.evicted for lru in r._index.values())
    assert evicted + sum(sizes.values()) == added == 300_000
    assert not r._sessions[Role.PREFILL]


# -- the balance rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("abs_", "rel", "load", "least", "allowed"),
    [
        (16, 1.5, 16, 0, True),  # exactly abs ahead of an idle one
        (16, 1.5, 17, 0, False),  # one more: spill (rel * 0 never helps)
        (16, 1.5, 40, 30, True),  # 10 ahead
        (16, 1.5, 57, 40, True),  # 17 ahead but within 1.5x
        (16, 1.5, 46, 29, False),  # 17 ahead and over 1.5x
        (0, 1.0, 0, 0, True),  # strictest: only as idle as the least loaded
        (0, 1.0, 1, 0, False),
        (0, 1.0, 5, 5, True),
        (2, 2.0, 10, 5, True),  # the rel arm alone
        (2, 2.0, 11, 5, False),
    ],
)
def test_balance_rule_edges(abs_: int, rel: float, load: int, least: int, allowed: bool) -> None:
    assert Balance(abs_, rel).allows(load, least) is allowed


# -- the choice ----------------------------------------------------------------------------------


def test_cache_aware_follows_the_prefix_until_the_balance_rule_says_no() -> None:
    r = _routing(cache_balance_abs=2, cache_balance_rel=1.5)
    a, b = Fake("prefill-0"), Fake("prefill-1")
    text = "p" * (BLOCK_CHARS * 10)
    first = _key(text + "one")
    assert r.choose(Role.PREFILL, [a, b], first) is a and first.why[Role.PREFILL] == "load"
    assert first.matched[Role.PREFILL] == 0
    a.outstanding = 2  # busier, but within abs of b's 0
    again = _key(text + "two")
    assert r.choose(Role.PREFILL, [b, a], again) is a
    assert again.why[Role.PREFILL] == "cache" and again.matched[Role.PREFILL] == 10
    a.outstanding = 3  # 3 - 0 > 2 and 3 > 1.5 * 0: the hot prefix spills
    spill = _key(text + "three")
    assert r.choose(Role.PREFILL, [a, b], spill) is b and spill.why[Role.PREFILL] == "load"
    # b now holds it too: a tie on the match goes to the less loaded.
    tie = _key(text + "four")
    assert r.choose(Role.PREFILL, [a, b], tie) is b and tie.why[Role.PREFILL] == "cache"


def test_session_affinity_within_the_balance_rule() -> None:
    r = _routing(prefill_policy="least_outstanding", session_affinity=True, cache_balance_abs=1)
    a, b = Fake("prefill-0"), Fake("prefill-1")
    assert r.choose(Role.PREFILL, [a, b], _key("x", "s1")) is a
    a.outstanding = 1
    k = _key("y", "s1")
    assert r.choose(Role.PREFILL, [b, a], k) is a and k.why[Role.PREFILL] == "session"
    a.outstanding = 2  # overloaded: the session moves, and stays where it moved
    assert r.choose(Role.PREFILL, [a, b], _key("z", "s1")) is b
    a.outstanding = 0
    assert r.choose(Role.PREFILL, [a, b], _key("w", "s1")) is b
    r.forget("prefill-1")  # b restarted: its sessions and blocks are gone
    assert r.blocks("prefill-1") == 0
    k = _key("v", "s1")
    assert r.choose(Role.PREFILL, [a, b], k) is a and k.why[Role.PREFILL] == "load"


def test_round_robin_decode_with_the_decider_takes_scan_order() -> None:
    r = _routing(
        prefill_policy="round_robin",
        decode_policy="round_robin",
        decode_only_uncached_below_chars=100,
    )
    assert r.tracks(Role.DECODE) and not r.tracks(Role.PREFILL)
    a, b = Fake("decode-0", 5), Fake("decode-1", 0)
    k = _key("d" * BLOCK_CHARS * 2)
    assert r.choose(Role.DECODE, [a, b], k) is a and k.matched[Role.DECODE] == 0
    assert r.choose(Role.DECODE, [a, b], _key("d" * BLOCK_CHARS * 2)) is a
    assert r.blocks("decode-0") == 2


# -- the router's hook ---------------------------------------------------------------------------


def test_router_routes_by_key_and_forgets_restarted_or_removed(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, prefill=2, decode=1, proxy={"prefill_policy": "cache_aware"})
    router = Router(parse_config(doc))
    for up in router.upstreams():
        router.set_ready(up.name, True)
    text = "k" * (BLOCK_CHARS * 4)
    first = router.pick(Role.PREFILL, key=_key(text))
    assert first is not None
    router.acquire(first)  # busier, within the default balance
    assert router.pick(Role.PREFILL, key=_key(text)) is first
    other = next(u for u in router.upstreams() if u.role is Role.PREFILL and u is not first)
    assert router.pick(Role.PREFILL) is other  # no key: least outstanding
    assert router.pick(Role.PREFILL, exclude=[first.name], key=_key(text)) is other
    assert router.cache.blocks(first.name) == 4
    router.set_ready(first.name, False)  # it restarts: its cache is empty
    assert router.cache.blocks(first.name) == 0
    router.set_ready(first.name, True)
    doc["instance"] = [i for i in doc["instance"] if i["name"] != other.name]
    router.update_topology(parse_config(doc))
    assert other.name not in router.cache.sizes()
