"""Cache-aware routing: send a prompt where its prefix was sent before (approximate mode).

A prefill that finds a prompt's prefix in its KV cache skips that part of the
work (vLLM's automatic prefix caching). The proxy cannot see the engines'
caches without KV events, so it keeps, per instance, the prompts it recently
routed there and assumes the engine still holds them (the approximate mode of
vllm-router's ``cache_aware``, SGLang's router and llm-d's ``prefix-cache-scorer``).

The prompt as text
    completions: the prompt string (a batch: its prompts joined by ``\\x1e``;
    token ids: their decimal numbers joined by spaces); chat: the messages in
    order, each ``role \\x1f text \\x1e`` (non-text parts as sorted JSON), after
    the ``tools`` as sorted JSON. A conversation's next turn renders to the
    previous turn's text plus more, so it shares every block of it.

Blocks and hashes
    The text is cut into blocks of `BLOCK_CHARS` = 64 characters: about 16
    tokens at ~4 characters a token (llm-d's estimate), the size of vLLM's
    default KV block on GPU, so that one block of text is about one block of
    cache. Only whole blocks count (vLLM caches only full blocks), and only the
    first `MAX_BLOCKS` (2048 blocks, 128 KiB of text, ~32k tokens): the work per
    request is one pass over at most that much text. Block *i*'s hash is
    Python's own ``hash((hash of block i-1, text of block i))`` (SipHash, 64
    bits, in C): chained, so equal hashes mean equal prefixes, not merely equal
    blocks. It is salted per process, which is fine: the index never leaves it.

The index
    Per instance, an LRU of block hashes (`BlockLru`) of at most
    ``[proxy] prefix_index_blocks`` blocks (default 32768: ~524k tokens, the KV
    capacity of an 8B model on one 80 GB GPU, as llm-d sizes its own 31250),
    about 100 bytes a block in memory, so 3 MiB per instance at the default.
    A prompt's blocks are touched last-block-first, so the prefix is the most
    recently used and a prompt's tail is evicted before its head (vLLM frees a
    request's blocks in reverse order for the same reason). An instance that
    stops being ready (restart, crash) or leaves the topology drops its index.

The choice (`PrefixRouting.choose`), among the eligible instances of a role:
    1. session affinity (``[proxy] session_affinity``; the ``X-Session-Id``
       header, else the OpenAI ``user`` field): the instance that served the
       session last, if it is eligible and within the balance rule;
    2. ``cache_aware`` policy: the instance holding the most leading blocks of
       the prompt among those within the balance rule (ties: fewer in flight,
       then scan order);
    3. otherwise the least outstanding (ties: scan order, i.e. round robin).

The balance rule (`Balance`; SGLang's router, compared per candidate rather
than max against min of the whole pool): a candidate with ``L`` requests in
flight may be chosen for its cache or session only while
``L - Lmin <= cache_balance_abs`` or ``L <= cache_balance_rel * Lmin``, Lmin
being the least loaded eligible instance's count (defaults 16 and 1.5). So
whatever the prompts, an instance chosen for its cache holds at most
``max(Lmin + abs, rel * Lmin)`` requests when it is picked: one hot prefix
spills to the others once its instance is that far ahead.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from disaggd.topology import ProxySection, Role

#: Characters per block of prompt text (≈ 16 tokens, vLLM's default GPU block).
BLOCK_CHARS = 64

#: Blocks of a prompt that are hashed and matched at most (128 KiB of text).
MAX_BLOCKS = 2048

#: Sessions remembered per role at most (LRU), ~150 bytes each.
MAX_SESSIONS = 65536

#: Longest ``X-Session-Id`` / ``user`` value taken as a session (characters).
MAX_SESSION_CHARS = 256

#: Why an instance was chosen: its session, its cache, or its load alone.
WHY = ("session", "cache", "load")


class Candidate(Protocol):
    """What the choice reads of an upstream (`disaggd.proxy.upstream.Upstream`)."""

    @property
    def name(self) -> str: ...

    @property
    def outstanding(self) -> int: ...


C = TypeVar("C", bound=Candidate)


# -- the prompt as blocks ----------------------------------------------------------------------


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return " ".join(map(str, prompt))
        return "\x1e".join(_prompt_text(p) for p in prompt)
    return ""


def _chat_text(req: Mapping[str, Any]) -> str:
    parts: list[str] = []
    tools = req.get("tools")
    if tools:
        parts.append(json.dumps(tools, sort_keys=True, separators=(",", ":")) + "\x1d")
    for msg in req.get("messages") or ():
        if not isinstance(msg, Mapping):
            continue
        parts.append(f"{msg.get('role')}\x1f")
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    parts.append(json.dumps(part, sort_keys=True, separators=(",", ":")))
        parts.append("\x1e")
    return "".join(parts)


def render(chat: bool, req: Mapping[str, Any]) -> str:
    """The request's prompt as one deterministic text (module docstring, "The prompt as text")."""
    return _chat_text(req) if chat else _prompt_text(req.get("prompt"))


