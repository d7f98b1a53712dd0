"""POST /events and category look-ups in POST /rank, through the real app and a real redis-server."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import redis

from feature_store.keys import KeySpace, current_key
from feature_store.records import encode_user, make_records
from model.data.log import BehaviourLog
from test_api import (  # noqa: F401  (fixtures)
    Trained,
    loaded_redis,
    rank_body,
    serving,
    settings_for,
    some_candidates,
    torch_ctr,
    trained,
    users_by_history,
)

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def with_events(log: BehaviourLog, rows: list[tuple[int, int, int, int]]) -> BehaviourLog:
    """The log plus behaviours (user, item, cate, ts), as the torch reference sees them."""
    extra = np.array(rows, dtype=np.int64).T
    return BehaviourLog(
        user_id=np.r_[log.user_id, extra[0]], item_id=np.r_[log.item_id, extra[1]],
        cate_id=np.r_[log.cate_id, extra[2]], timestamp=np.r_[log.timestamp, extra[3]], name="log+events",
    )


def event_body(rows, ids) -> dict:
    return {"events": [
        {"user_id": u, "item_id": i, "cate_id": c, "timestamp": t, "event_id": e} for (u, i, c, t), e in zip(rows, ids)
    ]}


async def test_events_are_seen_by_the_next_rank(trained, loaded_redis):
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    cands = some_candidates(trained.log, 12, seed=5)
    newest = int(trained.log.timestamp.max()) + 10
    pairs = np.unique(np.stack([trained.log.item_id, trained.log.cate_id], 1), axis=0)[:3].tolist()
    rows = [(user, i, c, newest + k) for k, (i, c) in enumerate(pairs)]
    settings = settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)
    async with serving(settings) as client:
        before = (await client.post("/rank", json=rank_body(user, cands))).json()
        r = await client.post("/events", json=event_body(rows, ["a1", "a2", "a3"]), headers=AUTH)
        again = await client.post("/events", json=event_body(rows, ["a1", "a2", "a3"]), headers=AUTH)  # a retry
        after = (await client.post("/rank", json=rank_body(user, cands))).json()
    assert r.status_code == 200, r.text
    assert r.json() | {"data_version": None} == {"events": 3, "applied": 3, "duplicates": 0, "users": 1, "data_version": None}
    assert again.json()["applied"] == 0 and again.json()["duplicates"] == 3
    assert after["history_length"] == min(before["history_length"] + 3, trained.bundle.spec.max_history)
    want, length = torch_ctr(replace(trained, log=with_events(trained.log, rows)), user, cands)
    assert after["history_length"] == length
    got = {(x["item_id"], x["cate_id"]): x["ctr"] for x in after["ranked"]}
    np.testing.assert_allclose([got[tuple(c)] for c in cands.tolist()], want, rtol=0, atol=1e-5)


async def test_events_need_the_admin_token(trained, loaded_redis):
    body = event_body([(1, 2, 3, 4)], ["x"])
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:  # no ADMIN_TOKEN: disabled
        disabled = await client.post("/events", json=body, headers=AUTH)
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)) as client:
        missing = await client.post("/events", json=body)
        wrong = await client.post("/events", json=body, headers={"Authorization": "Bearer nope"})
        right = await client.post("/events", json=body, headers=AUTH)
    assert (disabled.status_code, missing.status_code, wrong.status_code, right.status_code) == (403, 401, 403, 200)


@pytest.mark.parametrize(
    "body,must_mention",
    [
        pytest.param({"events": []}, ["events", "at least 1"], id="empty"),
        pytest.param(event_body([(1, 2, 3, 4)], [""]), ["event_id", "at least 1"], id="empty-id"),
        pytest.param(event_body([(1, 2, 3, 4)], ["x" * 129]), ["event_id", "at most 128"], id="long-id"),
        pytest.param(event_body([(1, 2, 3, 4)], ["é" * 100]), ["event_id", "at most 128 bytes"], id="long-id-bytes"),
        pytest.param(event_body([(1, 2, 3, 2**63)], ["x"]), ["timestamp", "less than or equal"], id="ts-overflow"),
        pytest.param({"events": [{"user_id": 1, "item_id": 2, "cate_id": 3, "event_id": "x"}]},
                     ["timestamp", "missing"], id="no-timestamp"),
        pytest.param(event_body([(1, 2, 3, 4)] * 6, list("abcdef")), ["events", "MAX_EVENTS=5"], id="too-many"),
    ],
)
async def test_bad_events_get_422_naming_the_field(trained, loaded_redis, body, must_mention):
    settings = settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN, max_events=5)
    async with serving(settings) as client:
        r = await client.post("/events", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    for word in must_mention:
        assert word in r.text, (word, r.text)


async def test_events_while_redis_is_down_are_refused_not_lost(trained, loaded_redis, redis_server):
    settings = settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)
    try:
        async with serving(settings) as client:
            ok = await client.post("/events", json=event_body([(1, 2, 3, 4)], ["before"]), headers=AUTH)
            redis_server.stop(save=False)
            down = await client.post("/events", json=event_body([(1, 2, 3, 5)], ["during"]), headers=AUTH)
    finally:
        redis_server.start()
    assert ok.status_code == 200
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert "not stored" in down.json()["detail"]


async def test_rank_looks_up_missing_categories_in_one_round_trip(trained, loaded_redis):
    user = int(trained.log.user_id[0])
    cands = some_candidates(trained.log, 20, seed=6)[:-3]  # known ads only
    with_cate = rank_body(user, cands)
    without = {"user_id": user, "candidates": [{"item_id": i} for i, _ in cands.tolist()]
               + [{"item_id": 10**12}, {"item_id": int(cands[0, 0]), "cate_id": 5}]}  # unknown ad; a given cate wins
    # the store's category of an ad is that of its latest event in the log
    latest = {}
    for i, c, t in sorted(zip(trained.log.item_id.tolist(), trained.log.cate_id.tolist(), trained.log.timestamp.tolist()),
                          key=lambda x: x[2]):
        latest[i] = c
    client_redis = redis.Redis.from_url(loaded_redis)
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        await client.post("/rank", json=rank_body(user, cands[:1]))  # connects, resolves the version
        client_redis.config_resetstat()
        looked_up = (await client.post("/rank", json=without)).json()
        stats = client_redis.info("commandstats")
        client_redis.config_resetstat()
        cached = (await client.post("/rank", json=without)).json()
        stats_cached = client_redis.info("commandstats")
        explicit = (await client.post("/rank", json=rank_body(user, np.array([[i, latest[i]] for i in cands[:, 0].tolist()]))))
    client_redis.close()
    assert stats["cmdstat_mget"]["calls"] == 2  # the user's history, and every missing category in one MGET
    assert stats_cached["cmdstat_mget"]["calls"] == 1  # the second time: the history; categories from the cache
    by_item = {}
    for x in looked_up["ranked"]:
        by_item.setdefault(x["item_id"], []).append(x)
    assert by_item[10**12][0]["cate_id"] is None  # unknown ad, no category sent
    for i in cands[:, 0].tolist():
        assert latest[i] in [x["cate_id"] for x in by_item[i]]
    assert 5 in [x["cate_id"] for x in by_item[int(cands[0, 0])]]
    assert looked_up["degraded"] is False and cached["ranked"] == looked_up["ranked"]
    # scores equal those of the same candidates sent with their categories
    want = {(x["item_id"], x["cate_id"]): x["ctr"] for x in explicit.json()["ranked"]}
    for x in looked_up["ranked"]:
        if x["item_id"] != 10**12 and x["cate_id"] == latest.get(x["item_id"]):
            assert x["ctr"] == pytest.approx(want[(x["item_id"], x["cate_id"])], abs=1e-6)
    assert with_cate  # (the explicit form stays valid)


async def test_corrupt_history_in_redis_ranks_as_empty_not_500(trained, loaded_redis):
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    client_redis = redis.Redis.from_url(loaded_redis)
    keys = KeySpace(version=client_redis.get(current_key()).decode())
    client_redis.set(keys.user(user), encode_user(make_records([1, 2], [3, 4], [5, 6]))[:-7])
    client_redis.close()
    cands = some_candidates(trained.log, 8, seed=7)
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        r = await client.post("/rank", json=rank_body(user, cands))
    assert r.status_code == 200
    assert r.json()["history_length"] == 0 and r.json()["degraded"] is False
    want, _ = torch_ctr(trained, int(trained.log.user_id.max()) + 1, cands)  # as a user without history
    got = {(x["item_id"], x["cate_id"]): x["ctr"] for x in r.json()["ranked"]}
    np.testing.assert_allclose([got[tuple(c)] for c in cands.tolist()], want, rtol=0, atol=1e-5)
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("din_store_corrupt_values_total", {"kind": "user"}) >= 1
    assert Trained  # (imported for type context)


# --------------------------------------------------------------------------- review fixes
def stored_items(url: str, user: int) -> list[int]:
    from feature_store.records import decode_user

    c = redis.Redis.from_url(url)
    try:
        keys = KeySpace(version=c.get(current_key()).decode())
        return decode_user(c.get(keys.user(user))).records["item_id"].tolist()
    finally:
        c.close()


async def test_a_retried_batch_with_more_events_of_one_user_than_the_id_window_appends_nothing(trained, loaded_redis):
    user, n = 777_777, 200  # a new user; 200 > the id window (128), < MAX_EVENTS
    rows = [(user, 5000 + i, 1, 10_000 - i) for i in range(n)]
    body = event_body(rows, [f"ev-{i}" for i in range(n)])
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)) as client:
        first = await client.post("/events", json=body, headers=AUTH)
        before = stored_items(loaded_redis, user)
        retry = await client.post("/events", json=body, headers=AUTH)  # the client timed out and re-sent it
    assert first.json()["applied"] == n
    assert (retry.json()["applied"], retry.json()["duplicates"]) == (0, n)
    after = stored_items(loaded_redis, user)
    assert after == before and len(set(after)) == len(after)  # no behaviour twice


async def test_events_go_through_the_store_guard(trained, loaded_redis):
    """A stalled Redis: refused within the append deadline (not a fixed 5 s), counted, and the breaker opens."""
    from test_observability import samples, value

    settings = settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN, store_timeout_ms=100,
                            breaker_failure_threshold=1, breaker_reset_ms=30_000)
    c = redis.Redis.from_url(loaded_redis)
    async with serving(settings) as client:
        assert (await client.post("/events", json=event_body([(1, 2, 3, 4)], ["warm"]), headers=AUTH)).status_code == 200
        c.execute_command("CLIENT", "PAUSE", 4_000, "WRITE")  # reads answer, writes wait
        try:
            t = time.perf_counter()
            slow = await client.post("/events", json=event_body([(1, 2, 3, 5)], ["stalled"]), headers=AUTH)
            took = time.perf_counter() - t
            skipped = await client.post("/events", json=event_body([(1, 2, 3, 6)], ["skipped"]), headers=AUTH)
            ready = (await client.get("/readyz")).json()
            m = samples((await client.get("/metrics")).text)
        finally:
            c.execute_command("CLIENT", "UNPAUSE")
            c.close()
    assert slow.status_code == 503 and 20 <= int(slow.headers["retry-after"]) <= 30, slow.text  # it opened the circuit
    assert 0.9 <= took < 2.5  # the append deadline (1 s), not the old fixed 5 s
    assert skipped.status_code == 503 and 20 <= int(skipped.headers["retry-after"]) <= 30  # until the trial call
    assert "circuit_open" in skipped.json()["detail"] and "not stored" in skipped.json()["detail"]
    assert ready["store_circuit"] == "open"
    assert value(m, "din_store_errors_total", op="append_events", reason="timeout") == 1
    assert value(m, "din_store_errors_total", op="append_events", reason="circuit_open") == 1
    assert value(m, "din_events_total", outcome="refused") == 2


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "empty-store"])
async def test_events_to_a_redis_that_refuses_writes_get_503_and_reads_go_on(trained, redis_url, loaded, request):
    """Out of memory: 503 + Retry-After saying why; Redis still answers reads, so the breaker stays closed."""
    if loaded:
        request.getfixturevalue("loaded_redis")
    user = int(trained.log.user_id[0])
    settings = settings_for(trained.bundle.path, redis_url, admin_token=TOKEN, breaker_failure_threshold=1)
    c = redis.Redis.from_url(redis_url)
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", 1)
    try:
        async with serving(settings) as client:
            refused = [await client.post("/events", json=event_body([(user, 2, 3, 4)], ["x"]), headers=AUTH)
                       for _ in range(2)]
            ranked = await client.post("/rank", json=rank_body(user, some_candidates(trained.log, 4)))
            ready = (await client.get("/readyz")).json()
    finally:
        c.config_set("maxmemory", 0)
        c.close()
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "maxmemory" in r.json()["detail"] and "not stored" in r.json()["detail"]
    assert ready["store_circuit"] == "closed"
    assert ranked.status_code == 200 and ranked.json()["degraded"] is False


@pytest.mark.parametrize("pointer", ["garbage", "wrong-type"])
async def test_a_broken_version_pointer_is_a_503_not_a_500(trained, loaded_redis, pointer):
    c = redis.Redis.from_url(loaded_redis)
    if pointer == "garbage":
        c.set(current_key(), b"not a version!")
    else:
        c.delete(current_key())
        c.hset(current_key(), "x", "1")
    c.close()
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)) as client:
        events = await client.post("/events", json=event_body([(1, 2, 3, 4)], ["x"]), headers=AUTH)
        sample = await client.get("/api/sample")
        ranked = await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 3)))
    assert events.status_code == 503 and events.headers["retry-after"] == "1", events.text
    assert "din load" in events.json()["detail"]
    assert sample.status_code == 503 and "din load" in sample.json()["detail"], sample.text
    assert ranked.status_code == 200 and ranked.json()["degraded"] is True


async def test_a_user_key_of_the_wrong_type_is_repaired_by_the_append_not_a_503_forever(trained, loaded_redis):
    """A stray RPUSH on one user's value (or a SET on another's event-id ring) failed the whole batch
    with WRONGTYPE after the other users' scripts had run: 503 "not stored" on every retry, every
    event counted refused. Garbage of any type is replaced, as a corrupt string value is."""
    from test_observability import samples, value

    users = np.unique(trained.log.user_id)
    listed, ringed, good = int(users[0]), int(users[1]), int(users[2])
    c = redis.Redis.from_url(loaded_redis)
    keys = KeySpace(version=c.get(current_key()).decode())
    c.delete(keys.user(listed))
    c.rpush(keys.user(listed), b"junk")
    c.set(keys.event_ids(ringed), b"junk")
    newest = int(trained.log.timestamp.max()) + 10
    rows = [(listed, 7001, 1, newest), (ringed, 7002, 1, newest), (good, 7003, 1, newest)]
    body = event_body(rows, ["w1", "w2", "w3"])
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN)) as client:
        first = await client.post("/events", json=body, headers=AUTH)
        retry = await client.post("/events", json=body, headers=AUTH)
        m = samples((await client.get("/metrics")).text)
    assert first.status_code == 200, first.text
    assert (first.json()["applied"], first.json()["duplicates"]) == (3, 0)
    assert (retry.json()["applied"], retry.json()["duplicates"]) == (0, 3)  # the repaired ring dedups again
    assert stored_items(loaded_redis, listed) == [7001]  # the list became a fresh history
    assert stored_items(loaded_redis, ringed)[0] == 7002 and stored_items(loaded_redis, good)[0] == 7003
    assert c.type(keys.event_ids(ringed)) == b"list"
    c.close()
    assert value(m, "din_events_total", outcome="stored") == 3
    assert value(m, "din_events_total", outcome="duplicate") == 3
    assert value(m, "din_events_total", outcome="refused") == 0
