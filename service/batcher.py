"""Cross-request micro-batching: concurrent /rank requests -> one scoring step.

Requests wait in a bounded queue. One collector task on the event loop forms a batch as
soon as the scorer is free: every queued request up to `max_batch_candidates`, going at
once when that is full and otherwise waiting at most `max_wait_s` after the oldest request
arrived. The batch's histories come from the store in one round trip (MGET), the batch is
scored in ONE step on a dedicated scoring thread (U users, N candidates, `cand_user`: one
graph call, or on the CPU a few calls of whole users when the batch is bigger than the
scorer's chunk size), and every request gets its slice back. The event loop never blocks
on inference, so it keeps parsing requests while a batch is scored, and those form the
next batch. Batches are pipelined (`pipeline_depth`, default 2): while one batch is
scored, the next is formed, its histories fetched, and it waits in the scoring thread's
queue, so the scoring thread goes from one graph call straight to the next instead of
idling through a store round trip and two thread hand-offs per batch (measured: those gaps
capped the service at about half the scorer's rate).

Overload: `submit` raises QueueFull at once (the route answers 503 with Retry-After) when
`max_queue` requests wait, or when the queue already holds more work than half the
request's deadline at the recent scoring pace (it would likely time out: better to say so
now and spend the scorer on requests that can still make it; measured: without this, an
offered load of 1.5x capacity collapsed the goodput to a third, as queued requests expired
mid-batch). A request still waiting at its
deadline is answered DeadlineExceeded (503) and dropped from the queue unscored, at once
(so is one whose caller went away): only requests still waiting count against `max_queue`
and the expected wait.

Shutdown (`close`) drains: the collector stops taking new requests, scores every queued one
and the batch it is forming, and exits on its own; it is not cancelled mid-batch, where the
requests it has taken are in neither the queue nor the scoring thread.

Counters (`stats`, `queue_depth`, `on_batch`) are plain attributes and a callback, so
metrics can be hooked in without touching this module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from feature_store.records import UserHistory
from service.scorer import RankInput, Scored, Scorer, ScoringBatch, build_batch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scorer's queue is full: answer 503 now, with `retry_after_s`."""

    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"the ranking queue is full ({depth} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request was not scored before its deadline."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_candidates: int = 256  # a batch goes at once when it holds this many candidates
    max_wait_s: float = 0.0002  # a lone request waits at most this long for company
    max_queue: int = 256  # waiting requests; past this, QueueFull
    deadline_s: float | None = 0.5  # per request, from arrival; None: no deadline
    pipeline_depth: int = 2  # batches formed and not yet scored; 1 = fetch and score strictly in turn

    def __post_init__(self) -> None:
        if self.max_batch_candidates < 1 or self.max_queue < 1 or self.pipeline_depth < 1:
            raise ValueError("max_batch_candidates, max_queue and pipeline_depth must be >= 1")
        if self.max_wait_s < 0 or (self.deadline_s is not None and self.deadline_s <= 0):
            raise ValueError("max_wait_s must be >= 0 and deadline_s > 0")


@dataclass(frozen=True)
class Fetched:
    """What the store returned for a batch of users (in request order)."""

    histories: Sequence[UserHistory | None]
    profile_fields: Sequence[str] = ()
    degraded: bool = False  # the store failed: every user of the batch ranked without history


@dataclass(frozen=True)
class Ranked:
    """One request's answer: its scores, and how it was scored."""

    scored: Scored
    degraded: bool
    model_version: str  # of the scorer that scored this batch (a hot reload swaps it between batches)
    batch_users: int  # requests in the batch it rode in
    history: UserHistory | None = None  # what the store returned (None: unknown user or degraded), for explain
    has_attention: bool = False  # the scoring model returns attention weights (for explain)
    max_history: int = 0  # of the scoring model: explain's bound is checked again against it


@dataclass(frozen=True)
class BatchStats:
    """One batch, for metrics: sizes and where its time went."""

    users: int
    candidates: int
    queue_depth: int  # requests still waiting when it was formed
    wait_s: float  # the oldest request's time in the queue
    fetch_s: float
    score_s: float


