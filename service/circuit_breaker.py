"""A circuit breaker: stop calling a dependency that keeps failing, test it now and then.

    closed --(failure_threshold consecutive failures)--> open
    open --(reset_s elapsed; the next call is let through as a trial)--> half_open
    half_open --(trial succeeds)--> closed      half_open --(trial fails)--> open

While open, `allow()` says no at once: /rank ranks degraded without waiting for a Redis
that is down or slow, and the dependency gets room to recover. Only one trial call runs
in half-open; every other caller is still refused until its outcome is known. Used from
one event loop (no locks needed: nothing here awaits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ):
        if failure_threshold < 1 or reset_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_s > 0")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if old is not state and self._on_change is not None:
            self._on_change(old, state)

    @property
    def retry_after_s(self) -> float:
        """Seconds until the next trial call (0 unless open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go to the dependency now? In half-open, True means "you are the trial"."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._open()
        elif self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold:
            self._open()

    def record_no_verdict(self) -> None:
        """The call ended without telling whether the dependency works (our own bug): in
        half-open, the next call is the trial; nothing else changes."""
        self._trial_in_flight = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)
