"""Bulk loads that die half-way: a `din load` process killed mid-load leaves the old version
serving; running it again resumes; other data removes the orphan instead."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store.fences import Fence, read_fence
from feature_store.keys import KeySpace, current_key, loading_key
from feature_store.redis_store import RedisHistoryStore
from model.data.log import BehaviourLog, write_log

ROOT = Path(__file__).resolve().parents[1]


def many_users_log(n_users: int, seed: int) -> BehaviourLog:
    rng = np.random.default_rng(seed)
    return BehaviourLog(
        user_id=np.repeat(np.arange(n_users, dtype=np.int64), 2),
        item_id=rng.integers(0, 1000, 2 * n_users), cate_id=rng.integers(0, 9, 2 * n_users),
        timestamp=np.tile([1, 2], n_users), name=f"many-{seed}",
    )


def din_load(url: str, data: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "DIN_HOME": str(tmp_path / "home")}
    env.pop("REDIS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "load", "--data", f"events:{data}", "--redis-url", url,
         "--chunk-users", "500", "--grace", "0", "--json", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def wait_for_progress(proc: subprocess.Popen, redis_client) -> None:
    """Until the `din load` process has written its first chunk (or exited)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        raw = redis_client.hgetall(loading_key())
        if raw and json.loads(next(iter(raw.values())))["users_done"] > 0:
            return
        time.sleep(0.01)


def histories(url: str, users: list[int]):
    async def go():
        store = RedisHistoryStore.from_url(url, socket_timeout=5.0)
        try:
            return await store.get_histories(users)
        finally:
            await store.close()

    return asyncio.run(go())


async def _stats(url: str):
    store = RedisHistoryStore.from_url(url, socket_timeout=5.0)
    try:
        return await store.stats()
    finally:
        await store.close()


def items(h) -> list[int]:
    return h.records["item_id"].tolist()


def newest_first_items(log: BehaviourLog, user: int) -> list[int]:
    rows = np.flatnonzero(log.user_id == user)
    return log.item_id[rows[np.argsort(-log.timestamp[rows], kind="stable")]].tolist()


