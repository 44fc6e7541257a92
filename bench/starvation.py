"""Supervision never starved (issue 11): the daemon's busiest load leaves its instances alone.

The proxy and the supervisor share one event loop. This check drives one daemon (2 prefill
+ 2 decode stand-ins, 1 ms per token) at the benchmark's highest concurrency and reads, from
the daemon itself, whether supervision noticed anything:

* before and after: ``disaggd status`` rows (control socket): every instance's pid,
  ``restarts`` and ``failures`` (a probe timing out three times in a row restarts it);
* during, every 0.25 s: the same rows (an instance seen not RUNNING or not ready is a
  finding) and ``disaggd_event_loop_lag_seconds`` (the largest lag of the last 10 s);
* after: the lag samples histogram (``disaggd_event_loop_lag_sample_seconds``).

Probes are tighter than the daemon's defaults (every 1 s, 1 s deadline, 3 in a row; the
defaults are 5 s, 5 s, 3), so a loop stalled for a second would show here first.

    python -m bench.starvation                     # c256, 16 tokens, 10 s
    python -m bench.starvation --concurrency 64 --max-tokens 256 --seconds 20

Prints PASS/MISS lines and the JSON (``--out FILE`` also writes it). A MISS is a finding,
not a failure: the exit status is 0 unless the check itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import daemon_pid, loadgen_argv, run_loadgen, scrape, start_daemon, status
from bench.overhead import OVERHEAD_ENV, topology_doc
from tests.harness.daemon import DaemonProcess

#: Stricter than the daemon's defaults (5 s, 5 s, 3): a loop stalled ~1 s fails a probe.
PROBES = {"probe_interval": 1.0, "probe_timeout": 1.0, "probe_failures": 3}
#: Seconds between samples of status and the lag gauge during the load.
PERIOD = 0.25
#: Largest loop lag that still counts as "not starved": well under one probe deadline.
LAG_LIMIT_S = 0.1


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples `name` (with or without labels) whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + "{") or line.startswith(name + " "))
        and all(w in line for w in want)
    ]
    return sum(values) if values else None


class Watcher:
    """Samples the daemon's status and loop-lag gauge in a thread while the load runs."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.findings: list[str] = []
        self.max_lag_s = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(PERIOD):
            at = round(time.monotonic() - t0, 2)
            try:
                rows = status(self.daemon)
                lag = metric(scrape(self.daemon.proxy_url), "disaggd_event_loop_lag_seconds")
            except OSError as exc:  # the control socket or /metrics did not answer in time
                self.findings.append(f"{at}s: no answer ({exc})")
                continue
            self.samples += 1
            self.max_lag_s = max(self.max_lag_s, lag or 0.0)
            for name, row in rows.items():
                if row["state"] != "RUNNING" or not row["ready"]:
                    self.findings.append(f"{at}s: {name} {row['state']} ready={row['ready']}")


def _supervision(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = ("pid", "state", "ready", "restarts", "failures")
    return {name: {k: row[k] for k in keys} for name, row in rows.items()}


def check(concurrency: int, max_tokens: int, seconds: float) -> dict[str, Any]:
    """Run the load once against a fresh daemon; what supervision saw, and the verdicts."""
    with tempfile.TemporaryDirectory(prefix="dd-starve-") as tmp, contextlib.ExitStack() as st:
        doc = topology_doc(Path(tmp), 2, 2, OVERHEAD_ENV)
        doc["supervisor"].update(PROBES)
        daemon = start_daemon(Path(tmp) / "daemon", doc, st)
        before = _supervision(status(daemon))
        argv = loadgen_argv(
            daemon.proxy_url, concurrency=concurrency, max_tokens=max_tokens, duration=seconds
        )
        with Watcher(daemon) as watch:
            load = run_loadgen(argv, timeout=seconds + 120)
        after = _supervision(status(daemon))
        text = scrape(daemon.proxy_url)
        lag_count = metric(text, "disaggd_event_loop_lag_sample_seconds_count") or 0.0
        lag_sum = metric(text, "disaggd_event_loop_lag_sample_seconds_sum") or 0.0
        over = lag_count - (
            metric(text, "disaggd_event_loop_lag_sample_seconds_bucket", le=str(LAG_LIMIT_S))
            or lag_count
        )
        pid = daemon_pid(daemon)
    changed = [
        f"{n}: {before[n]} -> {after.get(n)}"
        for n in before
        if after.get(n) is None
        or any(after[n][k] != before[n][k] for k in ("pid", "restarts", "failures"))
    ]
    verdicts = {
        "no instance restarted or failed": not changed,
        "no instance seen unready or not RUNNING": not watch.findings,
        f"loop lag <= {LAG_LIMIT_S * 1000:.0f} ms at every sample": watch.max_lag_s <= LAG_LIMIT_S,
        "0 failed requests": load["failed"] == 0,
    }
    return {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "probes": PROBES,
        "daemon_pid": pid,
        "load": {k: load[k] for k in ("requests", "failed", "errors", "req_per_s", "ttft_ms")},
        "before": before,
        "after": after,
        "changed": changed,
        "findings": watch.findings,
        "status_samples": watch.samples,
        "max_loop_lag_ms": round(watch.max_lag_s * 1000, 2),
        "lag_samples": int(lag_count),
        "lag_mean_ms": round(1000 * lag_sum / lag_count, 3) if lag_count else None,
        "lag_samples_over_limit": int(over),
        "verdicts": {k: "PASS" if v else "MISS" for k, v in verdicts.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = check(args.concurrency, args.max_tokens, args.seconds)
    for name, verdict in res["verdicts"].items():
        print(f"  {verdict:4}  {name}", file=sys.stderr)
    print(
        f"  max loop lag {res['max_loop_lag_ms']} ms over {res['status_samples']} samples; "
        f"{res['load']['requests']} requests at c{args.concurrency}",
        file=sys.stderr,
    )
    text = json.dumps(res, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
