"""Live appends against a real redis-server: order, bound, duplicates, concurrency, and loads racing them."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import feature_store.loader as loader
from feature_store.append_script import APPEND_LUA
from feature_store.events import EventBatch
from feature_store.fences import Fence, key_slot, read_fence, user_fence_tag
from feature_store.keys import KeySpace, current_key, loading_key
from feature_store.records import encode_user, make_records
from feature_store.redis_store import RedisHistoryStore, StoreError
from model.data.log import BehaviourLog

BIG = 2**53 + 1


def run(coro):
    return asyncio.run(coro)


def events(rows, ids) -> EventBatch:
    cols = np.array(rows, dtype=np.int64).reshape(-1, 4).T
    return EventBatch.from_columns(*cols, ids)


def tuples(h) -> list[tuple[int, int, int]]:
    r = h.records
    return list(zip(r["item_id"].tolist(), r["cate_id"].tolist(), r["timestamp"].tolist()))


async def append_and_read(url: str, batches, users, **kw):
    store = RedisHistoryStore.from_url(url, **kw)
    try:
        reports = [await store.append_events(b) for b in batches]
        return reports, await store.get_histories(users)
    finally:
        await store.close()


def small_log() -> BehaviourLog:
    # user 1: items 10 (ts 100), 11 (ts 300); user 2: item 20 (ts 50); profile-free
    return BehaviourLog(
        user_id=np.array([1, 1, 2]), item_id=np.array([10, 11, 20]),
        cate_id=np.array([1, 1, 2]), timestamp=np.array([100, 300, 50]), name="small",
    )


# --------------------------------------------------------------------------- order and bound
def test_appends_go_newest_first_even_out_of_order(redis_url):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    batch = events(
        [(1, 12, 3, 200), (1, 13, 3, 400), (1, 14, 4, 50), (1, 15, 5, 300)],  # 15 ties with loaded item 11
        ["e1", "e2", "e3", "e4"],
    )
    (report,), (h1, h2) = run(append_and_read(redis_url, [batch], [1, 2]))
    assert (report.applied, report.duplicates, report.users) == (4, 0, 1)
    # equal timestamps: the later arrival (live item 15) is newer than the loaded item 11
    assert tuples(h1) == [(13, 3, 400), (15, 5, 300), (11, 1, 300), (12, 3, 200), (10, 1, 100), (14, 4, 50)]
    assert tuples(h2) == [(20, 2, 50)]  # other users untouched


def test_history_is_bounded_by_the_versions_max_history(redis_url):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log(), max_history=3)
    first = events([(1, 12, 3, 200), (1, 13, 3, 400)], ["a", "b"])
    older = events([(1, 14, 4, 10)], ["c"])  # older than all 3 kept: falls off at once
    newer = events([(1, 15, 5, 500)], ["d"])
    _, (h,) = run(append_and_read(redis_url, [first, older, newer], [1]))
    assert tuples(h) == [(15, 5, 500), (13, 3, 400), (11, 1, 300)]


def test_duplicate_event_ids_are_not_appended_twice(redis_url, redis_client):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    batch = events([(1, 12, 3, 200), (2, 21, 3, 60), (1, 12, 3, 200)], ["x", "y", "x"])  # "x" twice in one batch
    reports, (h1, h2) = run(append_and_read(redis_url, [batch, batch], [1, 2]))
    assert [(r.applied, r.duplicates) for r in reports] == [(2, 1), (0, 3)]  # the retried batch is a no-op
    assert tuples(h1) == [(11, 1, 300), (12, 3, 200), (10, 1, 100)]
    assert tuples(h2) == [(21, 3, 60), (20, 2, 50)]
    # the same event id for another user is another event (ids are per user)
    reports, (h2,) = run(append_and_read(redis_url, [events([(2, 22, 3, 70)], ["x"])], [2]))
    assert reports[0].applied == 1 and len(h2) == 3


def test_the_dedup_window_is_the_last_id_window_ids_or_all_of_the_last_batch(redis_url, redis_client):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log(), id_window=3, max_history=50)
    first = events([(1, 100 + i, 1, 1000 + i) for i in range(4)], [f"id{i}" for i in range(4)])
    reports, (h,) = run(append_and_read(redis_url, [
        first, first,  # 4 ids > the 3-id window: all kept, so the retry of the batch appends nothing
        events([(1, 104, 1, 1004)], ["id4"]),  # the next batch trims the ring to 3: id4, id3, id2
        events([(1, 100, 1, 1000)], ["id0"]),  # id0 fell out of the window: its retry is appended again
        events([(1, 103, 1, 1003)], ["id3"]),
    ], [1]))
    assert [(r.applied, r.duplicates) for r in reports] == [(4, 0), (0, 4), (1, 0), (1, 0), (0, 1)]
    assert len(h) == 2 + 6
    keys = KeySpace(version=redis_client.get(current_key()).decode())
    assert redis_client.lrange(keys.event_ids(1), 0, -1) == [b"id0", b"id4", b"id3"]
    assert 0 < redis_client.ttl(keys.event_ids(1)) <= loader.DEFAULT_ID_TTL_S


def test_unknown_user_is_created_with_the_versions_profile_width(redis_url, tmp_log):
    RedisHistoryStore.from_url(redis_url).bulk_load(tmp_log)  # profile fields gender, age
    (report,), (h,) = run(append_and_read(redis_url, [events([(BIG + 7, BIG, BIG, 5)], ["n"])], [BIG + 7]))
    assert report.applied == 1
    assert tuples(h) == [(BIG, BIG, 5)]
    assert h.profile.tolist() == [-1, -1]  # known user, unknown profile ids


def test_first_event_into_an_empty_store_creates_a_version(redis_url, redis_client):
    (report,), (h, other) = run(append_and_read(redis_url, [events([(3, 30, 3, 1)], ["first"])], [3, 4]))
    assert report.version == redis_client.get(current_key()).decode()
    assert tuples(h) == [(30, 3, 1)] and other is None


def test_concurrent_appenders_to_one_user_lose_nothing(redis_url):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log(), max_history=500)
    n_tasks, per_task = 8, 25

    async def appender(k: int) -> None:
        store = RedisHistoryStore.from_url(redis_url)  # its own connections
        try:
            for j in range(per_task):
                await store.append_events(events([(1, 1000 * k + j, k, 1000 + j)], [f"t{k}-{j}"]))
        finally:
            await store.close()

    async def go():
        await asyncio.gather(*(appender(k) for k in range(n_tasks)))
        store = RedisHistoryStore.from_url(redis_url)
        try:
            return await store.get_history(1)
        finally:
            await store.close()

    h = run(go())
    assert len(h) == 2 + n_tasks * per_task
    items = h.records["item_id"].tolist()
    assert sorted(items) == sorted([10, 11] + [1000 * k + j for k in range(n_tasks) for j in range(per_task)])
    ts = h.records["timestamp"].tolist()
    assert ts == sorted(ts, reverse=True)


def test_user_ttl_is_set_by_the_load_and_renewed_by_appends(redis_url, redis_client):
    report = RedisHistoryStore.from_url(redis_url).bulk_load(small_log(), user_ttl_s=1000)
    keys = KeySpace(version=report.version)
    redis_client.expire(keys.user(1), 10)
    assert 0 < redis_client.ttl(keys.user(2)) <= 1000
    run(append_and_read(redis_url, [events([(1, 12, 3, 400), (9, 90, 9, 1)], ["a", "b"])], [1]))
    assert 10 < redis_client.ttl(keys.user(1)) <= 1000  # renewed by the new behaviour
    assert 0 < redis_client.ttl(keys.user(9)) <= 1000  # a created user expires too
    redis_client.expire(keys.user(2), 1)  # Redis expiring an inactive user: unknown afterwards


def test_a_corrupt_value_is_replaced_on_append_and_counted(redis_url, redis_client):
    report = RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    keys = KeySpace(version=report.version)
    redis_client.set(keys.user(1), encode_user(make_records([1], [2], [3]))[:-1])  # truncated

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            before = await store.get_history(1)
            await store.append_events(events([(1, 12, 3, 400)], ["a"]))
            return before, await store.get_history(1), store
        finally:
            await store.close()

    before, after, store = run(go())
    assert before is None and store.decode_errors == 1 and store.repaired_values == 1
    assert tuples(after) == [(12, 3, 400)]


def test_keys_of_one_user_share_a_slot_with_its_fence():
    from redis.crc import key_slot as redis_key_slot  # Redis's own rule, hash tags included

    keys = KeySpace(version="7")
    for uid in (0, 1, 42, BIG, -(2**63)):
        names = (keys.user(uid), keys.event_ids(uid), keys.pending(uid), keys.fence(user_fence_tag(uid)))
        slots = {redis_key_slot(k.encode()) for k in names}
        assert slots == {key_slot(str(uid).encode())}, uid


# --------------------------------------------------------------------------- appends racing a load
def test_events_during_a_load_reach_the_new_version(redis_url, redis_client, monkeypatch):
    """Pause a real load after its first chunk, append meanwhile, let it finish: nothing is lost."""
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(small_log())
    n_users = 30
    big_log = BehaviourLog(
        user_id=np.repeat(np.arange(1, n_users + 1), 2), item_id=np.arange(2 * n_users) + 500,
        cate_id=np.ones(2 * n_users, dtype=np.int64), timestamp=np.tile([10, 20], n_users), name="new",
    )
    written, resume = threading.Event(), threading.Event()
    real_send = loader.SetWriter.send
    calls = []

    def pausing_send(self, keys, *args, **kw):
        real_send(self, keys, *args, **kw)
        calls.append(keys[0])
        if len(calls) == 1:  # after the first chunk of users (1..10)
            written.set()
            assert resume.wait(30)

    monkeypatch.setattr(loader.SetWriter, "send", pausing_send)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=store.bulk_load(big_log, chunk_users=10, grace_s=0.5)))
    t.start()
    try:
        assert written.wait(30)
        (new_version,) = [v.decode() for v in redis_client.hkeys(loading_key())]  # the load in progress
        assert read_fence(redis_client, KeySpace(version=first.version)) == Fence("N", new_version)
        assert read_fence(redis_client, KeySpace(version=new_version)).state == "L"
        # user 2: already written by the load; user 25: not yet; user 77: nowhere
        live = events([(2, 9002, 9, 15), (25, 9025, 9, 30), (77, 9077, 9, 1), (2, 9002, 9, 15)], ["a", "b", "c", "a"])
        (report,), during = run(append_and_read(redis_url, [live], [2, 25, 77]))
        assert (report.applied, report.duplicates, report.version) == (3, 1, first.version)
        # readers still use the old version, which has the events too
        assert [tuples(h) for h in during] == [[(20, 2, 50), (9002, 9, 15)], [(9025, 9, 30)], [(9077, 9, 1)]]
    finally:
        resume.set()
        t.join(30)
    report = result["r"]
    assert report.version == new_version and report.merged_users == 3
    (_,), after = run(append_and_read(redis_url, [events([], [])], [2, 25, 77, 1]))
    assert tuples(after[0]) == [(503, 1, 20), (9002, 9, 15), (502, 1, 10)]
    assert tuples(after[1]) == [(9025, 9, 30), (549, 1, 20), (548, 1, 10)]
    assert tuples(after[2]) == [(9077, 9, 1)]
    assert tuples(after[3]) == [(501, 1, 20), (500, 1, 10)]
    assert redis_client.hgetall(loading_key()) == {}
    assert list(redis_client.scan_iter(match="din:v*:p:*")) == []  # parked events merged and gone
    # a retry of the same batch after the switch is still recognised in the new version
    (again,), _ = run(append_and_read(redis_url, [live], [2]))
    assert (again.applied, again.duplicates) == (0, 4)


def test_events_during_the_first_load_into_an_empty_store_are_kept(redis_url, redis_client, monkeypatch):
    """No version before the load: events sent while it runs land in an empty serving version
    (readers see them at once) and are carried into the loaded version; the placeholder goes."""
    store = RedisHistoryStore.from_url(redis_url)
    written, resume = threading.Event(), threading.Event()
    real_send = loader.SetWriter.send

    def pausing_send(self, keys, *args, **kw):
        real_send(self, keys, *args, **kw)
        written.set()
        assert resume.wait(30)

    monkeypatch.setattr(loader.SetWriter, "send", pausing_send)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=store.bulk_load(small_log(), chunk_users=10)))
    t.start()
    try:
        assert written.wait(30)
        live = events([(1, 12, 3, 200), (9, 90, 9, 5)], ["x", "y"])  # user 1 is in the log, user 9 is not
        (report,), during = run(append_and_read(redis_url, [live], [1, 9]))
        assert report.applied == 2 and report.version == redis_client.get(current_key()).decode()
        assert [tuples(h) for h in during] == [[(12, 3, 200)], [(90, 9, 5)]]  # the empty version + live events
    finally:
        resume.set()
        t.join(30)
    load = result["r"]
    assert load.previous_version is None and load.merged_users == 2
    assert redis_client.get(current_key()).decode() == load.version
    (again,), after = run(append_and_read(redis_url, [live], [1, 2, 9]))
    assert (again.applied, again.duplicates) == (0, 2)  # the event ids came along too
    assert tuples(after[0]) == [(11, 1, 300), (12, 3, 200), (10, 1, 100)]  # merged in timestamp order
    assert tuples(after[1]) == [(20, 2, 50)] and tuples(after[2]) == [(90, 9, 5)]
    assert {k.split(b":")[1] for k in redis_client.keys("din:v*")} == {f"v{load.version}".encode()}  # placeholder gone


def test_a_stale_appender_follows_the_fences_to_the_new_version(redis_url, redis_client):
    loader_store = RedisHistoryStore.from_url(redis_url)
    first = loader_store.bulk_load(small_log())

    async def go():
        stale = RedisHistoryStore.from_url(redis_url, version_refresh_s=3600, miss_refresh_s=3600)
        try:
            await stale.get_history(1)  # pins version 1 in this reader
            second = await asyncio.to_thread(loader_store.bulk_load, small_log(), keep_old=True)
            r1 = await stale.append_events(events([(1, 12, 3, 400)], ["k"]))  # v1 fence says: next = v2
            third = await asyncio.to_thread(loader_store.bulk_load, small_log(), grace_s=0.0)  # v2 deleted
            r2 = await stale.append_events(events([(1, 13, 3, 500)], ["m"]))  # v1 -> v2 (stale) -> re-read: v3
            return second, third, (r1, r2), stale.version
        finally:
            await stale.close()

    second, third, reports, seen_version = run(go())
    assert [r.applied for r in reports] == [1, 1]
    assert [r.version for r in reports] == [first.version, third.version]  # the pointer as the appender knows it
    assert seen_version == third.version
    _, hs = run(append_and_read(redis_url, [], [1]))
    assert tuples(hs[0])[0] == (13, 3, 500)  # v3 holds the event sent after its switch
    assert redis_client.get(KeySpace(version=second.version).user(1)) is None  # v2 retired and deleted
    v1 = redis_client.get(KeySpace(version=first.version).user(1))  # kept (keep_old): got both events
    assert v1 is not None and len(v1) == 8 + 4 * 24


def test_a_retired_fence_sends_appends_to_its_successor(redis_url, redis_client):
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(small_log())
    second = store.bulk_load(small_log(), keep_old=True)
    loader._redirect(redis_client, "din", first.version, "R", second.version)  # as retire_version does first

    async def go():
        stale = RedisHistoryStore.from_url(redis_url, version_refresh_s=3600, miss_refresh_s=3600)
        try:
            await stale.refresh_version()
            redis_client.set(current_key(), first.version)  # make the appender believe v1 is live ...
            await stale.refresh_version()
            redis_client.set(current_key(), second.version)
            return await stale.append_events(events([(1, 12, 3, 400)], ["r"]))  # ... its fence: R, go to v2
        finally:
            await stale.close()

    report = run(go())
    assert report.applied == 1
    v1 = KeySpace(version=first.version)
    assert len(redis_client.get(v1.user(1))) == 8 + 2 * 24  # untouched
    assert redis_client.lrange(KeySpace(version=second.version).event_ids(1), 0, -1) == [b"r"]


def test_appends_to_a_version_without_fences_fail_clearly(redis_url, redis_client):
    report = RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    loader.delete_fences(redis_client, KeySpace(version=report.version))  # as an older `din load` left it

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            with pytest.raises(StoreError, match="has no fences .* run `din load` again"):
                await store.append_events(events([(1, 12, 3, 400)], ["a"]))
        finally:
            await store.close()

    run(go())


def test_the_script_is_reloaded_after_a_script_flush(redis_url, redis_client):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log())

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            await store.append_events(events([(1, 12, 3, 400)], ["a"]))
            redis_client.script_flush()
            assert redis_client.script_exists(loader.APPEND_SHA) == [False]
            await store.append_events(events([(1, 13, 3, 500)], ["b"]))
            return await store.get_history(1)
        finally:
            await store.close()

    assert run(go()).records["item_id"].tolist()[:2] == [13, 12]
    assert APPEND_LUA  # (the script text is what docs/feature-store.md shows)


# --------------------------------------------------------------------------- ad features
def test_ad_features_hold_the_latest_category_of_each_ad(redis_url):
    log = BehaviourLog(
        user_id=np.array([1, 2, 3, 4, 5]), item_id=np.array([7, 7, 8, BIG, 7]),
        cate_id=np.array([70, 71, 80, BIG, 72]), timestamp=np.array([5, 9, 1, 2, 9]),  # ad 7: ts 9 twice
        name="ads",
    )
    report = RedisHistoryStore.from_url(redis_url).bulk_load(log)
    assert report.ads == 3

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            return await store.get_ad_features(np.array([8, 7, 404, BIG, 7]))
        finally:
            await store.close()

    ads = run(go())
    assert ads.fields == ("cate_id",)
    assert ads.found.tolist() == [True, True, False, True, True]
    assert ads.column("cate_id").tolist() == [80, 72, -1, BIG, 72]  # equal timestamps: the later row wins


def test_the_appended_value_is_pinned_byte_for_byte(redis_url, redis_client):
    log = BehaviourLog(user_id=np.array([4]), item_id=np.array([7]), cate_id=np.array([3]), timestamp=np.array([1000]))
    report = RedisHistoryStore.from_url(redis_url).bulk_load(log)
    run(append_and_read(redis_url, [events([(4, 5, 2, 900), (6, 2**53 + 1, 1, -1)], ["older", "new-user"])], []))
    keys = KeySpace(version=report.version)
    assert redis_client.get(keys.user(4)).hex() == (
        "44494e55" "01" "00" "0000"  # header: no profile ids
        "0700000000000000" "0300000000000000" "e803000000000000"  # loaded (7, 3, 1000): newest
        "0500000000000000" "0200000000000000" "8403000000000000"  # appended (5, 2, 900)
    )
    assert redis_client.get(keys.user(6)).hex() == (
        "44494e55" "01" "00" "0000" "0100000000002000" "0100000000000000" "ffffffffffffffff"
    )


def test_a_corrupt_ad_value_is_counted_and_unknown(redis_url, redis_client):
    report = RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    redis_client.set(KeySpace(version=report.version).ad(10), b"DINA\x01")  # truncated

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            return await store.get_ad_features(np.array([10, 11])), store.decode_errors
        finally:
            await store.close()

    ads, errors = run(go())
    assert ads.found.tolist() == [False, True] and ads.column("cate_id").tolist() == [-1, 1] and errors == 1


def test_a_full_redis_refuses_appends_with_a_clear_error(redis_url, redis_client):
    RedisHistoryStore.from_url(redis_url).bulk_load(small_log())
    redis_client.config_set("maxmemory", 1)  # everything above is "used": writes are refused
    redis_client.config_set("maxmemory-policy", "noeviction")

    async def go():
        store = RedisHistoryStore.from_url(redis_url)
        try:
            with pytest.raises(StoreError, match="refused the append: .*maxmemory"):
                await store.append_events(events([(1, 12, 3, 400)], ["a"]))
        finally:
            await store.close()

    try:
        run(go())
    finally:
        redis_client.config_set("maxmemory", 0)
    _, (h,) = run(append_and_read(redis_url, [], [1]))
    assert tuples(h) == [(11, 1, 300), (10, 1, 100)]  # nothing half-applied
