"""The stand-in engine: real subprocesses, real HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from devtools.standin import (
    Faults,
    UsageError,
    completion_text,
    parse_args,
)
from disaggd.topology.connectors import prefill_kv_transfer_params
from tests.harness.common import free_port, free_ports, pid_alive, wait_for

# -- harness -----------------------------------------------------------------------------------


class Standin:
    """One stand-in process in its own session; output goes to files."""

    def __init__(
        self,
        tmp: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        model: str = "standin-model",
        port: int | None = None,
        style: str = "serve",
    ) -> None:
        self.port = port or free_port()
        self.out_path = tmp / f"standin-{self.port}.out"
        self.err_path = tmp / f"standin-{self.port}.err"
        head = ["serve", model] if style == "serve" else ["--model", model]
        argv = [sys.executable, "-m", "devtools.standin", *head]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "STANDIN_ACCESS_LOG": "0", **(env or {})}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, env=full_env, start_new_session=True
            )
        self.pgid = self.proc.pid

    # process

    def wait_ready(self, timeout: float = 30.0) -> Standin:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"stand-in exited {self.proc.returncode}: {self.err()}")
            with contextlib.suppress(OSError):
                return self.request("GET", "/health", timeout=1)[0] == 200
            return False

        wait_for(ready, timeout=timeout, what="stand-in /health")
        return self

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def kill_all(self) -> None:
        """SIGKILL the whole process group (the API server and its engine, orphaned or not)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # HTTP

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, bytes) else None
            if body is not None and data is None:
                data = json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
        status, _, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw)

    def complete(self, prompt: Any, **fields: Any) -> dict[str, Any]:
        headers = fields.pop("headers", None)
        status, body = self.post("/v1/completions", {"prompt": prompt, **fields}, headers=headers)
        assert status == 200, body
        return body

    def get_json(self, path: str) -> Any:
        status, _, raw = self.request("GET", path)
        assert status == 200, raw
        return json.loads(raw)

    def info(self) -> dict[str, Any]:
        return dict(self.get_json("/_standin/info"))

    def metric(self, name: str, **labels: str) -> float:
        _, _, raw = self.request("GET", "/metrics")
        for line in raw.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name} {labels} not in /metrics")

    def record(self, request_id: str) -> dict[str, Any]:
        for entry in self.get_json("/_standin/requests"):
            if entry["request_id"] == request_id:
                return dict(entry)
        raise KeyError(request_id)

    def stream(
        self, path: str, body: Mapping[str, Any], timeout: float = 10
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request(
            "POST",
            path,
            body=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return conn, conn.getresponse()


def sse_events(resp: http.client.HTTPResponse) -> Iterator[str]:
    """The payload of each ``data:`` event, as it arrives."""
    pending = b""
    while True:
        line = resp.readline()
        if not line:
            return
        pending += line
        if pending.endswith(b"\n\n"):
            event = pending.decode()
            pending = b""
            assert event.startswith("data: "), event
            yield event[len("data: ") :].rstrip("\n")


def read_stream(resp: http.client.HTTPResponse) -> list[Any]:
    return [ev if ev == "[DONE]" else json.loads(ev) for ev in sse_events(resp)]


def stream_text(events: list[Any], chat: bool = False) -> str:
    out = ""
    for ev in events:
        if ev == "[DONE]":
            continue
        for choice in ev["choices"]:
            out += choice["delta"].get("content", "") if chat else choice["text"]
    return out


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _spawner(tmp: Path) -> Iterator[Any]:
    """A `start(*args, env=...)` for stand-ins; each is SIGKILLed (whole group) after."""
    started: list[Standin] = []

    def start(*args: str, env: Mapping[str, str] | None = None, **kw: Any) -> Standin:
        s = Standin(tmp, args, env, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill_all()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start stand-ins for one test."""
    yield from _spawner(tmp_path)


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start stand-ins shared by the module's tests."""
    yield from _spawner(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="module")
def plain(module_spawn: Any) -> Standin:
    """A stand-in without a KV connector, with extra vLLM flags it must ignore."""
    s: Standin = module_spawn(
        "--served-model-name",
        "alias",
        "--max-model-len",
        "64",
        "--gpu-memory-utilization",
        "0.8",
        "--trust-remote-code",
        "-tp",
        "1",
        "--enforce-eager",
    )
    return s.wait_ready()


# -- pure units --------------------------------------------------------------------------------


def test_parse_args_accepts_vllm_command_lines() -> None:
    args = parse_args(
        [
            "serve",
            "meta/llama",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--gpu-memory-utilization",
            "0.8",
            "--enforce-eager",
            "--max_model_len=1k",
            "--kv-transfer-config",
            '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}',
            "-tp",
            "2",
            "--shutdown-timeout",
            "3",
        ]
    )
    assert args.model == "meta/llama"
    assert args.port == 9000
    assert args.served_model_names == ("a", "b")
    assert args.public_name == "a"
    assert args.max_model_len == 1000
    assert args.kv_transfer_config == {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    assert args.shutdown_timeout == 3.0
    assert "--enforce-eager" in args.ignored and "0.8" in args.ignored
    api = parse_args(["--trust-remote-code", "--model", "m", "--host", "0.0.0.0"])
    assert (api.model, api.host, api.port) == ("m", "0.0.0.0", 8000)
    flagged = parse_args(["serve", "--enforce-eager", "--no-enable-prefix-caching", "M", "-O3"])
    assert flagged.model == "M"
    with pytest.raises(UsageError):
        parse_args(["serve", "--port", "1"])
    with pytest.raises(UsageError):
        parse_args(["serve", "m", "--kv-transfer-config", "{not json"])


def test_faults_from_env_and_update() -> None:
    f = Faults.from_env({"STANDIN_FAIL_STATUS": "503", "STANDIN_IGNORE_SIGTERM": "1"})
    assert (f.fail_status, f.fail_count, f.ignore_sigterm, f.fork_engine) == (503, None, True, True)
    assert f.update({"fail_count": "2", "health_status": 503}) == ["fail_count", "health_status"]
    assert (f.fail_count, f.health_status) == (2, 503)
    with pytest.raises(ValueError, match="unknown fault"):
        f.update({"nope": 1})
    with pytest.raises(ValueError, match="bad value"):
        f.update({"token_delay": "slow"})


# -- endpoints ---------------------------------------------------------------------------------


def test_health_models_version(plain: Standin) -> None:
    status, _, body = plain.request("GET", "/health")
    assert (status, body) == (200, b"")
    models = plain.get_json("/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["alias"]
    assert models["data"][0]["root"] == "standin-model"
    assert models["data"][0]["max_model_len"] == 64
    assert "version" in plain.get_json("/version")
    assert "ignores these flags" in plain.out()


def test_api_server_style_and_fast_start(spawn: Any, tmp_path: Path) -> None:
    t0 = time.monotonic()
    tmpdir = tmp_path / "instance-tmp"
    env = {"STANDIN_FORK_ENGINE": "0", "TMPDIR": str(tmpdir)}
    s = spawn(style="api_server", env=env).wait_ready()
    assert time.monotonic() - t0 < 3  # generous for loaded CI machines; ~0.3 s idle
    assert s.get_json("/v1/models")["data"][0]["id"] == "standin-model"
    assert s.info()["engine_pid"] is None
    assert "Starting vLLM API server 0 on http://127.0.0.1:" in s.out()
    assert [p.name[:10] for p in tmpdir.iterdir()] == ["vllm_dist_"]  # like vLLM's leftovers


def test_completion_shape_and_request_id(plain: Standin) -> None:
    body = plain.complete(
        "the quick brown fox", model="alias", max_tokens=5, headers={"X-Request-Id": "rid-1"}
    )
    assert body["id"] == "cmpl-rid-1"
    assert body["object"] == "text_completion"
    assert body["model"] == "alias"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == completion_text("the quick brown fox", 5)
    assert len(choice["text"].split()) == 5
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == 9
    assert body["kv_transfer_params"] is None
    status, headers, _ = plain.request(
        "POST", "/v1/completions", {"prompt": "x"}, {"X-Request-Id": "rid-2"}
    )
    assert status == 200 and headers["X-Request-Id"] == "rid-2"
    entry = plain.record("rid-1")
    assert entry["path"] == "/v1/completions"
    assert entry["headers"]["x-request-id"] == "rid-1"
    assert entry["body"]["prompt"] == "the quick brown fox"
    assert entry["verdict"] == "miss" and entry["status"] == 200
    # Defaults: 16 tokens; max_completion_tokens wins over max_tokens; token-id prompts.
    assert plain.complete("a b")["usage"]["completion_tokens"] == 16
    both = plain.complete([1, 2, 3], max_tokens=9, max_completion_tokens=2)
    assert both["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": None,
    }


def test_same_prompt_same_text_everywhere(plain: Standin, spawn: Any) -> None:
    other = spawn(env={"STANDIN_FORK_ENGINE": "0"}).wait_ready()
    a = plain.complete("deterministic please", max_tokens=8)["choices"][0]["text"]
    b = other.complete("deterministic please", max_tokens=8)["choices"][0]["text"]
    assert a == b == completion_text("deterministic please", 8)
    assert plain.complete("another prompt", max_tokens=8)["choices"][0]["text"] != a


def test_stream_sse_framing(plain: Standin) -> None:
    body = {"prompt": "stream me", "max_tokens": 6, "stream_options": {"include_usage": True}}
    conn, resp = plain.stream("/v1/completions", body)
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = read_stream(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    tokens = events[:-2]
    assert len(tokens) == 6
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 5 + ["length"]
    assert stream_text(tokens) == completion_text("stream me", 6)
    conn, resp = plain.stream("/v1/completions", {"prompt": "stream me", "max_tokens": 2})
    try:
        events = read_stream(resp)
    finally:
        conn.close()
    assert len(events) == 3 and events[-1] == "[DONE]"  # no usage chunk unless asked


def test_chat_plain_and_stream(plain: Standin) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    ]
    status, body = plain.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == completion_text("be brief\nhello there", 4)
    assert body["usage"]["prompt_tokens"] == 4
    conn, resp = plain.stream(
        "/v1/chat/completions",
        {
            "messages": messages,
            "max_completion_tokens": 3,
            "stream_options": {"include_usage": True},
        },
    )
    try:
        events = read_stream(resp)
    finally:
        conn.close()
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 3
    assert message["content"].startswith(stream_text(events[1:-2], chat=True))
    assert events[-3]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/chat/completions", {"prompt": "x"}, 400, "messages"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "7"}, 400, "integer"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "min_tokens": 5}, 400, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "stream_options": {}}, 400, "stream=True"),
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "does not exist"),
        (
            "/v1/completions",
            {"prompt": "w " * 10, "max_tokens": 60},
            400,
            "maximum context length is 64 tokens. However, you requested 70 tokens",
        ),
        ("/v1/completions", {"prompt": "w " * 64}, 400, "maximum context length is 64 tokens"),
    ],
)
def test_errors_like_vllm(
    plain: Standin, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    got, payload = plain.post(path, body)
    assert got == status
    err = payload["error"]
    assert needle in err["message"]
    assert err["code"] == status
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert "param" in err


def test_invalid_json_is_400(plain: Standin) -> None:
    status, _, raw = plain.request("POST", "/v1/completions", b"{nope")
    assert status == 400 and json.loads(raw)["error"]["code"] == 400


def test_stop_marker_and_metrics(plain: Standin) -> None:
    before = plain.metric("vllm:request_success_total", finished_reason="stop")
    body = plain.complete("halt [[stop]]", max_tokens=5)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == ""
    assert body["usage"]["completion_tokens"] == 1
    three = plain.complete("halt [[stop=3]]", max_tokens=5)["choices"][0]
    assert three["finish_reason"] == "stop" and len(three["text"].split()) == 2
    _, _, raw = plain.request("GET", "/metrics")
    text = raw.decode()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:external_prefix_cache_queries_total",
        "vllm:external_prefix_cache_hits_total",
        "vllm:prompt_tokens_by_source_total",
        "vllm:request_success_total",
        "standin_requests_total",
        "standin_kv_invalid_total",
    ):
        assert f'{name}{{model_name="alias"' in text or f"{name}{{" in text, name
    assert "_created" not in text
    assert plain.metric("vllm:request_success_total", finished_reason="stop") == before + 2


# -- KV handshakes -----------------------------------------------------------------------------


def _kv(connector: str, role: str, **more: Any) -> str:
    return json.dumps({"kv_connector": connector, "kv_role": role, **more})


@pytest.fixture(scope="module")
def nixl(module_spawn: Any) -> tuple[Standin, Standin]:
    ports = free_ports(2)
    prefill = module_spawn(
        "--kv-transfer-config",
        _kv("NixlConnector", "kv_producer", engine_id="prefill-0"),
        env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(ports[0])},
    )
    decode = module_spawn(
        "--kv-transfer-config",
        _kv("NixlConnector", "kv_consumer", engine_id="decode-0"),
        env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(ports[1])},
    )
    return prefill.wait_ready(), decode.wait_ready()


