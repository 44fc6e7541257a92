"""The targets of issue 7 against a run's figures, the printed tables, and the plot.

``python -m bench.report bench/results/FILE.json`` prints the README's "Latest
results" section for that run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WAYS = ("direct", "two_leg", "proxied_disagg", "proxied_decode_only")


def _entry(doc: Mapping[str, Any], concurrency: int) -> Mapping[str, Any] | None:
    entries: list[Mapping[str, Any]] = doc.get("overhead", [])
    return next((e for e in entries if e["concurrency"] == concurrency), None)


def _get(obj: Any, *path: str | int) -> Any:
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _diff(e: Mapping[str, Any] | None, way: str, base: str, stat: str) -> float | None:
    a, b = _get(e, way, "ttft_ms", stat), _get(e, base, "ttft_ms", stat)
    return None if a is None or b is None else round(a - b, 2)


def _row(target: str, measured: float | None, unit: str, ok: bool | None) -> dict[str, Any]:
    verdict = "n/a" if measured is None or ok is None else ("PASS" if ok else "MISS")
    return {"target": target, "measured": measured, "unit": unit, "result": verdict}


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target next to its measurement: PASS, MISS or n/a (not measured)."""
    c16, c64 = _entry(doc, 16), _entry(doc, 64)
    rows = []
    d = _diff(c16, "proxied_decode_only", "direct", "p50")
    rows.append(
        _row("decode-only hop adds <= 1 ms TTFT p50 (c=16)", d, "ms", d is not None and d <= 1)
    )
    d = _diff(c16, "proxied_decode_only", "direct", "p99")
    rows.append(
        _row("decode-only hop adds <= 5 ms TTFT p99 (c=16)", d, "ms", d is not None and d <= 5)
    )
    d = _diff(c16, "proxied_disagg", "two_leg", "p50")
    rows.append(
        _row("disagg adds <= 3 ms TTFT p50 over two-leg (c=16)", d, "ms", d is not None and d <= 3)
    )
    a, b = _get(c64, "proxied_disagg", "req_per_s"), _get(c64, "two_leg", "req_per_s")
    ratio = round(a / b, 3) if a and b else None
    rows.append(
        _row("disagg req/s >= 0.8 x two-leg (c=64)", ratio, "x", ratio is not None and ratio >= 0.8)
    )
    cpu = [e["daemon_cpu_s_per_req"] for e in doc.get("overhead", [])]
    worst = round(max(cpu) * 1e3, 3) if cpu else None
    rows.append(
        _row(
            "daemon CPU <= 1 ms per disagg request (worst concurrency)",
            worst,
            "ms",
            worst is not None and worst <= 1,
        )
    )
    mem = _get(doc, "recovery", "memory")
    rss = None
    if mem and "daemon_hwm_mb" in mem:
        rss = max(mem["daemon_hwm_mb"], mem["daemon_rss_mb"])
    rows.append(
        _row(
            "daemon < 150 MB resident, 4 instances, 256 streams",
            rss,
            "MB",
            rss is not None and rss < 150,
        )
    )
    kill = _get(doc, "recovery", "kill_decode")
    stop = None
    if kill and kill.get("unrouted_ms") is not None:
        stop = max(kill["unrouted_ms"], kill.get("last_routed_ms") or 0.0)
    rows.append(
        _row(
            "killed decode unrouted <= 100 ms after exit",
            stop,
            "ms",
            stop is not None and stop <= 100,
        )
    )
    n = _get(doc, "recovery", "reload", "failed")
    rows.append(_row("0 failed requests across a reload", n, "req", n is not None and n == 0))
    term = _get(doc, "recovery", "sigterm")
    n = term["lost"] + term["dropped"] if term and "lost" in term else None
    rows.append(_row("0 failed requests across a SIGTERM drain (lost+dropped)", n, "req", n == 0))
    return rows


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def print_report(doc: Mapping[str, Any]) -> None:
    """Tables of the overhead, recovery, real-engine figures and the targets."""
    m = doc["machine"]
    print(f"\nmachine: {m['host']}, {m['cpus']} x {m['cpu']}, {m['memory_gb']} GB, "
          f"load {m['loadavg_start']:.2f} -> {m.get('loadavg_end', 0):.2f}")  # fmt: skip
    if doc.get("overhead"):
        print("\nproxy overhead (stand-in, 1 ms/token, 16 tokens; ms; medians of rounds for rates)")
        head = ("c", "way", "ttft p50", "p99", "itl p50", "p99", "e2e p50", "p99", "req/s", "tok/s")
        print("{:>4} {:<20} {:>9} {:>7} {:>8} {:>7} {:>8} {:>7} {:>8} {:>8}".format(*head))
        for e in doc["overhead"]:
            for way in WAYS:
                w = e[way]
                print(
                    f"{e['concurrency']:>4} {way:<20} {_fmt(w['ttft_ms'].get('p50'), 2):>9} "
                    f"{_fmt(w['ttft_ms'].get('p99'), 2):>7} {_fmt(w['itl_ms'].get('p50'), 2):>8} "
                    f"{_fmt(w['itl_ms'].get('p99'), 2):>7} {_fmt(w['e2e_ms'].get('p50'), 2):>8} "
                    f"{_fmt(w['e2e_ms'].get('p99'), 2):>7} {_fmt(w['req_per_s']):>8} "
                    f"{_fmt(w['tokens_per_s'], 0):>8}"
                    + (f"  failed {w['failed']}" if w["failed"] else "")
                )
            print(
                f"{'':>4} daemon: {e['daemon_cpu_s_per_req'] * 1e3:.3f} ms CPU/req disagg, "
                f"{e['daemon_cpu_s_per_req_decode_only'] * 1e3:.3f} ms decode-only, "
                f"peak RSS {e['daemon_rss_mb']} MB"
            )
        print(
            "\nproxied_disagg against two_leg (vLLM's example proxy: TTFT p50 +3 ms at c=1,"
            " +27-43 ms at 16, ~+150 ms at 64; ~0.33 x the req/s at 64)"
        )
        for e in doc["overhead"]:
            ratio = e["proxied_disagg"]["req_per_s"] / max(e["two_leg"]["req_per_s"], 1e-9)
            added = _fmt(_diff(e, "proxied_disagg", "two_leg", "p50"), 2)
            print(f"  c={e['concurrency']:<3} TTFT p50 {added:>7} ms, req/s {ratio:.2f} x")
    rec = doc.get("recovery")
    if rec:
        print("\nrecovery (2P2D, stand-ins)")
        for name, fig in rec.items():
            if name != "supervisor":
                print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in fig.items()))
    real = doc.get("real")
    if real:
        print("\nreal engine on CPU")
        if real.get("skipped"):
            print(f"  skipped: {real['skipped']}")
        else:
            slo = real["slo"]
            print(
                f"  {real['topology']}, {real['max_tokens']} tokens; goodput: TTFT <= "
                f"{slo['ttft_ms']} ms and time per output token <= {slo['tpot_ms']} ms"
            )
            for way in ("aggregated", "disaggd"):
                w = real[way]
                for r in [{"rate": None, **w}, *w["rates"]]:
                    load = "c=1" if r["rate"] is None else f"{r['rate']:.2f} req/s"
                    print(
                        f"  {way:<10} {load:>12}: {r['req_per_s']:7.2f} req/s, TTFT p50 "
                        f"{_fmt(r['ttft_ms'].get('p50'), 2)} p99 {_fmt(r['ttft_ms'].get('p99'), 2)}"
                        f" ms, TPOT p50 {_fmt(r['tpot_ms'].get('p50'), 3)} ms, ITL p99 "
                        f"{_fmt(r['itl_ms'].get('p99'), 2)} ms"
                        + ("" if r["rate"] is None else f", goodput {r['goodput']} req/s")
                        + (f", failed {r['failed']}" if r["failed"] else "")
                    )
            print(
                f"  the decode's KV, per disaggregated request: {real['disaggd'].get('kv_check')}"
            )
    print("\ntargets")
    for row in doc["targets"]:
        print(f"  {row['result']:<5} {row['target']:<56} {_fmt(row['measured'], 3)} {row['unit']}")


