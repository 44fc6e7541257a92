"""The targets of issues 7 and 11 against a run's figures, the printed tables, and the plot.

``python -m bench.report bench/results/FILE.json`` prints the README's "Latest
results" section for that run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

WAYS = ("direct", "two_leg", "proxied_disagg", "proxied_decode_only", "vllm_router")
#: The measured proxy process of each proxied way.
PROXY_OF = {
    "proxied_disagg": "disaggd",
    "proxied_decode_only": "disaggd_decode_only",
    "vllm_router": "vllm_router",
}


# -- lookups -------------------------------------------------------------------------------------


def _cases(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    part = doc.get("overhead")
    return list(part.get("cases", [])) if isinstance(part, Mapping) else []


def _case(doc: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((e for e in _cases(doc) if e["case"] == name), None)


def _get(obj: Any, *path: str | int) -> Any:
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _way(e: Mapping[str, Any] | None, way: str, *path: str) -> Any:
    return _get(e, "ways", way, *path)


def _proxy(e: Mapping[str, Any] | None, proxy: str, key: str) -> Any:
    return _get(e, "proxies", proxy, key)


def _added_ttft(e: Mapping[str, Any] | None, way: str, base: str, stat: str) -> float | None:
    a, b = _way(e, way, "ttft_ms", stat), _way(e, base, "ttft_ms", stat)
    return None if a is None or b is None else round(a - b, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- targets -------------------------------------------------------------------------------------


def _row(
    issue: int,
    target: str,
    measured: float | None,
    unit: str,
    ok: Callable[[float], bool],
    *,
    reference: str = "",
) -> dict[str, Any]:
    verdict = "n/a" if measured is None else ("PASS" if ok(measured) else "MISS")
    return {
        "issue": issue,
        "target": target,
        "measured": measured,
        "unit": unit,
        "reference": reference,
        "result": verdict,
    }


def _vs(label: str, value: float | None, unit: str, digits: int = 2) -> str:
    return f"{label} {_fmt(value, digits)} {unit}" if value is not None else f"{label}: n/a"


def _le(ref: float | None) -> Callable[[float], bool]:
    return lambda x: ref is not None and x <= ref


def _ge(ref: float | None) -> Callable[[float], bool]:
    return lambda x: ref is not None and x >= ref


def targets_issue7(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 7: the proxy against the direct and two-leg ways; recovery."""
    c16, c64 = _case(doc, "c16"), _case(doc, "c64")
    rows = [
        _row(7, "decode-only hop adds <= 1 ms TTFT p50 (c=16)",
             _added_ttft(c16, "proxied_decode_only", "direct", "p50"), "ms", lambda d: d <= 1),
        _row(7, "decode-only hop adds <= 5 ms TTFT p99 (c=16)",
             _added_ttft(c16, "proxied_decode_only", "direct", "p99"), "ms", lambda d: d <= 5),
        _row(7, "disagg adds <= 3 ms TTFT p50 over two-leg (c=16)",
             _added_ttft(c16, "proxied_disagg", "two_leg", "p50"), "ms", lambda d: d <= 3),
        _row(7, "disagg req/s >= 0.8 x two-leg (c=64)",
             _ratio(_way(c64, "proxied_disagg", "req_per_s"), _way(c64, "two_leg", "req_per_s")),
             "x", lambda r: r >= 0.8),
    ]  # fmt: skip
    cpu = [
        e["proxies"]["disaggd"]["cpu_ms_per_req"]
        for e in _cases(doc)
        if e["max_tokens"] == 16 and e["prompt_chars"] < 1000 and "disaggd" in e["proxies"]
    ]
    rows.append(
        _row(7, "daemon CPU <= 1 ms per disagg request (worst 16-token case)",
             round(max(cpu), 3) if cpu else None, "ms", lambda x: x <= 1)
    )  # fmt: skip
    mem = _get(doc, "recovery", "memory")
    rss = (
        max(mem["daemon_hwm_mb"], mem["daemon_rss_mb"]) if mem and "daemon_hwm_mb" in mem else None
    )
    rows.append(
        _row(7, "daemon < 150 MB resident, 4 instances, 256 streams", rss, "MB", lambda x: x < 150)
    )
    kill = _get(doc, "recovery", "kill_decode")
    stop = None
    if kill and kill.get("unrouted_ms") is not None:
        stop = max(kill["unrouted_ms"], kill.get("last_routed_ms") or 0.0)
    rows.append(
        _row(7, "killed decode unrouted <= 100 ms after exit", stop, "ms", lambda x: x <= 100)
    )
    n = _get(doc, "recovery", "reload", "failed")
    rows.append(_row(7, "0 failed requests across a reload", n, "req", lambda x: x == 0))
    term = _get(doc, "recovery", "sigterm")
    n = term["lost"] + term["dropped"] if term and "lost" in term else None
    rows.append(
        _row(
            7, "0 failed requests across a SIGTERM drain (lost+dropped)", n, "req", lambda x: x == 0
        )
    )
    return rows


