"""Redis down, Redis slow, Redis back: /rank keeps answering (degraded), then recovers by itself.

Real parts only: the tests' own redis-server is stopped and restarted (SHUTDOWN, a new
process on the same port) or paused (CLIENT PAUSE: a Redis that accepts connections and
answers nothing), while a steady stream of /rank requests runs through the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

import anyio
import numpy as np
import pytest
import redis

from feature_store.embedded import free_port
from feature_store.redis_store import RedisHistoryStore
from service.metrics import ServiceMetrics
from service.store_guard import StoreCallFailed, StoreGuard, store_unavailable_error
from test_api import (  # noqa: F401  (fixtures)
    loaded_redis,
    rank_body,
    serving,
    settings_for,
    some_candidates,
    trained,
    users_by_history,
)
from test_observability import samples, value

pytestmark = pytest.mark.anyio


@dataclass
class Answer:
    started: float
    ended: float
    status: int
    degraded: bool | None
    history_length: int | None
    ctr: dict | None


def scores(body: dict) -> dict:
    return {(x["item_id"], x["cate_id"]): x["ctr"] for x in body["ranked"]}


async def stream(client, body: dict, answers: list[Answer], stop: anyio.Event) -> None:
    """Call /rank back to back until `stop`, recording every answer."""
    while not stop.is_set():
        t0 = time.monotonic()
        r = await client.post("/rank", json=body)
        ok = r.status_code == 200
        b = r.json() if ok else {}
        answers.append(
            Answer(t0, time.monotonic(), r.status_code, b.get("degraded"), b.get("history_length"), scores(b) if ok else None)
        )
        await anyio.sleep(0.002)  # a steady stream, not a busy loop


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)


def load(url: str, trained) -> None:
    RedisHistoryStore.from_url(url).bulk_load(trained.log, max_history=2 * trained.bundle.spec.max_history)


async def test_fault_injection_redis_stopped_and_restarted(trained, loaded_redis, redis_server, capsys):
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    body = rank_body(user, some_candidates(trained.log, 20, seed=5))
    settings = settings_for(
        trained.bundle.path, loaded_redis, store_timeout_ms=1000, store_read_timeout_ms=500,
        store_connect_timeout_ms=500, breaker_failure_threshold=3, breaker_reset_ms=200,
    )
    answers: list[Answer] = []
    stop = anyio.Event()
    try:
        async with serving(settings) as client:
            reference = (await client.post("/rank", json=body)).json()
            no_history = (await client.post("/rank", json=rank_body(10**12, some_candidates(trained.log, 20, seed=5)))).json()
            assert reference["degraded"] is False and reference["history_length"] > 0
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(stream, client, body, answers, stop)
                await wait_for(lambda: len(answers) >= 20, 30, "20 answers before the outage")
                await anyio.to_thread.run_sync(lambda: redis_server.stop(save=False))
                t_down = time.monotonic()
                n_before = len(answers)
                await wait_for(lambda: len(answers) >= n_before + 60, 30, "60 answers during the outage")
                t_restart = time.monotonic()
                # On the main thread, blocking the loop for a moment: the server dies with the
                # thread that started it (PR_SET_PDEATHSIG), and worker threads come and go.
                redis_server.start()
                await anyio.to_thread.run_sync(load, loaded_redis, trained)
                t_up = time.monotonic()
                await wait_for(
                    lambda: any(a.started > t_up and a.degraded is False and a.history_length for a in answers),
                    30, "a normal answer after the restart",
                )
                n_recovered = len(answers)
                await wait_for(lambda: len(answers) >= n_recovered + 20, 30, "20 more answers")
                stop.set()
            m = samples((await client.get("/metrics")).text)
            ready = (await client.get("/readyz")).json()
    finally:
        if not redis_server.running:
            redis_server.start()

    statuses = [a.status for a in answers]
    assert statuses.count(200) == len(answers), f"non-200 answers: {sorted(set(statuses))}"
    normal = [a for a in answers if a.degraded is False]
    degraded = [a for a in answers if a.degraded is True]
    assert len(normal) + len(degraded) == len(answers)
    # Degraded = ranked exactly as a user without history; normal with history = exactly as before.
    for a in degraded:
        assert a.history_length == 0
        assert a.ctr == pytest.approx(scores(no_history), abs=1e-6)
    with_history = [a for a in normal if a.history_length]
    for a in with_history:
        assert a.history_length == reference["history_length"]
        assert a.ctr == pytest.approx(scores(reference), abs=1e-6)
    # While Redis was down, every answer was degraded; after the restart it recovered by itself.
    during = [a for a in answers if a.started > t_down and a.ended < t_restart]
    assert len(during) >= 50 and all(a.degraded for a in during)
    first_normal = min(a.started for a in with_history if a.started > t_up)
    recovery_s = first_normal - t_up
    assert recovery_s < 10.0, f"recovered {recovery_s:.2f} s after the restart"
    assert all(a.degraded is False for a in answers[n_recovered:])
    # The breaker did its job: after 3 refused connections, Redis was not even tried.
    tried = value(m, "din_store_errors_total", op="get_histories", reason="unavailable")
    skipped = value(m, "din_store_errors_total", op="get_histories", reason="circuit_open")
    # One store call serves a micro-batch (the two streams often share one), so calls <= answers.
    assert 3 <= tried < len(degraded) and skipped > 0 and tried + skipped <= len(degraded)
    by_reason = {r: value(m, "din_degraded_responses_total", reason=r) for r in ("unavailable", "circuit_open")}
    assert by_reason["unavailable"] >= tried and by_reason["circuit_open"] >= skipped
    assert by_reason["unavailable"] + by_reason["circuit_open"] == len(degraded)  # every degraded answer counted once
    assert value(m, "din_store_circuit_state") == 0 and ready["store_circuit"] == "closed" and ready["store"] == "ok"
    with capsys.disabled():
        print(
            f"\n[fault injection] answers={len(answers)} 5xx=0 normal={len(normal)} "
            f"(with history {len(with_history)}) degraded={len(degraded)} during_outage={len(during)} "
            f"store_tried_while_down={tried:.0f} skipped_by_breaker={skipped:.0f} "
            f"recovery_after_restart={recovery_s:.3f}s max_latency_ms={max(a.ended - a.started for a in answers) * 1000:.1f}"
        )


async def test_slow_redis_is_cut_off_by_the_deadline_and_the_breaker(trained, loaded_redis, capsys):
    """CLIENT PAUSE: Redis accepts and answers nothing. /rank must not wait for it."""
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    body = rank_body(user, some_candidates(trained.log, 10, seed=6))
    threshold, reset_s, deadline_ms = 3, 0.3, 100
    settings = settings_for(
        trained.bundle.path, loaded_redis, store_timeout_ms=deadline_ms, store_read_timeout_ms=1000,
        breaker_failure_threshold=threshold, breaker_reset_ms=reset_s * 1000,
    )
    admin = redis.Redis.from_url(loaded_redis, socket_timeout=30)
    try:
        async with serving(settings) as client:
            assert (await client.post("/rank", json=body)).json()["degraded"] is False
            admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")
            t0 = time.monotonic()
            paused = []
            for _ in range(15):
                s = time.monotonic()
                r = await client.post("/rank", json=body)
                paused.append((r.status_code, r.json()["degraded"], time.monotonic() - s))
            elapsed = time.monotonic() - t0
            await anyio.to_thread.run_sync(admin.ping)  # returns when the pause is over
            recovered = None
            for i in range(200):
                if (await client.post("/rank", json=body)).json()["degraded"] is False:
                    recovered = i
                    break
                await anyio.sleep(0.02)
            m = samples((await client.get("/metrics")).text)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert [p[:2] for p in paused] == [(200, True)] * 15
    timeouts = value(m, "din_store_errors_total", op="get_histories", reason="timeout")
    skipped = value(m, "din_store_errors_total", op="get_histories", reason="circuit_open")
    trials_possible = math.floor(elapsed / reset_s) + 1
    assert threshold <= timeouts <= threshold + trials_possible  # Redis was tried only by trials once open
    assert skipped >= 15 - timeouts
    assert recovered is not None
    with capsys.disabled():
        lat = sorted(p[2] * 1000 for p in paused)
        print(
            f"\n[slow redis] 15 requests during CLIENT PAUSE: all 200 degraded; store timeouts={timeouts:.0f} "
            f"skipped={skipped:.0f}; latency ms min={lat[0]:.1f} median={lat[7]:.1f} max={lat[-1]:.1f} "
            f"(deadline {deadline_ms} ms); normal again after {recovered} retries"
        )


async def test_writes_to_a_failing_store_are_refused_with_503_and_retry_after():
    """What POST /events does with StoreGuard: every failure is refused, never acknowledged."""
    store = RedisHistoryStore.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, retries=0)
    guard = StoreGuard.build(failure_threshold=2, reset_s=30.0, timeout_s=2.0, metrics=ServiceMetrics())
    reasons = []
    try:
        for _ in range(4):
            with pytest.raises(StoreCallFailed) as e:
                await guard.call("append_events", store.ping)
            reasons.append(e.value.reason)
    finally:
        await store.close()
    assert reasons == ["unavailable", "unavailable", "circuit_open", "circuit_open"]
    http = store_unavailable_error(e.value, "the events")
    assert http.status_code == 503
    assert 28 <= int(http.headers["Retry-After"]) <= 30  # until the breaker's next trial
    assert http.detail == "the feature store is unavailable (circuit_open); the events was not stored, retry later"
    m = samples(guard.metrics.render().decode())
    assert value(m, "din_store_errors_total", op="append_events", reason="unavailable") == 2
    assert value(m, "din_store_errors_total", op="append_events", reason="circuit_open") == 2
    assert value(m, "din_store_circuit_state") == 2


async def test_an_error_reply_counts_as_a_failure_but_not_a_timeout(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    guard = StoreGuard.build(failure_threshold=5, reset_s=1.0, timeout_s=2.0, metrics=ServiceMetrics())
    try:
        with pytest.raises(StoreCallFailed) as e:
            await guard.call("read", lambda: client.execute_command("NO-SUCH-COMMAND"))
        assert await guard.call("read", client.ping) is True
    finally:
        await client.aclose()
    assert e.value.reason == "error" and guard.breaker.consecutive_failures == 0  # the success reset it
    m = samples(guard.metrics.render().decode())
    assert value(m, "din_store_request_duration_seconds_count", op="read") == 1
    assert np.isclose(value(m, "din_store_errors_total", op="read", reason="error"), 1)


async def test_one_wrong_type_user_key_does_not_open_the_breaker_for_everyone(trained, loaded_redis):
    """A user key holding a list (a stray write) is that user's bad data, not a store outage."""
    from feature_store.keys import KeySpace, current_key

    users = np.unique(trained.log.user_id)
    bad, good = int(users[0]), int(users[1])
    c = redis.Redis.from_url(loaded_redis)
    keys = KeySpace(version=c.get(current_key()).decode())
    c.delete(keys.user(bad))
    c.rpush(keys.user(bad), b"garbage")
    c.close()
    cands = some_candidates(trained.log, 8, seed=1)
    settings = settings_for(trained.bundle.path, loaded_redis, breaker_failure_threshold=2, breaker_reset_ms=60_000)
    async with serving(settings) as client:
        bads = [(await client.post("/rank", json=rank_body(bad, cands))).json() for _ in range(4)]
        after = (await client.post("/rank", json=rank_body(good, cands))).json()
        ready = (await client.get("/readyz")).json()
    assert [(b["degraded"], b["history_length"]) for b in bads] == [(False, 0)] * 4  # served as an unknown user
    assert after["degraded"] is False and after["history_length"] > 0
    assert ready["store_circuit"] == "closed"


