"""Prefix-cache routing on stand-ins: ``cache_aware`` against ``least_outstanding``, one run.

The workload (issue 12): `--prefixes` distinct long prefixes of `--prefix-tokens` words,
each used `--uses` times with a unique suffix of `--suffix-tokens` words, the uses shuffled
together (interleaved), sent at `--concurrency` through ``disaggd run`` in front of 2 prefill
stand-ins and 1 decode. Each stand-in's prefix cache holds `--cache-share` (default 0.5) of
the distinct prefixes' blocks: eviction pressure, the production case. Every prefill token
the cache misses costs `--token-delay` seconds, so TTFT shows the work.

For each policy, from the prefills' own metrics (as vLLM names them): the hit rate
(``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``), the prefill
tokens computed (``vllm:prompt_tokens_total`` minus the hits) against the ideal (every
distinct prefix computed once in the whole topology), TTFT p50/p99, and the decode's KV
verdicts (every request's KV must still have moved). Acceptance: cache_aware's hit rate is
at least 1.5x least_outstanding's.

    python -m bench.prefix [--prefixes 40] [--uses 4] [--concurrency 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import metric, scrape, start_daemon
from bench.loadgen import percentiles
from bench.overhead import instance_url, topology_doc

POLICIES = ("least_outstanding", "cache_aware")
PREFILLS = ("prefill-0", "prefill-1")
BLOCK_TOKENS = 16
#: cache_aware's hit rate over least_outstanding's that the issue asks for.
TARGET_RATIO = 1.5


def workload(args: argparse.Namespace) -> list[str]:
    """The prompts, in sending order: every prefix `uses` times, unique suffixes, shuffled."""
    rng = random.Random(args.seed)
    vocab = [f"w{i}" for i in range(5000)]
    prefixes = [
        " ".join(rng.choice(vocab) for _ in range(args.prefix_tokens)) for _ in range(args.prefixes)
    ]
    prompts = [
        f"{p} " + " ".join(f"s{n}x{k}" for k in range(args.suffix_tokens))
        for n, p in enumerate(p for p in prefixes for _ in range(args.uses))
    ]
    rng.shuffle(prompts)
    return prompts


def ideal_hits(args: argparse.Namespace) -> int:
    """Prompt tokens a perfect topology-wide cache hits: each prefix's whole blocks, on
    every use but its first."""
    cacheable = args.prefix_tokens // BLOCK_TOKENS * BLOCK_TOKENS
    return args.prefixes * (args.uses - 1) * cacheable


async def _send(session: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """One streamed completion; its TTFT (s)."""
    body = {"model": "standin-model", "prompt": prompt, "max_tokens": 4, "stream": True}
    t0 = time.monotonic()
    ttft = 0.0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for _chunk in resp.content.iter_any():
            if not ttft:
                ttft = time.monotonic() - t0
    return ttft


async def drive(url: str, prompts: list[str], concurrency: int) -> list[float]:
    """Send `prompts` in order, `concurrency` at a time; their TTFTs (s)."""
    queue = list(reversed(prompts))
    ttfts: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            ttfts.append(await _send(session, url, queue.pop()))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ttfts


def run_policy(policy: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start a daemon with `policy`, send the workload, read the engines' counters."""
    blocks = int(args.prefixes * args.cache_share * args.prefix_tokens / BLOCK_TOKENS)
    env = {
        "STANDIN_ACCESS_LOG": "0",
        "STANDIN_FORK_ENGINE": "0",
        "STANDIN_RECORD_LIMIT": "100",
        "STANDIN_PREFIX_CACHE_BLOCKS": str(blocks),
        "STANDIN_PREFIX_BLOCK_TOKENS": str(BLOCK_TOKENS),
        "STANDIN_PREFILL_TOKEN_DELAY": str(args.token_delay),
    }
    doc = topology_doc(tmp, 2, 1, env, prefill_policy=policy)
    prompts = workload(args)
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(tmp, doc, stack)
        t0 = time.monotonic()
        ttfts = asyncio.run(drive(daemon.proxy_url, prompts, args.concurrency))
        wall = time.monotonic() - t0
        texts = {name: scrape(instance_url(doc, name)) for name in (*PREFILLS, "decode-0")}
    per: dict[str, dict[str, float]] = {}
    for name in PREFILLS:
        text = texts[name]
        per[name] = {
            "prompt_tokens": metric(text, "vllm:prompt_tokens_total") or 0.0,
            "queries": metric(text, "vllm:prefix_cache_queries_total") or 0.0,
            "hits": metric(text, "vllm:prefix_cache_hits_total") or 0.0,
        }
    prompt = sum(p["prompt_tokens"] for p in per.values())
    hits = sum(p["hits"] for p in per.values())
    queries = sum(p["queries"] for p in per.values())
    ideal = prompt - ideal_hits(args)
    q = percentiles([t * 1000.0 for t in ttfts], (50, 99))
    return {
        "policy": policy,
        "requests": len(prompts),
        "cache_blocks_per_instance": blocks,
        "hit_rate": hits / queries if queries else 0.0,
        "prefill_tokens": prompt,
        "computed_tokens": prompt - hits,
        "ideal_computed_tokens": ideal,
        "computed_over_ideal": (prompt - hits) / ideal if ideal else 0.0,
        "prompt_tokens_by_prefill": {n: p["prompt_tokens"] for n, p in per.items()},
        "ttft_p50_ms": q["p50"],
        "ttft_p99_ms": q["p99"],
        "kv_hit": metric(texts["decode-0"], "standin_kv_verdicts_total", verdict="hit") or 0.0,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=40)
    ap.add_argument("--uses", type=int, default=4)
    ap.add_argument("--prefix-tokens", type=int, default=400)
    ap.add_argument("--suffix-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cache-share", type=float, default=0.5)
    ap.add_argument("--token-delay", type=float, default=0.0001)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="dd-prefix-") as tmp:
        for policy in POLICIES:
            results.append(run_policy(policy, Path(tmp) / policy, args))
    lo, ca = results
    ratio = ca["hit_rate"] / lo["hit_rate"] if lo["hit_rate"] else float("inf")
    report = {"args": vars(args) | {"out": None}, "results": results, "hit_rate_ratio": ratio}
    text = json.dumps(report, indent=2, default=str)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    for r in results:
        print(
            f"{r['policy']:>18}: hit rate {r['hit_rate']:.3f}, computed {r['computed_tokens']:.0f}"
            f" tokens = {r['computed_over_ideal']:.2f}x ideal, TTFT p50 {r['ttft_p50_ms']:.1f} ms"
            f" p99 {r['ttft_p99_ms']:.1f} ms, KV moved {r['kv_hit']:.0f}/{r['requests']}",
            file=sys.stderr,
        )
    ok = ratio >= TARGET_RATIO
    print(f"hit-rate ratio {ratio:.2f} (target >= {TARGET_RATIO}): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
