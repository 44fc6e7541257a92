"""Where the proxy's CPU goes: disaggd's proxy in this process, under a profiler, under load.

Two stand-in engines (1P1D, NIXL-style handoff, 1 ms per token, the overhead benchmark's
settings) run as subprocesses (`tests.harness.proxy.Cluster`); the proxy is served in this
process's event loop (`serve_proxy`, no supervisor: what the daemon runs per request); the
load generator (`bench.loadgen`) runs as a subprocess. For each shape, the proxy is measured
twice: once bare (CPU of this process per request and per streamed SSE event, the same
quotients as the overhead benchmark's), once under cProfile (the top entries, written with
the figures to ``--out``). The profiler inflates every Python call, so read its entries as
shares, and the bare run for the cost.

    python -m bench.profile_proxy --loop uvloop --out bench/results/profile-after.txt
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.common import loadgen_argv
from bench.overhead import EXTRA_EVENTS, STANDIN_ENV, standin_doc
from disaggd.observe import logs
from tests.harness.proxy import Cluster, serve_proxy

#: (name, concurrency, output tokens): the overhead benchmark's c16, c64 and c16-256tok.
SHAPES = (("c16", 16, 16), ("c64", 64, 16), ("c16-256tok", 16, 256))


async def _loadgen(url: str, concurrency: int, max_tokens: int, seconds: float) -> dict[str, Any]:
    argv = loadgen_argv(url, concurrency=concurrency, max_tokens=max_tokens, duration=seconds)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def _requests(res: dict[str, Any]) -> int:
    # Every request the proxy served: the measured ones and one warm-up per worker.
    return int(res["requests"]) + int(res["concurrency"])


async def _measure(
    url: str, shape: tuple[str, int, int], seconds: float, prof: cProfile.Profile | None
) -> str:
    name, conc, tokens = shape
    cpu0 = time.process_time()
    if prof is not None:
        prof.enable()
    res = await _loadgen(url, conc, tokens, seconds)
    if prof is not None:
        prof.disable()
    cpu = time.process_time() - cpu0
    n = _requests(res)
    events = n * (tokens + EXTRA_EVENTS)
    rps = res["req_per_s"]
    return (
        f"{name}: {n} requests ({rps} req/s measured), failed {res.get('failed')}, "
        f"CPU {cpu * 1000 / max(n, 1):.3f} ms/request, {cpu * 1e6 / max(events, 1):.1f} µs/event"
        + (" (under cProfile)" if prof is not None else "")
    )


def _by_package(stats: pstats.Stats) -> str:
    """Own time (tottime) summed per package: where a request's CPU goes, coarsely."""
    totals: dict[str, float] = {}
    for (path, _line, func), row in stats.stats.items():  # type: ignore[attr-defined]
        if path == "~":  # built-ins: name the C function (send, recv, poll, json...)
            key = "builtin " + func.split(" of ")[0].strip("{}<>").split()[-1]
        elif "site-packages/" in path:
            key = path.split("site-packages/")[1].split("/")[0]
        elif "/disaggd/" in path:
            key = "disaggd/" + path.split("/disaggd/")[1]
        else:
            key = "stdlib " + path.rsplit("/", 1)[-1]
        totals[key] = totals.get(key, 0.0) + row[2]
    whole = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    rows = [f"  {t:7.3f} s {100 * t / whole:5.1f} %  {k}" for k, t in top]
    return "own time by package (s, share of all profiled time):\n" + "\n".join(rows) + "\n\n"


async def _main(args: argparse.Namespace) -> str:
    logs.configure("logfmt", "warning")  # as the benchmark's daemons: no request_done lines
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dd-prof-") as tmp:
        cluster = Cluster(Path(tmp), standin_doc(Path(tmp), 1, 1), env=STANDIN_ENV)
        cluster.start()
        try:
            async with serve_proxy(cluster.topology()) as running:
                shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
                for shape in shapes:
                    lines.append(await _measure(running.base, shape, args.seconds, None))
                    print(lines[-1], file=sys.stderr)
                for shape in shapes:
                    prof = cProfile.Profile()
                    lines.append(await _measure(running.base, shape, args.seconds, prof))
                    print(lines[-1], file=sys.stderr)
                    buf = io.StringIO()
                    stats = pstats.Stats(prof, stream=buf)
                    buf.write(_by_package(stats))
                    stats.strip_dirs()
                    stats.sort_stats("tottime").print_stats(args.top)
                    stats.sort_stats("cumulative").print_stats(args.top)
                    lines.append(buf.getvalue())
        finally:
            cluster.stop()
    return "\n".join(lines)


def _runner(loop: str) -> Callable[[Coroutine[Any, Any, str]], str]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    text = f"loop: {args.loop}\n" + _runner(args.loop)(_main(args))
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
