"""Restart policy: capped exponential backoff."""

from __future__ import annotations

import pytest

from disaggd.supervise.backoff import Backoff
from disaggd.topology import SupervisorSection


def test_delays_grow_and_cap() -> None:
    b = Backoff(initial=1.0, factor=2.0, maximum=10.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_factor_one_is_constant() -> None:
    b = Backoff(initial=0.5, factor=1.0, maximum=60.0)
    assert {b.delay(n) for n in range(1, 50)} == {0.5}


def test_huge_failure_counts_do_not_overflow() -> None:
    b = Backoff(initial=1.0, factor=10.0, maximum=60.0)
    assert b.delay(10_000) == 60.0


def test_initial_above_cap_is_capped() -> None:
    assert Backoff(initial=5.0, factor=2.0, maximum=1.0).delay(1) == 1.0


@pytest.mark.parametrize("failures", [0, -1])
def test_no_failure_no_delay(failures: int) -> None:
    with pytest.raises(ValueError, match="failures"):
        Backoff(1.0, 2.0, 10.0).delay(failures)


@pytest.mark.parametrize(
    ("initial", "factor", "maximum"), [(0.0, 2.0, 1.0), (1.0, 0.5, 1.0), (1.0, 2.0, 0.0)]
)
def test_invalid_policy(initial: float, factor: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, factor, maximum)


def test_from_config() -> None:
    sup = SupervisorSection(backoff_initial=0.2, backoff_factor=3.0, backoff_max=1.0)
    b = Backoff.from_config(sup)
    assert b == Backoff(0.2, 3.0, 1.0)
    assert [round(b.delay(n), 6) for n in (1, 2, 3)] == [0.2, 0.6, 1.0]
    assert Backoff.from_config(SupervisorSection()) == Backoff(1.0, 2.0, 60.0)
