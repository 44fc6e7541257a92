"""Part 1: what a proxy costs, five ways of serving the same two stand-in engines, alternated.

* ``direct``: the load generator streams from the decode engine itself;
* ``two_leg``: it sends the prefill leg, then the decode leg with the returned params
  (the least any P/D proxy can cost);
* ``proxied_disagg``: disaggd's proxy (the 1P1D daemon that spawned the engines);
* ``proxied_decode_only``: a second daemon in front of the same engines, every prompt
  decode-only (the proxy hop alone);
* ``vllm_router``: vLLM's Rust P/D router (`bench.vllm_router`), when it could be started.

Each case (concurrency, output tokens, prompt length) runs every way once per round, in a
rotated order per round, so that a noisy minute hurts every way alike. For the three proxies,
CPU time (utime + stime from /proc) and peak RSS of the proxy process are read around each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import vllm_router
from bench.common import (
    RssSampler,
    daemon_pid,
    descendants,
    loadgen_argv,
    run_loadgen,
    start_daemon,
    status_mb,
    tree_cpu_seconds,
)
from bench.loadgen import percentiles
from tests.harness.common import standin_topology

WAYS = ("direct", "two_leg", "proxied_disagg", "proxied_decode_only", "vllm_router")
STANDIN_ENV = {
    "STANDIN_TOKEN_DELAY": "0.001",
    "STANDIN_ACCESS_LOG": "0",
    "STANDIN_FORK_ENGINE": "0",
}
#: The stand-ins keep each request's body for /_standin/requests; 220 KB prompts add up.
OVERHEAD_ENV = {**STANDIN_ENV, "STANDIN_RECORD_LIMIT": "1000"}
#: The daemon's own [supervisor] defaults, except a shorter start timeout and grace.
SUPERVISOR = {"start_timeout": 60, "stop_grace": 10}
#: SSE events of a response besides its token chunks: the usage chunk and ``[DONE]``.
EXTRA_EVENTS = 2


@dataclass(frozen=True)
class Case:
    """One load shape: every way runs it once per round."""

    name: str
    concurrency: int
    max_tokens: int = 16
    prompt_chars: int | None = None  # None: the load generator's 256-character prompt


CASES = (
    Case("c16", 16),
    Case("c64", 64),
    Case("c256", 256),
    Case("c16-256tok", 16, max_tokens=256),
    Case("c1-220kB", 1, prompt_chars=220_000),
    Case("c16-220kB", 16, prompt_chars=220_000),
)


def standin_doc(tmp: Path, prefill: int, decode: int, **proxy: Any) -> dict[str, Any]:
    """A stand-in topology with the benchmark's engine settings and quiet logs."""
    return topology_doc(tmp, prefill, decode, STANDIN_ENV, **proxy)


def topology_doc(
    tmp: Path, prefill: int, decode: int, env: Mapping[str, str], **proxy: Any
) -> dict[str, Any]:
    names = [f"prefill-{i}" for i in range(prefill)] + [f"decode-{i}" for i in range(decode)]
    doc = standin_topology(
        tmp,
        prefill=prefill,
        decode=decode,
        instance_env={n: env for n in names},
        proxy=proxy,
        daemon={"log_level": "warning"},
    )
    doc["supervisor"] = dict(SUPERVISOR)
    return doc


def instance_url(doc: Mapping[str, Any], name: str) -> str:
    inst = next(i for i in doc["instance"] if i["name"] == name)
    return f"http://127.0.0.1:{inst['port']}"


# -- the ways ------------------------------------------------------------------------------------


@dataclass
class Proxy:
    """A proxy process whose CPU and memory are measured."""

    name: str  # disaggd, disaggd_decode_only, vllm_router
    pid: int
    with_children: bool  # the daemon's children are the engines: not the proxy's cost

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)] if self.with_children else [self.pid]


@dataclass
class Way:
    url: str
    prefill_url: str | None = None
    proxy: Proxy | None = None


@dataclass
class Usage:
    """A proxy's CPU and requests over the runs of one case."""

    cpu_s: float = 0.0
    requests: int = 0
    peak_rss_mb: float = 0.0


@dataclass
class Setup:
    ways: dict[str, Way]
    decode_url: str
    info: dict[str, Any] = field(default_factory=dict)


