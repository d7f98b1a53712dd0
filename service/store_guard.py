"""One door for every feature-store call the service makes: a deadline, the breaker, metrics.

`StoreGuard.call(op, fn)` runs `fn()` (a coroutine factory) only when the circuit breaker
allows it, under a deadline (STORE_TIMEOUT_MS, redis-py's own retries included), and
records its duration or its failure. Every failure comes out as one exception type,
`StoreCallFailed`, whose `reason` is also the metric label:

    timeout       no answer within the deadline
    unavailable   connection refused / reset, socket timeout (StoreUnavailableError)
    circuit_open  not tried: the breaker is open after repeated failures
    busy          not tried: no free connection in the service's own pool within the
                  deadline (a burst of calls; StoreBusyError), which says nothing about Redis
    error         anything else the store raised (a Redis error reply, garbage data, a bug)

A StoreError is an `error` the breaker does not count: Redis answered and refused this one
call (out of memory for writes, a key or a data version's meta holding garbage), so it is
not down, and one bad key must not make every user's /rank skip the store. Nor is a
CorruptValueError (a value that does not decode: Redis answered), nor `busy`: Redis was not
asked. Nor is an exception that is neither the store's nor Redis's (a TypeError, a bare
ValueError: a bug in our own code, or garbage that got past the store's checks): it says
nothing about Redis, so it fails that call only, but is logged with its traceback and
counted as an `error`. An error of Redis's own client that the store did not translate
(redis.RedisError, an OSError) still counts, as do timeouts and `unavailable`.

Readers degrade on it (/rank ranks with an empty history); writers must refuse:
`store_unavailable_error(e)` is the 503 (with Retry-After) that POST /events raises, so an
event that was not stored is never acknowledged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import redis
from fastapi import HTTPException, status

from feature_store.base import CONNECTION_WAIT, ConnectionWait, StoreBusyError, StoreError, StoreUnavailableError
from feature_store.records import CorruptValueError
from service.circuit_breaker import BreakerState, CircuitBreaker
from service.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, ServiceMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATE_VALUE = {BreakerState.CLOSED: CIRCUIT_CLOSED, BreakerState.HALF_OPEN: CIRCUIT_HALF_OPEN, BreakerState.OPEN: CIRCUIT_OPEN}
# Redis's own failures (its client's errors, sockets) that a store did not translate: they count
_REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
_ANSWERED_GARBAGE = (StoreError, CorruptValueError)  # Redis answered; the data is not usable


class StoreCallFailed(StoreUnavailableError):
    """A store call that failed or was not tried; `reason` says which (see the module doc)."""

    def __init__(self, message: str, reason: str, retry_after_s: float = 1.0, answered: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.answered = answered  # the store answered and said why (a StoreError): the message is for the client


class StoreGuard:
    def __init__(self, breaker: CircuitBreaker, timeout_s: float, metrics: ServiceMetrics):
        self.breaker = breaker
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._last_error = ""
        self.bugs = 0  # calls failed by an exception that is neither the store's nor Redis's
        metrics.store_circuit_state.set(_STATE_VALUE[breaker.state])

    @classmethod
    def build(
        cls, *, failure_threshold: int, reset_s: float, timeout_s: float, metrics: ServiceMetrics
    ) -> "StoreGuard":
        guard: StoreGuard

        def on_change(old: BreakerState, new: BreakerState) -> None:
            metrics.store_circuit_state.set(_STATE_VALUE[new])
            if new is BreakerState.OPEN and old is BreakerState.CLOSED:
                log.warning(
                    "feature store circuit open after %d failures (last: %s): skipping the store for %.0f ms",
                    failure_threshold, guard._last_error, reset_s * 1000,
                )
            elif new is BreakerState.CLOSED:
                log.info("feature store circuit closed: the store answers again")

        guard = cls(CircuitBreaker(failure_threshold, reset_s, on_change=on_change), timeout_s, metrics)
        return guard

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    def _fail(self, op: str, reason: str, message: str) -> StoreCallFailed:
        self.metrics.store_errors.labels(op, reason).inc()
        if reason != "circuit_open":
            self._last_error = message
            self.breaker.record_failure()
        return StoreCallFailed(message, reason, retry_after_s=max(self.breaker.retry_after_s, 1.0))

    def _refused(self, op: str, e: Exception) -> StoreCallFailed:
        """The store answered but refused this call, or its data is garbage: an error, not an outage (module doc)."""
        self.metrics.store_errors.labels(op, "error").inc()
        self.breaker.record_success()  # Redis answers (a half-open trial has its answer)
        return StoreCallFailed(str(e), "error", retry_after_s=1.0, answered=True)

    def _bug(self, op: str, e: Exception) -> StoreCallFailed:
        """Neither the store's nor Redis's exception: visible (traceback, metric), but no evidence
        of an outage, so it does not count towards opening the circuit (module doc)."""
        self.bugs += 1
        self.metrics.store_errors.labels(op, "error").inc()
        if self.bugs <= 10 or self.bugs % 1000 == 0:  # the traceback, without flooding the log
            log.error("feature store %s failed: %s: %s (a bug, not counted as a store outage; %d so far)",
                      op, type(e).__name__, e, self.bugs, exc_info=(type(e), e, e.__traceback__))
        else:
            log.warning("feature store %s failed: %s: %s", op, type(e).__name__, e)
        self.breaker.record_no_verdict()  # a half-open trial learnt nothing: the next call is the trial
        return StoreCallFailed(f"{type(e).__name__}: {e}", "error", retry_after_s=1.0)

    def _busy(self, op: str, message: str) -> StoreCallFailed:
        """No free connection in our own pool: not Redis's failure, so the breaker does not count it."""
        self.metrics.store_errors.labels(op, "busy").inc()
        if self.breaker.state is BreakerState.HALF_OPEN:  # the trial got no answer: the next one tries again
            self.breaker.record_failure()
        return StoreCallFailed(message, "busy", retry_after_s=1.0)

    async def call(self, op: str, fn: Callable[[], Awaitable[T]], *, timeout_s: float | None = None) -> T:
        """`await fn()` under the deadline and the breaker; raise StoreCallFailed on any failure."""
        if not self.breaker.allow():
            raise self._fail(op, "circuit_open", f"the feature store is failing ({self._last_error}); not tried")
        deadline = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        wait = ConnectionWait()  # the store marks it while the call queues for a connection
        token = CONNECTION_WAIT.set(wait)
        try:
            with anyio.fail_after(deadline):
                result = await fn()
        except TimeoutError:
            if wait.waiting:
                raise self._busy(op, f"no free Redis connection within {deadline * 1000:.0f} ms "
                                     f"(all in use by this process)") from None
            raise self._fail(op, "timeout", f"no answer within {deadline * 1000:.0f} ms") from None
        except StoreBusyError as e:
            raise self._busy(op, str(e)) from None
        except StoreUnavailableError as e:
            raise self._fail(op, "unavailable", str(e)) from None
        except _ANSWERED_GARBAGE as e:
            log.warning("feature store %s refused: %s", op, e)
            raise self._refused(op, e) from None
        except _REDIS_FAILURES as e:
            log.warning("feature store %s failed: %s: %s", op, type(e).__name__, e)
            raise self._fail(op, "error", f"{type(e).__name__}") from None
        except Exception as e:
            raise self._bug(op, e) from None
        except BaseException:  # cancelled: a trial call must not stay "in flight" forever
            if self.breaker.state is BreakerState.HALF_OPEN:
                self.breaker.record_failure()
            raise
        finally:
            CONNECTION_WAIT.reset(token)
        self.breaker.record_success()
        self.metrics.store_seconds.labels(op).observe(time.perf_counter() - start)
        return result


def store_unavailable_error(e: StoreCallFailed, what: str = "the request") -> HTTPException:
    """The 503 a writer answers when the store failed: nothing was stored, retry later.

    When the store answered and said why (out of memory, no usable data version), the
    detail passes that on: it is what an operator has to fix before a retry can work.
    """
    if e.answered:
        detail = f"the feature store refused: {e}; {what} was not stored, retry later"
    elif e.reason == "busy":
        detail = f"the service is busy (no free connection to the feature store); {what} was not stored, retry later"
    else:
        detail = f"the feature store is unavailable ({e.reason}); {what} was not stored, retry later"
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail,
        headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))},
    )