def block_hashes(text: str) -> list[int]:
    """Chained hashes of the whole `BLOCK_CHARS` blocks of `text` (at most `MAX_BLOCKS`)."""
    n = min(len(text) // BLOCK_CHARS, MAX_BLOCKS)
    out: list[int] = []
    h = 0
    for i in range(0, n * BLOCK_CHARS, BLOCK_CHARS):
        h = hash((h, text[i : i + BLOCK_CHARS]))
        out.append(h)
    return out


@dataclass(slots=True)
class RouteKey:
    """One request's routing key, computed once before its legs.

    Attributes:
        hashes: chained block hashes of the prompt (`block_hashes`).
        session: the session id, or None.
        matched: per role, the leading blocks the chosen instance held when chosen.
        why: per role, why that instance was chosen (one of `WHY`).
    """

    hashes: list[int]
    session: str | None = None
    matched: dict[Role, int] = field(default_factory=dict)
    why: dict[Role, str] = field(default_factory=dict)


def session_of(headers: Iterable[tuple[bytes, bytes]], req: Mapping[str, Any]) -> str | None:
    """The ``X-Session-Id`` header, else the body's ``user``; None when absent or unusable."""
    for name, value in headers:
        if name == b"x-session-id":
            sid = value.decode("latin-1").strip()
            if sid and len(sid) <= MAX_SESSION_CHARS and sid.isprintable():
                return sid
    user = req.get("user")
    if isinstance(user, str) and 0 < len(user) <= MAX_SESSION_CHARS:
        return user
    return None


# -- the index ---------------------------------------------------------------------------------


class BlockLru:
    """The block hashes recently routed to one instance, at most `capacity` (LRU).

    Attributes:
        capacity: blocks kept at most.
        evicted: blocks dropped to stay within `capacity`, since creation.
    """

    __slots__ = ("_blocks", "capacity", "evicted")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.evicted = 0
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are held."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int]) -> None:
        """Hold `hashes` as just used: the first block most recently, the last least."""
        blocks = self._blocks
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        over = len(blocks) - self.capacity
        if over > 0:
            self.evicted += over
            for _ in range(over):
                blocks.popitem(last=False)

    def resize(self, capacity: int) -> None:
        """Change the capacity; evicts the least recently used blocks beyond it."""
        self.capacity = capacity
        self.add(())


@dataclass(frozen=True, slots=True)
class Balance:
    """The balance rule (module docstring): thresholds in requests in flight."""

    abs: int = 16
    rel: float = 1.5

    def allows(self, load: int, least: int) -> bool:
        """Whether an instance with `load` in flight may be preferred when the least
        loaded eligible one has `least`."""
        return load - least <= self.abs or load <= self.rel * least


class PrefixRouting:
    """The per-instance prefix index, the session table and the choice that reads them.

    Pure: no I/O, no clock. The router calls `choose` for roles that `tracks`
    and `forget` / `retain` when instances restart or leave.
    """

    def __init__(self) -> None:
        self._index: dict[str, BlockLru] = {}
        self._sessions: dict[Role, OrderedDict[str, str]] = {r: OrderedDict() for r in Role}
        self._policy: dict[Role, str] = {r: "least_outstanding" for r in Role}
        self._tracked: dict[Role, bool] = {r: False for r in Role}
        self.balance = Balance()
        self.capacity = 32768
        self.affinity = False

    def configure(self, p: ProxySection) -> None:
        """Read ``[proxy]``: policies, thresholds, index size, affinity, the decode decider."""
        self._policy = {Role.PREFILL: p.prefill_policy, Role.DECODE: p.decode_policy}
        self.balance = Balance(p.cache_balance_abs, p.cache_balance_rel)
        self.affinity = p.session_affinity
        decider = p.decode_only_uncached_below_chars > 0
        for role in Role:
            cache = self._policy[role] == "cache_aware"
            self._tracked[role] = cache or self.affinity or (role is Role.DECODE and decider)
        if p.prefix_index_blocks != self.capacity:
            self.capacity = p.prefix_index_blocks
            for lru in self._index.values():
                lru.resize(self.capacity)

    @property
    def wanted(self) -> bool:
        """Whether requests need a `RouteKey` at all (some role is tracked)."""
        return any(self._tracked.values())

    def tracks(self, role: Role) -> bool:
        """Whether picks of `role` go through `choose`."""
        return self._tracked[role]

    def choose(self, role: Role, candidates: Sequence[C], key: RouteKey) -> C | None:
        """The candidate that gets the request (module docstring, "The choice").

        `candidates` are the eligible upstreams in scan order. Records the
        prompt's blocks (and the session) on the one chosen, and its match and
        reason in `key`.
        """
        if not candidates:
            return None
        least = min(c.outstanding for c in candidates)
        best, why, matched = self._by_session(role, candidates, key, least), "session", -1
        if best is None and self._policy[role] == "cache_aware" and key.hashes:
            best, matched = self._by_cache(candidates, key.hashes, least)
            why = "cache"
        if best is None:
            why = "load"
            if self._policy[role] == "round_robin":
                best = candidates[0]
            else:
                best = next(c for c in candidates if c.outstanding == least)
        lru = self._index.get(best.name)
        if lru is None:
            lru = self._index[best.name] = BlockLru(self.capacity)
        key.matched[role] = lru.match(key.hashes) if matched < 0 else matched
        key.why[role] = why
        lru.add(key.hashes)
        if key.session is not None and self.affinity:
            sessions = self._sessions[role]
            sessions[key.session] = best.name
            sessions.move_to_end(key.session)
            if len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
        return best

    def _by_session(
        self, role: Role, candidates: Sequence[C], key: RouteKey, least: int
    ) -> C | None:
        if key.session is None or not self.affinity:
            return None
        name = self._sessions[role].get(key.session)
        if name is None:
            return None
        for c in candidates:
            if c.name == name:
                return c if self.balance.allows(c.outstanding, least) else None
        return None

    def _by_cache(
        self, candidates: Sequence[C], hashes: Sequence[int], least: int
    ) -> tuple[C | None, int]:
        best: C | None = None
        score = 0
        for c in candidates:
            lru = self._index.get(c.name)
            if lru is None or not self.balance.allows(c.outstanding, least):
                continue
            n = lru.match(hashes)
            if n > score or (n == score and best is not None and c.outstanding < best.outstanding):
                best, score = c, n
        return best, score

    # -- instances come and go -------------------------------------------------------------

    def forget(self, name: str) -> None:
        """Drop what instance `name` was thought to hold (it restarted or left)."""
        self._index.pop(name, None)
        for sessions in self._sessions.values():
            stale = [s for s, n in sessions.items() if n == name]
            for s in stale:
                del sessions[s]

    def retain(self, names: Collection[str]) -> None:
        """Forget every instance not in `names` (after a reload)."""
        for name in [n for n in self._index if n not in names]:
            self.forget(name)

    def blocks(self, name: str) -> int:
        """Blocks the index holds for instance `name` (0 when none): `disaggd status`."""
        lru = self._index.get(name)
        return 0 if lru is None else len(lru)

    def sizes(self) -> dict[str, int]:
        """Instance name → blocks held, for every instance with an index."""
        return {name: len(lru) for name, lru in self._index.items()}


def route_key(
    chat: bool,
    req: Mapping[str, Any],
    headers: Iterable[tuple[bytes, bytes]],
    routing: PrefixRouting,
) -> RouteKey | None:
    """The request's `RouteKey`, or None when no role routes by key (no cost then)."""
    if not routing.wanted:
        return None
    session = session_of(headers, req) if routing.affinity else None
    return RouteKey(block_hashes(render(chat, req)), session)
