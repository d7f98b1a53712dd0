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


def histories(url: str, users: list[int]):
    async def go():
        store = RedisHistoryStore.from_url(url, socket_timeout=5.0)
        try:
            return await store.get_histories(users)
        finally:
            await store.close()

    return asyncio.run(go())


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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        raw = redis_client.hgetall(loading_key())
        if raw and json.loads(next(iter(raw.values())))["users_done"] > 0:
            break  # (resumable or not: other data removes it either way)
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (orphan,) = [v.decode() for v in redis_client.hkeys(loading_key())]

    other = many_users_log(30, seed=5)
    report = store.bulk_load(other, stale_after_s=0.0, grace_s=0.0)  # the orphan counts as dead at once
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
