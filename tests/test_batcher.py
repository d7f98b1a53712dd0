"""The micro-batcher: one graph call and one store round trip per batch, results equal to
scoring alone, max wait and full batches, the bounded queue and the deadline.

Real parts: a bundle exported by the real exporter (random weights, no training: fast),
a real ONNX Runtime session, the tests' real redis-server through the real store. Graph
calls are counted by the scorer, store round trips by Redis' own command statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import redis

from feature_store.redis_store import RedisHistoryStore
from model.bundle import Bundle
from service.app import create_app
from service.batcher import Batcher, BatcherClosed, BatcherConfig, BatchStats, DeadlineExceeded, QueueFull
from service.metrics import ServiceMetrics
from service.routes.rank import fetch_histories
from service.scorer import RankInput, RuntimeOptions, Scorer
from service.settings import Settings
from service.store_guard import StoreGuard

from tests.tiny_bundle import USERS, behaviour_log, bundle, candidates, store_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio

def mget_calls(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))
    finally:
        client.close()


@contextlib.asynccontextmanager
async def running(bundle: Bundle, url: str | None, config: BatcherConfig) -> AsyncIterator[tuple[Batcher, Scorer, list]]:
    scorer = Scorer.load(bundle, options=RuntimeOptions(device="cpu", intra_op_threads=1))
    store = RedisHistoryStore.from_url(url) if url else None
    metrics = ServiceMetrics()
    guard = StoreGuard.build(failure_threshold=5, reset_s=1.0, timeout_s=5.0, metrics=metrics)
    state = SimpleNamespace(store=store, store_guard=guard, metrics=metrics)
    batcher = Batcher(lambda: scorer, lambda users: fetch_histories(state, 5.0, users), config)
    batches: list[BatchStats] = []
    batcher.on_batch = batches.append
    batcher.start()
    try:
        yield batcher, scorer, batches
    finally:
        await batcher.close()
        if store is not None:
            await store.close()


async def test_concurrent_requests_share_one_graph_call_and_one_mget(bundle, store_url):
    requests = [(u, candidates(u, 3 + u)) for u in USERS]
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.05, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        before = mget_calls(store_url)
        # one request explains: the batch then carries the attention weights for all
        results = await asyncio.gather(*(batcher.submit(u, c, explain=u == USERS[-1]) for u, c in requests))
        assert scorer.calls == 1  # one ONNX Runtime call for all eight requests
        assert mget_calls(store_url) - before == 1  # one store round trip for all eight users
        assert [b.users for b in batches] == [8] and batches[0].candidates == sum(3 + u for u in USERS)
        assert all(r.batch_users == 8 and not r.degraded and len(r.history) == u for r, u in zip(results, USERS))
        assert batcher.stats.batches == 1 and batcher.stats.mean_batch_users == 8

        # each result equals scoring that request alone, with the same history
        store = RedisHistoryStore.from_url(store_url)
        histories = await store.get_histories([u for u, _ in requests])
        await store.close()
    for (u, cands), got, history in zip(requests, results, histories):
        recs = history.records[: bundle.spec.max_history]
        alone = RankInput(history={f: recs[f] for f in bundle.spec.sequence_fields}, profile={}, candidates=cands)
        (want,) = scorer.score_requests([alone])
        assert got.scored.history_length == want.history_length == min(u, bundle.spec.max_history)
        np.testing.assert_allclose(got.scored.ctr, want.ctr, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.scored.attention, want.attention, rtol=0, atol=1e-6)
    assert np.ptp(np.concatenate([r.scored.ctr for r in results])) > 1e-3


async def test_a_batch_without_explain_leaves_the_attention_out(bundle, store_url):
    requests = [(u, candidates(u, 4)) for u in USERS[:4]]
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.05, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        plain = await asyncio.gather(*(batcher.submit(u, c) for u, c in requests))
        explained = await asyncio.gather(*(batcher.submit(u, c, explain=u == USERS[0]) for u, c in requests))
    assert [b.users for b in batches] == [4, 4]
    assert all(r.scored.attention is None for r in plain)  # (a GPU would not copy them back)
    for p, e in zip(plain, explained):
        assert e.scored.attention.shape == (4, e.scored.history_length)
        np.testing.assert_array_equal(p.scored.ctr, e.scored.ctr)


async def test_a_lone_request_goes_after_max_wait(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.3, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        result = await asyncio.wait_for(batcher.submit(1, candidates(0, 4)), timeout=30)
    assert result.batch_users == 1 and scorer.calls == 1
    assert batches[0].wait_s >= 0.3  # it waited for company, as long as max_wait and no longer than needed to go


async def test_a_full_batch_goes_at_once_and_a_big_queue_splits(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=10, max_wait_s=60.0, deadline_s=None)  # waiting for max_wait would time the test out
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(u, candidates(u, 5)) for u in (1, 2, 3, 4))), timeout=30)
    assert [b.users for b in batches] == [2, 2]  # 10 candidates each: full, so neither waited 60 s
    assert scorer.calls == 2 and [r.batch_users for r in results] == [2, 2, 2, 2]


async def test_past_the_queue_bound_submit_fails_at_once(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.5, max_queue=3, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        queued = [asyncio.create_task(batcher.submit(u, candidates(u, 2))) for u in (1, 2, 3)]
        await asyncio.sleep(0)  # they are queued; the collector waits for company
        assert batcher.queue_depth == 3
        with pytest.raises(QueueFull) as e:
            await batcher.submit(4, candidates(4, 2))
        assert e.value.retry_after_s >= 1 and batcher.stats.rejected_queue_full == 1
        results = await asyncio.gather(*queued)  # the queued ones are still served
    assert [r.batch_users for r in results] == [3, 3, 3] and scorer.calls == 1


async def test_a_request_not_scored_by_its_deadline_is_refused_and_dropped(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.5, deadline_s=0.05)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        with pytest.raises(DeadlineExceeded, match="50 ms"):
            await batcher.submit(1, candidates(0, 3))
        assert batcher.stats.rejected_deadline == 1
        await asyncio.sleep(0.6)  # past max_wait: the collector has looked at the queue
        assert scorer.calls == 0 and batches == []  # dropped unscored
        ok = await batcher.submit(2, candidates(1, 3), deadline_s=30)  # a per-request deadline
    assert ok.scored.ctr.shape == (3,) and scorer.calls == 1


@contextlib.contextmanager
def scoring_held(scorer: Scorer):
    """Hold the scoring thread inside its next graph call (a GC pause, a cold GPU kernel, a
    huge batch) until the block ends. Yields an event set once it is held."""
    started, release = threading.Event(), threading.Event()
    real = scorer.score_batch

    def held(batch):
        started.set()
        release.wait(60)
        return real(batch)

    scorer.score_batch = held
    try:
        yield started
    finally:
        release.set()


async def test_expired_and_cancelled_requests_leave_the_queue_at_once(bundle, store_url):
    """Review item 9: a request answered at its deadline (or whose caller went away) no longer
    counts against the queue bound, the expected wait or the queue-depth metric, even while
    the collector cannot reach the queue because the scorer is busy."""
    config = BatcherConfig(max_batch_candidates=1, max_wait_s=0.0, max_queue=3, deadline_s=0.1, pipeline_depth=1)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        with scoring_held(scorer) as started:
            first = asyncio.create_task(batcher.submit(1, candidates(1, 3), deadline_s=60))
            assert await asyncio.to_thread(started.wait, 30)  # on the scoring thread: the collector waits for its slot
            expired = await asyncio.gather(*(batcher.submit(u, candidates(u, 3)) for u in (2, 3, 4)), return_exceptions=True)
            assert [type(e) for e in expired] == [DeadlineExceeded] * 3 and batcher.stats.rejected_deadline == 3
            assert batcher.queue_depth == 0 and batcher.queued_candidates == 0 and batcher.expected_wait_s() == 0

            gone = asyncio.create_task(batcher.submit(5, candidates(5, 3), deadline_s=60))
            await asyncio.sleep(0)
            assert batcher.queue_depth == 1
            gone.cancel()  # the client hung up
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert batcher.queue_depth == 0 and batcher.queued_candidates == 0

            late = asyncio.create_task(batcher.submit(6, candidates(6, 3), deadline_s=60))  # not a QueueFull
            await asyncio.sleep(0)
            assert batcher.queue_depth == 1 and batcher.stats.rejected_queue_full == 0
        results = await asyncio.wait_for(asyncio.gather(first, late), 30)
    assert [r.scored.ctr.shape for r in results] == [(3,), (3,)] and scorer.calls == 2  # the dropped ones unscored


async def test_a_request_found_overdue_when_taken_gets_the_deadline_answer(bundle, store_url):
    """The collector can take a request whose deadline has passed before its timer ran: it is
    answered DeadlineExceeded like the timer would, not a CancelledError leaking into the route."""
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.3, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        req = asyncio.create_task(batcher.submit(1, candidates(1, 3)))
        await asyncio.sleep(0)
        batcher._queue[0].deadline = 0.0  # overdue, its timer (at 30 s) not yet run
        with pytest.raises(DeadlineExceeded, match="30000 ms"):
            await asyncio.wait_for(req, 30)
    assert batcher.queue_depth == 0 and scorer.calls == 0 and batcher.stats.rejected_deadline == 1


@pytest.mark.parametrize("deadline_s", [None, 30.0])
async def test_close_finishes_the_batch_being_fetched(bundle, store_url, deadline_s):
    """Review item 10: close() while the collector awaits a batch's histories scores that batch:
    its requests are in neither the queue nor the scoring thread (they used to hang, or get a
    deadline 503)."""
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.0, deadline_s=deadline_s)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        fetching, release = asyncio.Event(), asyncio.Event()
        fetch = batcher.fetch

        async def held_fetch(users):
            fetching.set()
            await release.wait()  # a store read in progress
            return await fetch(users)

        batcher.fetch = held_fetch
        taken = asyncio.create_task(batcher.submit(1, candidates(1, 3)))
        await asyncio.wait_for(fetching.wait(), 30)
        assert batcher.queue_depth == 0  # taken from the queue, being fetched
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)  # close() is under way (the old one cancelled the collector here)
        release.set()
        result = await asyncio.wait_for(taken, 10)
        await asyncio.wait_for(closing, 30)
        with pytest.raises(BatcherClosed):
            await batcher.submit(2, candidates(2, 3))
    assert result.scored.ctr.shape == (3,) and scorer.calls == 1


async def test_close_scores_the_queued_requests_at_once(bundle, store_url):
    """close() sends what is queued without waiting for company (max_wait)."""
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=60.0, deadline_s=None)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        queued = [asyncio.create_task(batcher.submit(u, candidates(u, 3))) for u in (1, 2, 3)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 3  # the collector waits up to 60 s for more
        await asyncio.wait_for(batcher.close(), 20)
        results = await asyncio.wait_for(asyncio.gather(*queued), 10)
    assert [r.batch_users for r in results] == [3, 3, 3] and [b.users for b in batches] == [3]


async def test_a_cancelled_collector_fails_the_batch_it_was_fetching(bundle, store_url):
    """If the collector is cancelled anyway (its loop shuts down), the requests it took are
    answered BatcherClosed instead of waiting forever (no deadline here)."""
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.0, deadline_s=None)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        fetching = asyncio.Event()

        async def stuck_fetch(users):
            fetching.set()
            await asyncio.Event().wait()

        batcher.fetch = stuck_fetch
        req = asyncio.create_task(batcher.submit(1, candidates(1, 3)))
        await asyncio.wait_for(fetching.wait(), 30)
        batcher._task.cancel()
        with pytest.raises(BatcherClosed):
            await asyncio.wait_for(req, 10)
    assert scorer.calls == 0


async def test_without_a_store_the_batch_is_degraded(bundle):
    async with running(bundle, None, BatcherConfig(max_wait_s=0.0)) as (batcher, _, _):
        r = await batcher.submit(1, candidates(0, 3))
    assert r.degraded and r.scored.history_length == 0


# ---------------------------------------------------------------------------------------
# Through HTTP: overload answers 503 with Retry-After, at once.
@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            yield client, app


def body(user: int, n: int) -> dict:
    c = candidates(user, n)
    return {"user_id": user, "candidates": [{"item_id": i, "cate_id": k} for i, k in zip(c["item_id"].tolist(), c["cate_id"].tolist())]}


async def test_http_overload_and_deadline_are_503_with_retry_after(bundle, store_url):
    settings = Settings(
        bundle=bundle.path, redis_url=store_url, intra_op_threads=1, max_queue=2, batch_max_wait_ms=1000,
        request_deadline_ms=60_000,
    )  # fmt: skip
    async with serving(settings) as (client, app):
        batcher = app.state.batcher
        queued = [asyncio.create_task(batcher.submit(u, candidates(u, 2))) for u in (1, 2)]
        await asyncio.sleep(0)
        r = await client.post("/rank", json=body(3, 4))
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
        await asyncio.gather(*queued)
        ok = await client.post("/rank", json=body(3, 4))
        assert ok.status_code == 200 and ok.headers["x-batch-users"] == "1"
    settings = Settings(bundle=bundle.path, redis_url=store_url, intra_op_threads=1, batch_max_wait_ms=1000, request_deadline_ms=20, store_timeout_ms=10)
    async with serving(settings) as (client, _):
        r = await client.post("/rank", json=body(3, 4))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "deadline" in r.json()["detail"]


async def test_a_request_the_queue_cannot_serve_in_time_is_refused_at_once(bundle, store_url):
    """Once the scoring pace is known, a request behind more work than its deadline is a 503 now."""
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.5, max_queue=100, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, _):
        await batcher.submit(1, candidates(1, 4))  # sets the pace
        queued = [asyncio.create_task(batcher.submit(u, candidates(u, 4))) for u in (2, 3)]
        await asyncio.sleep(0)
        assert batcher.expected_wait_s() > 0
        with pytest.raises(QueueFull):
            await batcher.submit(4, candidates(4, 4), deadline_s=batcher.expected_wait_s())  # needs 2x the wait
        late = await batcher.submit(5, candidates(5, 4), deadline_s=30)  # enough time: accepted
        await asyncio.gather(*queued)
    assert late.batch_users == 3 and batcher.stats.rejected_queue_full == 1


async def test_an_empty_queue_always_admits_whatever_the_pace(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=10_000, max_wait_s=0.0, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, _, _):
        await batcher.submit(1, candidates(1, 4))
        batcher._cand_per_s = 1e-3  # a pace so pessimistic that any queued work would exceed any deadline
        r = await batcher.submit(2, candidates(2, 4), deadline_s=0.5)
    assert r.scored.ctr.shape == (4,)


async def test_batched_requests_keep_category_lookup_explain_and_metrics(bundle, store_url):
    """Issues 5, 6 and 8 through the batcher: concurrent requests with missing categories and
    `explain` share one graph call, and each answer equals the same request sent alone with
    the store's categories written in: its own history, attention, nulls for unknown ads."""
    from test_observability import samples, value

    store = RedisHistoryStore.from_url(store_url)
    users = [1, 3, 5, 8]
    logged = np.unique(behaviour_log().item_id)  # ads the store knows (loaded with the histories)
    bodies = []
    for u in users:
        b = body(u, 5)
        b["candidates"][0] = {"item_id": int(logged[u])}  # no category: looked up in the store
        b["candidates"][1] = {"item_id": int(logged[u + 1]), "cate_id": None}  # the same, sent as null
        b["candidates"].append({"item_id": 7})  # an ad nobody knows: cate_id null, scored as unknown
        b["explain"] = u % 2 == 1
        bodies.append(b)
    ads = [await store.get_ad_features(np.array([c["item_id"] for c in b["candidates"]], dtype=np.int64)) for b in bodies]
    histories = await store.get_histories(users)
    await store.close()
    assert all(a.found[:2].all() and not a.found[-1] for a in ads)
    # what each answer must say: the sent category, else the store's, else null
    want = [[c["cate_id"] if c.get("cate_id") is not None else (int(k) if f else None)
             for c, k, f in zip(b["candidates"], a.column("cate_id"), a.found)] for b, a in zip(bodies, ads)]

    settings = Settings(
        bundle=bundle.path, redis_url=store_url, intra_op_threads=1, batch_max_wait_ms=300, request_deadline_ms=30_000,
        store_timeout_ms=5000, store_read_timeout_ms=5000, store_connect_timeout_ms=5000,  # a loaded CI box: never degraded
    )  # fmt: skip
    async with serving(settings) as (client, app):
        answers = await asyncio.gather(*(client.post("/rank", json=b) for b in bodies))
        alone = []
        for b, cates in zip(bodies, want):  # the same requests, one at a time, categories written in (-1: unknown)
            explicit = dict(b, candidates=[{"item_id": c["item_id"], "cate_id": -1 if k is None else k} for c, k in zip(b["candidates"], cates)])
            alone.append(await client.post("/rank", json=explicit))
        m = samples((await client.get("/metrics")).text)
    assert [r.status_code for r in answers + alone] == [200] * 8, [r.text for r in answers + alone]
    assert [r.headers["x-batch-users"] for r in answers] == ["4"] * 4 and [r.headers["x-batch-users"] for r in alone] == ["1"] * 4
    for b, cates, got, ref, history in zip(bodies, want, answers, alone, histories):
        got, ref = got.json(), ref.json()
        pairs = sorted((c["item_id"], -2 if k is None else k) for c, k in zip(b["candidates"], cates))
        assert sorted((x["item_id"], -2 if x["cate_id"] is None else x["cate_id"]) for x in got["ranked"]) == pairs, (b, cates, got["ranked"])
        assert [x["ctr"] for x in got["ranked"]] == pytest.approx([x["ctr"] for x in ref["ranked"]], abs=1e-6)
        assert [x["item_id"] for x in got["ranked"]] == [x["item_id"] for x in ref["ranked"]]
        assert got["history_length"] == min(len(history.records), bundle.spec.max_history) > 0 and not got["degraded"]
        if b["explain"]:
            assert got["attention_available"] is True
            assert [h["item_id"] for h in got["history"]] == history.records["item_id"][: got["history_length"]].tolist()
            for x, y in zip(got["ranked"], ref["ranked"]):
                assert len(x["attention"]) == got["history_length"]
                assert x["attention"] == pytest.approx(y["attention"], abs=1e-5)
        else:
            assert "history" not in got and all("attention" not in x for x in got["ranked"])
    # one ONNX call for the four, then four alone; every request counted once
    assert value(m, "din_scoring_batch_requests_count") == 5 and value(m, "din_scoring_batch_requests_sum") == 8
    assert value(m, "din_scoring_batch_candidates_sum") == sum(len(b["candidates"]) for b in bodies) * 2
    assert value(m, "din_store_request_duration_seconds_count", op="get_histories") == 5  # one store call per batch
    assert value(m, "din_scoring_queue_depth") == 0


