"""Several hosts, tested: a front disaggd on host A routing to a disaggd's instances on host B.

Hosts are network namespaces plugged into one userspace wire (tests/harness/netns.py), which can
lose or delay every frame towards a host. Host B's daemon spawns a prefill and a decode
stand-in bound to B's address; host A's daemon spawns its own pair on A's address and
routes to B's two as remote (``url``) instances, round robin, so every other request
crosses the wire. The test process itself never enters a namespace: its HTTP clients run
on threads that did (`Hosts.executor`, `Hosts.call`).
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import netns
from tests.harness.common import http_get, standin_topology, wait_for
from tests.harness.netns import Hosts, NsDaemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 0.3
PROBE_FAILURES = 2
#: A's probe budget: how long a dead peer may stay in rotation (every failed probe of a
#: black-holed peer waits its whole timeout).
PROBE_BUDGET = PROBE_FAILURES * (PROBE_INTERVAL + PROBE_TIMEOUT)
#: Scheduling on a loaded 2-core machine, and the 50 ms metrics poll.
SLACK = 1.0
#: A's whole-request deadline; a stand-in on B takes 2 s for a 100-token stream.
REQUEST_TIMEOUT = 4.0
TOKEN_DELAY_B = 0.02
B_NAMES = ("prefill-b", "decode-b")


@dataclass(frozen=True)
class Outcome:
    status: int
    body: str
    elapsed: float

    @property
    def complete(self) -> bool:
        """A 200 that carries a whole answer (a stream ends with [DONE] and no error)."""
        if self.status != 200:
            return False
        if self.body.startswith("data:") or "\ndata:" in self.body:
            return self.body.rstrip().endswith("data: [DONE]") and '"error"' not in self.body
        return bool(json.loads(self.body).get("choices"))


@dataclass
class Cluster:
    hosts: Hosts
    a: NsDaemon
    b: NsDaemon
    client: ThreadPoolExecutor  # threads inside host A
    b_urls: dict[str, str]  # B's instance name -> its URL on B's address

    def request(self, prompt: str, max_tokens: int = 4, stream: bool = False) -> Outcome:
        """One completion through A's proxy (from inside A), timed."""
        return self.submit(prompt, max_tokens, stream).result()

    def submit(self, prompt: str, max_tokens: int = 4, stream: bool = False) -> Future[Outcome]:
        port = int(self.a.doc["proxy"]["port"])
        return self.client.submit(_complete, port, prompt, max_tokens, stream)

    def b_counters(self) -> dict[str, dict[str, Any]]:
        """B's instances' own counters, read inside B (reachable whatever the wire does)."""
        out = {}
        for name, url in self.b_urls.items():
            status, body = self.hosts.call("b", http_get, f"{url}/_standin/info")
            assert status == 200, body
            out[name] = json.loads(body)["counters"]
        return out

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A's /metrics: (sample name, sorted labels) -> value."""
        url = f"http://127.0.0.1:{self.a.doc['proxy']['port']}/metrics"
        status, body = self.client.submit(http_get, url).result()
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples
        }

    def in_rotation(self) -> dict[str, bool]:
        """``disaggd_upstream_ready`` of B's instances at A."""
        m = self.metrics()
        return {
            name: m.get(("disaggd_upstream_ready", (("instance", name), ("role", role)))) == 1.0
            for name, role in zip(B_NAMES, ("prefill", "decode"), strict=True)
        }

    def wait_rotation(self, ready: bool, timeout: float) -> float:
        """Seconds until both of B's instances are (out of) A's rotation."""
        start = time.monotonic()
        want = dict.fromkeys(B_NAMES, ready)
        wait_for(lambda: self.in_rotation() == want, timeout, what=f"B in rotation == {ready}")
        return time.monotonic() - start