async def test_a_refusal_of_a_store_that_answers_is_an_error_but_not_a_breaker_failure():
    from feature_store.base import StoreError

    async def refuse():
        raise StoreError("Redis at redis://x refused the append: OOM command not allowed")

    async def ok():
        return 1

    async def times_out():
        raise TimeoutError  # as a call past its deadline does inside the guard

    guard = StoreGuard.build(failure_threshold=1, reset_s=0.05, timeout_s=1.0, metrics=ServiceMetrics())
    with pytest.raises(StoreCallFailed) as e:
        await guard.call("append_events", refuse)
    assert (e.value.reason, e.value.answered, guard.state.value) == ("error", True, "closed")
    http = store_unavailable_error(e.value, "the batch")
    assert http.headers["Retry-After"] == "1" and "OOM command not allowed" in http.detail
    # a half-open trial answered by a refusal closes the circuit: Redis answers again
    with pytest.raises(StoreCallFailed):
        await guard.call("read", times_out)
    assert guard.state.value == "open"
    await anyio.sleep(0.06)
    with pytest.raises(StoreCallFailed):
        await guard.call("append_events", refuse)
    assert guard.state.value == "closed" and await guard.call("read", ok) == 1
    m = samples(guard.metrics.render().decode())
    assert value(m, "din_store_errors_total", op="append_events", reason="error") == 2