def _prefill_leg(prompt: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": prefill_kv_transfer_params(),
    }


def test_nixl_handshake_verdicts(nixl: tuple[Standin, Standin]) -> None:
    prefill, decode = nixl
    prompt = "one two three four five six"
    status, first = prefill.post(
        "/v1/completions", _prefill_leg(prompt), headers={"X-Request-Id": "nx-p"}
    )
    assert status == 200
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "prefill-0"
    assert params["remote_host"] == "127.0.0.1"
    assert params["remote_port"] == int(prefill.info()["kv_address"].rsplit(":", 1)[1])
    assert params["remote_block_ids"] and params["tp_size"] == 1
    assert params["remote_request_id"] == "nx-p"
    assert prefill.record("nx-p")["verdict"] == "prefill"

    hits = decode.metric("vllm:external_prefix_cache_hits_total")
    queries = decode.metric("vllm:external_prefix_cache_queries_total")
    body = decode.complete(
        prompt, max_tokens=4, kv_transfer_params=params, headers={"X-Request-Id": "nx-d"}
    )
    assert body["choices"][0]["text"] == completion_text(prompt, 4)
    assert decode.record("nx-d")["verdict"] == "hit"
    assert decode.metric("vllm:external_prefix_cache_hits_total") == hits + 6
    assert decode.metric("vllm:external_prefix_cache_queries_total") == queries + 6
    assert decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") >= 6

    # Tampered params, params for another prompt, or none at all.
    invalid = decode.metric("standin_kv_invalid_total")
    bad = {**params, "standin_sig": "0" * 64}
    decode.complete(prompt, max_tokens=2, kv_transfer_params=bad, headers={"X-Request-Id": "nx-b"})
    assert decode.record("nx-b")["verdict"] == "invalid"
    decode.complete("other prompt", kv_transfer_params=params, headers={"X-Request-Id": "nx-o"})
    assert decode.record("nx-o")["verdict"] == "invalid"
    assert decode.metric("standin_kv_invalid_total") == invalid + 2
    decode.complete(prompt, max_tokens=2, headers={"X-Request-Id": "nx-m"})
    assert decode.record("nx-m")["verdict"] == "miss"
    assert decode.metric("vllm:external_prefix_cache_hits_total") == hits + 6


