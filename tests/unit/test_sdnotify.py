"""sd_notify messages on a real datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from disaggd.observe.sdnotify import Notifier, watchdog_interval


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        n = Notifier(str(path))
        assert n.enabled
        assert n.ready(status="1/2 ready")
        assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=1/2 ready"]
        assert n.reloading()
        fields = dict(x.split("=", 1) for x in sock.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
        assert n.status("x") and sock.recv(4096) == b"STATUS=x"
        assert n.status("x")  # unchanged: not resent
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()


def test_abstract_namespace_address() -> None:
    name = f"disaggd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = Notifier("@" + name)
        assert n.watchdog()
        assert sock.recv(64) == b"WATCHDOG=1"


def test_without_systemd_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


@pytest.mark.timeout(10)
def test_a_reader_that_stalls_never_blocks_the_sender(tmp_path: Path) -> None:
    # A datagram socket queues a handful of messages; past that a blocking sendto would
    # freeze the daemon's event loop. The messages that do not fit are dropped instead.
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier(str(path))
        sent = [n.send(STATUS=f"line {i}") for i in range(500)]
        assert sent[0] is True and sent[-1] is False  # the queue filled, nothing blocked
        sock.settimeout(1)
        assert sock.recv(4096) == b"STATUS=line 0"  # what was queued is intact
        n.close()