async def test_a_burst_of_ad_look_ups_past_the_pool_size_opens_no_breaker(trained, loaded_redis):
    """200 concurrent /rank with candidates sent without cate_id (one ad look-up each) on a pool of
    2 connections: redis-py's "Too many connections" used to count as a Redis outage, opening the
    breaker and taking every user's history away while Redis was healthy. Now they queue."""
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    cands = some_candidates(trained.log, 5, seed=8)
    settings = settings_for(trained.bundle.path, loaded_redis, store_max_connections=2,
                            breaker_failure_threshold=3, breaker_reset_ms=60_000)

    def look_up(k: int) -> dict:  # a fresh ad id per request: an ad-cache miss, so a Redis call
        return {"user_id": user, "candidates": [{"item_id": 10**12 + k}, {"item_id": int(cands[0, 0]), "cate_id": 1}]}

    async with serving(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/rank", json=look_up(k)) for k in range(200)),
            *(client.post("/rank", json=rank_body(user, cands)) for _ in range(20)),
        )
        m = samples((await client.get("/metrics")).text)
        ready = (await client.get("/readyz")).json()
    bodies = [r.json() for r in answers]
    assert [r.status_code for r in answers] == [200] * 220
    assert all(b["degraded"] is False and b["history_length"] > 0 for b in bodies), {
        (b["degraded"], b["history_length"]) for b in bodies}
    assert ready["store_circuit"] == "closed"
    for op in ("get_ad_features", "get_histories"):
        for reason in ("unavailable", "timeout", "circuit_open"):
            assert value(m, "din_store_errors_total", op=op, reason=reason) == 0, (op, reason)


