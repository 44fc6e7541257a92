"""A/B: two builds of disaggd's proxy on the same engines, in the same alternating rounds.

    python -m bench.ab --base REV [--head REV] [--rounds 4] [--seconds 3] [--cases ...]

The question a refactor must answer ("are the figures no worse than before?") needs both
builds measured in one run: the machine's load moves more between runs than a small
regression does. One 1P1D daemon of this checkout spawns the two stand-in engines; two
more daemons route to them as remote (``url``) instances, disaggregated:

* ``head``: the ``disaggd`` of revision ``--head`` (default HEAD);
* ``base``: the ``disaggd`` of revision ``--base``.

Each build runs from a temporary worktree of its revision (its daemon process gets the
worktree first on ``PYTHONPATH``), so uncommitted edits in the checkout do not count; the
engines' daemon runs the head build.

Each round runs every case on both, in alternating order. Per case and build: req/s
(median of rounds), TTFT p50 (pooled), proxy CPU ms per request and µs per streamed chunk
(utime + stime of the daemon process, as in `bench.overhead`), and base/head ratios.
Prints the table and writes ``bench/results/ab-<base>-<head>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, daemon_pid
from bench.loadgen import percentiles
from bench.overhead import (
    EXTRA_EVENTS,
    OVERHEAD_ENV,
    Case,
    Proxy,
    Usage,
    Way,
    instance_url,
    median,
    one_run,
    select,
    topology_doc,
)
from tests.harness.daemon import DaemonProcess

RESULTS = ROOT / "bench" / "results"
DEFAULT_CASES = "c16,c64,c16-256tok"
#: A difference below this fraction is noise on a shared 2-core machine.
NOISE = 0.05


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def remote_daemon(
    tmp: Path, name: str, engines: dict[str, str], stack: contextlib.ExitStack, tree: Path
) -> DaemonProcess:
    """A daemon routing disaggregated to the shared engines; `tree` first on its path."""
    doc = topology_doc(tmp / name, 1, 1, OVERHEAD_ENV)
    doc["instance"] = [
        {"name": "prefill-0", "role": "prefill", "url": engines["prefill"]},
        {"name": "decode-0", "role": "decode", "url": engines["decode"]},
    ]
    (tmp / name).mkdir(parents=True, exist_ok=True)
    daemon = stack.enter_context(DaemonProcess(tmp / name, doc, env={"PYTHONPATH": str(tree)}))
    daemon.start(timeout=90)
    return daemon


def measure(
    ways: dict[str, Way], cases: Sequence[Case], rounds: int, seconds: float
) -> dict[str, Any]:
    """Every case on both builds, `rounds` times, alternating which goes first."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    usage: dict[tuple[str, str], Usage] = {}
    for rnd in range(rounds):
        for i, case in enumerate(cases):
            order = ["head", "base"] if (rnd + i) % 2 == 0 else ["base", "head"]
            for build in order:
                u = usage.setdefault((case.name, build), Usage())
                res = one_run(ways[build], case, seconds, u)
                runs.setdefault((case.name, build), []).append(res)
                print(
                    f"  round {rnd + 1} {case.name:<11} {build:<4} {res['req_per_s']:8.1f} req/s"
                    f"  failed {res['failed']}",
                    flush=True,
                )
    return {
        case.name: {
            build: summarize(case, runs[(case.name, build)], usage[(case.name, build)])
            for build in ("head", "base")
        }
        for case in cases
    }


def summarize(case: Case, results: list[dict[str, Any]], u: Usage) -> dict[str, Any]:
    ttft = [v for r in results for v in r["samples"]["ttft_ms"]]
    chunks = u.requests * (case.max_tokens + EXTRA_EVENTS)
    return {
        "req_per_s": round(median([r["req_per_s"] for r in results]), 1),
        "ttft_p50_ms": round(float(percentiles(ttft, (50,)).get("p50", float("nan"))), 2),
        "cpu_ms_per_req": round(u.cpu_s * 1e3 / max(u.requests, 1), 3),
        "cpu_us_per_chunk": round(u.cpu_s * 1e6 / max(chunks, 1), 2),
        "failed": sum(r["failed"] for r in results),
    }


def verdicts(table: dict[str, Any]) -> list[str]:
    """One line per case and figure: head vs base, and whether head is no worse."""
    lines = []
    higher_is_better = {"req_per_s": True, "ttft_p50_ms": False, "cpu_ms_per_req": False}
    for case, builds in table.items():
        head, base = builds["head"], builds["base"]
        for key, up in higher_is_better.items():
            ratio = head[key] / base[key] if base[key] else float("nan")
            ok = ratio >= 1 - NOISE if up else ratio <= 1 + NOISE
            lines.append(
                f"{case:<11} {key:<15} head {head[key]:>9} base {base[key]:>9} "
                f"head/base {ratio:5.2f}  {'PASS' if ok else 'MISS'} (no worse, ±{NOISE:.0%})"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare with (e.g. main~5)")
    p.add_argument("--head", default="HEAD", help="git revision measured against it")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cases", default=DEFAULT_CASES)
    args = p.parse_args(argv)
    base_rev, head_rev = (git("rev-parse", "--short", rev) for rev in (args.base, args.head))
    with tempfile.TemporaryDirectory(prefix="dd-ab-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        # `python -m disaggd` puts its working folder first on sys.path: run the daemons
        # from here, not from the checkout, so that each build's PYTHONPATH decides.
        stack.callback(os.chdir, Path.cwd())
        os.chdir(tmp)
        trees = {}
        for build, rev in (("head", head_rev), ("base", base_rev)):
            trees[build] = tmp / f"{build}-tree"
            git("worktree", "add", "--detach", str(trees[build]), rev)
            stack.callback(git, "worktree", "remove", "--force", str(trees[build]))
        doc = topology_doc(tmp / "engines", 1, 1, OVERHEAD_ENV)
        (tmp / "engines").mkdir()
        engines_daemon = DaemonProcess(tmp / "engines", doc, env={"PYTHONPATH": str(trees["head"])})
        stack.enter_context(engines_daemon).start(timeout=90)
        engines = {role: instance_url(doc, f"{role}-0") for role in ("prefill", "decode")}
        ways = {}
        for build, path in trees.items():
            d = remote_daemon(tmp, build, engines, stack, path)
            ways[build] = Way(d.proxy_url, None, Proxy(f"disaggd@{build}", daemon_pid(d), False))
        table = measure(ways, select(args.cases), args.rounds, args.seconds)
    lines = verdicts(table)
    print(f"\nA/B head {head_rev} vs base {base_rev}:\n" + "\n".join(lines))
    out = RESULTS / f"ab-{base_rev}-{head_rev}.json"
    out.write_text(json.dumps({"base": base_rev, "head": head_rev, "table": table}, indent=1))
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