def _complete(port: int, prompt: str, max_tokens: int, stream: bool) -> Outcome:
    """POST /v1/completions; the socket timeout only catches a hang well past the deadline."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT + 10)
    body = {"model": "standin-model", "prompt": prompt, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    start = time.monotonic()
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        return Outcome(resp.status, text, time.monotonic() - start)
    except (OSError, http.client.HTTPException) as exc:  # a cut connection is an error too
        return Outcome(0, repr(exc), time.monotonic() - start)
    finally:
        conn.close()


def _pair(tmp: Path, addr: str, suffix: str, proxy: dict[str, Any]) -> dict[str, Any]:
    """A stand-in prefill and decode bound to `addr`, named ``prefill-SUFFIX``/``decode-SUFFIX``."""
    supervisor = {
        "probe_interval": PROBE_INTERVAL,
        "probe_timeout": PROBE_TIMEOUT,
        "probe_failures": PROBE_FAILURES,
    }
    doc = standin_topology(tmp, supervisor=supervisor, proxy=proxy)
    for inst in doc["instance"]:
        inst["name"] = f"{inst['role']}-{suffix}"
        inst["host"] = addr  # also the advertised KV host: remote peers can reach it
    return doc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("mh")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    with Hosts.create(["a", "b"]) as hosts:
        doc_b = _pair(tmp / "b", hosts.addr["b"], "b", {})
        doc_b["instance"][1]["env"] = {"STANDIN_TOKEN_DELAY": str(TOKEN_DELAY_B)}
        b_urls = {i["name"]: f"http://{hosts.addr['b']}:{i['port']}" for i in doc_b["instance"]}
        doc_a = _pair(
            tmp / "a",
            hosts.addr["a"],
            "a",
            {
                "prefill_policy": "round_robin",
                "decode_policy": "round_robin",
                "request_timeout": REQUEST_TIMEOUT,
                "connect_timeout": 1.0,
            },
        )
        doc_a["instance"] += [
            {"name": name, "role": name.split("-")[0], "url": url} for name, url in b_urls.items()
        ]
        b = NsDaemon(hosts.ns["b"], tmp / "b", doc_b)
        a = NsDaemon(hosts.ns["a"], tmp / "a", doc_a)
        try:
            b.start()
            a.start()
            with hosts.executor("a", 8) as pool:
                yield Cluster(hosts, a, b, pool, b_urls)
        finally:
            a.close()
            b.close()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The wire clean, B's daemon up, and B's instances in A's rotation."""
    cluster.hosts.heal("b")
    if cluster.b.proc is None or cluster.b.proc.poll() is not None:
        cluster.b.start()
    cluster.wait_rotation(True, 20)
    return cluster


def test_requests_flow_through_a_to_bs_instances(healthy: Cluster) -> None:
    c = healthy
    rows = c.a.status()
    for name in B_NAMES:
        assert rows[name]["spawned"] is False and rows[name]["state"] == "RUNNING"
        assert rows[name]["url"] == c.b_urls[name]
    before = c.b_counters()
    outcomes = [c.request(f"across the wire {i}") for i in range(8)]
    assert all(o.complete for o in outcomes), outcomes
    after = c.b_counters()
    for name in B_NAMES:  # round robin over 2 per role: about half of the legs went to B
        assert after[name]["received"] - before[name]["received"] >= 3, (before, after)
    # B's decode got KV params from prefills on both hosts, and they checked out
    hits = after["decode-b"]["verdicts"].get("hit", 0) - before["decode-b"]["verdicts"].get(
        "hit", 0
    )
    assert hits >= 3 and after["decode-b"]["kv_invalid"] == 0, after
    # B advertises its own address as NIXL side channel (what a remote decode dials)
    status, body = c.hosts.call("b", http_get, f"{c.b_urls['prefill-b']}/_standin/info")
    assert status == 200, body
    assert json.loads(body)["kv_address"].startswith(f"{c.hosts.addr['b']}:")