@pytest.mark.parametrize("depth", [1, 2])
async def test_the_next_batch_is_fetched_while_one_is_scored(bundle, store_url, depth):
    """Pipelining: with depth 2 a batch's store read happens while the previous batch is on
    the scoring thread (the thread never waits for a fetch); depth 1 keeps them in turn.
    Every request is still answered with its own scores."""
    overlapped = []
    config = BatcherConfig(max_batch_candidates=1, max_wait_s=0.0, deadline_s=30, pipeline_depth=depth)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        fetch = batcher.fetch

        async def observed_fetch(users):
            overlapped.append(len(batcher._in_flight))  # batches handed to the scoring thread, not yet answered
            return await fetch(users)

        batcher.fetch = observed_fetch
        requests = [(u, candidates(u, 400)) for u in list(USERS) * 4]  # one request per batch (max 1 candidate)
        results = await asyncio.gather(*(batcher.submit(u, c) for u, c in requests))
        alone = [await batcher.submit(u, c) for u, c in requests[:3]]
    assert len(batches) == len(requests) + 3 and all(b.users == 1 for b in batches)
    assert max(overlapped) == depth - 1  # never more batches ahead of the scorer than the depth
    for got, ref in zip(results[:3], alone):
        np.testing.assert_allclose(got.scored.ctr, ref.scored.ctr, rtol=1e-6)
    assert all(r.scored.ctr.shape == (400,) for r in results)


