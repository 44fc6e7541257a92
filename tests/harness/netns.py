"""Several "hosts" on one machine: Linux network namespaces plugged into one wire.

Only what a test creates is touched: namespaces named ``dd<token>-<host>`` (and
``dd<token>-wire``), veth pairs ``v<token>h<i>``/``v<token>w<i>`` inside them, and the
addresses of one private /24 (10.211.X.0/24) that exists only inside those namespaces.
`Hosts.close` removes everything, whatever state the test left it in.

The wire (`Wire`) relays frames between the hosts' veths in userspace, so partitions and
latency work without ``sch_netem`` (which this machine's kernel lacks); `Hosts.set_link`
takes a host's link down in the kernel.

Python code reaches a namespace from a thread (`Hosts.call`, `Hosts.executor`): a thread
that entered a network namespace creates every socket there, and the test's own thread
never moves. Processes run in one through ``ip netns exec`` (`NsDaemon`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.harness.common import disaggd_argv
from tests.harness.daemon import DaemonProcess, NotifySocket

T = TypeVar("T")

#: setns(2): join a network namespace (sched.h CLONE_NEWNET).
CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    """Why namespaces cannot be made here (the skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"ddprobe{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _enter(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`."""
    import ctypes  # here: some unprivileged users cannot load it, and they only skip

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Wire:
    """A hub in its own namespace joining every host: frames in on one port go out on all others.

    It is userspace netem: ``tc qdisc ... netem`` is absent from some kernels (this one has no
    sch_netem), and a frame relay can lose or delay traffic on any kernel with AF_PACKET.
    Frames keep their virtio-net header (PACKET_VNET_HDR), so GSO super-frames and partial
    checksums cross as the kernel handed them over.

    Faults are per host port: `lost` hosts neither send nor receive anything (their link stays
    up: connections stall, nothing is refused); frames towards a host wait `delay[host]` s.
    """

    _SOL_PACKET = 263
    _PACKET_VNET_HDR = 15
    _ETH_P_ALL = 3

    def __init__(self, ns: str, ports: dict[str, str]) -> None:
        self.ns = ns
        self.ports = ports  # host name -> the wire's interface facing it
        self.lost: set[str] = set()
        self.delay: dict[str, float] = dict.fromkeys(ports, 0.0)
        self._stop = threading.Event()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="netns-wire", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.result(10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self) -> dict[str, socket.socket]:
        socks = {}
        for host, dev in self.ports.items():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self._ETH_P_ALL))
            s.setsockopt(self._SOL_PACKET, self._PACKET_VNET_HDR, 1)
            s.bind((dev, 0))
            s.setblocking(False)
            socks[host] = s
        return socks

    def _run(self) -> None:
        try:
            _enter(self.ns)
            socks = self._open()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        queues: dict[str, deque[tuple[float, bytes]]] = {h: deque() for h in socks}
        try:
            while not self._stop.is_set():
                due = [q[0][0] for q in queues.values() if q]
                wait = min(0.05, max(0.0, min(due) - time.monotonic())) if due else 0.05
                readable, _, _ = select.select(list(socks.values()), [], [], wait)
                for host, s in socks.items():
                    if s in readable:
                        self._receive(host, s, queues)
                self._release(socks, queues)
        finally:
            for s in socks.values():
                s.close()

    def _receive(self, src: str, s: socket.socket, queues: dict[str, deque[Any]]) -> None:
        try:
            data, addr = s.recvfrom(1 << 18)
        except OSError:
            return
        if addr[2] == socket.PACKET_OUTGOING or src in self.lost:
            return
        now = time.monotonic()
        for dst, q in queues.items():
            if dst != src and dst not in self.lost:
                q.append((now + self.delay[dst], data))

    def _release(self, socks: dict[str, socket.socket], queues: dict[str, deque[Any]]) -> None:
        now = time.monotonic()
        for dst, q in queues.items():
            while q and q[0][0] <= now:
                _, data = q.popleft()
                if dst in self.lost:
                    continue
                with contextlib.suppress(OSError):  # a port that is down drops it
                    socks[dst].send(data)


