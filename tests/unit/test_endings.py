"""`disaggd.proxy.endings`: complete vs cut, from the last events of a stream or an answer."""

from __future__ import annotations

import json
from typing import Any

from disaggd.proxy.endings import answer_aborted, last_chunk, last_finish

DONE = b"data: [DONE]\n\n"


def ev(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def tok(finish: str | None, text: str = "x") -> bytes:
    return ev({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


USAGE = ev({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


def test_finished_streams_are_complete() -> None:
    for reason in ("length", "stop", "tool_calls"):
        assert last_finish(tok(None) + tok(reason) + DONE) == (False, reason)
        assert last_finish(tok(reason) + USAGE + DONE) == (False, reason)


def test_abort_or_no_finish_reason_is_cut() -> None:
    assert last_finish(tok(None) + tok("abort", "") + DONE) == (True, "abort")
    assert last_finish(tok(None) + USAGE + DONE) == (True, None)
    # n > 1: one aborted choice is enough.
    two = ev({"choices": [{"finish_reason": "length"}, {"finish_reason": "abort"}]})
    assert last_finish(two + DONE)[0] is True


def test_error_event_and_unjudgeable_tails_are_left_alone() -> None:
    assert last_finish(ev({"error": {"message": "x"}}) + DONE) == (False, None)
    assert last_finish(DONE) == (False, None)
    assert last_finish(b'data: {"choi' + b"\n\n" + DONE) == (False, None)


def test_last_chunk_strips_done_only_when_cut_even_across_reads() -> None:
    assert last_chunk("r", "d", tok(None), tok("length") + DONE) == tok("length") + DONE
    assert last_chunk("r", "d", tok(None), tok("abort") + DONE) == tok("abort")
    # The abort chunk came in the read before a lone [DONE].
    assert last_chunk("r", "d", tok("abort"), DONE) == b""
    assert last_chunk("r", "d", tok("abort") + USAGE, DONE) == b""


def test_answer_aborted() -> None:
    done = {"choices": [{"text": "abort", "finish_reason": "length"}]}
    cut = {"choices": [{"text": "ab", "finish_reason": "abort"}]}
    assert answer_aborted("r", "d", json.dumps(done).encode()) is False
    assert answer_aborted("r", "d", json.dumps(cut).encode()) is True
    assert answer_aborted("r", "d", b"not json abort") is False