def _vs_router(e: Mapping[str, Any] | None, key: str) -> tuple[float | None, float | None]:
    """(disaggd's, vllm-router's) figure `key` of a case's proxies."""
    return _proxy(e, "disaggd", key), _proxy(e, "vllm_router", key)


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda x: x <= limit


def targets_issue11(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 11: disaggd against vllm-router and the two-leg baseline."""
    c16, c64 = _case(doc, "c16"), _case(doc, "c64")
    rows = []
    for label, e in (("c=16", c16), ("c=64", c64)):
        ours, theirs = _vs_router(e, "cpu_ms_per_req")
        target = f"disaggd CPU per disagg request <= vllm-router's ({label}, 16 tokens)"
        ref = _vs("vllm-router", theirs, "ms", 3)
        rows.append(_row(11, target, ours, "ms", _le(theirs), reference=ref))
    ours, theirs = _vs_router(_case(doc, "c16-256tok"), "cpu_us_per_chunk")
    target = "disaggd CPU per streamed chunk <= vllm-router's (c=16, 256 tokens)"
    ref = _vs("vllm-router", theirs, "us", 1)
    rows.append(_row(11, target, ours, "us", _le(theirs), reference=ref))
    for label, e in (("c=16", c16), ("c=64", c64)):
        ours, theirs = _way(e, "proxied_disagg", "req_per_s"), _way(e, "vllm_router", "req_per_s")
        ref = _vs("vllm-router", theirs, "req/s", 1)
        target = f"disaggd req/s >= vllm-router's ({label})"
        rows.append(_row(11, target, ours, "req/s", _ge(theirs), reference=ref))
    two = _way(c16, "two_leg", "req_per_s")
    ratio = _ratio(_way(c16, "proxied_disagg", "req_per_s"), two)
    ref = _vs("vllm-router", _ratio(_way(c16, "vllm_router", "req_per_s"), two), "x", 3)
    target = "disaggd req/s >= 0.95 x two-leg (c=16)"
    rows.append(_row(11, target, ratio, "x", lambda r: r >= 0.95, reference=ref))
    long_c1 = _case(doc, "c1-220kB")
    for target, e, limit in (
        ("disaggd adds <= 2 ms TTFT p50 over two-leg (c=16)", c16, 2.0),
        ("220 KB prompt: disaggd adds <= 5 ms TTFT p50 over two-leg (c=1)", long_c1, 5.0),
    ):
        added = _added_ttft(e, "proxied_disagg", "two_leg", "p50")
        ref = _vs("vllm-router", _added_ttft(e, "vllm_router", "two_leg", "p50"), "ms")
        rows.append(_row(11, target, added, "ms", _at_most(limit), reference=ref))
    ours, theirs = _vs_router(_case(doc, "c256"), "peak_rss_mb")
    hwm = _get(doc, "overhead", "proxy_hwm_mb", "disaggd")
    ref = f"{_vs('vllm-router', theirs, 'MB', 1)}; daemon VmHWM after all cases {_fmt(hwm)} MB"
    target = "disaggd daemon < 150 MB resident with 256 streams (1P1D, c=256)"
    rows.append(_row(11, target, ours, "MB", lambda x: x < 150, reference=ref))
    rows.append(_failures_row(doc))
    return rows


def _failures_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    where = {
        f"{e['case']}/{way}": w["failed"]
        for e in _cases(doc)
        for way, w in e["ways"].items()
        if w["failed"]
    }
    total = sum(where.values()) if _cases(doc) else None
    ref = ", ".join(f"{k} {v}" for k, v in where.items()) or "none in any way"
    target = "0 failed requests in every way and case"
    return _row(11, target, total, "req", lambda x: x == 0, reference=ref)


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target next to its measurement: PASS, MISS or n/a (not measured)."""
    return targets_issue7(doc) + targets_issue11(doc)


# -- printing ------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pp(w: Mapping[str, Any], key: str, sep: str = " / ") -> str:
    return f"{_fmt(w[key].get('p50'), 2)}{sep}{_fmt(w[key].get('p99'), 2)}"


def _proxy_cells(e: Mapping[str, Any], way: str) -> tuple[str, str, str]:
    p = _get(e, "proxies", PROXY_OF.get(way, ""))
    if not p:
        return "", "", ""
    return (
        f"{p['cpu_ms_per_req']:.3f} ms",
        f"{p['cpu_us_per_chunk']:.1f} us",
        f"{p['peak_rss_mb']:.0f} MB",
    )


def _case_title(e: Mapping[str, Any]) -> str:
    return (
        f"{e['case']}: concurrency {e['concurrency']}, {e['max_tokens']} output tokens, "
        f"{e['prompt_chars']}-character prompt"
    )


def print_overhead(doc: Mapping[str, Any]) -> None:
    part = doc["overhead"]
    print("\nproxy overhead (stand-in engines, 1 ms/token; ms; rates: medians of the rounds)")
    print(f"  handoff verdicts of the decode engine: {part.get('handoff')}")
    print(f"  vllm-router: {part.get('vllm_router')}")
    head = ("way", "ttft p50", "p99", "itl p50", "p99", "e2e p50", "p99", "req/s", "CPU/req",
            "CPU/chunk", "RSS")  # fmt: skip
    for e in _cases(doc):
        print(f"\n  {_case_title(e)}; load average {_get(e, 'loadavg_1m')}")
        print(
            "  {:<20} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10} {:>10} {:>7}".format(*head)
        )
        for way, w in e["ways"].items():
            cpu, chunk, rss = _proxy_cells(e, way)
            print(
                f"  {way:<20} {_fmt(w['ttft_ms'].get('p50'), 2):>9} "
                f"{_fmt(w['ttft_ms'].get('p99'), 2):>8} {_fmt(w['itl_ms'].get('p50'), 2):>8} "
                f"{_fmt(w['itl_ms'].get('p99'), 2):>7} {_fmt(w['e2e_ms'].get('p50'), 2):>8} "
                f"{_fmt(w['e2e_ms'].get('p99'), 2):>8} {_fmt(w['req_per_s']):>8} "
                f"{cpu:>10} {chunk:>10} {rss:>7}"
                + (f"  failed {w['failed']}" if w["failed"] else "")
            )
    print(f"\n  proxies' VmHWM at the end: {part.get('proxy_hwm_mb')}")


def print_real(real: Mapping[str, Any]) -> None:
    print("\nreal engine on CPU")
    if real.get("skipped"):
        print(f"  skipped: {real['skipped']}")
        return
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
    print(f"  the decode's KV, per disaggregated request: {real['disaggd'].get('kv_check')}")


def print_report(doc: Mapping[str, Any]) -> None:
    """Tables of the overhead, recovery, real-engine figures and the targets."""
    m = doc["machine"]
    print(f"\nmachine: {m['host']}, {m['cpus']} x {m['cpu']}, {m['memory_gb']} GB, "
          f"load {m['loadavg_start']:.2f} -> {m.get('loadavg_end', 0):.2f}")  # fmt: skip
    if _cases(doc):
        print_overhead(doc)
    rec = doc.get("recovery")
    if rec:
        print("\nrecovery (2P2D, stand-ins)")
        for name, fig in rec.items():
            if name != "supervisor":
                print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in fig.items()))
    if doc.get("real"):
        print_real(doc["real"])
    print("\ntargets")
    for row in doc["targets"]:
        print(
            f"  {row['result']:<5} #{row.get('issue', 7):<2} {row['target']:<68} "
            f"{_fmt(row['measured'], 3)} {row['unit']}"
            + (f"  ({row['reference']})" if row.get("reference") else "")
        )