def test_a_killed_load_leaves_the_old_version_and_the_rerun_resumes(redis_url, redis_client, tmp_path):
    old_log = many_users_log(50, seed=1)
    old = RedisHistoryStore.from_url(redis_url).bulk_load(old_log)
    new_log = many_users_log(200_000, seed=2)
    path = write_log(new_log, tmp_path / "new.parquet")

    proc = din_load(redis_url, path, tmp_path)
    deadline = time.monotonic() + 120
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        raw = redis_client.hgetall(loading_key())
        if raw:
            (version, state_raw), = raw.items()
            state = json.loads(state_raw)
            if state["users_done"] > 0 and state["fingerprint"]:  # (resumable from here)
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"the load finished before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    version = version.decode()
    assert 0 < state["users_done"] < 200_000

    # the old version still serves, whole
    assert redis_client.get(current_key()).decode() == old.version
    got = histories(redis_url, [0, 7, 49, 50])
    assert [items(h) for h in got[:3]] == [newest_first_items(old_log, u) for u in (0, 7, 49)]
    assert got[3] is None  # a user only the killed load knew: not visible
    # live appends meanwhile go to the old version and are parked for the unfinished one
    assert read_fence(redis_client, KeySpace(version=old.version)) == Fence("N", version)

    done = din_load(redis_url, path, tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    report = json.loads(out)
    assert report["version"] == version and report["resumed_from"] >= state["users_done"]
    assert report["users"] == 200_000 and report["previous_version"] == old.version
    assert redis_client.get(current_key()).decode() == version
    assert redis_client.hgetall(loading_key()) == {}
    sample = [0, 1, 99_999, 150_000, 199_999]
    assert [items(h) for h in histories(redis_url, sample)] == [newest_first_items(new_log, u) for u in sample]
    assert list(redis_client.scan_iter(match=f"din:v{old.version}:*", count=10_000)) == []  # old version deleted


def test_other_data_after_a_killed_load_removes_the_orphan(redis_url, redis_client, tmp_path):
    store = RedisHistoryStore.from_url(redis_url)
    old = store.bulk_load(many_users_log(20, seed=3))
    path = write_log(many_users_log(200_000, seed=4), tmp_path / "big.parquet")
    proc = din_load(redis_url, path, tmp_path)
    wait_for_progress(proc, redis_client)  # (resumable or not: other data removes it either way)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (orphan,) = [v.decode() for v in redis_client.hkeys(loading_key())]

    other = many_users_log(30, seed=5)
    report = store.bulk_load(other, grace_s=0.0)  # its process has exited: dead at once, not after 60 s
    assert report.version != orphan and report.resumed_from == 0
    assert redis_client.hgetall(loading_key()) == {}
    assert list(redis_client.scan_iter(match=f"din:v{orphan}:*", count=10_000)) == []
    assert [items(h) for h in histories(redis_url, [0, 29])] == [newest_first_items(other, u) for u in (0, 29)]
    assert old.version != report.version


def test_rerunning_a_finished_load_is_safe(redis_url, redis_client):
    log = many_users_log(40, seed=6)
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(log)
    second = store.bulk_load(log, grace_s=0.0)  # same data again: a fresh version, the old one removed
    assert second.version != first.version and second.resumed_from == 0 and second.deleted_keys > 0
    assert [items(h) for h in histories(redis_url, [0, 39])] == [newest_first_items(log, u) for u in (0, 39)]
    assert {k.decode().split(":")[1] for k in redis_client.scan_iter(match="din:v*", count=10_000)} == {f"v{second.version}"}


@pytest.mark.parametrize("keep_old", [True, False])
def test_old_version_deletion_is_configurable(redis_url, redis_client, keep_old):
    store = RedisHistoryStore.from_url(redis_url)
    first = store.bulk_load(many_users_log(5, seed=7))
    store.bulk_load(many_users_log(5, seed=8), keep_old=keep_old, grace_s=0.0)
    left = redis_client.get(KeySpace(version=first.version).user(0))
    assert (left is not None) == keep_old


def test_a_second_load_of_other_data_is_refused_while_one_runs(redis_url, redis_client, tmp_path):
    """Two loads at once lost live events (the live version's fences follow only one of them);
    the second is refused while the first makes progress, and the first finishes untouched."""
    from feature_store.loader import LoadInProgressError

    store = RedisHistoryStore.from_url(redis_url)
    store.bulk_load(many_users_log(20, seed=6))
    big = many_users_log(200_000, seed=7)
    proc = din_load(redis_url, write_log(big, tmp_path / "big.parquet"), tmp_path)
    wait_for_progress(proc, redis_client)
    assert proc.poll() is None, "the first load finished before the second could start"
    with pytest.raises(LoadInProgressError, match="another load into namespace 'din' .* is running"):
        store.bulk_load(many_users_log(30, seed=8), grace_s=0.0)
    with pytest.raises(LoadInProgressError):  # the same data too: joining a running load lost users and events
        store.bulk_load(big, chunk_users=500, grace_s=0.0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert redis_client.get(current_key()).decode() == json.loads(out)["version"]
    assert [items(h) for h in histories(redis_url, [0, 199_999])] == [newest_first_items(big, u) for u in (0, 199_999)]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_load_stopped_in_its_grace_period_leaves_no_old_version(redis_url, redis_client, tmp_path, stop):
    """Stopped after the switch, while readers still had time to leave the old version: Ctrl-C
    deletes it at once; a kill leaves it due, and the next load deletes it (it leaked for ever)."""
    store = RedisHistoryStore.from_url(redis_url)
    old = store.bulk_load(many_users_log(20, seed=9))
    proc = din_load(redis_url, write_log(many_users_log(50, seed=10), tmp_path / "new.parquet"), tmp_path, "--grace", "60")
    deadline = time.monotonic() + 60
    while redis_client.get(current_key()).decode() == old.version:  # switched: now in its grace period
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(stop)
    proc.wait(30)
    old_keys = list(redis_client.scan_iter(match=f"din:v{old.version}:*", count=10_000))
    if stop == signal.SIGINT:
        assert old_keys == [] and redis_client.hgetall("din:retiring") == {}
        return
    assert old_keys and redis_client.hkeys("din:retiring") == [old.version.encode()]
    assert asyncio.run(_stats(redis_url)).retiring == [old.version]  # `din store stats` shows it
    store.bulk_load(many_users_log(30, seed=11), grace_s=0.0)
    assert list(redis_client.scan_iter(match=f"din:v{old.version}:*", count=10_000)) == []
    assert redis_client.hgetall("din:retiring") == {}


def test_a_stalled_load_whose_version_was_removed_does_not_switch_to_it(redis_url, redis_client, tmp_path):
    """A load stalled past stale_after_s is taken for dead and its version removed by the next
    load; when it wakes up it must not seal and switch to the half-deleted version."""
    from feature_store.loader import abandon_version

    store = RedisHistoryStore.from_url(redis_url)
    old = store.bulk_load(many_users_log(20, seed=12))
    proc = din_load(redis_url, write_log(many_users_log(200_000, seed=13), tmp_path / "big.parquet"), tmp_path)
    wait_for_progress(proc, redis_client)
    proc.send_signal(signal.SIGSTOP)  # stalled
    try:
        (version,) = [v.decode() for v in redis_client.hkeys(loading_key())]
        abandon_version(redis_client, "din", version)  # what a load does to one it takes for dead
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "was removed by another load" in err and "Traceback" not in err, err[-2000:]
    assert redis_client.get(current_key()).decode() == old.version  # still the old, whole version
    assert [items(h) for h in histories(redis_url, [0, 19])] == [newest_first_items(many_users_log(20, seed=12), u) for u in (0, 19)]