def start_ways(tmp: Path, stack: contextlib.ExitStack, router_venv: Path | None) -> Setup:
    """Both daemons and (if it can) vllm-router, in front of the same two engines."""
    doc_a = topology_doc(tmp / "disagg", 1, 1, OVERHEAD_ENV)
    disagg = start_daemon(tmp / "disagg", doc_a, stack)
    prefill_url = instance_url(doc_a, "prefill-0")
    decode_url = instance_url(doc_a, "decode-0")
    # A second daemon in front of the same two engines, routing every prompt
    # decode-only: the proxy hop alone.
    doc_b = topology_doc(tmp / "decode_only", 1, 1, OVERHEAD_ENV, decode_only_below_chars=10**7)
    doc_b["instance"] = [
        {"name": "prefill-0", "role": "prefill", "url": prefill_url},
        {"name": "decode-0", "role": "decode", "url": decode_url},
    ]
    decode_only = start_daemon(tmp / "decode_only", doc_b, stack)
    ways = {
        "direct": Way(decode_url),
        "two_leg": Way(decode_url, prefill_url),
        "proxied_disagg": Way(disagg.proxy_url, None, Proxy("disaggd", daemon_pid(disagg), False)),
        "proxied_decode_only": Way(
            decode_only.proxy_url,
            None,
            Proxy("disaggd_decode_only", daemon_pid(decode_only), False),
        ),
    }
    setup = Setup(ways, decode_url)
    router = start_router(tmp, stack, router_venv, prefill_url, decode_url)
    if isinstance(router, str):
        setup.info["vllm_router"] = {"skipped": router}
    else:
        ways["vllm_router"] = Way(router.url, None, Proxy("vllm_router", router.pid, True))
        setup.info["vllm_router"] = {
            "package": f"{vllm_router.PACKAGE}=={vllm_router.VERSION}",
            "argv": [Path(router.argv[0]).name, *router.argv[1:]],
            "children": len(descendants(router.pid)),
        }
    setup.info["handoff"] = {
        way: handoff_verdict(w.url, decode_url, way) for way, w in ways.items() if w.proxy
    }
    print(f"  handoff seen by the decode engine: {setup.info['handoff']}", flush=True)
    return setup


def start_router(
    tmp: Path,
    stack: contextlib.ExitStack,
    venv: Path | None,
    prefill_url: str,
    decode_url: str,
) -> vllm_router.VllmRouter | str:
    """A started vllm-router, or why there is none (printed)."""
    if venv is None:
        why = "not asked for (--no-vllm-router)"
    else:
        try:
            exe = vllm_router.ensure(venv)
            router = stack.enter_context(
                vllm_router.VllmRouter(exe, prefill_url, decode_url, tmp / "vllm-router.log")
            )
            return router.start()
        except vllm_router.Unavailable as exc:
            why = str(exc)
    print(f"  vllm-router: skipped: {why}", flush=True)
    return why


def handoff_verdict(url: str, decode_url: str, tag: str) -> str | None:
    """One request through a proxy; the decode stand-in's verdict on it.

    "hit": the decode loaded the KV of a prefill of the same prompt (the handoff worked);
    "miss": it computed the prompt itself (decode-only); "invalid": a wrong handoff.
    """
    prompt = f"handoff check {tag} " * 20
    body = {"model": "standin-model", "prompt": prompt, "max_tokens": 4, "stream": False}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
        with urllib.request.urlopen(f"{decode_url}/_standin/requests", timeout=30) as resp:
            records = json.load(resp)
    except OSError as exc:
        return f"error: {exc}"
    seen = [r for r in records if (r.get("body") or {}).get("prompt") == prompt]
    return seen[-1].get("verdict") if seen else None


# -- measuring -----------------------------------------------------------------------------------


def one_run(way: Way, case: Case, seconds: float, usage: Usage) -> dict[str, Any]:
    """One load-generator run of `case` on `way`; a proxy's CPU and RSS go into `usage`."""
    argv = loadgen_argv(
        way.url,
        prefill_url=way.prefill_url,
        concurrency=case.concurrency,
        duration=seconds,
        samples=True,
        max_tokens=case.max_tokens,
        prompt_chars=case.prompt_chars,
    )
    if way.proxy is None:
        return run_loadgen(argv)
    pids = way.proxy.pids()
    with RssSampler(way.proxy.pid) as sampler:
        before = tree_cpu_seconds(pids)
        res = run_loadgen(argv)
        used = tree_cpu_seconds(pids) - before
    usage.cpu_s += used
    # The warm-up requests (one per worker) cost the proxy too.
    usage.requests += res["requests"] + case.concurrency
    usage.peak_rss_mb = max(usage.peak_rss_mb, sampler.peak_mb)
    return res


def rotated(ways: Sequence[str], shift: int) -> list[str]:
    shift %= len(ways)
    return [*ways[shift:], *ways[:shift]]


