"""The store on a real 3-master Redis Cluster (started by tests/conftest.py): loads, reads across
slots, live appends, ad features, stats, version switches."""

from __future__ import annotations

import asyncio

import numpy as np
import redis

from feature_store.events import EventBatch
from feature_store.fences import user_fence_tag
from feature_store.keys import KeySpace
from feature_store.redis_store import RedisHistoryStore

BIG = 2**53 + 1


def tuples(h):
    r = h.records
    return list(zip(r["item_id"].tolist(), r["cate_id"].tolist(), r["timestamp"].tolist()))


def test_round_trips_appends_and_switches_on_a_cluster(redis_cluster, redis_cluster_url, tmp_log):
    store = RedisHistoryStore.from_url(redis_cluster_url)
    assert store.cluster
    first = store.bulk_load(tmp_log, max_history=4)
    assert (first.users, first.events, first.ads) == (5, 10, 12)

    users = [1, 2, 3, BIG, 5, 999]

    async def go():
        s = RedisHistoryStore.from_url(redis_cluster_url)
        try:
            hs = await s.get_histories(users)  # keys on all three masters: one MGET per slot
            report = await s.append_events(EventBatch.from_columns(
                [1, 1, 777], [900, 901, 902], [9, 9, 9], [1000, 50, 7], ["a", "b", "c"]))
            retry = await s.append_events(EventBatch.from_columns([1], [900], [9], [1000], ["a"]))
            after = await s.get_histories([1, 777])
            ads = await s.get_ad_features(np.array([101, BIG + 1, 404]))
            stats = await s.stats()
            return hs, report, retry, after, ads, stats
        finally:
            await s.close()

    hs, report, retry, after, ads, stats = asyncio.run(go())
    assert [h.records["item_id"].tolist() if h is not None else None for h in hs] == [
        [105, 101, 104, 103], [201, 202], [301], [BIG + 3, BIG + 1, BIG + 2], [], None]
    assert [h.profile.tolist() for h in hs[:5]] == [[0, 25], [1, 35], [1, 45], [-1, -1], [0, 18]]
    assert (report.applied, report.duplicates, retry.duplicates) == (3, 0, 1)
    assert tuples(after[0]) == [(900, 9, 1000), (105, 11, 900), (101, 11, 500), (104, 13, 300)]
    assert tuples(after[1]) == [(902, 9, 7)]
    assert ads.found.tolist() == [True, True, False] and ads.column("cate_id").tolist() == [11, 13, -1]
    assert stats.users == 6 and stats.ads == 12 and stats.version == first.version
    assert stats.version_keys["fences"] == 16384 and stats.memory_used > 0

    second = store.bulk_load(tmp_log, grace_s=0.0)  # retire + delete the old version on every master
    assert second.previous_version == first.version and second.deleted_keys > 16384
    nodes = [redis.Redis(port=p) for p in redis_cluster.ports]
    left = sum(len(list(n.scan_iter(match=f"din:v{first.version}:*", count=10_000))) for n in nodes)
    assert left == 0
    for n in nodes:
        n.close()


def test_a_users_keys_share_a_slot_on_the_cluster(redis_cluster, redis_cluster_url):
    node = redis.Redis(port=redis_cluster.ports[0])
    keys = KeySpace(version="3")
    for uid in (1, 42, BIG, -7):
        names = [keys.user(uid), keys.event_ids(uid), keys.pending(uid), keys.fence(user_fence_tag(uid))]
        slots = {node.execute_command("CLUSTER KEYSLOT", k) for k in names}  # the server's own answer
        assert len(slots) == 1, (uid, names)
    node.close()


def test_events_during_a_load_are_merged_on_a_cluster(redis_cluster_url, monkeypatch):
    import threading

    import feature_store.loader as loader
    from model.data.log import BehaviourLog

    store = RedisHistoryStore.from_url(redis_cluster_url)
    store.bulk_load(BehaviourLog(user_id=np.array([1]), item_id=np.array([1]), cate_id=np.array([1]),
                                 timestamp=np.array([1])))
    n = 40
    log = BehaviourLog(user_id=np.arange(n), item_id=np.arange(n) + 100, cate_id=np.ones(n, dtype=np.int64),
                       timestamp=np.full(n, 10), name="new")
    paused, go_on = threading.Event(), threading.Event()
    real = loader.set_values

    def pausing(client, keys, *args, **kw):
        real(client, keys, *args, **kw)
        if keys and ":u:" in keys[0] and not paused.is_set():
            paused.set()
            assert go_on.wait(30)

    monkeypatch.setattr(loader, "set_values", pausing)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=store.bulk_load(log, chunk_users=10, grace_s=0.0)))
    t.start()
    try:
        assert paused.wait(30)
        users = list(range(0, n, 3)) + [500]  # written and unwritten users on all masters, and a new one

        async def send():
            s = RedisHistoryStore.from_url(redis_cluster_url)
            try:
                return await s.append_events(EventBatch.from_columns(
                    users, [9000 + u for u in users], [9] * len(users), [20] * len(users), [f"e{u}" for u in users]))
            finally:
                await s.close()

        report = asyncio.run(send())
    finally:
        go_on.set()
        t.join(60)
    assert report.applied == len(users)
    assert out["r"].merged_users == len(users)

    async def read():
        s = RedisHistoryStore.from_url(redis_cluster_url)
        try:
            return await s.get_histories(users)
        finally:
            await s.close()

    hs = asyncio.run(read())
    for u, h in zip(users, hs):
        want = [9000 + u] + ([100 + u] if u < n else [])
        assert h.records["item_id"].tolist() == want, u