def test_nixl_prefill_without_params(nixl: tuple[Standin, Standin]) -> None:
    prefill, _ = nixl
    _, stopped = prefill.post("/v1/completions", _prefill_leg("finish early [[stop]]"))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["kv_transfer_params"] is None
    conn, resp = prefill.stream("/v1/completions", _prefill_leg("streamed prefill"))
    try:
        events = read_stream(resp)
    finally:
        conn.close()
    assert all("kv_transfer_params" not in e for e in events if e != "[DONE]")


def test_p2p_nccl_request_id_addressing(spawn: Any, tmp_path: Path) -> None:
    kv_ports = free_ports(2)
    shared = tmp_path / "p2p-markers"
    env = {"VLLM_HOST_IP": "127.0.0.1", "STANDIN_SHARED_DIR": str(shared)}
    prefill = spawn(
        "--kv-transfer-config", _kv("P2pNcclConnector", "kv_producer", kv_port=kv_ports[0]), env=env
    )
    decode = spawn(
        "--kv-transfer-config", _kv("P2pNcclConnector", "kv_consumer", kv_port=kv_ports[1]), env=env
    )
    prefill.wait_ready()
    decode.wait_ready()
    p_addr, d_addr = f"127.0.0.1:{kv_ports[0]}", f"127.0.0.1:{kv_ports[1]}"
    assert prefill.info()["kv_address"] == p_addr
    rid = f"___prefill_addr_{p_addr}___decode_addr_{d_addr}_abc123"
    prefill.complete("tell me", max_tokens=1, headers={"X-Request-Id": rid})
    assert prefill.record(rid)["verdict"] == "prefill"
    decode.complete("tell me", max_tokens=3, headers={"X-Request-Id": rid})
    assert decode.record(rid)["verdict"] == "hit"
    assert decode.metric("vllm:external_prefix_cache_hits_total") == 2
    # Addressed to someone else, or no prefill happened: invalid; no id at all: local compute.
    wrong = f"___prefill_addr_{p_addr}___decode_addr_127.0.0.1:1_def456"
    decode.complete("tell me", headers={"X-Request-Id": wrong})
    assert decode.record(wrong)["verdict"] == "invalid"
    skipped = f"___prefill_addr_{p_addr}___decode_addr_{d_addr}_nopref"
    decode.complete("tell me", headers={"X-Request-Id": skipped})
    assert decode.record(skipped)["verdict"] == "invalid"
    elsewhere = f"___prefill_addr_127.0.0.1:1___decode_addr_{d_addr}_x"
    prefill.complete("tell me", max_tokens=1, headers={"X-Request-Id": elsewhere})
    assert prefill.record(elsewhere)["verdict"] == "invalid"
    decode.complete("tell me", headers={"X-Request-Id": "plain-id"})
    assert decode.record("plain-id")["verdict"] == "miss"
    assert decode.metric("standin_kv_invalid_total") == 2


