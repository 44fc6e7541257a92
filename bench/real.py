"""Part 3: the real engine on CPU: disaggregated through disaggd against one aggregated vLLM.

Uses ``etc/examples/cpu-tiny.toml`` (1P1D, the tiny model of
``python -m devtools.tinymodel models/tiny-llama``) with fresh ports and a temporary state
folder. The aggregated baseline is the topology's decode instance started on
its own without ``--kv-transfer-config`` (same model, arguments and env).
The two run one after the other, never at once, so that they do not share the CPUs.

For each: TTFT, inter-token latency and time per output token (TPOT,
(e2e - TTFT) / (tokens - 1)) at concurrency 1, then goodput at a few request
rates (Poisson arrivals): requests/s that meet both a TTFT and a TPOT target
(DistServe's figure). Rates and targets scale with the aggregated instance's
own speed at concurrency 1 (rates 1, 2 and 4 times its requests/s; TTFT <= 4 x
its TTFT p50; TPOT <= 2 x its e2e p50 / max_tokens, because tokens often come in
bursts on CPU and its TPOT p50 can be near 0), so the same harness gives
meaningful figures on a GPU host. Skipped, with the reason, when vLLM is not
importable or the topology or model is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    MAX_TOKENS,
    ROOT,
    loadgen_argv,
    metric,
    run_loadgen,
    scrape,
    start_daemon,
)
from bench.loadgen import DEFAULT_PROMPT, percentiles
from disaggd._compat import tomllib
from disaggd.topology import Role, parse_config
from disaggd.topology.spec import build_spec
from tests.harness.common import free_port, free_ports

TOPOLOGY = ROOT / "etc" / "examples" / "cpu-tiny.toml"
RATE_FACTORS = (1.0, 2.0, 4.0)
#: ~550 tokens with the tiny model's tokenizer: KV moves in whole blocks (128 tokens on CPU),
#: so a prompt shorter than a block would be recomputed by the decode, not transferred.
PROMPT = DEFAULT_PROMPT * 8


def unavailable() -> str | None:
    """Why the real-engine benchmark cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not importable by {sys.executable} (pip install 'disaggd[cpu]')"
    if not TOPOLOGY.exists():
        return f"{os.path.relpath(TOPOLOGY, ROOT)} is missing"
    model = _model_path(tomllib.loads(TOPOLOGY.read_text())["model"]["name"])
    if not model.exists():
        return f"model {model} is missing (python -m devtools.tinymodel models/tiny-llama)"
    return None


def _model_path(name: str) -> Path:
    """The model folder; relative paths in a topology are relative to the file."""
    path = Path(name)
    return path if path.is_absolute() else (TOPOLOGY.parent / path).resolve()


def topology(tmp: Path) -> dict[str, Any]:
    """cpu-tiny.toml with free ports, an absolute model path and state under `tmp`."""
    doc: dict[str, Any] = tomllib.loads(TOPOLOGY.read_text())
    doc["model"]["name"] = str(_model_path(doc["model"]["name"]))
    doc["proxy"] = {**doc.get("proxy", {}), "host": "127.0.0.1", "port": free_port()}
    doc["daemon"] = {
        **doc.get("daemon", {}),
        "control_socket": str(tmp / "ctl.sock"),
        "state_dir": str(tmp / "state"),
        "log_level": "warning",
        "log_format": "logfmt",
        "watch": False,
    }
    for inst in doc.get("instance", []):
        if "url" not in inst:
            inst["port"], inst["kv_port"] = free_ports(2)
    return doc


@contextlib.contextmanager
def aggregated(tmp: Path, doc: Mapping[str, Any]) -> Any:
    """One vLLM instance like the topology's decode, without a KV connector; yields its URL."""
    topo = parse_config(doc, tmp / "disaggd.toml")
    spec = build_spec(topo, topo.by_role(Role.DECODE)[0])
    argv = list(spec.argv)
    i = argv.index("--kv-transfer-config")
    del argv[i : i + 2]
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    workdir = tmp / "aggregated"
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env, "TMPDIR": str(workdir / "tmp")}
    with (workdir / "output.log").open("wb") as log:
        # Its own session: vLLM forks an EngineCore, so the whole group is stopped below.
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "output.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"aggregated vLLM did not become healthy:\n{tail}")
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process we started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def tpot_ms(records: Sequence[Sequence[Any]]) -> list[float]:
    """Time per output token after the first, per successful request, ms."""
    return [
        ((end - start) * 1e3 - ttft) / max(tokens - 1, 1)
        for start, end, ttft, tokens, error in records
        if error is None and ttft is not None
    ]