@dataclass
class Hosts:
    """Namespaces standing for hosts, all plugged into one `Wire` (its own namespace).

    Host i has address ``{subnet}.{i + 1}/24`` on its veth. Build with `Hosts.create`
    (a context manager that always cleans up).
    """

    token: str
    subnet: str  # "10.211.X": this /24 exists only inside these namespaces
    ns: dict[str, str] = field(default_factory=dict)  # host name -> namespace name
    addr: dict[str, str] = field(default_factory=dict)  # host name -> its address
    dev: dict[str, str] = field(default_factory=dict)  # host name -> its veth end
    wire: Wire | None = None
    _made: list[str] = field(default_factory=list)  # every namespace made, the wire's too

    @classmethod
    @contextlib.contextmanager
    def create(cls, names: list[str]) -> Iterator[Hosts]:
        token = uuid.uuid4().hex[:6]
        hosts = cls(token, f"10.211.{int(token, 16) % 250 + 1}")
        try:
            wire_ns = hosts._namespace("wire")
            ports = {name: hosts._plug(i, name, wire_ns) for i, name in enumerate(names)}
            hosts.wire = Wire(wire_ns, ports)
            hosts.wire.start()
            yield hosts
        finally:
            hosts.close()

    def _plug(self, i: int, name: str, wire_ns: str) -> str:
        """Host `name` (the i-th): its namespace, a veth into the wire; the wire's end."""
        ns = self.ns[name] = self._namespace(name)
        dev, port = f"v{self.token}h{i}", f"v{self.token}w{i}"
        self.dev[name] = dev
        _run(*f"ip link add {dev} netns {ns} type veth peer name {port} netns {wire_ns}".split())
        self.addr[name] = f"{self.subnet}.{i + 1}"
        _run("ip", "-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", dev)
        _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", wire_ns, "link", "set", port, "up")
        return port

    def _namespace(self, name: str) -> str:
        ns = f"dd{self.token}-{name}"
        _run("ip", "netns", "add", ns)
        self._made.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def close(self) -> None:
        """Stop the wire and delete every namespace (their veth ends go with them)."""
        if self.wire is not None:
            self.wire.stop()
            self.wire = None
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    # -- faults -----------------------------------------------------------------------------

    def _wire(self) -> Wire:
        assert self.wire is not None
        return self.wire

    def partition(self, host: str) -> None:
        """Every frame from or to `host` is lost (its link stays up: connections stall)."""
        self._wire().lost.add(host)

    def delay(self, host: str, seconds: float) -> None:
        """Frames towards `host` arrive `seconds` late (netem ``delay`` on its port)."""
        self._wire().delay[host] = seconds

    def heal(self, host: str) -> None:
        """No loss, no delay, link up."""
        self._wire().lost.discard(host)
        self._wire().delay[host] = 0.0
        self.set_link(host, up=True)

    def set_link(self, host: str, up: bool) -> None:
        """``ip link set DEV up|down`` on `host`'s end (down: its peers are unreachable)."""
        _run("ip", "-n", self.ns[host], "link", "set", self.dev[host], "up" if up else "down")

    # -- Python code inside a namespace -----------------------------------------------------

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` run by a thread inside `host`'s namespace."""
        fut: Future[T] = Future()
        ns = self.ns[host]

        def body() -> None:
            try:
                _enter(ns)
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                fut.set_exception(exc)

        t = threading.Thread(target=body, name=f"netns-{host}", daemon=True)
        t.start()
        t.join()
        return fut.result()

    def executor(self, host: str, workers: int) -> ThreadPoolExecutor:
        """A thread pool whose threads all live in `host`'s namespace."""
        return ThreadPoolExecutor(workers, initializer=_enter, initargs=(self.ns[host],))


class DrainedNotifySocket(NotifySocket):
    """A `NotifySocket` that a thread keeps reading, as systemd does.

    A datagram socket holds a few messages (net.unix.max_dgram_qlen, 10 by default); once
    full, the daemon's blocking sd_notify ``sendto`` stops its whole event loop. A daemon
    that goes through many state changes between two `poll` calls needs this.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="notify-drain", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.wait(0.05):
            self.poll()

    def poll(self) -> list[dict[str, str]]:
        with self._lock:
            return super().poll()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            super().close()


class NsDaemon(DaemonProcess):
    """`DaemonProcess` run inside a namespace with ``ip netns exec`` (same pid: it execs).

    Its notify socket is drained all the time (`DrainedNotifySocket`). `start` may be
    called again after `stop`: READY is then awaited after the last message seen, not
    found among the old ones.
    """

    def __init__(self, ns: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ns = ns
        path = self.notify.path
        self.notify.close()
        path.unlink()
        self.notify = DrainedNotifySocket(path)

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> NsDaemon:
        seen = len(self.notify.poll())
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *disaggd_argv("run", "-c", str(self.config))],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            try:
                self.notify.wait("READY", timeout=timeout, after=seen)
            except TimeoutError:
                raise AssertionError(f"daemon in {self.ns} not ready; log:\n{self.log()}") from None
        return self