def test_storage_connector(spawn: Any, tmp_path: Path) -> None:
    store = tmp_path / "kv"
    extra = {"shared_storage_path": str(store)}
    prefill = spawn(
        "--kv-transfer-config",
        _kv("ExampleConnector", "kv_producer", kv_connector_extra_config=extra),
    )
    decode = spawn(
        "--kv-transfer-config",
        _kv("ExampleConnector", "kv_consumer", kv_connector_extra_config=extra),
    )
    prefill.wait_ready()
    decode.wait_ready()
    prompt = "store this prompt please"
    prefill.complete(prompt, max_tokens=1, headers={"X-Request-Id": "st-p"})
    assert prefill.record("st-p")["verdict"] == "prefill"
    assert (store / hashlib.sha256(prompt.encode()).hexdigest()).exists()
    decode.complete(prompt, headers={"X-Request-Id": "st-d"})
    assert decode.record("st-d")["verdict"] == "hit"
    assert "External Cache Hit!" in decode.out()
    assert decode.metric("vllm:external_prefix_cache_hits_total") == 4
    decode.complete("never prefilled", headers={"X-Request-Id": "st-m"})
    assert decode.record("st-m")["verdict"] == "miss"
    (store / hashlib.sha256(prompt.encode()).hexdigest()).write_text('{"garbage": 1}')
    decode.complete(prompt, headers={"X-Request-Id": "st-c"})
    assert decode.record("st-c")["verdict"] == "invalid"


