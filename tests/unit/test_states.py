"""Process states: the one table of legal edges, checked edge by edge."""

from __future__ import annotations

import itertools

import pytest

from disaggd.supervise.states import TRANSITIONS, IllegalTransition, ProcessState, check_transition

S = ProcessState

#: The edges the supervisor relies on, written out independently of the table.
LEGAL = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.STARTING, S.BACKOFF),
    (S.STARTING, S.STOPPING),
    (S.STARTING, S.FATAL),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.EXITED),
    (S.RUNNING, S.STARTING),
    (S.BACKOFF, S.STARTING),
    (S.BACKOFF, S.STOPPED),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.BACKOFF),
    (S.STOPPING, S.FATAL),
    (S.EXITED, S.BACKOFF),
    (S.EXITED, S.FATAL),
    (S.EXITED, S.STOPPED),
    (S.FATAL, S.STARTING),
}


def test_names_are_supervisords() -> None:
    assert [s.value for s in S] == [
        "STOPPED",
        "STARTING",
        "RUNNING",
        "BACKOFF",
        "STOPPING",
        "EXITED",
        "FATAL",
    ]
    assert all(s.value == s.name and str(s) == s.name for s in S)
    assert S("RUNNING") is S.RUNNING


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(S)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL


@pytest.mark.parametrize(("old", "new"), sorted(LEGAL))
def test_legal_edge(old: ProcessState, new: ProcessState) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [p for p in itertools.product(S, S) if p not in LEGAL])
def test_illegal_edge(old: ProcessState, new: ProcessState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert info.value.old is old and info.value.new is new
    assert f"{old.value} -> {new.value}" in str(info.value)


def test_no_self_loops_and_no_exit_from_stopped_but_start() -> None:
    assert all(s not in TRANSITIONS[s] for s in S)
    assert TRANSITIONS[S.STOPPED] == {S.STARTING}
    # FATAL is left only by an operator's restart (or a reload).
    assert TRANSITIONS[S.FATAL] == {S.STARTING}


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[S.STOPPED] = frozenset()  # type: ignore[index]
