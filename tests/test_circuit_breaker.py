"""The circuit breaker's state machine, step by step on a clock the test moves."""

from __future__ import annotations

import pytest

from service.circuit_breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(threshold: int = 3, reset_s: float = 2.0):
    clock, changes = Clock(), []
    breaker = CircuitBreaker(threshold, reset_s, clock=clock, on_change=lambda a, b: changes.append((a.value, b.value)))
    return breaker, clock, changes


def test_opens_after_threshold_consecutive_failures_only():
    b, _, changes = make(threshold=3)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.allow()
    b.record_success()  # a success in between resets the count
    assert b.consecutive_failures == 0
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and changes == []
    b.record_failure()
    assert b.state is BreakerState.OPEN and changes == [("closed", "open")]
    assert [b.allow() for _ in range(5)] == [False] * 5


def test_half_open_lets_exactly_one_trial_through_then_closes_on_success():
    b, clock, changes = make(threshold=1, reset_s=2.0)
    b.record_failure()
    clock.t += 1.999
    assert not b.allow() and b.retry_after_s == pytest.approx(0.001)
    clock.t += 0.001
    assert b.allow()  # the trial
    assert b.state is BreakerState.HALF_OPEN
    assert [b.allow() for _ in range(3)] == [False] * 3  # everyone else waits for its outcome
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.retry_after_s == 0.0
    assert all(b.allow() for _ in range(3))
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_trial_reopens_for_a_full_reset_period():
    b, clock, changes = make(threshold=2, reset_s=5.0)
    b.record_failure()
    b.record_failure()
    clock.t += 5.0
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.retry_after_s == pytest.approx(5.0)
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.1
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open")]


def test_late_outcomes_while_open_change_nothing():
    b, clock, _ = make(threshold=1, reset_s=1.0)
    b.record_failure()
    b.record_success()  # a call let through before the breaker opened, answering late
    assert b.state is BreakerState.OPEN and not b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN


@pytest.mark.parametrize("threshold, reset_s", [(0, 1.0), (1, 0.0)])
def test_rejects_nonsense_configuration(threshold, reset_s):
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, reset_s)