# -- fault switches ----------------------------------------------------------------------------


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_start_delay_binds_late(spawn: Any) -> None:
    t0 = time.monotonic()
    s = spawn(env={"STANDIN_START_DELAY": "1.0"})
    loading = spawn(env={"STANDIN_START_DELAY": "30"})
    time.sleep(0.5)
    assert not _connectable(s.port)
    s.wait_ready()
    assert time.monotonic() - t0 >= 1.0
    # A SIGTERM while "loading the model" ends the process at once.
    loading.proc.send_signal(signal.SIGTERM)
    assert loading.proc.wait(5) == 0


def test_fail_start(spawn: Any) -> None:
    s = spawn(env={"STANDIN_FAIL_START": "1"})
    assert s.proc.wait(10) == 1
    err = s.err()
    assert "ERROR" in err and "CUDA out of memory" in err
    assert not _connectable(s.port)


@pytest.mark.parametrize("code", [3, 0])
def test_exit_after_requests(spawn: Any, code: int) -> None:
    s = spawn(env={"STANDIN_EXIT_AFTER_REQUESTS": "2", "STANDIN_EXIT_CODE": str(code)}).wait_ready()
    engine = s.info()["engine_pid"]
    s.complete("one")
    assert s.complete("two")["choices"][0]["finish_reason"] == "length"  # answered in full
    assert s.proc.wait(5) == code
    wait_for(lambda: not pid_alive(engine), timeout=5, what="engine gone")