@pytest.mark.parametrize("meta", [b"[1]", b"not json"], ids=["json-not-an-object", "not-json"])
async def test_a_meta_that_is_not_a_json_object_is_served_like_unreadable_meta(trained, loaded_redis, meta):
    """`SET din:v1:meta '[1]'` (valid JSON, not an object) used to make every /rank degraded, with no
    metric, while /readyz said ok: it is counted as corrupt and the version's fields fall back to defaults."""
    from feature_store.keys import KeySpace, current_key

    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    c = redis.Redis.from_url(loaded_redis)
    c.set(KeySpace(version=c.get(current_key()).decode()).meta, meta)
    c.close()
    item = int(trained.log.item_id[0])
    missing_cate = {"user_id": user, "candidates": [{"item_id": item}, {"item_id": 1, "cate_id": 1}]}
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        m0 = samples((await client.get("/metrics")).text)
        ranked = [(await client.post("/rank", json=b)).json() for b in
                  (rank_body(user, some_candidates(trained.log, 5)), missing_cate)]
        m = samples((await client.get("/metrics")).text)
    assert [(r["degraded"], r["history_length"] > 0) for r in ranked] == [(False, True)] * 2
    corrupt = [value(x, "din_store_corrupt_values_total", kind="meta") for x in (m0, m)]
    assert corrupt[1] - corrupt[0] == 1  # (a process-wide counter)
    assert sum(v for (name, _), v in m.items() if name == "din_store_errors_total") == 0


async def test_readyz_says_whether_the_store_holds_a_data_version(trained, loaded_redis):
    """Redis restarted empty: every user silently became new while /readyz said "ok". Readiness does
    not change (an empty store is a fresh deployment's normal state); the body says so."""
    settings = settings_for(trained.bundle.path, loaded_redis)
    c = redis.Redis.from_url(loaded_redis)
    try:
        async with serving(settings) as client:
            loaded = (await client.get("/readyz")).json()
            c.flushall()  # what a Redis restarted without its data holds
            t0 = time.monotonic()
            empty = (await client.get("/readyz")).json()
            while empty["store_data"] == "loaded" and time.monotonic() - t0 < 5:  # the pointer is re-read within 1 s
                await anyio.sleep(0.05)
                empty = (await client.get("/readyz")).json()
    finally:
        c.close()
    assert (loaded["ready"], loaded["store"], loaded["degraded"], loaded["store_data"]) == (True, "ok", False, "loaded")
    assert (empty["ready"], empty["store"], empty["degraded"], empty["store_data"]) == (True, "ok", False, "none loaded")
    async with serving(settings_for(trained.bundle.path, f"redis://127.0.0.1:{free_port()}/0")) as client:
        down = (await client.get("/readyz")).json()
    assert down["store_data"] is None and down["store"].startswith("unreachable")


