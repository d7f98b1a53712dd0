"""Bulk load: a behaviour log into a new data version, then one SET switches readers to it.

Order of work, so that a reader never sees a half-loaded state:
1. group the log's behaviours (the trainer's rule: `BehaviourLog.behaviour_mask`) by user with one
   vectorised sort, keep each user's newest `max_history`, newest first;
2. INCR `{ns}:seq` for a fresh version and SET every user key of that version with
   non-transactional pipelines, `chunk_users` users per round trip;
3. write `{ns}:v{version}:meta`;
4. SET `{ns}:current` to the new version (atomic; the old version comes back with GET);
5. after a grace period (readers re-check the pointer at least that often), delete the
   previous version's keys with SCAN + UNLINK, unless `keep_old`.
If anything fails before step 4, the partial new version is deleted and readers keep the
old one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import redis
from tqdm import tqdm

from feature_store.keys import KeySpace, current_key, seq_key
from feature_store.records import FORMAT_VERSION, MAX_PROFILE_FIELDS, encode_users
from model.data.log import BehaviourLog

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 50
DEFAULT_CHUNK_USERS = 1000
DEFAULT_GRACE_S = 2.0  # > the reader's default version refresh interval (1 s)


@dataclass(frozen=True)
class LoadReport:
    namespace: str
    version: str
    previous_version: str | None
    users: int  # user keys written
    events: int  # records stored (after truncation to max_history)
    log_events: int  # rows of the log
    bytes: int  # total size of the user values
    seconds: float
    deleted_keys: int  # keys of the previous version removed

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return asdict(self) | {"users_per_s": round(self.users_per_s, 1)}


@dataclass(frozen=True)
class GroupedHistories:
    """Every user's kept events, as index arrays into the log (no per-user objects)."""

    user_id: np.ndarray  # (U,) int64, sorted; includes users with 0 records
    counts: np.ndarray  # (U,) int64 records kept per user
    rows: np.ndarray  # (R,) int64 log row of each kept record: grouped by user, newest first
    profiles: np.ndarray  # (U, P) int64 raw profile ids (-1 = none)
    profile_fields: tuple[str, ...]