def test_exit_after_seconds(spawn: Any) -> None:
    s = spawn(env={"STANDIN_EXIT_AFTER_SECONDS": "0.5"}).wait_ready()
    assert s.proc.wait(5) == 1
    assert "ERROR" in s.err()


def test_hang_after_requests(spawn: Any) -> None:
    s = spawn(env={"STANDIN_HANG_AFTER_REQUESTS": "1"}).wait_ready()
    s.complete("last answer")
    time.sleep(0.1)
    with pytest.raises(OSError):  # TimeoutError: connected, never answered
        s.request("GET", "/health", timeout=0.5)
    assert s.proc.poll() is None and _connectable(s.port)
    s.proc.send_signal(signal.SIGTERM)  # still honoured while wedged
    assert s.proc.wait(5) == 0


def test_hang_immediately_and_ignore_sigterm(spawn: Any) -> None:
    s = spawn(env={"STANDIN_HANG_AFTER_REQUESTS": "0", "STANDIN_IGNORE_SIGTERM": "1"})
    wait_for(lambda: "Starting vLLM API server" in s.out(), timeout=30)
    with pytest.raises(OSError):
        s.request("GET", "/health", timeout=0.5)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert s.proc.poll() is None
    s.proc.kill()
    assert s.proc.wait(5) == -signal.SIGKILL


def test_fail_status_count_and_match(spawn: Any) -> None:
    s = spawn(
        env={
            "STANDIN_FAIL_STATUS": "503",
            "STANDIN_FAIL_COUNT": "2",
            "STANDIN_FAIL_MATCH": "boom",
        }
    ).wait_ready()
    assert s.post("/v1/completions", {"prompt": "calm"})[0] == 200
    for _ in range(2):
        status, body = s.post("/v1/completions", {"prompt": "boom here"})
        assert status == 503 and body["error"]["code"] == 503
    assert s.post("/v1/completions", {"prompt": "boom again"})[0] == 200
    assert "ERROR" in s.err()
    status, body = s.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "please [[status=429]]"}]}
    )
    assert status == 429 and body["error"]["type"] == "RateLimitError"