async def test_readyz_behind_a_burst_of_store_calls_says_busy_not_down(trained, loaded_redis):
    """Every connection held by slow calls: /readyz's PING queues behind them and Redis is not
    asked. That is the 'busy' of the store guard (calls queue, they do not fail), not
    "no answer to PING", and the data version last read is still known."""
    import httpx

    from service.app import create_app

    app = create_app(settings_for(trained.bundle.path, loaded_redis, store_max_connections=1, store_timeout_ms=200))
    user = int(trained.log.user_id[0])
    admin = redis.Redis.from_url(loaded_redis)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://service"
        ) as client:
            assert (await client.get("/readyz")).json()["store_data"] == "loaded"
            admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            async with anyio.create_task_group() as tg:
                tg.start_soon(app.state.store.get_histories, [user])  # a slow read holds the only connection
                await anyio.sleep(0.2)
                busy = (await client.get("/readyz")).json()
                admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert busy["store"].startswith("busy") and busy["store_data"] == "loaded" and busy["ready"] is True, busy
    assert busy["degraded"] is False, busy


def copy_version(c: redis.Redis, to: str = "77", **meta_changes) -> str:
    """Copy the live data version's keys to `din:v{to}:*`, change fields of its meta and point
    `din:current` at it (a version written by a buggy or foreign loader); returns its meta key."""
    import json

    from feature_store.keys import KeySpace, current_key

    live = KeySpace(version=c.get(current_key()).decode())
    copy = KeySpace(version=to)
    pipe = c.pipeline(transaction=False)
    for key in c.scan_iter(match=live.match_all, count=5000):
        pipe.restore(copy.prefix.encode() + key[len(live.prefix):], 0, c.dump(key), replace=True)
    pipe.execute()
    meta = json.loads(c.get(live.meta)) | meta_changes
    c.set(copy.meta, json.dumps(meta))
    c.set(current_key(), to)
    return copy.meta


@pytest.mark.parametrize("ad_fields", [[], "cate_id"], ids=["empty-list", "not-a-list"])
async def test_a_meta_with_unusable_ad_fields_fails_the_ad_look_up_only_not_the_breaker(trained, loaded_redis, ad_fields):
    """A version whose meta says `"ad_fields": []` (Redis healthy): every ad look-up used to raise a bare
    ValueError ("n_fields must be in 1..255, got 0") that the guard counted as a Redis failure, so the
    circuit opened and every /rank, even one that needs no ad look-up, lost its history. Now the ad
    look-up of that call fails with the meta key and field named, and the breaker stays closed."""
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    c = redis.Redis.from_url(loaded_redis)
    try:
        meta_key = copy_version(c, ad_fields=ad_fields)
    finally:
        c.close()
    item = int(trained.log.item_id[0])
    missing_cate = {"user_id": user, "candidates": [{"item_id": item}, {"item_id": 1, "cate_id": 1}]}
    settings = settings_for(trained.bundle.path, loaded_redis, breaker_failure_threshold=2, breaker_reset_ms=60_000)
    async with serving(settings) as client:
        m0 = samples((await client.get("/metrics")).text)
        looked_up = [(await client.post("/rank", json=missing_cate)) for _ in range(8)]
        plain = (await client.post("/rank", json=rank_body(user, some_candidates(trained.log, 5)))).json()
        ready = (await client.get("/readyz")).json()
        m = samples((await client.get("/metrics")).text)
    assert [r.status_code for r in looked_up] == [200] * 8
    # the category stays unknown (degraded), the user's history is still there
    assert [(b["degraded"], b["history_length"] > 0) for b in (r.json() for r in looked_up)] == [(True, True)] * 8
    assert plain["degraded"] is False and plain["history_length"] > 0
    assert ready["store_circuit"] == "closed" and ready["store"] == "ok"
    assert value(m, "din_store_errors_total", op="get_ad_features", reason="error") == 8
    for op in ("get_ad_features", "get_histories"):
        for reason in ("unavailable", "timeout", "circuit_open"):
            assert value(m, "din_store_errors_total", op=op, reason=reason) == 0, (op, reason)
    assert value(m, "din_store_errors_total", op="get_histories", reason="error") == 0
    corrupt = [value(x, "din_store_corrupt_values_total", kind="meta") for x in (m0, m)]
    assert corrupt[1] - corrupt[0] == 1  # once, when the version was read (a process-wide counter)

    # the guard's error names the key and the field, and says what to do
    store = RedisHistoryStore.from_url(loaded_redis)
    guard = StoreGuard.build(failure_threshold=1, reset_s=60.0, timeout_s=5.0, metrics=ServiceMetrics())
    try:
        for _ in range(5):
            with pytest.raises(StoreCallFailed) as e:
                await guard.call("get_ad_features", lambda: store.get_ad_features(np.array([item])))
            assert (e.value.reason, e.value.answered, guard.state.value) == ("error", True, "closed")
        histories = await guard.call("get_histories", lambda: store.get_histories([user]))
    finally:
        await store.close()
    assert meta_key in str(e.value) and "'ad_fields'" in str(e.value) and "din load" in str(e.value), str(e.value)
    assert "n_fields" not in str(e.value)
    assert histories[0] is not None and len(histories[0]) > 0