async def test_a_batch_that_cannot_be_built_fails_its_requests_not_the_batcher(bundle, store_url):
    config = BatcherConfig(max_batch_candidates=1, max_wait_s=0.0, deadline_s=30)
    async with running(bundle, store_url, config) as (batcher, scorer, batches):
        broken = {"item_id": candidates(1, 5)["item_id"]}  # no cate_id column: the rows cannot be built
        with pytest.raises(KeyError, match="cate_id"):
            await asyncio.wait_for(batcher.submit(1, broken), 5)
        good = await asyncio.wait_for(batcher.submit(2, candidates(2, 5)), 5)  # the collector still runs
    assert good.scored.ctr.shape == (5,) and scorer.calls == 1


def _reads_gender(tmp_path) -> Bundle:
    """A DIN over the tiny bundle's ids that also reads a `gender` profile field."""
    import torch

    from model.bundle import load_bundle
    from model.config import ModelConfig
    from model.contract import FeatureSpec, Vocabulary
    from model.export import export_bundle
    from model.registry import build_model
    from tests.tiny_bundle import CATES, ITEMS

    vocabs = {"item_id": Vocabulary(ITEMS), "cate_id": Vocabulary(CATES), "gender": Vocabulary(np.array([1, 2], dtype=np.int64))}
    spec = FeatureSpec(profile_fields=("gender",), vocab_sizes={k: v.num_rows for k, v in vocabs.items()}, max_history=6)
    torch.manual_seed(0)
    model = build_model("din", spec, ModelConfig(embedding_dim=4))
    return load_bundle(export_bundle(model, model_type="din", spec=spec, vocabularies=vocabs, out_dir=tmp_path,
                                     data_fingerprint="profile", extra={}).bundle)  # fmt: skip


