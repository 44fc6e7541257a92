"""The restart policy, table-driven (pure: no processes, no clock but the one given).

Like supervisord's ``transition()`` tests: every way a life can end, every edge of
the failure count, exact values. Timings: backoff 1 s doubling to 10 s, FATAL at
the 4th failure in a row, stable after 60 s of RUNNING.
"""

from __future__ import annotations

import pytest

from disaggd.supervise.policy import Decision, End, Ending, backoff_delay, decide, is_stable
from disaggd.supervise.states import TRANSITIONS, ProcessState
from disaggd.topology import SupervisorSection

S = ProcessState
SUP = SupervisorSection(
    backoff_initial=1.0, backoff_factor=2.0, backoff_max=10.0, max_failures=4, stable_after=60.0
)
NOW = 1000.0
CRASH = "killed by SIGKILL"

#: (ending, failures so far, running_since) -> the decision. running_since None: never RUNNING.
TABLE: list[tuple[str, End, int, float | None, Decision]] = [
    # -- stop: never a failure, whatever the count
    ("stop", End(Ending.STOP), 0, None, Decision(S.STOPPED, 0, 0.0, "stop requested")),
    ("stop keeps count", End(Ending.STOP), 2, None, Decision(S.STOPPED, 2, 0.0, "stop requested")),
    (
        "stop after a stable run clears",
        End(Ending.STOP),
        2,
        NOW - 60.0,
        Decision(S.STOPPED, 0, 0.0, "stop requested", cleared=2),
    ),
    # -- crash (any exit nobody asked for) -> BACKOFF with a growing delay
    (
        "crash",
        End(Ending.EXIT, CRASH),
        0,
        NOW - 5.0,
        Decision(S.BACKOFF, 1, 1.0, f"{CRASH}; failure 1 of 4, next start in 1s"),
    ),
    (
        "second crash",
        End(Ending.EXIT, CRASH),
        1,
        None,
        Decision(S.BACKOFF, 2, 2.0, f"{CRASH}; failure 2 of 4, next start in 2s"),
    ),
    (
        "exit 0 is a crash (vllm #48966)",
        End(Ending.EXIT, "exited with status 0 (unexpected)"),
        0,
        NOW - 1.0,
        Decision(
            S.BACKOFF,
            1,
            1.0,
            "exited with status 0 (unexpected); failure 1 of 4, next start in 1s",
        ),
    ),
    (
        "start timeout",
        End(Ending.START_TIMEOUT, "not ready within 20s"),
        2,
        None,
        Decision(S.BACKOFF, 3, 4.0, "not ready within 20s; failure 3 of 4, next start in 4s"),
    ),
    (
        "unhealthy",
        End(Ending.UNHEALTHY, "unhealthy: 3 probes failed (timeout)"),
        0,
        NOW - 10.0,
        Decision(
            S.BACKOFF,
            1,
            1.0,
            "unhealthy: 3 probes failed (timeout); failure 1 of 4, next start in 1s",
        ),
    ),
    (
        "spawn failure is retried",
        End(Ending.SPAWN_FAILED, "spawn failed: [Errno 2] No such file"),
        0,
        None,
        Decision(
            S.BACKOFF,
            1,
            1.0,
            "spawn failed: [Errno 2] No such file; failure 1 of 4, next start in 1s",
        ),
    ),
    # -- FATAL after max_failures in a row
    (
        "the max_failures-th failure is FATAL",
        End(Ending.EXIT, CRASH),
        3,
        None,
        Decision(S.FATAL, 4, 0.0, f"{CRASH}; 4 failures in a row"),
    ),
    (
        "start timeout as the last failure",
        End(Ending.START_TIMEOUT, "not ready within 20s"),
        3,
        None,
        Decision(S.FATAL, 4, 0.0, "not ready within 20s; 4 failures in a row"),
    ),
    # -- stable reset: a RUNNING that lasted stable_after starts the count afresh
    (
        "stable run: count restarts at 1",
        End(Ending.EXIT, CRASH),
        3,
        NOW - 60.0,
        Decision(S.BACKOFF, 1, 1.0, f"{CRASH}; failure 1 of 4, next start in 1s", cleared=3),
    ),
    (
        "just short of stable: FATAL",
        End(Ending.EXIT, CRASH),
        3,
        NOW - 59.999,
        Decision(S.FATAL, 4, 0.0, f"{CRASH}; 4 failures in a row"),
    ),
    (
        "stable with nothing to clear",
        End(Ending.EXIT, CRASH),
        0,
        NOW - 3600.0,
        Decision(S.BACKOFF, 1, 1.0, f"{CRASH}; failure 1 of 4, next start in 1s"),
    ),
    # -- cannot be started at all: FATAL at once, not a failure
    (
        "port in use",
        End(Ending.CANNOT_START, "port 8100 (HTTP) in use on 127.0.0.1"),
        0,
        None,
        Decision(S.FATAL, 0, 0.0, "port 8100 (HTTP) in use on 127.0.0.1"),
    ),
    (
        "folders cannot be created",
        End(Ending.CANNOT_START, "cannot create /x: Permission denied"),
        2,
        None,
        Decision(S.FATAL, 2, 0.0, "cannot create /x: Permission denied"),
    ),
    # -- the old group survived SIGKILL (vllm #55510): FATAL, never a second engine
    (
        "group survived SIGKILL",
        End(Ending.EXIT, CRASH, group_gone=False),
        0,
        NOW - 5.0,
        Decision(S.FATAL, 0, 0.0, f"{CRASH}; its old process group survived SIGKILL"),
    ),
    (
        "group survived a start-timeout kill",
        End(Ending.START_TIMEOUT, "not ready within 20s", group_gone=False),
        1,
        None,
        Decision(S.FATAL, 1, 0.0, "not ready within 20s; its old process group survived SIGKILL"),
    ),
    (
        "a stop wins over a stuck group",
        End(Ending.STOP, group_gone=False),
        1,
        None,
        Decision(S.STOPPED, 1, 0.0, "stop requested"),
    ),
]


