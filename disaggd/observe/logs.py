"""Logging, configured once, here.

Every module logs through ``structlog.get_logger(...)`` with bound context
(``instance=``, ``role=``, ``pid=``, ``request_id=``) and snake_case events
(``child_exited``). `configure` picks one renderer:

* ``journal``: stdout is the journal (``JOURNAL_STREAM`` is set). When stdout
  really is that journal stream and journald's socket is there, each event is
  one native-protocol datagram (`JournalLogger`): ``MESSAGE``, ``PRIORITY``,
  ``SYSLOG_IDENTIFIER=disaggd`` and every bound key as a field of its own, so
  ``journalctl -u disaggd INSTANCE=decode-0`` shows that child's lines (their
  ``MESSAGE`` is the child's line itself, with ``STREAM=stdout|stderr``).
  Otherwise each line starts with its syslog priority, ``<3>`` error, ``<4>``
  warning, ``<6>`` info, ``<7>`` debug (sd-daemon(3) ``SD_ERR`` ...), then
  ``event key=value ...``;
* ``logfmt``: ``ts level event key=value ...``, for files and pipes;
* ``json``: one JSON object per line;
* ``console``: structlog's readable console output, for a terminal;
* ``auto``: journal under systemd, console on a TTY, else logfmt.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

#: sd-daemon(3) priority prefixes by structlog level name.
PRIORITY = {
    "critical": 2,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# vLLM's own line prefix: "INFO 11-30 14:50:01 [api_server.py:123] ..." (vllm/logger.py),
# possibly behind a process tag such as "(EngineCore pid=123) " or "(APIServer pid=1) ".
_VLLM_LEVEL = re.compile(r"^(?:\(\w[^)]*\)\s+)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")


def child_level(line: str) -> str:
    """The structlog level of one line of child output, from vLLM's own prefix.

    Lines without a recognised prefix (tracebacks, third-party prints) are "info";
    a Python traceback header is "error".
    """
    m = _VLLM_LEVEL.match(line)
    if m:
        level = m.group(1).lower()
        return "warning" if level == "warn" else level
    if line.startswith("Traceback (most recent call last)"):
        return "error"
    return "info"


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """Turn ``auto`` into the concrete format for `stream` (default stdout)."""
    if fmt != "auto":
        return fmt
    if os.environ.get("JOURNAL_STREAM"):
        return "journal"
    stream = stream or sys.stdout
    return "console" if stream.isatty() else "logfmt"


def _journal_renderer(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    level = str(event_dict.pop("level", "info"))
    event_dict.pop("timestamp", None)  # journald stamps every line itself
    event = event_dict.pop("event", "")
    body = _kv(event_dict)
    return f"<{PRIORITY.get(level, 6)}>{event}{' ' + body if body else ''}"


#: journald's native protocol socket (systemd-journald.service(8)).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Overrides `JOURNAL_SOCKET` (tests point it at a socket of their own).
JOURNAL_SOCKET_ENV = "DISAGGD_JOURNAL_SOCKET"

_FIELD_BAD = re.compile(r"[^A-Z0-9_]")


def _field_name(key: str) -> str:
    """A journal field name for `key`: upper case, ``[A-Z0-9_]``, not starting with ``_``
    (those are journald's trusted fields) nor a digit, at most 64 bytes."""
    name = _FIELD_BAD.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def _journal_field(name: str, value: str) -> bytes:
    """One field of a native-protocol datagram; a value with a newline goes length-prefixed."""
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def _native_journal_renderer(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> dict[str, Any]:
    """Both forms of one event: the datagram for journald, the line if it cannot be sent."""
    level = str(event_dict.pop("level", "info"))
    event_dict.pop("timestamp", None)
    event = str(event_dict.pop("event", ""))
    priority = PRIORITY.get(level, 6)
    body = _kv(event_dict)
    line = f"{event}{' ' + body if body else ''}"
    # A child's line reads as itself in `journalctl`; its instance and stream are fields.
    message = str(event_dict["line"]) if event == "child_output" and "line" in event_dict else line
    fields = [("MESSAGE", message), ("PRIORITY", str(priority))]
    fields += [("SYSLOG_IDENTIFIER", "disaggd"), ("DISAGGD_EVENT", event)]
    fields += [(_field_name(k), str(v)) for k, v in event_dict.items() if k != "line"]
    datagram = b"".join(_journal_field(k, v) for k, v in fields)
    return {"datagram": datagram, "line": f"<{priority}>{line}"}


class JournalLogger:
    """A structlog logger that sends each event to journald as one datagram.

    Never blocks: the socket is non-blocking, and an event journald cannot take
    now (its queue is full, or the event is too big for a datagram) is written
    to `fallback` as a priority-prefixed line instead, which is the journal too.
    """

    def __init__(self, path: str, fallback: TextIO) -> None:
        self._path = path
        self._fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def msg(self, datagram: bytes, line: str) -> None:
        """Send one event (the keyword arguments of `_native_journal_renderer`)."""
        try:
            self._sock.sendto(datagram, self._path)
        except OSError:
            print(line, file=self._fallback, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def journal_socket(stream: TextIO) -> str | None:
    """journald's socket when `stream` is the journal stream systemd gave us, else None.

    ``JOURNAL_STREAM`` is ``DEV:INODE`` of that stream (systemd.exec(5)); a
    mismatch means stdout was redirected (a test, a pipe), where lines belong.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    path = os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if expected != f"{st.st_dev}:{st.st_ino}" or not os.path.exists(path):
        return None
    return path


def _logfmt_renderer(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    ts = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", "info")
    event = event_dict.pop("event", "")
    body = _kv(event_dict)
    return f"{ts} {level:<7} {event}{' ' + body if body else ''}"


def _kv(event_dict: MutableMapping[str, Any]) -> str:
    parts = []
    for key, value in event_dict.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog for the whole process; returns the concrete format.

    Args:
        fmt: ``auto`` | ``journal`` | ``logfmt`` | ``json`` | ``console``.
        level: minimum level name (``debug`` ... ``error``).
        stream: where lines go (default stdout, which systemd connects to the journal).
    """
    stream = stream or sys.stdout
    concrete = resolve_format(fmt, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if concrete != "journal":
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info)
    factory: Any = structlog.PrintLoggerFactory(file=stream)
    native = journal_socket(stream) if concrete == "journal" else None
    if native is not None:
        processors.append(_native_journal_renderer)
        journal = JournalLogger(native, stream)
        factory = lambda *_args: journal  # noqa: E731 - one logger for every name
    elif concrete == "journal":
        processors.append(_journal_renderer)
    elif concrete == "json":
        processors.append(structlog.processors.JSONRenderer())
    elif concrete == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        processors.append(_logfmt_renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return concrete


def get_logger(name: str, **context: Any) -> Any:
    """A structlog logger for module `name` with `context` bound."""
    return structlog.get_logger(name).bind(**context) if context else structlog.get_logger(name)
