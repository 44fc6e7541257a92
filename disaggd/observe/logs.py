"""Logging, configured once, here.

Every module logs through ``structlog.get_logger(...)`` with bound context
(``instance=``, ``role=``, ``pid=``, ``request_id=``) and snake_case events
(``child_exited``). `configure` picks one renderer:

* ``journal``: stdout is the journal (``JOURNAL_STREAM`` is set). Each line
  starts with its syslog priority, ``<3>`` error, ``<4>`` warning, ``<6>`` info,
  ``<7>`` debug (sd-daemon(3) ``SD_ERR`` ...), then ``event key=value ...``;
* ``logfmt``: ``ts level event key=value ...``, for files and pipes;
* ``json``: one JSON object per line;
* ``console``: structlog's readable console output, for a terminal;
* ``auto``: journal under systemd, console on a TTY, else logfmt.
"""

from __future__ import annotations

import logging
import os
import re
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
    if concrete == "journal":
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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return concrete


def get_logger(name: str, **context: Any) -> Any:
    """A structlog logger for module `name` with `context` bound."""
    return structlog.get_logger(name).bind(**context) if context else structlog.get_logger(name)