@dataclass
class BatcherStats:
    batches: int = 0
    requests: int = 0
    candidates: int = 0
    rejected_queue_full: int = 0
    rejected_deadline: int = 0
    max_batch_users: int = 0

    @property
    def mean_batch_users(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


@dataclass(eq=False)
class _Job:
    user_id: int
    candidates: dict[str, np.ndarray]
    n: int
    arrived: float
    deadline: float
    budget: float | None  # the deadline's length, for its message
    future: asyncio.Future = field(repr=False)
    explain: bool = False  # needs the attention weights
    queued: bool = True  # in Batcher._queue (and counted in _queued_candidates)


FetchFn = Callable[[list[int]], Awaitable[Fetched]]
_TIMER_RESOLUTION_S = 0.002  # below this, waiting by timer overshoots (epoll sleeps in whole ms)


def rank_input(scorer: Scorer, history: UserHistory | None, profile_fields: Sequence[str], candidates: dict[str, np.ndarray]) -> RankInput:
    """A stored history (or None: unknown user / degraded) and raw candidate ids -> RankInput."""
    if history is None:
        return RankInput(history={}, profile={}, candidates=candidates)
    spec = scorer.bundle.spec
    recs = history.records[: spec.max_history]
    return RankInput(
        history={f: recs[f] for f in spec.sequence_fields},
        profile=dict(zip(profile_fields, history.profile.tolist())),
        candidates=candidates,
    )


def missing_profiles(fetched: Fetched, scorer: Scorer) -> tuple[str, ...]:
    """Profile fields the model reads that the store's data does not keep (() when no known
    user is in the batch, or the batch is degraded anyway): such users score with the
    unknown-profile row, so their answers are degraded."""
    missing = tuple(f for f in scorer.bundle.spec.profile_fields if f not in fetched.profile_fields)  # usually ()
    if not missing or fetched.degraded or all(h is None for h in fetched.histories):
        return ()
    return missing


class Batcher:
    """Coalesces `submit` calls into batches; see the module docstring.

    `get_scorer` is read once per batch, so a hot reload that swaps the scorer takes effect
    at the next batch while the batch in flight finishes on the old model. `fetch` reads
    a batch's histories (one store round trip) and never raises for a failing store: it
    returns `Fetched(degraded=True)`.
    """

    def __init__(self, get_scorer: Callable[[], Scorer], fetch: FetchFn, config: BatcherConfig = BatcherConfig()):
        self.get_scorer = get_scorer
        self.fetch = fetch
        self.config = config
        self.stats = BatcherStats()
        self.on_batch: Callable[[BatchStats], None] | None = None  # e.g. a metrics hook
        self._queue: deque[_Job] = deque()
        self._queued_candidates = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._warned_profiles: set[tuple[str, tuple[str, ...]]] = set()  # (model version, fields) logged
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="din-scoring")
        self._slots: asyncio.Semaphore | None = None  # pipeline_depth batches in flight at most
        self._in_flight: set[asyncio.Future] = set()
        self._cand_per_s = 0.0  # recent scoring pace (EWMA), for Retry-After

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the collector on the running event loop."""
        if self._task is None:
            self._arrived = asyncio.Event()
            self._slots = asyncio.Semaphore(self.config.pipeline_depth)
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="din-batcher")

    async def close(self) -> None:
        """Take no new requests, finish the queued ones, stop the collector and the thread.

        The collector is woken and exits by itself once the queue is empty, after handing
        over the batch it was forming: cancelling it could catch it inside that batch's
        history fetch, with requests taken from the queue that nobody would answer.
        """
        self._closed = True
        if self._task is not None:
            self._arrived.set()
            try:
                await self._task
            except asyncio.CancelledError:  # it was cancelled by someone else: see _run_one_batch
                pass
            self._task = None
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        while self._queue:  # only if the collector died or never ran
            job = self._queue[0]
            self._unqueue(job)
            if not job.future.done():
                job.future.set_exception(BatcherClosed("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being scored)."""
        return len(self._queue)

    @property
    def queued_candidates(self) -> int:
        return self._queued_candidates

    # ------------------------------------------------------------------ requests
    async def submit(
        self, user_id: int, candidates: dict[str, np.ndarray], deadline_s: float | None = None, explain: bool = False
    ) -> Ranked:
        """Queue one request and wait for its scores (with the attention weights when `explain`).

        Raises QueueFull (at once), DeadlineExceeded (at the deadline: a timer answers it,
        and the collector drops it if it is still queued), BatcherClosed.
        """
        if self._closed or self._task is None:
            raise BatcherClosed("the ranking service is not accepting requests")
        budget = self.config.deadline_s if deadline_s is None else deadline_s
        n = int(next(iter(candidates.values())).shape[0])
        if len(self._queue) >= self.config.max_queue or (budget and self.expected_wait_s() > budget / 2):
            self.stats.rejected_queue_full += 1
            raise QueueFull(len(self._queue), self.retry_after_s())
        loop = asyncio.get_running_loop()
        now = time.monotonic()  # the event loop's clock too
        job = _Job(user_id, candidates, n, now, now + budget if budget else math.inf, budget, loop.create_future(), explain)
        self._queue.append(job)
        self._queued_candidates += n
        self._arrived.set()
        timer = loop.call_at(job.deadline, self._expire, job) if budget else None
        try:
            return await job.future
        finally:
            if timer is not None:
                timer.cancel()
            self._unqueue(job)  # the caller went away (cancelled) while it waited

    def _unqueue(self, job: _Job) -> None:
        """Drop a job from the queue now, so it stops counting against admission and the metrics.

        O(its position): one that leaves at its deadline is usually near the head.
        """
        if job.queued:
            job.queued = False
            self._queue.remove(job)  # identity (eq=False)
            self._queued_candidates -= job.n

    def _expire(self, job: _Job) -> None:
        """(its timer, or _take_batch if first) The deadline passed unscored: answer 503, drop the job."""
        self._unqueue(job)
        if not job.future.done():
            self.stats.rejected_deadline += 1
            job.future.set_exception(DeadlineExceeded(f"not scored within the {job.budget * 1000:.0f} ms request deadline"))

    def expected_wait_s(self) -> float:
        """How long a new request would wait behind the queued work at the recent pace.

        0 with an empty queue (or no pace yet): a request is always admitted when nothing is
        ahead of it, so a stale or pessimistic pace can never lock the service out.
        """
        return self._queued_candidates / self._cand_per_s if self._cand_per_s > 0 else 0.0

    def retry_after_s(self) -> int:
        """Seconds a rejected client should wait: the queue's drain time at the recent pace, at least 1."""
        if self._cand_per_s <= 0:
            return 1
        return max(1, math.ceil(self._queued_candidates / self._cand_per_s))

    # ------------------------------------------------------------------ the collector
    async def _collect(self) -> None:
        """Run batches until closed with nothing left to take (see close)."""
        while not (self._closed and not self._queue):
            try:
                await self._run_one_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch stop the service
                log.exception("a scoring batch failed")

    async def _wait_for_batch(self) -> None:
        """Return when the queue holds a full batch or its oldest request has waited max_wait,
        or at once when closing (then possibly with an empty queue).

        Requests also leave the queue while it waits (at their deadline), so it may empty.
        """
        cfg, loop = self.config, asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self._queued_candidates >= cfg.max_batch_candidates:
                return
            left = self._queue[0].arrived + cfg.max_wait_s - time.monotonic()
            if left <= 0:
                return
            if left < _TIMER_RESOLUTION_S:
                # The event loop's timers sleep in whole milliseconds (epoll), so a 0.2 ms wait
                # would take 1 ms or more: yield instead, which also polls the sockets for
                # requests that would join this batch.
                await asyncio.sleep(0)
                continue
            self._arrived.clear()
            timer = loop.call_later(left, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()

    def _take_batch(self) -> list[_Job]:
        """Live jobs from the head of the queue, up to max_batch_candidates (at least one)."""
        jobs: list[_Job] = []
        total, now = 0, time.monotonic()
        while self._queue:
            job = self._queue[0]
            if jobs and total + job.n > self.config.max_batch_candidates:
                break
            if now > job.deadline:  # due, and its timer has not run yet
                self._expire(job)
                continue
            self._unqueue(job)  # the head: O(1)
            if job.future.done():  # its caller was cancelled a moment ago (submit drops it next)
                continue
            jobs.append(job)
            total += job.n
        return jobs

    async def _run_one_batch(self) -> None:
        """Form, fetch and hand over one batch; its answers are set when the scoring thread is done."""
        await self._wait_for_batch()
        if not self._queue:  # closing, nothing left
            return
        await self._slots.acquire()  # formed only now: requests that came meanwhile ride along
        handed_over = False  # else the slot goes back below
        try:
            formed = time.monotonic()
            jobs = self._take_batch()
            if not jobs:
                return
            depth = len(self._queue)
            try:
                fetched = await self.fetch([j.user_id for j in jobs])
            except asyncio.CancelledError:  # the collector was cancelled: these jobs are nowhere else
                self._fail(jobs, BatcherClosed("the service is shutting down"))
                raise
            except Exception as e:  # the fetch function should not raise; rank degraded if it does
                log.warning("history fetch for a batch failed (%s: %s); ranking without histories", type(e).__name__, e)
                fetched = Fetched(histories=[None] * len(jobs), degraded=True)
            fetched_at = time.monotonic()
            scorer = self.get_scorer()
            if missing := missing_profiles(fetched, scorer):
                self._warn_missing_profiles(scorer, missing, fetched.profile_fields)
                fetched = replace(fetched, degraded=True)
            # Ids -> rows here, on the event loop: the scoring thread is the bottleneck under
            # load and should only run the graph (~0.1 ms of numpy per request moves over).
            try:
                inputs = [rank_input(scorer, h, fetched.profile_fields, j.candidates) for j, h in zip(jobs, fetched.histories)]
                batch = build_batch(scorer.bundle, inputs, attention=any(j.explain for j in jobs))
            except Exception as e:
                self._fail(jobs, e)
                return
            scoring = asyncio.get_running_loop().run_in_executor(self._executor, self._score, scorer, batch)
            handed_over = True
        finally:
            if not handed_over:
                self._slots.release()
        self._in_flight.add(scoring)
        scoring.add_done_callback(lambda done: self._answer(done, jobs, fetched, scorer, depth, formed, fetched_at))

    def _answer(self, done: asyncio.Future, jobs: list[_Job], fetched: Fetched, scorer: Scorer,
                depth: int, formed: float, fetched_at: float) -> None:
        """(event loop) A batch came back from the scoring thread: answer its requests."""
        self._in_flight.discard(done)
        self._slots.release()
        if done.cancelled() or done.exception() is not None:
            self._fail(jobs, done.exception() if not done.cancelled() else BatcherClosed("scoring was cancelled"))
            return
        results, score_s = done.result()
        version, has_attention, max_history = scorer.model_version, scorer.bundle.has_attention, scorer.max_history
        for job, scored, history in zip(jobs, results, fetched.histories):
            if not job.future.done():
                job.future.set_result(Ranked(scored, fetched.degraded, version, len(jobs), history, has_attention, max_history))
        self._count(jobs, depth, formed, fetched_at, score_s)

    def _warn_missing_profiles(self, scorer: Scorer, missing: tuple[str, ...], kept: Sequence[str]) -> None:
        """Once per model and field set, not per batch."""
        if (scorer.model_version, missing) not in self._warned_profiles:
            self._warned_profiles.add((scorer.model_version, missing))
            log.warning("model %s reads profile field(s) %s that the store's data does not keep (it has %s): answers "
                        "are degraded; load the profiles with `din load`", scorer.model_version, list(missing), list(kept))  # fmt: skip

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        log.error("a scoring batch failed: %s: %s", type(error).__name__, error)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    @staticmethod
    def _score(scorer: Scorer, batch: ScoringBatch) -> tuple[list[Scored], float]:
        """On the scoring thread: one graph call -> per-request slices (and its time)."""
        started = time.perf_counter()
        return scorer.score_batch(batch), time.perf_counter() - started

    def _count(self, jobs: list[_Job], depth: int, formed: float, fetched_at: float, score_s: float) -> None:
        s = self.stats
        n = sum(j.n for j in jobs)
        s.batches += 1
        s.requests += len(jobs)
        s.candidates += n
        s.max_batch_users = max(s.max_batch_users, len(jobs))
        # the scoring thread's pace (fetches overlap scoring when pipelined; without the
        # pipeline a batch also waits for its fetch)
        busy = score_s if self.config.pipeline_depth > 1 else score_s + (fetched_at - formed)
        pace = n / max(busy, 1e-6)
        self._cand_per_s = pace if self._cand_per_s <= 0 else 0.9 * self._cand_per_s + 0.1 * pace
        if self.on_batch is not None:
            try:
                self.on_batch(BatchStats(len(jobs), n, depth, formed - jobs[0].arrived, fetched_at - formed, score_s))
            except Exception:  # a metrics hook must not break ranking
                log.exception("the on_batch hook failed")