# -- the plot ------------------------------------------------------------------------------------


def plot(raw: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path | None:
    """CDFs of TTFT and e2e latency per case and way; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'disaggd[bench]'): no plot")
        return None
    cases = list(dict.fromkeys(k.split("/")[0] for k in raw))
    metrics = (("ttft_ms", "TTFT (ms)"), ("e2e_ms", "end-to-end (ms)"))
    cols = min(3, len(cases))
    rows = len(metrics) * math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.9 * rows), squeeze=False)
    for i, case in enumerate(cases):
        for m, (key, label) in enumerate(metrics):
            ax = axes[(i // cols) * len(metrics) + m][i % cols]
            for way in WAYS:
                xs = sorted(raw.get(f"{case}/{way}", {}).get(key, []))
                if xs:
                    ax.plot(xs, [(j + 1) / len(xs) for j in range(len(xs))], label=way)
            _log_axis(ax)
            ax.set_xlabel(f"{case}: {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i % cols == 0:
                ax.set_ylabel("fraction of requests", fontsize=8)
    for j in range(len(cases), cols * math.ceil(len(cases) / cols)):
        for m in range(len(metrics)):
            axes[(j // cols) * len(metrics) + m][j % cols].set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("proxy overhead: latency CDFs (stand-in engines, 1 ms/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _log_axis(ax: Any) -> None:
    """A log x axis labelled at 1, 2, 5 x 10^k; a linear one over less than 3 x."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    lo, hi = ax.dataLim.intervalx
    if lo <= 0 or hi / lo < 3:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", which="both", labelsize=7)


# -- the README section --------------------------------------------------------------------------


def _md_targets(doc: Mapping[str, Any]) -> list[str]:
    out = ["| issue | target | measured | for comparison | result |", "|---|---|---|---|---|"]
    out += [
        f"| {r.get('issue', 7)} | {r['target']} | {_fmt(r['measured'], 2)} {r['unit']} | "
        f"{r.get('reference', '')} | {r['result']} |"
        for r in doc["targets"]
    ]
    return out


def _router_line(info: Mapping[str, Any] | None) -> str:
    if not info:
        return "not run"
    if info.get("skipped"):
        return f"skipped: {info['skipped']}"
    return f"`{info.get('package')}`, started as in the section above"


def _md_overhead(doc: Mapping[str, Any]) -> list[str]:
    part = doc["overhead"]
    out = [
        "",
        "Proxy overhead (ms; TTFT, ITL and e2e as p50 / p99; req/s the median of the rounds;"
        " for the proxies: CPU per request, CPU per streamed chunk and peak RSS of the proxy"
        " process):",
        "",
        f"Handoff verdicts of the decode engine, one request per proxy: {part.get('handoff')}."
        f" vllm-router: {_router_line(part.get('vllm_router'))}.",
        "",
        "| case | way | TTFT | ITL | e2e | req/s | CPU/req | CPU/chunk | RSS | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in _cases(doc):
        for way, w in e["ways"].items():
            cpu, chunk, rss = _proxy_cells(e, way)
            cells = " | ".join(_pp(w, k) for k in ("ttft_ms", "itl_ms", "e2e_ms"))
            out.append(
                f"| {e['case']} | {way} | {cells} | {_fmt(w['req_per_s'])} | {cpu} | {chunk} | "
                f"{rss} | {w['failed']} |"
            )
    loads = ", ".join(
        f"{e['case']} {e['loadavg_1m']['min']:.1f}-{e['loadavg_1m']['max']:.1f}"
        for e in _cases(doc)
        if "loadavg_1m" in e
    )
    out += [
        "",
        f"Proxies' VmHWM (lifetime peak RSS) after the part: {part.get('proxy_hwm_mb')}.",
        f"1-minute load average after each run, lowest-highest per case: {loads or 'n/a'}.",
    ]
    return out


def _md_real(real: Mapping[str, Any]) -> list[str]:
    out = ["", "Real engine on CPU:", ""]
    if real.get("skipped"):
        return [*out, f"skipped: {real['skipped']}"]
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
            out.append(
                f"| {way} | {load} | {_fmt(r['req_per_s'])} | {_pp(r, 'ttft_ms')} | "
                f"{_fmt(r['tpot_ms'].get('p50'), 2)} | {_fmt(r['itl_ms'].get('p99'), 1)} | "
                f"{_fmt(r['goodput'], 2)} | {r['failed']} |"
            )
    out += ["", f"KV verdicts of the disaggregated requests: {real['disaggd'].get('kv_check')}"]
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    """The README's "Latest results" section for one results file."""
    m = doc["machine"]
    out = [
        f"`{doc.get('source', '')}`: {doc['started']}, host `{m['host']}` ({m['cpus']} x "
        f"{m['cpu']}, {m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}), "
        f"commit `{m['commit']}`, load average {m['loadavg_start']:.1f} at the start and "
        f"{m['loadavg_end']:.1f} at the end, {doc['duration_s']:.0f} s.",
        "",
        *_md_targets(doc),
    ]
    if _cases(doc):
        out += _md_overhead(doc)
    rec = doc.get("recovery")
    if rec:
        out += ["", "Recovery (2P2D):", ""]
        out += [
            f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in rec[name].items())
            for name in ("memory", "kill_decode", "reload", "sigterm")
            if name in rec
        ]
    if doc.get("real"):
        out += _md_real(doc["real"])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import json
    import sys

    for arg in sys.argv[1:]:
        sys.stdout.write(markdown({**json.loads(Path(arg).read_text()), "source": arg}))