@pytest.mark.parametrize(
    ("field", "bad", "ad_read_fails"),
    [
        ("ad_fields", [], True),
        ("ad_fields", "cate_id", True),
        ("ad_fields", None, True),
        ("ad_fields", ["cate_id", 7], True),
        ("ad_fields", [""], True),
        ("ad_fields", ["f"] * 256, True),
        ("profile_fields", "gender", False),
        ("profile_fields", [1, 2], False),
        ("profile_fields", {"gender": 0}, False),
        ("max_history", "50", False),
        ("max_history", True, False),
        ("max_history", 0, False),
    ],
)
async def test_meta_fields_of_the_wrong_shape_are_corrupt_data_named_by_key_and_field(
    trained, loaded_redis, field, bad, ad_read_fails
):
    """Each field the reads rely on is checked when the version is read: bad ad_fields refuse the
    ad reads (a StoreError naming the key and the field, never a bare ValueError); bad profile_fields
    or max_history are unknown (as with an unreadable meta), counted as corrupt, and logged once."""
    from feature_store import metrics as store_metrics
    from feature_store.base import StoreError

    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    item = int(trained.log.item_id[0])
    c = redis.Redis.from_url(loaded_redis)
    try:
        meta_key = copy_version(c, **{field: bad})
    finally:
        c.close()
    corrupt0 = store_metrics.CORRUPT_VALUES.labels("meta")._value.get()
    store = RedisHistoryStore.from_url(loaded_redis)
    try:
        (history,) = await store.get_histories([user])
        if ad_read_fails:
            for _ in range(2):
                with pytest.raises(StoreError, match=rf"{meta_key}.*'{field}'.*din load") as e:
                    await store.get_ad_features(np.array([item]))
            assert not isinstance(e.value, ValueError)
        else:
            ads = await store.get_ad_features(np.array([item]))
            assert ads.fields == ("cate_id",) and ads.found.tolist() == [True]
        profile_fields, max_history = store.profile_fields, store.max_history
    finally:
        await store.close()
    assert store.version == "77" and history is not None and len(history) > 0
    assert store_metrics.CORRUPT_VALUES.labels("meta")._value.get() - corrupt0 == 1  # once per version read
    assert all(isinstance(f, str) for f in profile_fields)
    if field == "profile_fields":
        assert profile_fields == ()
    if field == "max_history":
        assert max_history is None
    else:
        assert max_history == 2 * trained.bundle.spec.max_history


async def test_a_bug_in_a_store_call_is_logged_and_counted_but_opens_no_breaker(caplog):
    """An exception that is neither the store's nor Redis's (a TypeError in our own code, a ValueError
    from decoding) says nothing about Redis: it fails that call, is logged with its traceback and
    counted as an `error`, but does not open the circuit. Redis's own errors still count."""
    from feature_store.records import CorruptValueError

    async def bug():
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    async def garbage():
        raise CorruptValueError("user value starts with b'xxxx', expected magic b'DINU'")

    async def connection_lost():
        raise redis.ConnectionError("Connection closed by server.")

    guard = StoreGuard.build(failure_threshold=1, reset_s=0.05, timeout_s=1.0, metrics=ServiceMetrics())
    with caplog.at_level("WARNING", logger="service.store_guard"):
        for _ in range(5):
            with pytest.raises(StoreCallFailed) as e:
                await guard.call("get_ad_features", bug)
            assert (e.value.reason, guard.state.value) == ("error", "closed")
    assert "TypeError" in str(e.value)
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is TypeError]
    assert logged and "get_ad_features" in logged[0].getMessage()
    with pytest.raises(StoreCallFailed) as e:
        await guard.call("get_histories", garbage)
    assert (e.value.reason, e.value.answered, guard.state.value) == ("error", True, "closed")
    with pytest.raises(StoreCallFailed) as e:  # a Redis error the store did not map still counts
        await guard.call("ping", connection_lost)
    assert (e.value.reason, guard.state.value) == ("error", "open")
    await anyio.sleep(0.06)
    with pytest.raises(StoreCallFailed):  # a half-open trial that hit a bug learnt nothing about Redis:
        await guard.call("get_ad_features", bug)
    assert guard.state.value == "half_open"  # not re-opened for another reset period

    async def answered():
        return []

    assert await guard.call("get_histories", answered) == []  # the next call is the trial, and closes it
    assert guard.state.value == "closed"
    m = samples(guard.metrics.render().decode())
    assert value(m, "din_store_errors_total", op="get_ad_features", reason="error") == 6
    assert value(m, "din_store_errors_total", op="get_histories", reason="error") == 1