def test_partition_takes_b_out_of_rotation_and_never_hangs(healthy: Cluster) -> None:
    c = healthy
    # long enough to be in flight at the partition, short enough to finish without it
    inflight = [c.submit(f"stream {i}", 100, stream=True) for i in range(4)]
    inflight += [c.submit(f"plain {i}", 100) for i in range(2)]
    wait_for(lambda: c.b_counters()["decode-b"]["inflight"] >= 1, 5, what="a request on B")
    c.hosts.partition("b")
    took = c.wait_rotation(False, PROBE_BUDGET + SLACK + 5)
    assert took <= PROBE_BUDGET + SLACK, f"{took:.2f}s to leave rotation"
    # new requests go to A's own instances: fast, whole, and none reaches B
    before = c.b_counters()
    fresh = [c.request(f"after the partition {i}") for i in range(6)]
    assert all(o.complete and o.elapsed < 2.0 for o in fresh), fresh
    after = c.b_counters()
    assert all(after[n]["received"] == before[n]["received"] for n in B_NAMES), (before, after)
    # every request in flight returned by the proxy's deadline; those on B with an error
    results = [f.result(REQUEST_TIMEOUT + 15) for f in inflight]
    assert all(o.elapsed <= REQUEST_TIMEOUT + SLACK for o in results), [o.elapsed for o in results]
    cut = [o for o in results if not o.complete]
    assert cut, "the requests on B were in flight at the partition; none failed?"
    assert all(o.status in (0, 200, 502, 503, 504) for o in cut), cut


def test_heal_returns_b_to_rotation(healthy: Cluster) -> None:
    c = healthy
    c.hosts.partition("b")
    c.wait_rotation(False, PROBE_BUDGET + SLACK + 5)
    c.hosts.heal("b")
    healed = time.monotonic()
    # back within two probe intervals (plus a probe sent into the void just before the heal)
    took = c.wait_rotation(True, 10)
    assert took <= 2 * PROBE_INTERVAL + PROBE_TIMEOUT + SLACK, f"{took:.2f}s to return"
    before = c.b_counters()
    first = c.request("first after the heal")
    second = c.request("second after the heal")
    assert first.complete and second.complete, (first, second)
    after = c.b_counters()
    # round robin: one of the two went to each of B's instances, and it succeeded
    assert all(after[n]["completed"] > before[n]["completed"] for n in B_NAMES), (before, after)
    assert time.monotonic() - healed <= 2 * PROBE_INTERVAL + PROBE_TIMEOUT + 2 * SLACK


def test_b_daemon_restart_is_recovered_without_intervention(healthy: Cluster) -> None:
    c = healthy
    old = c.b.pids()
    c.b.signal(signal.SIGTERM)
    assert c.b.wait(30) == 0
    c.wait_rotation(False, PROBE_BUDGET + SLACK + 5)
    during = [c.request(f"while B is down {i}") for i in range(4)]
    assert all(o.complete for o in during), during
    c.b.start()
    assert all(c.b.pids()[n] != old[n] for n in B_NAMES)
    c.wait_rotation(True, 10)
    before = c.b_counters()
    outcomes = [c.request(f"B is back {i}") for i in range(4)]
    assert all(o.complete for o in outcomes), outcomes
    after = c.b_counters()
    assert all(after[n]["completed"] > before[n]["completed"] for n in B_NAMES), (before, after)


def _mean(m: dict[Any, float], name: str, instance: str) -> tuple[float, float]:
    key = (("instance", instance),)
    return m.get((f"{name}_sum", key), 0.0), m.get((f"{name}_count", key), 0.0)


def test_latency_on_the_link_shows_in_metrics_not_as_failures(healthy: Cluster) -> None:
    c = healthy
    name = "disaggd_prefill_latency_seconds"

    def mean_prefill_b(n: int, tag: str) -> float:
        s0, n0 = _mean(c.metrics(), name, "prefill-b")
        outcomes = [c.request(f"{tag} {i}") for i in range(n)]
        assert all(o.complete for o in outcomes), outcomes
        s1, n1 = _mean(c.metrics(), name, "prefill-b")
        assert n1 - n0 >= n // 2 - 1
        return (s1 - s0) / (n1 - n0)

    errors_before = {
        k: v for k, v in c.metrics().items() if k[0] == "disaggd_upstream_errors_total"
    }
    plain = mean_prefill_b(8, "no delay")
    c.hosts.delay("b", 0.05)  # every frame towards B arrives 50 ms late
    delayed = mean_prefill_b(8, "with delay")
    assert delayed - plain >= 0.045, (plain, delayed)
    assert c.in_rotation() == dict.fromkeys(B_NAMES, True)
    errors_after = {k: v for k, v in c.metrics().items() if k[0] == "disaggd_upstream_errors_total"}
    assert errors_after == errors_before