def goodput(result: Mapping[str, Any], slo: Mapping[str, float]) -> float:
    """Requests/s that succeeded within both the TTFT and the time-per-output-token target."""
    good = sum(
        1
        for r in result["records"]
        if r[4] is None
        and r[2] is not None
        and r[2] <= slo["ttft_ms"]
        and tpot_ms([r])[0] <= slo["tpot_ms"]
    )
    return round(good / max(float(result["wall_s"]), 1e-9), 3)


def _load(url: str, model: str, seconds: float, **shape: Any) -> dict[str, Any]:
    return run_loadgen(
        loadgen_argv(
            url,
            model=model,
            prompt=PROMPT,
            ignore_eos=True,
            timeout=300,
            duration=seconds,
            records=True,
            **shape,
        )
    )


def _figures(res: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "req_per_s": res["req_per_s"],
        "ttft_ms": res["ttft_ms"],
        "itl_ms": res["itl_ms"],
        "tpot_ms": percentiles(tpot_ms(res["records"])),
        "e2e_ms": res["e2e_ms"],
        "failed": res["failed"],
    }


def concurrency_one(url: str, model: str, seconds: float) -> dict[str, Any]:
    """TTFT, ITL and time per output token, one request at a time."""
    return _figures(_load(url, model, seconds, concurrency=1, warmup=2))


def at_rates(
    url: str, model: str, seconds: float, rates: Sequence[float], slo: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Open-loop load at each rate: latencies and goodput."""
    rows = []
    for rate in rates:
        res = _load(url, model, seconds, rate=round(rate, 3))
        rows.append({"rate": round(rate, 3), **_figures(res), "goodput": goodput(res, slo)})
    return rows


def run(tmp: Path, *, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole comparison, or ``{"skipped": reason}``."""
    reason = unavailable()
    if reason is not None:
        log(f"  skipped: {reason}")
        return {"skipped": reason}
    tmp.mkdir(parents=True, exist_ok=True)
    seconds = 10.0 if quick else 20.0
    doc = topology(tmp)
    model = parse_config(doc, tmp / "disaggd.toml").model.public_name
    log("  aggregated vLLM: concurrency 1")
    with aggregated(tmp, doc) as url:
        agg = concurrency_one(url, model, seconds)
        rates = [f * agg["req_per_s"] for f in RATE_FACTORS]
        # Tokens often arrive in bursts on CPU (TPOT p50 near 0): the per-token target is
        # based on the whole unloaded request instead.
        slo = {
            "ttft_ms": round(4 * agg["ttft_ms"]["p50"], 2),
            "tpot_ms": round(2 * agg["e2e_ms"]["p50"] / MAX_TOKENS, 3),
        }
        log(f"  aggregated vLLM: rates {[round(r, 2) for r in rates]} req/s, targets {slo}")
        agg["rates"] = at_rates(url, model, seconds, rates, slo)
    log("  disaggd 1P1D: concurrency 1 and the same rates")
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(tmp / "disaggd", doc, stack, timeout=900)
        dis = concurrency_one(daemon.proxy_url, model, seconds)
        dis["rates"] = at_rates(daemon.proxy_url, model, seconds, rates, slo)
        # Whether the decode really loaded the prompts' KV (disaggd.proxy.kv_verdict).
        text = scrape(daemon.proxy_url)
        verdicts = set(re.findall(r'^disaggd_kv_check_total\{verdict="(\w+)"', text, re.M))
        dis["kv_check"] = {
            v: int(metric(text, "disaggd_kv_check_total", verdict=v) or 0) for v in verdicts
        }
    return {
        "topology": os.path.relpath(TOPOLOGY, ROOT),
        "model": model,
        "max_tokens": MAX_TOKENS,
        "prompt_chars": len(PROMPT),
        "seconds_per_run": seconds,
        "slo": slo,
        "aggregated": agg,
        "disaggd": dis,
    }
