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