def overhead(
    tmp: Path,
    cases: Sequence[Case],
    rounds: int,
    seconds: float,
    router_venv: Path | None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """Every case, every way, `rounds` times; returns (the JSON part, raw samples for the plot)."""
    with contextlib.ExitStack() as stack:
        setup = start_ways(tmp, stack, router_venv)
        ways = [w for w in WAYS if w in setup.ways]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        usage: dict[tuple[str, str], Usage] = {}
        total = rounds * len(cases) * len(ways)
        done = 0
        for rnd in range(rounds):
            for i, case in enumerate(cases):
                for way in rotated(ways, rnd + i):
                    u = usage.setdefault((case.name, way), Usage())
                    res = one_run(setup.ways[way], case, seconds, u)
                    # Other people's jobs on the machine show here (the 1-minute average).
                    res["loadavg"] = round(os.getloadavg()[0], 2)
                    runs.setdefault((case.name, way), []).append(res)
                    done += 1
                    progress(done, total, case, way, res)
        hwm = {
            w.proxy.name: round(status_mb(w.proxy.pid, "VmHWM"), 1)
            for w in setup.ways.values()
            if w.proxy
        }
        entries = []
        raw: dict[str, dict[str, list[float]]] = {}
        for case in cases:
            entry = case_entry(case, ways=ways, setup=setup, runs=runs, usage=usage, raw=raw)
            entries.append(entry)
        return {**setup.info, "ways": ways, "proxy_hwm_mb": hwm, "cases": entries}, raw


def progress(done: int, total: int, case: Case, way: str, res: Mapping[str, Any]) -> None:
    print(
        f"  [{done}/{total}] {case.name:<11} {way:<20} {res['req_per_s']:8.1f} req/s"
        f"  ttft p50 {res['ttft_ms'].get('p50', float('nan')):8.2f} ms"
        f"  failed {res['failed']}  load {res['loadavg']:.1f}",
        flush=True,
    )


def case_entry(
    case: Case,
    *,
    ways: Sequence[str],
    setup: Setup,
    runs: Mapping[tuple[str, str], list[dict[str, Any]]],
    usage: Mapping[tuple[str, str], Usage],
    raw: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    """One case's JSON: each way's pooled figures and each proxy's CPU and memory."""
    entry: dict[str, Any] = {
        "case": case.name,
        "concurrency": case.concurrency,
        "max_tokens": case.max_tokens,
        "prompt_chars": runs[(case.name, ways[0])][0]["prompt_chars"],
        "ways": {},
        "proxies": {},
    }
    loads = [r["loadavg"] for way in ways for r in runs[(case.name, way)]]
    entry["loadavg_1m"] = {"min": min(loads), "max": max(loads)}
    for way in ways:
        entry["ways"][way], raw[f"{case.name}/{way}"] = pool(runs[(case.name, way)])
        proxy = setup.ways[way].proxy
        if proxy is not None:
            u = usage[(case.name, way)]
            chunks = u.requests * (case.max_tokens + EXTRA_EVENTS)
            entry["proxies"][proxy.name] = {
                "way": way,
                "cpu_s": round(u.cpu_s, 3),
                "requests": u.requests,
                "cpu_ms_per_req": round(u.cpu_s * 1e3 / max(u.requests, 1), 4),
                "cpu_us_per_chunk": round(u.cpu_s * 1e6 / max(chunks, 1), 2),
                "peak_rss_mb": round(u.peak_rss_mb, 1),
            }
    return entry


def pool(results: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """One way in one case over all rounds: pooled percentiles, median rates."""
    samples: dict[str, list[float]] = {"ttft_ms": [], "itl_ms": [], "e2e_ms": []}
    errors: dict[str, int] = {}
    for r in results:
        for key, values in r["samples"].items():
            samples[key] += values
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    rates = [r["req_per_s"] for r in results]
    summary = {
        **{key: percentiles(values) for key, values in samples.items()},
        "req_per_s": median(rates),
        "tokens_per_s": median([r["tokens_per_s"] for r in results]),
        "req_per_s_rounds": rates,
        "requests": sum(r["requests"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "errors": errors,
    }
    return summary, samples


def median(xs: Sequence[float]) -> float:
    p = percentiles(xs, (50,))
    return float(p["p50"]) if p else float("nan")


def select(names: str | None) -> tuple[Case, ...]:
    """The cases named (comma-separated), all of them for None."""
    if not names:
        return CASES
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names.split(",") if n.strip() and n.strip() not in by_name]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(by_name)}")
    return tuple(by_name[n.strip()] for n in names.split(",") if n.strip())
