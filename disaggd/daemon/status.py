"""Status, as systemd, a person and a machine read it.

* `status_line`: systemd's ``STATUS=`` (``decode-0 loading model, 1/2 ready``);
* `status_rows`: the rows of the ``status`` control reply (`disaggd status --json`);
* `render_reply` and friends: the CLI's text for a control reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from disaggd.export.llmd import role_labels
from disaggd.proxy.kvcheck import VERDICTS as KV_VERDICTS
from disaggd.supervise.events import InstanceStatus
from disaggd.supervise.states import ProcessState

#: Output lines of each instance carried in a status reply.
STATUS_OUTPUT_LINES = 10



def status_line(statuses: Iterable[InstanceStatus]) -> str:
    """systemd's ``STATUS=`` text: what is not serving yet, then ``N/M ready``."""
    statuses = list(statuses)
    ready = sum(1 for s in statuses if s.ready)
    words = []
    for s in statuses:
        if s.state is ProcessState.STARTING:
            words.append(f"{s.name} loading model")
        elif s.state in (ProcessState.BACKOFF, ProcessState.EXITED):
            words.append(f"{s.name} restarting")
        elif s.state is ProcessState.FATAL:
            words.append(f"{s.name} FATAL")
        elif s.held:
            words.append(f"{s.name} stopped by hand")
    head = ", ".join(words)
    tail = f"{ready}/{len(statuses)} ready"
    return f"{head}, {tail}" if head else f"serving, {tail}"


def status_rows(
    statuses: Iterable[InstanceStatus],
    inflight: Mapping[str, int],
    routing: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready row per instance; `inflight` is requests in flight by instance name.

    ``labels`` are the instance's llm-d labels (``{"llm-d.ai/role": "prefill"}``);
    `routing` adds the proxy's view by name: ``breaker`` (closed / open / half_open),
    ``breaker_reason`` and ``prefix_blocks`` (its entries in the cache-aware index).
    """
    routing = routing or {}
    return [
        {
            **routing.get(s.name, {}),
            "name": s.name,
            "role": s.role,
            "state": s.state.value,
            "ready": s.ready,
            "pid": s.pid,
            "port": s.port,
            "url": s.url,
            "spawned": s.spawned,
            "uptime": s.uptime,
            "restarts": s.restarts,
            "failures": s.failures,
            "inflight": inflight.get(s.name, 0),
            "last_exit": s.last_exit,
            "last_output": list(s.last_output[-STATUS_OUTPUT_LINES:]),
            "held": s.held,
            "labels": role_labels(s.role),
        }
        for s in statuses
    ]


def annotate_rows(
    rows: list[dict[str, Any]],
    hand_drained: Collection[str],
    kv: Mapping[str, Mapping[str, int]],
) -> None:
    """Add to each status row ``drained`` (by hand) and, for a decode, ``kv``.

    ``kv`` is the proxy's KV check verdicts of the requests that decode served:
    ``{"moved": n, "recomputed": n, "short_prompt": n, "unknown": n}``.
    """
    for row in rows:
        row["drained"] = row["name"] in hand_drained
        if row["role"] == "decode":
            counts = kv.get(row["name"], {})
            row["kv"] = {v: counts.get(v, 0) for v in KV_VERDICTS}


def render_reply(
    command: str, reply: dict[str, Any], *, as_json: bool = False
) -> tuple[str, int]:
    """Text for the user and the exit status of a control command."""
    ok = bool(reply.get("ok"))
    status = 0 if ok else 1
    if as_json:
        return json.dumps(reply, indent=2, default=str), status
    if "results" in reply:
        return render_results(reply["results"]), status
    if not ok:
        return f"disaggd {command}: {reply.get('error', 'failed')}", status
    if command == "status":
        return render_status(reply.get("instances", []), reply), status
    if command == "reload":
        return render_plan(reply), status
    return str(reply.get("message", "ok")), status


def render_line(line: Mapping[str, Any]) -> str:
    """One line of `disaggd logs`: ``2025-06-01 12:00:01.234 stdout  TEXT`` (local time)."""
    when = float(line.get("time", 0.0))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    millis = int(when * 1000) % 1000
    return f"{stamp}.{millis:03d} {line.get('stream', '')!s:<6}  {line.get('line', '')}"


def render_results(results: list[dict[str, Any]]) -> str:
    """One line per instance of a per-instance verb: ``decode-1: stopped (...)``."""
    return "\n".join(f"{r.get('name')}: {r.get('message')}" for r in results)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def render_status(instances: list[dict[str, Any]], reply: dict[str, Any] | None = None) -> str:
    """The `disaggd status` table."""
    header = (
        "INSTANCE",
        "ROLE",
        "STATE",
        "READY",
        "PID",
        "PORT",
        "UPTIME",
        "RESTARTS",
        "INFLIGHT",
        "LAST EXIT",
    )
    rows = [header]
    for inst in instances:
        rows.append(
            (
                str(inst.get("name")),
                str(inst.get("role")),
                str(inst.get("state")) + (" (by hand)" if inst.get("held") else ""),
                _ready_word(inst),
                str(inst.get("pid") or "-"),
                str(inst.get("port") or inst.get("url") or "-"),
                _duration(inst.get("uptime")),
                str(inst.get("restarts", 0)),
                str(inst.get("inflight", 0)),
                str(inst.get("last_exit") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]
    lines += _kv_lines(instances)
    if reply and reply.get("proxy"):
        proxy = reply["proxy"]
        lines.append(
            f"\nproxy {proxy.get('url')}: {proxy.get('inflight', 0)} in flight, "
            f"health {'ok' if proxy.get('healthy') else 'NOT READY'}"
        )
    return "\n".join(lines)


def _ready_word(inst: Mapping[str, Any]) -> str:
    """READY: ``drained`` (by hand), ``breaker open`` (passive health), else yes / no."""
    if inst.get("drained"):
        return "drained"
    breaker = inst.get("breaker")
    if inst.get("ready") and breaker not in (None, "closed"):
        return f"breaker {breaker}".replace("_", "-")
    return "yes" if inst.get("ready") else "no"


def _kv_lines(instances: list[dict[str, Any]]) -> list[str]:
    """``KV check, per decode`` and one line per decode: its verdict counts."""
    decodes = [i for i in instances if isinstance(i.get("kv"), dict)]
    if not decodes:
        return []
    width = max(len(str(i.get("name"))) for i in decodes)
    lines = ["\nKV check per decode (did the decode load the prefill's KV?):"]
    for inst in decodes:
        kv = inst["kv"]
        counts = [f"{v} {kv.get(v, 0)}" for v in KV_VERDICTS if v != "unknown" or kv.get(v)]
        lines.append(f"  {str(inst.get('name')).ljust(width)}  {', '.join(counts)}")
    return lines


def render_plan(reply: dict[str, Any]) -> str:
    """The `disaggd reload` summary: kept / restarted / added / removed."""
    plan = reply.get("plan", {})
    parts = []
    for key in ("kept", "restarted", "added", "removed"):
        names = plan.get(key, [])
        parts.append(f"{key}: {', '.join(names) if names else '-'}")
    text = "reload applied; " + "; ".join(parts)
    if plan.get("settings"):
        text += f"\nsettings applied: {', '.join(plan['settings'])}"
    for note in reply.get("notes", []):
        text += f"\nnote: {note}"
    return text