def test_runtime_faults_and_health_status(spawn: Any) -> None:
    s = spawn(env={"STANDIN_HEALTH_STATUS": "503"})
    wait_for(lambda: _connectable(s.port), timeout=30)
    assert s.request("GET", "/health")[0] == 503
    assert s.post("/v1/completions", {"prompt": "still works"})[0] == 200
    status, faults = s.post(
        "/_standin/faults", {"health_status": 200, "fail_status": 500, "fail_count": 1}
    )
    assert status == 200 and faults["fail_status"] == 500
    assert s.request("GET", "/health")[0] == 200
    assert s.post("/v1/completions", {"prompt": "x"})[0] == 500
    assert s.post("/v1/completions", {"prompt": "x"})[0] == 200
    assert s.post("/_standin/faults", {"no_such_fault": 1})[0] == 400
    s.post("/_standin/faults", {"exit_after_requests": 1, "exit_code": 7})
    s.complete("last")
    assert s.proc.wait(5) == 7


def test_hang_slow_and_delays(spawn: Any) -> None:
    s = spawn(env={"STANDIN_PREFILL_DELAY": "0.2", "STANDIN_TOKEN_DELAY": "0.01"}).wait_ready()
    with pytest.raises(OSError):
        s.request("POST", "/v1/completions", {"prompt": "never [[hang]]"}, timeout=0.5)
    t0 = time.monotonic()
    s.complete("quick", max_tokens=5)
    assert 0.25 <= time.monotonic() - t0 < 5  # 0.2 prefill + 5 * 0.01
    t0 = time.monotonic()
    s.complete("slow one [[slow=0.1]]", max_tokens=5)
    assert time.monotonic() - t0 >= 0.7  # 0.2 + 5 * 0.1
    # Stream chunks arrive as produced, not all at the end.
    conn, resp = s.stream("/v1/completions", {"prompt": "paced [[slow=0.15]]", "max_tokens": 4})
    try:
        t0 = time.monotonic()
        arrivals = [time.monotonic() - t0 for _ in sse_events(resp)]
    finally:
        conn.close()
    assert len(arrivals) == 5  # 4 tokens + [DONE]
    assert arrivals[0] < arrivals[3] - 0.2


def _raw_post(port: int, path: str, body: Mapping[str, Any]) -> bytes:
    """POST and read until the server closes: what was sent, byte for byte."""
    data = json.dumps(body)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n{data}"
    )
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
    return raw


def test_max_num_seqs_queues_requests(spawn: Any) -> None:
    s = spawn("--max-num-seqs", "1", env={"STANDIN_TOKEN_DELAY": "0.05"}).wait_ready()
    threads = [
        threading.Thread(target=s.complete, args=(f"queued {i}",), kwargs={"max_tokens": 20})
        for i in range(2)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: s.info()["counters"]["inflight"] == 2, timeout=10)
    assert s.metric("vllm:num_requests_running") == 1
    assert s.metric("vllm:num_requests_waiting") == 1
    for t in threads:
        t.join(5)
    assert s.metric("vllm:num_requests_waiting") == 0


def test_midstream_error_cuts_connection(spawn: Any) -> None:
    s = spawn().wait_ready()
    cut = {"prompt": "cut [[midstream_error]]", "max_tokens": 20}
    raw = _raw_post(s.port, "/v1/completions", {**cut, "stream": True})
    assert raw.startswith(b"HTTP/1.1 200")
    assert 1 <= raw.count(b"data: {") <= 3
    # Cut mid-body: no [DONE], no terminating zero-length chunk.
    assert b"[DONE]" not in raw and not raw.endswith(b"0\r\n\r\n")
    assert _raw_post(s.port, "/v1/completions", cut) == b""  # not streamed: no answer at all
    assert s.complete("next is fine")["choices"][0]["finish_reason"] == "length"


# -- signals and the engine grandchild ---------------------------------------------------------


