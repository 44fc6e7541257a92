"""journald's native protocol: one datagram per event, the instance as a field."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import structlog

from disaggd.observe import logs


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    structlog.reset_defaults()


def parse_datagram(data: bytes) -> dict[str, Any]:
    """Fields of one native-protocol datagram (``NAME=value`` or length-prefixed)."""
    fields: dict[str, Any] = {}
    while data:
        head, sep, rest = data.partition(b"\n")
        assert sep, data
        if b"=" in head:
            name, _, value = head.partition(b"=")
            data = rest
        else:
            name = head
            (size,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[name.decode()] = value.decode()
    return fields


def test_events_go_to_the_journal_socket_with_their_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    out = open(tmp_path / "stdout", "w")  # noqa: SIM115 - closed below
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(path))
    try:
        assert logs.configure("journal", "debug", out) == "journal"
        log = logs.get_logger("t", instance="decode-0", role="decode")
        log.warning("child_output", stream="stderr", line="WARNING boom")
        log.info("child_ready", pid=42, note="two\nlines")
        child = parse_datagram(sock.recv(65536))
        ready = parse_datagram(sock.recv(65536))
    finally:
        sock.close()
        out.close()
    assert child == {
        "MESSAGE": "WARNING boom",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "disaggd",
        "DISAGGD_EVENT": "child_output",
        "INSTANCE": "decode-0",
        "ROLE": "decode",
        "STREAM": "stderr",
    }
    assert ready["MESSAGE"] == 'child_ready instance=decode-0 role=decode pid=42 note="two\\nlines"'
    assert ready["NOTE"] == "two\nlines"  # a value with a newline goes length-prefixed
    assert ready["PRIORITY"] == "6" and ready["PID"] == "42"
    assert (tmp_path / "stdout").read_text() == ""


def test_lines_on_stdout_when_it_is_not_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JOURNAL_STREAM that is not our stdout (a redirect): prefixed lines, as before."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(path))
    out = open(tmp_path / "stdout", "w")  # noqa: SIM115 - closed below
    try:
        logs.configure("journal", "info", out)
        logs.get_logger("t", instance="decode-0").info("child_ready")
    finally:
        out.close()
        sock.close()
    assert (tmp_path / "stdout").read_text() == "<6>child_ready instance=decode-0\n"


def test_an_event_journald_cannot_take_falls_back_to_stdout(tmp_path: Path) -> None:
    out = open(tmp_path / "stdout", "w")  # noqa: SIM115 - closed below
    try:
        journal = logs.JournalLogger(str(tmp_path / "gone.sock"), out)  # nobody listens
        journal.info(datagram=b"MESSAGE=x\n", line="<6>x")
    finally:
        out.close()
    assert (tmp_path / "stdout").read_text() == "<6>x\n"


@pytest.mark.parametrize(
    ("key", "field"),
    [("instance", "INSTANCE"), ("request-id", "REQUEST_ID"), ("_pid", "PID"), ("1x", "F_1X")],
)
def test_field_names(key: str, field: str) -> None:
    assert logs._field_name(key) == field
