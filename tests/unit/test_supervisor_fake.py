"""The supervisor on a fake OS and a virtual clock: the restart behaviour over hours of
virtual time in milliseconds, no processes (the OS seam `disaggd.supervise.osapi` faked)."""

from __future__ import annotations

import asyncio
import selectors
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from disaggd.supervise.events import InstanceEvent
from disaggd.supervise.health import ProbeResult
from disaggd.supervise.states import ProcessState
from disaggd.supervise.supervisor import Supervisor
from disaggd.topology import Topology, parse_config
from disaggd.topology.spec import InstanceSpec
from tests.harness.common import (
    free_port,
    standin_topology,
)
from tests.harness.supervise import (  # noqa: F401 - plain_structlog is a fixture
    STEADY,
    Recorder,
    events,
    fatal_lines,
    make_topo,
    plain_structlog,
    supervisor,
    wait_state,
)

S = ProcessState


# -- the same supervisor on a fake OS and a virtual clock ---------------------------------------
#
# What must never happen again (a spawn after FATAL, a remote instance going FATAL) is proven
# here over an hour of virtual time in milliseconds: the OS seam is faked (no processes, no
# guardian) and the event loop's clock jumps to the next timer whenever nothing is runnable.


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that, instead of waiting `timeout` seconds, moves the loop's clock."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: nothing is scheduled and nothing can wake the loop")
        self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` only moves when every task is waiting for a timer."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def run_virtual(main: Callable[[VirtualClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = VirtualClockLoop()
    try:
        loop.run_until_complete(main(loop))
    finally:
        loop.close()


@dataclass
class Script:
    """How a fake child behaves: healthy `ready_after` s after spawn (None: never); exits
    with `rc` after `exit_after` s (None: only when signalled)."""

    ready_after: float | None = 0.0
    exit_after: float | None = None
    rc: int = 1


class FakeProcess:
    def __init__(self, pid: int, loop: asyncio.AbstractEventLoop, script: Script) -> None:
        self.pid = pid
        self.exited: asyncio.Future[int] = loop.create_future()
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self.ready_at = None if script.ready_after is None else loop.time() + script.ready_after
        if script.exit_after is not None:
            loop.call_later(script.exit_after, self.exit, script.rc)

    def exit(self, rc: int) -> None:
        if not self.exited.done():
            self.exited.set_result(rc)

    def close(self) -> None:
        pass


class FakeOs:
    """An `OsApi` with scripted children, scripted ports and a scripted remote; also the probe."""

    def __init__(self, scripts: Mapping[str, Sequence[Script]] | None = None) -> None:
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.spawns: list[tuple[float, str]] = []
        self.groups: dict[int, FakeProcess] = {}
        self.by_url: dict[str, FakeProcess] = {}
        self.busy_ports: set[int] = set()
        self.remote_up: set[str] = set()
        self.signals: list[tuple[int, int]] = []
        self.released: list[int] = []
        self.closed = False
        self._pids = iter(range(4_000_001, 5_000_000))

    async def spawn(self, spec: InstanceSpec) -> FakeProcess:
        loop = asyncio.get_running_loop()
        queue = self.scripts.get(spec.name, [])
        script = queue.pop(0) if len(queue) > 1 else (queue[0] if queue else Script())
        proc = FakeProcess(next(self._pids), loop, script)
        self.spawns.append((loop.time(), spec.name))
        self.groups[proc.pid] = self.by_url[spec.base_url] = proc
        return proc

    def signal_group(self, pgid: int, sig: int) -> bool:
        proc = self.groups.get(pgid)
        if proc is None or proc.exited.done():
            return False
        self.signals.append((pgid, sig))
        if sig in (signal.SIGTERM, signal.SIGKILL):
            asyncio.get_running_loop().call_soon(proc.exit, -sig)
        return True

    def group_exists(self, pgid: int) -> bool:
        proc = self.groups.get(pgid)
        return proc is not None and not proc.exited.done()

    def reap_group(self, pgid: int) -> None:
        pass

    def release_group(self, pgid: int) -> None:
        self.released.append(pgid)

    def group_members(self, pgid: int) -> list[int]:
        return [pgid] if self.group_exists(pgid) else []

    def port_in_use(self, host: str, port: int) -> bool:
        return port in self.busy_ports

    def set_subreaper(self, enabled: bool) -> bool | None:
        return None

    def prepare_dirs(self, spec: InstanceSpec) -> None:
        pass

    def empty_dir(self, path: Path) -> None:
        pass

    @property
    def guardian_pid(self) -> int | None:
        return None

    async def close(self) -> None:
        self.closed = True

    async def probe(self, url: str, timeout: float) -> ProbeResult:
        proc = self.by_url.get(url)
        now = asyncio.get_running_loop().time()
        if url in self.remote_up:
            ok = True
        elif proc is None or proc.exited.done() or proc.ready_at is None:
            ok = False
        else:
            ok = now >= proc.ready_at
        return ProbeResult(ok, 200 if ok else None, None if ok else "connection refused", 0.0)

    def spawned(self, name: str) -> list[float]:
        return [t for t, n in self.spawns if n == name]


def fake_supervisor(
    topo: Topology, fake: FakeOs, loop: VirtualClockLoop, **kwargs: Any
) -> Supervisor:
    return Supervisor(topo, os_api=fake, probe=fake.probe, clock=loop.time, **kwargs)


def test_fake_crash_loop_backs_off_exactly_then_fatal_and_never_again(tmp_path: Path) -> None:
    # Timings of standin_topology: backoff 0.2 s doubling, capped at 1 s; FATAL at 3 failures.
    topo = make_topo(tmp_path)
    fake = FakeOs({"decode-0": [Script(ready_after=None, exit_after=0.5, rc=1)]})
    rec: list[InstanceEvent] = []

    async def main(loop: VirtualClockLoop) -> None:
        async with fake_supervisor(topo, fake, loop, on_event=rec.append) as sup:
            t0 = loop.time()
            await sup.start_all()
            assert await sup.wait_ready(["prefill-0"], timeout=5)
            assert await sup.wait_ready(timeout=3600) is False  # False at FATAL, not at 3600
            st = sup.status("decode-0")
            assert (st.state, st.failures, st.restarts, st.pid) == (S.FATAL, 3, 2, None)
            assert st.since == pytest.approx(t0 + 0.5 + 0.2 + 0.5 + 0.4 + 0.5)
            assert st.last_exit == "exited with status 1 (unexpected)"
            # spawn, 0.5 s life, 0.2 s backoff, 0.5 s life, 0.4 s backoff, 0.5 s life: FATAL.
            expected = [t0, t0 + 0.7, t0 + 1.6]
            assert fake.spawned("decode-0") == pytest.approx(expected)
            # An hour later: never spawned again, still FATAL; the other never restarted.
            await asyncio.sleep(3600)
            assert fake.spawned("decode-0") == pytest.approx(expected)
            assert sup.status("decode-0").state is S.FATAL
            assert fake.spawned("prefill-0") == [t0]
            # An operator's restart clears FATAL.
            fake.scripts["decode-0"] = [Script()]
            assert await sup.restart("decode-0") is True
            st = sup.status("decode-0")
            assert (st.state, st.ready, st.failures, st.restarts) == (S.RUNNING, True, 0, 3)
        assert fake.closed

    run_virtual(main)
    reasons = [e.reason for e in rec if e.name == "decode-0" and e.state_changed]
    assert reasons[:6] == [
        "start",
        "exited with status 1 (unexpected); failure 1 of 3, next start in 0.2s",
        "restart 1 after: exited with status 1 (unexpected)",
        "exited with status 1 (unexpected); failure 2 of 3, next start in 0.4s",
        "restart 2 after: exited with status 1 (unexpected)",
        "exited with status 1 (unexpected); 3 failures in a row",
    ]


def test_fake_event_stream_of_a_crash(tmp_path: Path) -> None:
    topo = make_topo(tmp_path)
    fake = FakeOs({"decode-0": [Script(exit_after=1.0, rc=0), Script()]})
    seen: list[InstanceEvent] = []
    def on_event(event: InstanceEvent) -> None:
        seen.append(event)
        raise RuntimeError("a broken listener must not break supervision")

    async def main(loop: VirtualClockLoop) -> None:
        sup = fake_supervisor(
            topo,
            fake,
            loop,
            on_event=on_event,
        )
        async with sup:
            t0 = loop.time()
            await sup.start_all()
            await asyncio.sleep(2.5)  # RUNNING again for 1.3 s: not yet stable (2 s)
            st = sup.status("decode-0")
            assert (st.state, st.ready, st.restarts, st.failures) == (S.RUNNING, True, 1, 1)
            assert st.last_exit == "exited with status 0 (unexpected)"  # vllm #48966
            assert st.since == pytest.approx(t0 + 1.2)
            assert st.uptime == pytest.approx(2.5 - 1.2)

    with capture_logs() as logs:
        run_virtual(main)
    decode = [(e.previous, e.state, e.was_ready, e.ready) for e in seen if e.name == "decode-0"]
    assert decode == [
        (S.STOPPED, S.STARTING, False, False),
        (S.STARTING, S.RUNNING, False, True),  # RUNNING and ready: one event
        (S.RUNNING, S.EXITED, True, False),
        (S.EXITED, S.BACKOFF, False, False),
        (S.BACKOFF, S.STARTING, False, False),
        (S.STARTING, S.RUNNING, False, True),
        (S.RUNNING, S.RUNNING, True, False),  # shutdown: not ready at once ...
        (S.RUNNING, S.STOPPING, False, False),  # ... then stopped
        (S.STOPPING, S.STOPPED, False, False),
    ]
    failed = events(logs, "callback_failed")
    assert len(failed) == len(seen) and {e["callback"] for e in failed} == {"on_event"}


def test_fake_stable_run_clears_the_failure_count(tmp_path: Path) -> None:
    # stable_after = 2 s: a 1 s run counts on; a 5 s run starts the count afresh.
    topo = make_topo(tmp_path)
    scripts = [Script(exit_after=1.0), Script(exit_after=5.0), Script()]
    fake = FakeOs({"decode-0": scripts})

    async def main(loop: VirtualClockLoop) -> None:
        async with fake_supervisor(topo, fake, loop) as sup:
            await sup.start_all()
            await asyncio.sleep(1.1)
            assert sup.status("decode-0").failures == 1
            await asyncio.sleep(3.0)  # RUNNING again for 2.9 s: stable, the count is cleared
            assert sup.status("decode-0").failures == 0
            await asyncio.sleep(3.0)  # then it crashed: failure 1 again, not 2
            st = sup.status("decode-0")
            assert (st.state, st.failures, st.restarts) == (S.RUNNING, 1, 2)

    with capture_logs() as logs:
        run_virtual(main)
    stable = events(logs, "child_stable", "decode-0")
    assert [e["failures_cleared"] for e in stable] == [1]


def test_fake_port_in_use_is_fatal_after_port_wait_and_never_spawned(tmp_path: Path) -> None:
    topo = make_topo(tmp_path)
    port = topo.instance("decode-0").port
    assert port is not None
    fake = FakeOs()
    fake.busy_ports.add(port)

    async def main(loop: VirtualClockLoop) -> None:
        async with fake_supervisor(topo, fake, loop, port_wait=3.0) as sup:
            t0 = loop.time()
            await sup.start_all()
            assert await sup.wait_ready(timeout=3600) is False
            st = sup.status("decode-0")
            assert (st.state, st.failures, st.restarts) == (S.FATAL, 0, 0)
            assert st.last_exit == f"port {port} (HTTP) in use on 127.0.0.1"
            assert t0 + 3.0 <= st.since <= t0 + 3.2 + 1e-6  # retried every 0.2 s for 3 s
            await asyncio.sleep(3600)
            assert fake.spawned("decode-0") == []
            assert sup.status("decode-0").state is S.FATAL

    run_virtual(main)


def test_fake_remote_instance_is_never_fatal(tmp_path: Path) -> None:
    doc = standin_topology(tmp_path, supervisor=STEADY)
    url = f"http://127.0.0.1:{free_port()}"
    doc["instance"][1] = {"name": "decode-0", "role": "decode", "url": url}
    topo = parse_config(doc, tmp_path / "disaggd.toml")
    fake = FakeOs()

    async def main(loop: VirtualClockLoop) -> None:
        async with fake_supervisor(topo, fake, loop) as sup:
            await sup.start_all()
            await asyncio.sleep(600)  # ten minutes of refused probes
            st = sup.status("decode-0")
            assert (st.state, st.ready, st.failures, st.restarts) == (S.STARTING, False, 0, 0)
            assert st.last_exit == "not healthy: connection refused"
            fake.remote_up.add(url)
            assert await sup.wait_ready(["decode-0"], timeout=2)
            fake.remote_up.discard(url)
            await asyncio.sleep(600)
            st = sup.status("decode-0")
            assert (st.state, st.ready, st.failures) == (S.STARTING, False, 0)
            assert st.last_exit == "not healthy: connection refused"
            assert fake.spawned("decode-0") == []

    run_virtual(main)


def test_fake_stop_during_backoff_is_stopped_without_a_spawn(tmp_path: Path) -> None:
    topo = make_topo(tmp_path, supervisor={"backoff_initial": 30, "backoff_max": 60})
    fake = FakeOs({"decode-0": [Script(exit_after=0.5)]})

    async def main(loop: VirtualClockLoop) -> None:
        async with fake_supervisor(topo, fake, loop) as sup:
            await sup.start_all()
            await asyncio.sleep(1.0)
            assert sup.status("decode-0").state is S.BACKOFF
            t = loop.time()
            assert await sup.shutdown() is True
            assert loop.time() == t  # the delay is cut short, not waited out
            assert sup.status("decode-0").state is S.STOPPED
            assert len(fake.spawned("decode-0")) == 1

    run_virtual(main)