async def test_a_model_reading_a_profile_field_the_store_lacks_answers_degraded(store_url, tmp_path):
    """The tiny store keeps no profiles; a model that reads `gender` would score every user with
    the unknown-profile row while saying nothing: the answers are marked degraded instead."""
    with_profile = _reads_gender(tmp_path)
    settings = Settings(
        bundle=with_profile.path, redis_url=store_url, intra_op_threads=1,
        store_timeout_ms=5000, store_read_timeout_ms=5000, store_connect_timeout_ms=5000,  # a loaded CI box: never degraded
    )  # fmt: skip
    known, unknown = int(USERS[0]), 10**9
    async with serving(settings) as (client, _):
        answers = [await client.post("/rank", json=body(u, 3)) for u in (known, unknown)]
    assert [r.status_code for r in answers] == [200, 200]
    assert answers[0].json()["degraded"] is True and answers[0].json()["history_length"] > 0
    assert answers[1].json()["degraded"] is False  # an unknown user has no profile anyway


async def test_a_reload_to_a_model_reading_a_profile_field_the_store_lacks_is_refused(bundle, store_url, tmp_path):
    """At start-up such a model serves degraded answers (above); a reload refuses it instead,
    so the model that the store's data can feed keeps serving."""
    token = "reload-token-123456"
    settings = Settings(
        bundle=bundle.path, redis_url=store_url, intra_op_threads=1, admin_token=token,
        store_timeout_ms=5000, store_read_timeout_ms=5000, store_connect_timeout_ms=5000,
    )  # fmt: skip
    async with serving(settings) as (client, _):
        r = await client.post("/admin/reload", json={"bundle": str(_reads_gender(tmp_path).path)},
                              headers={"Authorization": f"Bearer {token}"})
        after = await client.post("/rank", json=body(int(USERS[0]), 3))
    assert r.status_code == 422, r.text
    assert "reads profile field(s) ['gender'] that the store's loaded data does not keep" in r.json()["detail"]
    assert after.json()["model_version"] == bundle.model_version and after.json()["degraded"] is False
