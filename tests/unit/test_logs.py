"""Log lines as journald and people read them."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from disaggd.observe import logs


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    structlog.reset_defaults()


def test_journal_lines_start_with_their_priority() -> None:
    out = io.StringIO()
    assert logs.configure("journal", "debug", out) == "journal"
    log = logs.get_logger("t", instance="decode-0")
    log.debug("probe_ok")
    log.info("child_ready", pid=42)
    log.warning("kv_recomputed", request_id="r 1")
    log.error("child_fatal")
    lines = out.getvalue().splitlines()
    assert lines == [
        "<7>probe_ok instance=decode-0",
        "<6>child_ready instance=decode-0 pid=42",
        '<4>kv_recomputed instance=decode-0 request_id="r 1"',
        "<3>child_fatal instance=decode-0",
    ]


def test_auto_is_journal_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    assert logs.resolve_format("auto", io.StringIO()) == "journal"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert logs.resolve_format("auto", io.StringIO()) == "logfmt"


def test_json_and_level_filter() -> None:
    out = io.StringIO()
    logs.configure("json", "warning", out)
    logs.get_logger("t").info("hidden")
    logs.get_logger("t").warning("shown", n=1)
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["event"] == "shown" and doc["level"] == "warning" and doc["n"] == 1


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("INFO 11-30 14:50:01 [api_server.py:123] Starting vLLM API server", "info"),
        ("(EngineCore pid=123) WARNING 11-30 14:50:01 [core.py:9] slow", "warning"),
        ("(APIServer pid=1) ERROR 11-30 14:50:01 [x.py:1] boom", "error"),
        ("DEBUG 11-30 14:50:01 [x.py:1] d", "debug"),
        ("Traceback (most recent call last):", "error"),
        ("some other print", "info"),
    ],
)
def test_child_level_from_vllm_prefix(line: str, level: str) -> None:
    assert logs.child_level(line) == level
