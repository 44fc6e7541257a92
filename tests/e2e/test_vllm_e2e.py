"""Real vLLM end to end: disaggd runs two CPU `vllm serve` children and the KV really moves.

One daemon per topology (ExampleConnector, then NIXL), started from the example files
in etc/examples/ with only ports and folders changed; one aggregated vLLM instance for
the whole session gives the reference output. Every disaggregated request is checked
three ways: its greedy token ids equal the aggregated instance's, the decode's
external-KV counter grew by the prompt's whole blocks (and the prefill's prompt-token
counter grew), and disaggd's own KV check counted it as moved.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from disaggd._compat import tomllib
from disaggd.proxy.kvcheck import kv_verdict
from tests.harness.common import all_gone, free_ports, http_get, http_post, short_dir, wait_for
from tests.harness.daemon import DaemonProcess

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny-llama"
SERVED = "tiny-llama"
BLOCK = 128  # vLLM's CPU KV block size: KV moves in whole blocks
MODEL_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
ZEN = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better "
    "than complex. Complex is better than complicated. Flat is better than nested. "
    "Sparse is better than dense. Readability counts. Special cases aren't special enough "
    "to break the rules. Although practicality beats purity. Errors should never pass "
    "silently. Unless explicitly silenced. In the face of ambiguity, refuse the "
    "temptation to guess. There should be one-- and preferably only one --obvious way to "
    "do it. Although that way may not be obvious at first unless you're Dutch. Now is "
    "better than never. Although never is often better than *right* now. If the "
    "implementation is hard to explain, it's a bad idea. If the implementation is easy "
    "to explain, it may be a good idea. Namespaces are one honking great idea -- let's "
    "do more of those! "
)


def long_prompt() -> str:
    """A fresh prompt of several KV blocks (fresh: no prefix-cache hit anywhere)."""
    return f"Request {uuid.uuid4().hex}. " + ZEN * 3


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from devtools.tinymodel import build_tiny_model

    return build_tiny_model(MODEL_DIR)


def vllm_env(tmp: Path, core: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": core,
        "TMPDIR": str(tmp),
        "VLLM_CACHE_ROOT": str(tmp / "cache"),
        "PYTHONUNBUFFERED": "1",
    }


class Aggregated:
    """One plain vLLM instance (no KV connector): what disaggregation must reproduce."""

    def __init__(self, model: Path, tmp: Path) -> None:
        (self.port,) = free_ports(1)
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = open(tmp / "aggregated.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--served-model-name",
                SERVED,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *MODEL_ARGS,
            ],
            env=vllm_env(tmp, "0"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                return http_get(self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, interval=1, what="aggregated vLLM ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own group, by pid
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        group_pids = pids_in_group(self.proc.pid)
        for pid in group_pids:
            os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def aggregated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aggregated]:
    agg = Aggregated(tiny_model, tmp_path_factory.mktemp("aggregated"))
    try:
        agg.wait_ready()
        yield agg
    finally:
        agg.stop()


def pids_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def example_doc(name: str, tmp: Path, model: Path) -> dict[str, Any]:
    """An example topology as shipped, with free ports and its folders under `tmp`."""
    doc: dict[str, Any] = tomllib.loads((ROOT / "etc" / "examples" / name).read_text())
    ports = free_ports(5)
    doc["model"]["name"] = str(model)
    for idx, inst in enumerate(doc["instance"]):
        inst["port"] = ports[idx]
        inst["kv_port"] = ports[2 + idx]
    doc["proxy"]["port"] = ports[4]
    doc["daemon"].update(
        control_socket=str(tmp / "ctl.sock"),
        state_dir=str(short_dir(tmp) / "state"),
        log_level="info",
    )
    doc["daemon"]["log_format"] = "logfmt"
    return doc


@pytest.fixture(scope="module", params=["cpu-tiny.toml", "cpu-nixl.toml"])
def daemon(
    request: pytest.FixtureRequest,
    tiny_model: Path,
    aggregated: Aggregated,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp(request.param.removesuffix(".toml"))
    d = DaemonProcess(tmp, example_doc(request.param, tmp, tiny_model))
    try:
        d.start(timeout=900)
        yield d
    finally:
        d.close()


# -- helpers ----------------------------------------------------------------------------------


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (with these labels) at `url`/metrics."""
    status, body = http_get(url + "/metrics", timeout=10)
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def instance_url(d: DaemonProcess, name: str) -> str:
    return f"http://127.0.0.1:{d.status()[name]['port']}"


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = http_post(url, body, timeout=300)
    assert status == 200, raw[:2000]
    return dict(json.loads(raw))


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The parsed `data:` events of a streaming response (ending with the usage chunk)."""
    host, port = url.split("//")[1].split("/", maxsplit=1)[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:2000]
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        text = resp.read().decode()
    finally:
        conn.close()
    lines = [ln[len("data: ") :] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def token_ids(route: str, body: dict[str, Any], url: str) -> tuple[list[int], dict[str, Any]]:
    """Greedy token ids generated for `body` at `url`, and the usage."""
    body = {**body, "return_token_ids": True}
    if not body.get("stream"):
        doc = post(url + route, body)
        return list(doc["choices"][0]["token_ids"]), doc["usage"]
    events = stream(url + route, {**body, "stream_options": {"include_usage": True}})
    ids: list[int] = []
    for ev in events:
        for choice in ev.get("choices", []):
            ids.extend(choice.get("token_ids") or [])
    assert events[-1]["choices"] == [] and events[-1]["usage"]
    return ids, events[-1]["usage"]


def request_body(route: str, prompt: str, stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    body: dict[str, Any] = {"model": SERVED, "max_tokens": max_tokens, "temperature": 0}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
    return body


# -- the proof --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_disaggregated_output_equals_aggregated_and_kv_moved(
    daemon: DaemonProcess, aggregated: Aggregated, route: str, stream_: bool
) -> None:
    prefill_url = instance_url(daemon, "prefill-0")
    decode_url = instance_url(daemon, "decode-0")
    body = request_body(route, long_prompt(), stream_)
    hits0 = metric(decode_url, "vllm:external_prefix_cache_hits_total")
    prompt0 = metric(prefill_url, "vllm:prompt_tokens_total")
    moved0 = metric(daemon.proxy_url, "disaggd_kv_check_total", verdict="moved")

    got, usage = token_ids(route, body, daemon.proxy_url)
    want, _ = token_ids(route, body, aggregated.url)

    assert got == want, "disaggregated greedy output differs from one aggregated instance"
    assert len(got) == body["max_tokens"]
    prompt_tokens = int(usage["prompt_tokens"])
    assert prompt_tokens >= 3 * BLOCK
    hits = metric(decode_url, "vllm:external_prefix_cache_hits_total") - hits0
    # KV moves in whole blocks: at least all but the last (partial) block came from the prefill.
    assert hits >= prompt_tokens - BLOCK, (hits, prompt_tokens)
    assert metric(prefill_url, "vllm:prompt_tokens_total") - prompt0 >= prompt_tokens
    # disaggd's own per-request check saw it too.
    assert metric(daemon.proxy_url, "disaggd_kv_check_total", verdict="moved") == moved0 + 1


def test_negative_control_a_decode_without_kv_fails_the_check(daemon: DaemonProcess) -> None:
    """The checks can fail: a decode that got no KV recomputes, and both checks say so."""
    decode_url = instance_url(daemon, "decode-0")
    hits0 = metric(decode_url, "vllm:external_prefix_cache_hits_total")
    body = request_body("/v1/completions", long_prompt(), False)
    doc = post(decode_url + "/v1/completions", body)  # straight to the decode: no prefill leg
    verdict, prompt_tokens, cached = kv_verdict(doc["usage"], BLOCK)
    assert verdict == "recomputed", (verdict, prompt_tokens, cached)
    assert metric(decode_url, "vllm:external_prefix_cache_hits_total") == hits0


def test_short_prompt_is_not_counted_as_a_failure(daemon: DaemonProcess) -> None:
    before = metric(daemon.proxy_url, "disaggd_kv_check_total", verdict="short_prompt")
    doc = post(
        daemon.proxy_url + "/v1/completions",
        request_body("/v1/completions", "San Francisco is a", False, 10),
    )
    assert len(doc["choices"][0]["text"]) > 0
    assert metric(daemon.proxy_url, "disaggd_kv_check_total", verdict="short_prompt") == before + 1
    assert metric(daemon.proxy_url, "disaggd_kv_check_total", verdict="recomputed") == 0


def test_kill_9_of_the_decode_api_server(daemon: DaemonProcess) -> None:
    row = daemon.status()["decode-0"]
    old_pid = row["pid"]
    group = pids_in_group(old_pid)
    assert len(group) >= 2, "expected the API server and its EngineCore in one group"
    os.kill(old_pid, signal.SIGKILL)
    # /health says so at once; the instance comes back with a new process group
    wait_for(lambda: http_get(daemon.proxy_url + "/health")[0] == 503, 10, what="health 503")

    def back() -> bool:
        r = daemon.status()["decode-0"]
        return r["state"] == "RUNNING" and r["pid"] not in (None, old_pid)

    wait_for(back, 600, interval=1, what="decode-0 RUNNING again")
    assert all_gone(group, timeout=5), "the old EngineCore survived its API server"
    assert daemon.status()["decode-0"]["restarts"] >= 1
    doc = post(
        daemon.proxy_url + "/v1/completions", request_body("/v1/completions", long_prompt(), False)
    )
    assert (
        doc["usage"]["prompt_tokens_details"]["cached_tokens"]
        >= doc["usage"]["prompt_tokens"] - BLOCK
    )


def test_sigterm_with_a_request_in_flight(daemon: DaemonProcess) -> None:
    """Last in the module: the daemon stops for good."""
    groups = [pid for row in daemon.status().values() for pid in pids_in_group(row["pid"])]
    body = request_body("/v1/completions", long_prompt(), True, max_tokens=400)
    body["stream_options"] = {"include_usage": True}
    host, port = "127.0.0.1", int(daemon.proxy_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()  # the first token is out: the request is in flight
    assert first.startswith(b"data: ")
    daemon.signal(signal.SIGTERM)
    rest = resp.read().decode()
    conn.close()
    events = [
        json.loads(x[6:]) for x in (first.decode() + rest).split("\n\n") if x.startswith("data: {")
    ]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["usage"]["completion_tokens"] == 400  # completed, not cut short
    finishes = [
        c["finish_reason"] for ev in events for c in ev["choices"] if c.get("finish_reason")
    ]
    assert finishes == ["length"]
    assert daemon.wait(120) == 0
    assert all_gone(groups, timeout=30), "a vLLM process outlived the daemon"
    assert re.search(r"daemon_exited status=0", daemon.log())


def test_the_readme_main_job(tmp_path: Path, tiny_model: Path) -> None:
    """`scripts/demo.sh` (the README's main job) serves the seed's two requests; Ctrl-C
    leaves nothing. Its topology is cpu-tiny.toml on free ports (CONFIG=...)."""
    from tests.harness.common import write_topology

    doc = example_doc("cpu-tiny.toml", tmp_path, tiny_model)
    config = write_topology(tmp_path / "demo.toml", doc)
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env={**os.environ, "CONFIG": str(config)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # like a terminal's foreground job
    )
    proxy = f"http://127.0.0.1:{doc['proxy']['port']}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            try:
                return http_get(proxy + "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, 900, interval=1, what="demo ready")
        pids = [
            p
            for inst in ("prefill-0", "decode-0")
            for p in pids_in_group(instance_pid(config, inst))
        ]
        for prompt in ("San Francisco is a", "Santa Clara is a"):
            out = post(
                proxy + "/v1/completions",
                {"model": SERVED, "prompt": prompt, "max_tokens": 10, "temperature": 0},
            )
            assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] == 10
        # The README's third request, longer than a KV block: the KV moves, and status says so.
        out = post(proxy + "/v1/completions", readme_long_request())
        assert out["usage"]["completion_tokens"] == 10
        status = subprocess.run(
            [sys.executable, "-m", "disaggd", "status", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "decode-0  moved 1, recomputed 0, short_prompt 2" in status.stdout, status.stdout
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        assert proc.wait(120) == 0
        assert all_gone(pids, timeout=30)
        tmps = list((Path(doc["daemon"]["state_dir"]) / "instances").glob("*/tmp/*"))
        assert tmps == [], tmps
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        log.close()


def readme_long_request() -> dict[str, Any]:
    """The body of the README's long-prompt curl, read from the README (so they never drift)."""
    text = (ROOT / "README.md").read_text()
    line = next(x for x in text.splitlines() if "-d '" in x and "Disaggregated prefill" in x)
    body = line.strip().removeprefix("-d '").removesuffix("'").replace("'\"'\"'", "'")
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def instance_pid(config: Path, name: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "disaggd", "status", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["instances"]}
    return int(rows[name]["pid"])