def plot(raw: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path | None:
    """CDFs of TTFT and e2e latency per concurrency and way; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed (pip install 'disaggd[bench]'): no plot")
        return None
    concurrencies = sorted({int(k.split("/")[0]) for k in raw})
    metrics = (("ttft_ms", "TTFT (ms)"), ("e2e_ms", "end-to-end (ms)"))
    fig, axes = plt.subplots(
        len(metrics), len(concurrencies), figsize=(4 * len(concurrencies), 6.5), squeeze=False
    )
    for col, c in enumerate(concurrencies):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for way in WAYS:
                xs = sorted(raw.get(f"{c}/{way}", {}).get(key, []))
                if xs:
                    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=way)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(f"concurrency {c}")
            if col == 0:
                ax.set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("disaggd proxy overhead: latency CDFs (stand-in engine, 1 ms/token, 16 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(doc: Mapping[str, Any]) -> str:
    """The README's "Latest results" section for one results file."""
    m = doc["machine"]
    out = [
        f"`{doc.get('source', '')}`: {doc['started']}, host `{m['host']}` ({m['cpus']} x "
        f"{m['cpu']}, {m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}), "
        f"commit `{m['commit']}`, load average {m['loadavg_start']:.1f} at the start and "
        f"{m['loadavg_end']:.1f} at the end, {doc['duration_s']:.0f} s.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    out += [
        f"| {r['target']} | {_fmt(r['measured'], 2)} {r['unit']} | {r['result']} |"
        for r in doc["targets"]
    ]
    if doc.get("overhead"):
        out += [
            "",
            "Proxy overhead (ms; TTFT, ITL and e2e as p50 / p99; req/s the median of the rounds;"
            " daemon CPU per request and peak RSS of the 1P1D daemon):",
            "",
            "| c | way | TTFT | ITL | e2e | req/s | tokens/s | daemon CPU/req | daemon RSS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in doc["overhead"]:
            for way in WAYS:
                w = e[way]
                cpu = rss = ""
                if way == "proxied_disagg":
                    cpu = f"{e['daemon_cpu_s_per_req'] * 1e3:.2f} ms"
                    rss = f"{e['daemon_rss_mb']:.0f} MB"
                elif way == "proxied_decode_only":
                    cpu = f"{e['daemon_cpu_s_per_req_decode_only'] * 1e3:.2f} ms"
                cells = [
                    f"{_fmt(w[k].get('p50'), 2)} / {_fmt(w[k].get('p99'), 2)}"
                    for k in ("ttft_ms", "itl_ms", "e2e_ms")
                ]
                out.append(
                    f"| {e['concurrency']} | {way} | {' | '.join(cells)} | "
                    f"{_fmt(w['req_per_s'])} | {_fmt(w['tokens_per_s'], 0)} | {cpu} | {rss} |"
                )
    rec = doc.get("recovery")
    if rec:
        out += ["", "Recovery (2P2D):", ""]
        for name in ("memory", "kill_decode", "reload", "sigterm"):
            if name in rec:
                fig = ", ".join(f"{k} {v}" for k, v in rec[name].items())
                out.append(f"- `{name}`: {fig}")
    real = doc.get("real")
    if real:
        out += ["", "Real engine on CPU:", ""]
        if real.get("skipped"):
            out.append(f"skipped: {real['skipped']}")
        else:
            slo = real["slo"]
            out += [
                f"Goodput targets: TTFT <= {slo['ttft_ms']} ms, TPOT <= {slo['tpot_ms']} ms.",
                "",
                "| way | load | req/s | TTFT p50 / p99 | TPOT p50 | ITL p99 | goodput | failed |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for way in ("aggregated", "disaggd"):
                w = real[way]
                for r in [{"rate": None, "goodput": None, **w}, *w["rates"]]:
                    load = "c=1" if r["rate"] is None else f"{r['rate']:.1f} req/s"
                    ttft = (
                        f"{_fmt(r['ttft_ms'].get('p50'), 1)} / {_fmt(r['ttft_ms'].get('p99'), 1)}"
                    )
                    out.append(
                        f"| {way} | {load} | {_fmt(r['req_per_s'])} | {ttft} | "
                        f"{_fmt(r['tpot_ms'].get('p50'), 2)} | {_fmt(r['itl_ms'].get('p99'), 1)} | "
                        f"{_fmt(r['goodput'], 2)} | {r['failed']} |"
                    )
            out += [
                "",
                f"KV verdicts of the disaggregated requests: {real['disaggd'].get('kv_check')}",
            ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import json
    import sys

    for arg in sys.argv[1:]:
        sys.stdout.write(markdown({**json.loads(Path(arg).read_text()), "source": arg}))