@contextlib.contextmanager
def _cluster_mode_node(tmp_path, *extra_args: str):
    """A real redis-server in cluster mode that serves no slot until one is added: every key
    command answers CLUSTERDOWN (with --cluster-require-full-coverage no, only unserved slots do)."""
    from feature_store.embedded import EmbeddedRedis, find_redis_server

    node = EmbeddedRedis(tmp_path / "node", free_port(), binary=find_redis_server(), persist=False,
                         extra_args=("--cluster-enabled", "yes", "--cluster-config-file", str((tmp_path / "nodes.conf").resolve()), *extra_args))  # fmt: skip
    node.start()
    try:
        yield node
    finally:
        node.stop(save=False)

async def test_a_cluster_that_serves_no_slot_is_an_outage_that_opens_the_breaker(tmp_path):
    """CLUSTERDOWN / TRYAGAIN are error replies that mean "not serving now": an outage the
    breaker counts, not a refusal of one call (which would keep it closed for ever). A real
    redis-server in cluster mode with no slot assigned answers every key command CLUSTERDOWN."""
    with _cluster_mode_node(tmp_path) as node:
        store = RedisHistoryStore.from_url(node.url)
        guard = StoreGuard.build(failure_threshold=3, reset_s=60.0, timeout_s=5.0, metrics=ServiceMetrics())
        reasons = []
        for _ in range(3):
            with pytest.raises(StoreCallFailed) as e:
                await guard.call("get_histories", lambda: store.get_histories([1, 2]))
            reasons.append(e.value.reason)
            assert "CLUSTERDOWN" in str(e.value) or "unavailable" in str(e.value)
        assert reasons == ["unavailable"] * 3 and guard.state.value == "open"
        await store.close()


async def test_a_meta_read_that_fails_for_now_is_read_again_not_cached_as_garbage(tmp_path):
    """A version's meta is read once per version. When that read gets "retry later" (here a
    cluster node that does not serve the meta's slot yet: CLUSTERDOWN), the version must stay
    unread, so the next reader reads the meta, rather than run with no profile fields until
    the next `din load`."""
    import json

    from feature_store.base import StoreUnavailableError
    from feature_store.keys import KeySpace, current_key

    with _cluster_mode_node(tmp_path, "--cluster-require-full-coverage", "no") as node, redis.Redis.from_url(node.url) as admin:
        meta_key = KeySpace(namespace="din", version="1").meta
        meta_slot = admin.execute_command("CLUSTER", "KEYSLOT", meta_key)
        admin.execute_command("CLUSTER", "ADDSLOTS", *(s for s in range(16384) if s != meta_slot))
        deadline = time.monotonic() + 10
        while admin.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            await anyio.sleep(0.05)
        admin.set(current_key("din"), "1")  # the pointer's slot is served, the meta's is not
        store = RedisHistoryStore.from_url(node.url)
        with pytest.raises(StoreUnavailableError, match="ClusterDownError: Hash slot not served"):
            await store.refresh_version()
        admin.execute_command("CLUSTER", "ADDSLOTS", meta_slot)  # the slot comes back, with the meta
        admin.set(meta_key, json.dumps({"profile_fields": ["gender"], "ad_fields": ["cate_id"], "max_history": 7}))
        assert await store.refresh_version() == "1"
        assert (store.profile_fields, store.max_history) == (("gender",), 7)
        await store.close()
