"""Restart policy: how one life of a child ended → what happens next (pure).

No clock, no processes, no I/O: `decide` is a function of its arguments, so that
every edge of the policy is a row in a table test (``tests/test_policy.py``), the
way supervisord tests ``transition()``. The life (`disaggd.supervise.life`) calls
it once per ending and applies the answer.

The rules, in order:

* a stop that was asked for is not a failure: STOPPED;
* an instance that cannot be started at all (a port in use, its folders cannot be
  created) is FATAL at once: retrying would not help and would spawn into a port
  somebody else holds;
* an old process group that survived SIGKILL is FATAL: never start a second
  engine next to one that still holds the GPU (vllm #55510);
* anything else (an exit nobody asked for — whatever its status, vLLM may exit 0
  when its engine dies, vllm #48966 —, a start timeout, failed probes, a spawn
  that failed) is a failure: after `max_failures` in a row FATAL, else BACKOFF
  for a capped exponential delay;
* a run that stayed RUNNING for `stable_after` seconds clears the count first
  (supervisord's ``startsecs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from disaggd.supervise.states import ProcessState
from disaggd.topology import SupervisorSection


class Ending(str, Enum):
    """Why one life of a child ended."""

    #: Asked to stop (shutdown, remove, restart): not a failure.
    STOP = "stop"
    #: Exited nobody asked it to, whatever the status (0 included): a crash.
    EXIT = "exit"
    #: Not healthy within ``start_timeout``; killed.
    START_TIMEOUT = "start_timeout"
    #: ``probe_failures`` probes in a row failed while RUNNING; killed.
    UNHEALTHY = "unhealthy"
    #: The spawn itself failed (exec error): a failure, retried.
    SPAWN_FAILED = "spawn_failed"
    #: Cannot be started at all (a port in use, folders cannot be created): no retry.
    CANNOT_START = "cannot_start"


@dataclass(frozen=True)
class End:
    """How one life ended.

    Attributes:
        kind: why it ended.
        reason: the words for ``last_exit`` and the logs (``killed by SIGKILL``,
            ``not ready within 20s``, ``port 8100 (HTTP) in use on 127.0.0.1``).
        group_gone: False when its process group was still there after SIGKILL
            (a process stuck in the kernel); such a life is never followed by another.
        at: monotonic seconds at which the ending was noticed (stability is judged then).
    """

    kind: Ending
    reason: str = ""
    group_gone: bool = True
    at: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What comes after a life.

    Attributes:
        state: BACKOFF (start again after `delay`), FATAL (left alone until an
            operator acts) or STOPPED.
        failures: the failure count from now on (failures in a row without a stable run).
        delay: seconds to wait before the next start; 0.0 unless BACKOFF.
        reason: why, for the state change's log line and ``last_exit``.
        cleared: failures the run's stability cleared before this ending was counted
            (0 when none); for the ``child_stable`` log line.
    """

    state: ProcessState
    failures: int
    delay: float
    reason: str
    cleared: int = 0


def backoff_delay(sup: SupervisorSection, failures: int) -> float:
    """Seconds before the next start after `failures` failures in a row.

    ``backoff_initial * backoff_factor**(failures-1)``, capped at ``backoff_max``.

    Raises:
        ValueError: `failures` < 1 (there is nothing to back off from).
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    delay = sup.backoff_initial
    # Multiply step by step and stop at the cap: factor**failures can overflow a float.
    for _ in range(failures - 1):
        delay *= sup.backoff_factor
        if delay >= sup.backoff_max:
            return sup.backoff_max
    return min(delay, sup.backoff_max)


def is_stable(running_since: float | None, sup: SupervisorSection, now: float) -> bool:
    """True when a run that became RUNNING at `running_since` has lasted ``stable_after`` s.

    `running_since` is None for a life that never reached RUNNING (never stable).
    """
    return running_since is not None and now - running_since >= sup.stable_after


def decide(
    end: End,
    failures: int,
    running_since: float | None,
    sup: SupervisorSection,
    now: float,
) -> Decision:
    """The state after a life that ended as `end`.

    Args:
        end: how the life ended.
        failures: failures in a row before this ending (>= 0).
        running_since: monotonic seconds at which this life became RUNNING, or None.
        sup: the ``[supervisor]`` section in force (max_failures, backoff_*, stable_after).
        now: monotonic seconds at which the life ended (normally ``end.at``).

    Returns:
        The next state, the new failure count, the delay and the reason; see the
        module docstring for the rules.
    """
    cleared = failures if failures and is_stable(running_since, sup, now) else 0
    failures -= cleared
    if end.kind is Ending.STOP:
        return Decision(ProcessState.STOPPED, failures, 0.0, "stop requested", cleared)
    if end.kind is Ending.CANNOT_START:
        return Decision(ProcessState.FATAL, failures, 0.0, end.reason, cleared)
    if not end.group_gone:
        reason = f"{end.reason}; its old process group survived SIGKILL"
        return Decision(ProcessState.FATAL, failures, 0.0, reason, cleared)
    failures += 1
    if failures >= sup.max_failures:
        reason = f"{end.reason}; {failures} failures in a row"
        return Decision(ProcessState.FATAL, failures, 0.0, reason, cleared)
    delay = backoff_delay(sup, failures)
    reason = f"{end.reason}; failure {failures} of {sup.max_failures}, next start in {delay:.3g}s"
    return Decision(ProcessState.BACKOFF, failures, delay, reason, cleared)