def _user_time_order(uid: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Row order by user, then time (stable): one lexsort, skipped when already in order."""
    same_user = uid[1:] == uid[:-1]
    if (uid[1:] >= uid[:-1]).all() and (~same_user | (ts[1:] >= ts[:-1])).all():
        return np.arange(uid.size, dtype=np.int64)  # e.g. a log written by sorted_by_user_time()
    return np.lexsort((ts, uid))


def group_histories(
    log: BehaviourLog,
    max_history: int = DEFAULT_MAX_HISTORY,
    profile_fields: Sequence[str] | None = None,
) -> GroupedHistories:
    """Group `log`'s behaviours by user, newest first, at most `max_history` each, with one sort.

    "Newest" is the largest timestamp; among equal timestamps the later row of the log is
    the newer one (the order in which events were logged). Every user of the log gets an
    entry, also one without behaviours (e.g. only unclicked events), as does every user
    with a profile: their profile still counts, their history is empty. `profile_fields`
    picks (and orders) the profile ids stored, e.g. a bundle's; None = all of the log's.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    uid_all = np.asarray(log.user_id, dtype=np.int64)
    mask = log.behaviour_mask()
    everything = bool(mask.all())
    beh_rows = np.arange(uid_all.size, dtype=np.int64) if everything else np.flatnonzero(mask)
    uid = uid_all[beh_rows]
    order = beh_rows[_user_time_order(uid, np.asarray(log.timestamp, dtype=np.int64)[beh_rows])]
    uid_sorted = uid_all[order]
    n = uid_sorted.size
    starts = np.flatnonzero(np.r_[True, uid_sorted[1:] != uid_sorted[:-1]]) if n else np.empty(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64) if n else np.empty(0, np.int64)
    users = uid_sorted[starts]
    kept = np.minimum(ends - starts, max_history)
    first_out = np.cumsum(kept) - kept
    rank = np.arange(int(kept.sum()), dtype=np.int64) - np.repeat(first_out, kept)  # 0 = newest
    rows = order[np.repeat(ends - 1, kept) - rank]

    fields = log.profile_fields if profile_fields is None else tuple(profile_fields)
    missing = [f for f in fields if f not in log.profile_fields]
    if missing:
        raise ValueError(
            f"behaviour log {log.name!r} has no profile field(s) {', '.join(map(repr, missing))} "
            f"(it has {list(log.profile_fields) or 'none'}); load the data the model was trained on"
        )
    if len(fields) > MAX_PROFILE_FIELDS:
        raise ValueError(f"at most {MAX_PROFILE_FIELDS} profile fields fit a user value, the log has {len(fields)}")
    all_users = users
    if not everything:
        all_users = np.union1d(all_users, uid_all)
    if log.profiles is not None and log.profiles.user_id.size:
        all_users = np.union1d(all_users, np.asarray(log.profiles.user_id, dtype=np.int64))
    counts = np.zeros(all_users.size, dtype=np.int64)
    counts[np.searchsorted(all_users, users)] = kept
    if fields:
        looked_up = log.profiles.lookup(all_users)
        profiles = np.stack([looked_up[f] for f in fields], axis=1).astype(np.int64)
    else:
        profiles = np.empty((all_users.size, 0), dtype=np.int64)
    return GroupedHistories(all_users, counts, rows, profiles, fields)


def delete_version(client: redis.Redis, keys: KeySpace, batch: int = 1000) -> int:
    """UNLINK every key of one data version (SCAN by its prefix); returns how many."""
    deleted = 0
    pending: list[bytes] = []
    for key in client.scan_iter(match=keys.match_all, count=batch):
        pending.append(key)
        if len(pending) >= batch:
            deleted += client.unlink(*pending)
            pending.clear()
    if pending:
        deleted += client.unlink(*pending)
    return deleted


def _abandon(client: redis.Redis, keys: KeySpace) -> None:
    """Delete a failed load's keys, unless the switch happened after all (a lost reply)."""
    try:
        current = client.get(keys.current)
        if current is not None and current.decode() == keys.version:
            return
        delete_version(client, keys)
    except redis.RedisError:  # the store is gone; the orphan version is never current
        logger.warning("could not remove the partial data version %s of %s", keys.version, keys.namespace)


def load_log(
    client: redis.Redis,
    log: BehaviourLog,
    *,
    namespace: str = "din",
    max_history: int = DEFAULT_MAX_HISTORY,
    keep_old: bool = False,
    progress: bool = False,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    grace_s: float = DEFAULT_GRACE_S,
    profile_fields: Sequence[str] | None = None,
) -> LoadReport:
    """Write `log` as a new data version of `namespace` and make it the current one."""
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be at least 1, got {chunk_users}")
    t0 = time.perf_counter()
    grouped = group_histories(log, max_history, profile_fields)
    if grouped.user_id.size == 0:
        raise ValueError(f"behaviour log {log.name!r} has no users: nothing to load (the current data stays)")
    version = str(client.incr(seq_key(namespace)))
    keys = KeySpace(namespace=namespace, version=version)
    columns = [np.asarray(c, dtype=np.int64) for c in (log.item_id, log.cate_id, log.timestamp)]
    record_end = np.cumsum(grouped.counts)
    n_users = grouped.user_id.size
    total_bytes = 0
    bar = tqdm(
        total=n_users, unit="users", unit_scale=True, file=sys.stderr, disable=not progress,
        desc=f"load {namespace} v{version}", dynamic_ncols=True,
    )
    try:
        with bar:
            for a in range(0, n_users, chunk_users):
                b = min(a + chunk_users, n_users)
                r0 = int(record_end[a - 1]) if a else 0
                r1 = int(record_end[b - 1]) if b else 0
                rows = grouped.rows[r0:r1]
                words = np.empty((rows.size, 3), dtype=np.int64)  # item_id, cate_id, timestamp
                for j, col in enumerate(columns):
                    words[:, j] = col[rows]
                data, offsets = encode_users(grouped.counts[a:b], words, grouped.profiles[a:b])
                total_bytes += len(data)
                bounds = offsets.tolist()
                pipe = client.pipeline(transaction=False)
                for i, key in enumerate(keys.users(grouped.user_id[a:b].tolist())):
                    pipe.execute_command("SET", key, data[bounds[i] : bounds[i + 1]])  # (.set() is slower)
                pipe.execute()
                bar.update(b - a)
            meta = {
                "format_version": FORMAT_VERSION,
                "profile_fields": list(grouped.profile_fields),
                "max_history": int(max_history),
                "users": int(n_users),
                "events": int(grouped.rows.size),
                "source": log.name,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            client.set(keys.meta, json.dumps(meta))
            previous = client.set(current_key(namespace), version, get=True)
    except BaseException:
        _abandon(client, keys)
        raise
    previous = previous.decode() if isinstance(previous, bytes) else previous
    deleted = 0
    if previous is not None and previous != version and not keep_old:
        time.sleep(grace_s)  # readers still on the old version re-check the pointer by then
        deleted = delete_version(client, KeySpace(namespace=namespace, version=previous))
    return LoadReport(
        namespace=namespace,
        version=version,
        previous_version=previous,
        users=int(n_users),
        events=int(grouped.rows.size),
        log_events=len(log),
        bytes=total_bytes,
        seconds=time.perf_counter() - t0,
        deleted_keys=deleted,
    )