def test_sigterm_cuts_streams_short_with_200(spawn: Any) -> None:
    s = spawn(env={"STANDIN_TOKEN_DELAY": "0.02"}).wait_ready()
    engine = s.info()["engine_pid"]
    plain_result: list[tuple[int, dict[str, Any]]] = []
    waiter = threading.Thread(
        target=lambda: plain_result.append(
            s.post("/v1/completions", {"prompt": "not streamed", "max_tokens": 200})
        )
    )
    waiter.start()
    body = {"prompt": "long one", "max_tokens": 200, "stream_options": {"include_usage": True}}
    conn, resp = s.stream("/v1/completions", body)
    try:
        events = sse_events(resp)
        first = next(events)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rest = [first, *events]
    finally:
        conn.close()
    assert resp.status == 200
    assert s.proc.wait(5) == 0
    assert time.monotonic() - t0 < 3  # ~0.1 s on an idle machine
    assert rest[-1] == "[DONE]"
    parsed = [json.loads(e) for e in rest[:-1]]
    assert parsed[-2]["choices"][0]["finish_reason"] == "abort"
    assert 0 < parsed[-1]["usage"]["completion_tokens"] < 200
    wait_for(lambda: not pid_alive(engine), timeout=5, what="engine terminated")
    assert "Shutting down" in s.out()
    assert "Traceback" not in s.err()
    waiter.join(5)
    ((status, plain_body),) = plain_result
    assert status == 200 and plain_body["choices"][0]["finish_reason"] == "abort"
    assert 0 < plain_body["usage"]["completion_tokens"] < 200


def test_shutdown_timeout_drains(spawn: Any) -> None:
    s = spawn("--shutdown-timeout", "5", env={"STANDIN_TOKEN_DELAY": "0.02"}).wait_ready()
    conn, resp = s.stream("/v1/completions", {"prompt": "drain me", "max_tokens": 30})
    try:
        events = sse_events(resp)
        first = next(events)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert s.request("GET", "/health")[0] == 503
        assert s.post("/v1/completions", {"prompt": "too late"})[0] == 503
        rest = [first, *events]
    finally:
        conn.close()
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert stream_text([json.loads(e) for e in rest[:-1]]) == completion_text("drain me", 30)
    assert s.proc.wait(5) == 0


def test_ignore_sigterm(spawn: Any) -> None:
    s = spawn(env={"STANDIN_IGNORE_SIGTERM": "1"}).wait_ready()
    engine = s.info()["engine_pid"]
    s.proc.send_signal(signal.SIGTERM)
    os.killpg(s.pgid, signal.SIGTERM)  # a group SIGTERM does not stop the engine either
    time.sleep(0.3)
    assert s.proc.poll() is None and pid_alive(engine)
    assert s.request("GET", "/health")[0] == 200
    assert "WARNING" in s.out() and "SIGTERM" in s.out()
    s.proc.send_signal(signal.SIGINT)  # SIGINT still shuts it down, engine included
    assert s.proc.wait(5) == 0
    wait_for(lambda: not pid_alive(engine), timeout=5, what="engine gone")


def test_engine_survives_sigkill_of_api_server(spawn: Any) -> None:
    s = spawn().wait_ready()
    engine = s.info()["engine_pid"]
    try:
        assert comm(engine) == "VLLM::EngineCor"
        assert os.getpgid(engine) == s.pgid
        s.proc.kill()
        assert s.proc.wait(5) == -signal.SIGKILL
        time.sleep(0.2)
        assert pid_alive(engine)  # orphaned, still holding its (pretend) GPU memory
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)
    wait_for(lambda: not pid_alive(engine), timeout=5, what="engine killed")


def test_sigint_stops_engine_and_engine_death_stops_server(spawn: Any) -> None:
    s = spawn().wait_ready()
    engine = s.info()["engine_pid"]
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(5) == 0
    wait_for(lambda: not pid_alive(engine), timeout=5, what="engine gone")
    # An engine that dies on its own takes the API server down, with status 0 (vllm #48966).
    t = spawn().wait_ready()
    os.kill(t.info()["engine_pid"], signal.SIGKILL)
    assert t.proc.wait(5) == 0
    assert "died unexpectedly" in t.err()


def test_port_in_use_fails_fast(spawn: Any) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        s = spawn(port=port)
        assert s.proc.wait(10) == 1
    assert "address already in use" in s.err().lower()