@pytest.mark.parametrize(
    ("end", "failures", "running_since", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide(end: End, failures: int, running_since: float | None, expected: Decision) -> None:
    assert decide(end, failures, running_since, SUP, NOW) == expected


def test_every_decision_is_a_legal_edge_from_where_a_life_ends() -> None:
    # A life ends in STARTING (crashed or refused before RUNNING), STOPPING (killed) or EXITED;
    # STOPPED is reached through STOPPING by the life itself.
    for _, end, failures, since, _ in TABLE:
        decision = decide(end, failures, since, SUP, NOW)
        if decision.state is S.STOPPED:
            continue
        sources = [S.STARTING]
        if end.kind is not Ending.CANNOT_START:
            sources += [S.STOPPING, S.EXITED]
        for source in sources:
            assert decision.state in TRANSITIONS[source], (source, decision)


def test_crash_loop_to_fatal_on_a_fake_clock() -> None:
    """A life that crashes 2 s after each start: delays 1, 2, 4, then FATAL; nothing after."""
    now, failures, delays = 0.0, 0, []
    while True:
        now += 2.0  # RUNNING for 2 s (< stable_after), then killed
        d = decide(End(Ending.EXIT, CRASH), failures, now - 2.0, SUP, now)
        failures = d.failures
        if d.state is S.FATAL:
            break
        delays.append(d.delay)
        now += d.delay
    assert delays == [1.0, 2.0, 4.0]
    assert (failures, now) == (4, 2.0 * 4 + 7.0)


def test_backoff_cap() -> None:
    assert [backoff_delay(SUP, n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    big = SupervisorSection(backoff_initial=1.0, backoff_factor=10.0, backoff_max=60.0)
    assert backoff_delay(big, 10_000) == 60.0  # no float overflow
    # The cap reaches decide: the 6th failure of 10 waits backoff_max, not 32 s.
    ten = SUP.model_copy(update={"max_failures": 10})
    d = decide(End(Ending.EXIT, CRASH), 5, None, ten, NOW)
    assert (d.state, d.failures, d.delay) == (S.BACKOFF, 6, 10.0)
    assert d.reason == f"{CRASH}; failure 6 of 10, next start in 10s"


def test_backoff_shapes() -> None:
    flat = SupervisorSection(backoff_initial=0.5, backoff_factor=1.0, backoff_max=60.0)
    assert {backoff_delay(flat, n) for n in range(1, 50)} == {0.5}
    above = SupervisorSection(backoff_initial=5.0, backoff_factor=2.0, backoff_max=1.0)
    assert backoff_delay(above, 1) == 1.0
    odd = SupervisorSection(backoff_initial=0.2, backoff_factor=3.0, backoff_max=1.0)
    assert [round(backoff_delay(odd, n), 6) for n in (1, 2, 3)] == [0.2, 0.6, 1.0]
    assert [backoff_delay(SupervisorSection(), n) for n in (1, 2, 7)] == [1.0, 2.0, 60.0]


@pytest.mark.parametrize("failures", [0, -1])
def test_no_failure_no_delay(failures: int) -> None:
    with pytest.raises(ValueError, match="failures must be >= 1"):
        backoff_delay(SUP, failures)


def test_max_failures_one_is_fatal_at_the_first_failure() -> None:
    one = SUP.model_copy(update={"max_failures": 1})
    d = decide(End(Ending.UNHEALTHY, "unhealthy: 2 probes failed (timeout)"), 0, None, one, NOW)
    assert d == Decision(
        S.FATAL, 1, 0.0, "unhealthy: 2 probes failed (timeout); 1 failures in a row"
    )


def test_is_stable() -> None:
    assert is_stable(None, SUP, NOW) is False
    assert is_stable(NOW - 60.0, SUP, NOW) is True
    assert is_stable(NOW - 59.0, SUP, NOW) is False
    assert is_stable(NOW, SUP.model_copy(update={"stable_after": 0.0}), NOW) is True
