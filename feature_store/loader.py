"""Bulk load: a behaviour log into a new data version, then one SET switches readers to it.

Order of work, so that a reader never sees a half-loaded state and no live append is lost:
1. group the log's behaviours (the trainer's rule: `BehaviourLog.behaviour_mask`) by user with one
   vectorised sort, keep each user's newest `max_history`, newest first; ad id ->
   category of its latest event;
2. claim a version: resume an unfinished load of the same data (`{ns}:loading`), else
   INCR `{ns}:seq`; fence the new version "loading" (live appends for it are parked)
   and the live version "next = new" (live appends go to both);
3. SET every user key, `chunk_users` per round trip, recording progress after each
   chunk (a killed load resumes there); SET the ad keys and the meta;
4. seal the new version (fences "serving") and merge the parked appends into it;
5. SET `{ns}:current` to the new version (atomic; the old version comes back with GET);
6. after a grace period (readers re-check the pointer at least that often), retire the
   previous version and delete its keys (SCAN + UNLINK), unless `keep_old`.
If an exception stops the load before step 5, the new version is deleted and readers
keep the old one; a load killed outright leaves its version unreferenced, to be resumed
(same data) or removed (other data) by the next `din load`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import redis
from tqdm import tqdm

from feature_store.base import StoreError
from feature_store.append_script import APPEND_LUA, APPEND_SHA, PENDING_TTL_S
from feature_store.connection import is_cluster
from feature_store.fences import Fence, delete_fences, read_fence, slot_tags, user_fence_tag, write_fences
from feature_store.keys import KeySpace, current_key, loading_key, retiring_key, seq_key
from feature_store.process import pid_alive
from feature_store.records import FORMAT_VERSION, MAX_PROFILE_FIELDS, encode_ads, encode_users
from feature_store.resp import SetWriter, format_command
from model.data.log import BehaviourLog

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 50
DEFAULT_CHUNK_USERS = 1000
DEFAULT_GRACE_S = 2.0  # > the reader's default version refresh interval (1 s)
DEFAULT_ID_WINDOW = 128  # event ids remembered per user (a LIST that stays a compact listpack)
DEFAULT_ID_TTL_S = 86_400  # ... for a day after the user's last append
DEFAULT_STALE_AFTER_S = 60.0  # a load whose progress is older is dead: resumed or removed
AD_FIELDS = ("cate_id",)
AD_CHUNK = 10_000


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
    ads: int = 0  # ad keys written
    resumed_from: int = 0  # users already written by an earlier, killed run of this load
    merged_users: int = 0  # users whose appends arrived during the load and were merged
    prepare_seconds: float = 0.0  # grouping the log and the ads (no Redis; the data's hash runs on)
    write_seconds: float = 0.0  # writing the user and ad keys

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return asdict(self) | {"users_per_s": round(self.users_per_s, 1)}


@dataclass(frozen=True)
class GroupedHistories:
    """Every user's kept events, as index arrays into the log (no per-user objects).

    The log rows of users a..b (`rows_of(a, b)`) are computed per chunk, never for the
    whole log at once: a 50M-row log would need several 400 MB temporaries otherwise.
    """

    user_id: np.ndarray  # (U,) int64, sorted; includes users with 0 records
    counts: np.ndarray  # (U,) int64 records kept per user
    last: np.ndarray  # (U,) int64 position of the user's newest behaviour in the (user, time) order
    order: np.ndarray | None  # (n,) log row at each position of that order; None: the log is in it
    profiles: np.ndarray  # (U, P) int64 raw profile ids (-1 = none)
    profile_fields: tuple[str, ...]

    @property
    def events(self) -> int:
        return int(self.counts.sum())

    def rows_of(self, a: int, b: int) -> np.ndarray:
        """Log rows of the kept records of users a..b-1: grouped by user, newest first."""
        counts = self.counts[a:b]
        first = np.cumsum(counts) - counts
        pos = np.repeat(self.last[a:b] + first, counts) - np.arange(int(counts.sum()), dtype=np.int64)
        return pos if self.order is None else self.order[pos]

    @property
    def rows(self) -> np.ndarray:
        """Every kept record's log row (all users; tests and small logs)."""
        return self.rows_of(0, self.user_id.size)


def _already_in_order(uid: np.ndarray, ts: np.ndarray) -> bool:
    """Grouped by ascending user, and in time order within each user."""
    if uid.size < 2:
        return True
    if not (uid[1:] >= uid[:-1]).all():
        return False
    return bool(((uid[1:] != uid[:-1]) | (ts[1:] >= ts[:-1])).all())


def _user_time_order(uid: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Row order by user, then time (stable): one lexsort, skipped when already in order."""
    if _already_in_order(uid, ts):
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
    ts_all = np.asarray(log.timestamp, dtype=np.int64)
    if everything and _already_in_order(uid_all, ts_all):  # e.g. sorted_by_user_time(): no gathers
        order = None
        uid_sorted = uid_all
    else:
        beh_rows = np.arange(uid_all.size, dtype=np.int64) if everything else np.flatnonzero(mask)
        uid = uid_all[beh_rows]
        order = beh_rows[_user_time_order(uid, ts_all[beh_rows])]
        uid_sorted = uid_all[order]
    n = uid_sorted.size
    starts = np.flatnonzero(np.r_[True, uid_sorted[1:] != uid_sorted[:-1]]) if n else np.empty(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64) if n else np.empty(0, np.int64)
    users = uid_sorted[starts]
    kept = np.minimum(ends - starts, max_history)

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
    last = np.zeros(all_users.size, dtype=np.int64)
    at = np.searchsorted(all_users, users)
    counts[at] = kept
    last[at] = ends - 1
    if fields:
        looked_up = log.profiles.lookup(all_users)
        profiles = np.stack([looked_up[f] for f in fields], axis=1).astype(np.int64)
    else:
        profiles = np.empty((all_users.size, 0), dtype=np.int64)
    return GroupedHistories(all_users, counts, last, order, profiles, fields)


def group_ads(log: BehaviourLog) -> tuple[np.ndarray, np.ndarray]:
    """(ad ids sorted, (A, 1) category ids): each ad's category as of its latest event.

    Hash-grouped by (ad, category) in Arrow first (no sort of the whole log); only ads
    seen with more than one category are resolved row by row (latest timestamp, then
    the later row).
    """
    item = np.asarray(log.item_id, dtype=np.int64)
    cate = np.asarray(log.cate_id, dtype=np.int64)
    if item.size == 0:
        return np.empty(0, np.int64), np.empty((0, 1), np.int64)
    pairs = pa.table({"item_id": item, "cate_id": cate}).group_by(["item_id", "cate_id"]).aggregate([])
    p_item = pairs.column("item_id").to_numpy()
    p_cate = pairs.column("cate_id").to_numpy()
    order = np.argsort(p_item, kind="stable")
    p_item, p_cate = p_item[order], p_cate[order]
    ads, first, counts = np.unique(p_item, return_index=True, return_counts=True)
    out = p_cate[first].copy()
    conflicted = ads[counts > 1]
    if conflicted.size:
        rows = np.flatnonzero(np.isin(item, conflicted))
        rows = rows[np.lexsort((rows, np.asarray(log.timestamp)[rows], item[rows]))]
        last = np.r_[item[rows][1:] != item[rows][:-1], True]
        out[np.searchsorted(ads, item[rows][last])] = cate[rows][last]
    return ads, out[:, None]


def _data_hash(log: BehaviourLog) -> str:
    """SHA-256 of the log's columns, hashed in place (no copies: hashlib releases the GIL)."""
    h = hashlib.sha256()
    for col in (log.user_id, log.item_id, log.cate_id, log.timestamp, log.label, log.is_behaviour):
        if col is not None:
            arr = np.ascontiguousarray(col)
            h.update(str(arr.dtype).encode())
            h.update(arr.data)
    return h.hexdigest()


def load_fingerprint(log_fingerprint: str, grouped: GroupedHistories, settings: dict) -> str:
    """Names the data and options of a load: a killed load is resumed only by an identical one."""
    h = hashlib.sha256(log_fingerprint.encode())
    h.update(np.ascontiguousarray(grouped.profiles).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- raw writes
def set_values(client, keys: Sequence[str], data: bytes, offsets: Sequence[int], ex: int = 0) -> None:
    """SET keys[i] = data[offsets[i]:offsets[i+1]] (EX `ex` if > 0), one round trip on a single Redis.

    On a single Redis the commands go out as one RESP buffer (feature_store/resp.py); a
    cluster goes through redis-py's cluster pipeline, which splits the commands per node.
    """
    view = memoryview(data)
    if is_cluster(client):
        pipe = client.pipeline(transaction=False)
        for i, key in enumerate(keys):
            value = view[offsets[i] : offsets[i + 1]].tobytes()
            pipe.set(key, value, ex=ex) if ex > 0 else pipe.set(key, value)
        pipe.execute()
        return
    with SetWriter(client) as writer:
        writer.send(keys, data, offsets, ex)


def _delete_matching(client, pattern: str, skip_prefix: bytes | None = None, batch: int = 1000) -> int:
    deleted = 0
    pending: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=batch):
        if skip_prefix is not None and key.startswith(skip_prefix):
            continue
        pending.append(key)
        if len(pending) >= batch:
            deleted += client.unlink(*pending)
            pending.clear()
    if pending:
        deleted += client.unlink(*pending)
    return deleted


def delete_version(client, keys: KeySpace, batch: int = 1000) -> int:
    """UNLINK every key of one data version (SCAN by its prefix, fences last); returns how many."""
    deleted = _delete_matching(client, keys.match_all, skip_prefix=keys.fence_prefix.encode(), batch=batch)
    return deleted + delete_fences(client, keys)


def _current(client, namespace: str) -> str | None:
    raw = client.get(current_key(namespace))
    return raw.decode() if raw is not None else None


def _redirect(client, namespace: str, version: str | None, state: str, nxt: str | None = None,
              only_if_next: str | None = None) -> None:
    """Set every fence of `version` to `state` (keeping its settings), if it has fences."""
    if version is None:
        return
    keys = KeySpace(namespace=namespace, version=version)
    fence = read_fence(client, keys)
    if fence is None or (only_if_next is not None and fence.next != only_if_next):
        return
    write_fences(client, keys, fence.to(state, nxt))


def abandon_version(client, namespace: str, version: str) -> int:
    """Remove an unfinished load's version, and stop sending live appends to it; returns keys deleted."""
    current = _current(client, namespace)
    if current == version:  # it was switched to after all (a lost reply): it is the live one
        client.hdel(loading_key(namespace), version)
        return 0
    _redirect(client, namespace, current, "S", only_if_next=version)
    keys = KeySpace(namespace=namespace, version=version)
    if current is not None and read_fence(client, keys) is not None:
        write_fences(client, keys, read_fence(client, keys).to("R", current))
    deleted = delete_version(client, keys)
    client.hdel(loading_key(namespace), version)
    return deleted


def retire_version(client, namespace: str, version: str, successor: str) -> int:
    """Point the version's appends at `successor`, then delete its keys (fences last)."""
    _redirect(client, namespace, version, "R", successor)
    deleted = delete_version(client, KeySpace(namespace=namespace, version=version))
    client.hdel(retiring_key(namespace), version)
    return deleted


class LoadInProgressError(ValueError):
    """Another load into the namespace is running: two at once lose live events."""


class LoadRemovedError(StoreError):
    """This load's unfinished version was removed by another load that took it for dead."""


_HOST = socket.gethostname()


def _owner() -> dict:
    return {"host": _HOST, "pid": os.getpid()}


def _running(state: dict, now: float, stale_after_s: float) -> bool:
    """Whether the load that wrote `state` may still be running: it made progress within
    `stale_after_s` and, when it ran on this machine, its process is alive (a killed load on
    this machine is known dead at once; one on another machine after `stale_after_s`)."""
    return now - float(state.get("heartbeat", 0)) <= stale_after_s and _owner_alive(state.get("owner"))


def _owner_alive(owner) -> bool:
    """False only for a process of this machine that has exited; another machine's is assumed alive."""
    if isinstance(owner, dict) and owner.get("host") == _HOST and isinstance(owner.get("pid"), int):
        return pid_alive(owner["pid"])
    return True


def _retire_leftovers(client, namespace: str) -> None:
    """Delete versions a load replaced but was stopped (Ctrl-C, kill) before deleting."""
    current, now = _current(client, namespace), time.time()
    for raw_version, raw in client.hgetall(retiring_key(namespace)).items():
        version = raw_version.decode()
        try:
            due = json.loads(raw)
            successor, due_at, owner = str(due["successor"]), float(due["due_at"]), due.get("owner")
        except (ValueError, KeyError, TypeError, AttributeError):
            successor, due_at, owner = raw.decode(errors="replace"), 0.0, None
        if version == current:  # switched back to since (not by us): keep it
            client.hdel(retiring_key(namespace), version)
            continue
        if due_at > now and _owner_alive(owner):  # a running load's grace period: readers may still be on it
            continue
        logger.info("deleting data version %s of %s, replaced by an interrupted load", version, namespace)
        retire_version(client, namespace, version, successor)


def _claim(client, namespace: str, fingerprint, resume: bool, stale_after_s: float) -> tuple[str, dict]:
    """(version, state): an unfinished load of the same data to resume, else a fresh version.

    `fingerprint(wait)` names this load's data (waiting for it only when there is an
    unfinished load to compare with). Unfinished loads of other data whose progress is
    older than `stale_after_s` are dead and removed; younger ones may still be running and
    are left alone. A load killed before its fingerprint was recorded cannot be resumed.
    """
    now = time.time()
    current = _current(client, namespace)
    found: tuple[str, dict] | None = None
    running: tuple[str, float] | None = None  # another load that may be running: refused
    entries = client.hgetall(loading_key(namespace))
    mine = fingerprint(wait=bool(entries))
    for raw_version, raw_state in sorted(entries.items()):
        version = raw_version.decode()
        try:
            state = json.loads(raw_state)
        except ValueError:
            state = {}
        if version == current:
            client.hdel(loading_key(namespace), version)
        elif _running(state, now, stale_after_s):  # of any data: joining or racing it loses events
            running = version, now - float(state.get("heartbeat", 0))
        elif resume and found is None and mine is not None and state.get("fingerprint") == mine:
            found = version, state
        else:
            logger.warning("removing the unfinished load of data version %s of %s (its process has exited, or no "
                           "progress for %.0f s)", version, namespace, now - float(state.get("heartbeat", 0)))
            abandon_version(client, namespace, version)
    if running is not None:  # two loads at once: the live version's fences follow one, and events are lost
        raise LoadInProgressError(
            f"another load into namespace {namespace!r} (data version {running[0]}) is running (progress "
            f"{running[1]:.0f} s ago); two loads at once would lose live events: wait for it to finish (a load "
            f"killed on another machine counts as dead after {stale_after_s:.0f} s without progress)"
        )
    _retire_leftovers(client, namespace)
    if found is not None:
        version, state = found
        state.update(owner=_owner(), heartbeat=now)  # ours now: others see a running load
        client.hset(loading_key(namespace), version, json.dumps(state))
        return version, state
    version = str(client.incr(seq_key(namespace)))
    state = {"fingerprint": mine, "users_done": 0, "heartbeat": now, "started_at": now, "owner": _owner()}
    client.hset(loading_key(namespace), version, json.dumps(state))
    return version, state


def merge_pending(client, keys: KeySpace, batch: int = 500) -> list[int]:
    """Apply the events parked while `keys.version` was loading (it must be sealed); returns the users.

    The users come from the per-slot sets the script fills while parking (one SMEMBERS
    per slot, pipelined), not from a SCAN of the whole keyspace.
    """
    tags = slot_tags()
    pipe = client.pipeline(transaction=False)
    for tag in tags:
        pipe.smembers(keys.pending_users(tag))
    users = sorted({int(u) for members in pipe.execute() for u in members})
    if not users:
        return []
    client.script_load(APPEND_LUA)
    for a in range(0, len(users), batch):
        pipe = client.pipeline(transaction=False)
        for uid in users[a : a + batch]:
            tag = user_fence_tag(uid)
            pipe.execute_command("EVALSHA", APPEND_SHA, 5, keys.user(uid), keys.event_ids(uid), keys.pending(uid),
                                 keys.fence(tag), keys.pending_users(tag), "merge", 0, b"", PENDING_TTL_S, uid)
        pipe.execute()
    pipe = client.pipeline(transaction=False)
    for tag in tags:
        pipe.unlink(keys.pending_users(tag))
    pipe.execute()
    return users


def load_log(
    client,
    log: BehaviourLog,
    *,
    namespace: str = "din",
    max_history: int = DEFAULT_MAX_HISTORY,
    keep_old: bool = False,
    progress: bool = False,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    grace_s: float = DEFAULT_GRACE_S,
    profile_fields: Sequence[str] | None = None,
    user_ttl_s: int = 0,
    id_window: int = DEFAULT_ID_WINDOW,
    id_ttl_s: int = DEFAULT_ID_TTL_S,
    resume: bool = True,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> LoadReport:
    """Write `log` as a new data version of `namespace` and make it the current one.

    `user_ttl_s` > 0: a user's keys expire that long after the load or their last live
    append. `resume`: continue an unfinished (killed) load of the same data and options.
    """
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be at least 1, got {chunk_users}")
    if user_ttl_s < 0 or id_ttl_s < 0 or id_window < 1:
        raise ValueError("user_ttl_s and id_ttl_s must be >= 0 and id_window >= 1")
    t0 = time.perf_counter()
    placeholder = None  # the empty version this load made current, when the store had none
    # numpy, Arrow and hashlib release the GIL: the ads and the data's hash use the other core.
    # The hash is only needed to match an unfinished load, so it may finish during the writes.
    pool = ThreadPoolExecutor(2)
    log_hash = pool.submit(_data_hash, log)
    ads = pool.submit(group_ads, log)
    pool.shutdown(wait=False)
    grouped = group_histories(log, max_history, profile_fields)
    ad_ids, ad_values = ads.result()
    if grouped.user_id.size == 0:
        raise ValueError(f"behaviour log {log.name!r} has no users: nothing to load (the current data stays)")
    settings = {
        "max_history": int(max_history), "profile_fields": list(grouped.profile_fields), "chunk_users": chunk_users,
        "user_ttl_s": int(user_ttl_s), "id_window": int(id_window), "id_ttl_s": int(id_ttl_s),
    }

    def fingerprint(wait: bool = True) -> str | None:
        if not wait and not log_hash.done():
            return None
        return load_fingerprint(log_hash.result(), grouped, settings)

    t_prepared = time.perf_counter()
    version, state = _claim(client, namespace, fingerprint, resume, stale_after_s)
    keys = KeySpace(namespace=namespace, version=version)
    fence = Fence("L", None, int(max_history), len(grouped.profile_fields), int(user_ttl_s), int(id_window), int(id_ttl_s))
    columns = [np.asarray(c, dtype=np.int64) for c in (log.item_id, log.cate_id, log.timestamp)]
    n_users = grouped.user_id.size
    start = min(int(state.get("users_done", 0)), n_users) // chunk_users * chunk_users
    if start:
        logger.info("resuming the load of data version %s at user %d of %d", version, start, n_users)
    total_bytes = 0
    switched = False
    bar = tqdm(
        total=n_users, initial=start, unit="users", unit_scale=True, file=sys.stderr, disable=not progress,
        desc=f"load {namespace} v{version}", dynamic_ncols=True,
    )
    try:
        write_fences(client, keys, fence)
        previous_live = _current(client, namespace)
        if previous_live is None:  # the first load: live events during it need a version to land in now
            empty = Fence("N", version, int(max_history), 0, int(user_ttl_s), int(id_window), int(id_ttl_s))
            previous_live, created = _new_empty_version(client, namespace, empty)
            placeholder = previous_live if created else None  # an appender's empty version is a normal predecessor
        _redirect(client, namespace, previous_live, "N", version)
        writer = None if is_cluster(client) else SetWriter(client)
        try:
            with bar:
                for a in range(start, n_users, chunk_users):
                    b = min(a + chunk_users, n_users)
                    rows = grouped.rows_of(a, b)
                    words = np.empty((rows.size, 3), dtype=np.int64)  # item_id, cate_id, timestamp
                    for j, col in enumerate(columns):
                        words[:, j] = col[rows]
                    data, offsets = encode_users(grouped.counts[a:b], words, grouped.profiles[a:b])
                    total_bytes += len(data)
                    user_keys = keys.users(grouped.user_id[a:b].tolist())
                    state.update(users_done=b, heartbeat=time.time())  # the resume point, and liveness
                    if state.get("fingerprint") is None:
                        state["fingerprint"] = fingerprint(wait=False)
                    if writer is not None:  # this chunk in flight (progress recorded after it), the previous confirmed
                        progress = format_command("HSET", loading_key(namespace), version, json.dumps(state))
                        writer.send(user_keys, data, offsets.tolist(), ex=user_ttl_s, then=progress)
                    else:
                        set_values(client, user_keys, data, offsets.tolist(), ex=user_ttl_s)
                        client.hset(loading_key(namespace), version, json.dumps(state))
                    bar.update(b - a)
            if writer is not None:
                writer.flush()
        finally:
            if writer is not None:
                writer.close()
        state.update(users_done=n_users, heartbeat=time.time(), fingerprint=fingerprint())
        client.hset(loading_key(namespace), version, json.dumps(state))
        ad_size = 8 + 8 * len(AD_FIELDS)
        for a in range(0, ad_ids.size, AD_CHUNK):
            b = min(a + AD_CHUNK, ad_ids.size)
            set_values(client, keys.ads(ad_ids[a:b].tolist()), encode_ads(ad_values[a:b]),
                       range(0, (b - a + 1) * ad_size, ad_size))
        meta = {
            "format_version": FORMAT_VERSION,
            "profile_fields": list(grouped.profile_fields),
            "ad_fields": list(AD_FIELDS),
            "max_history": int(max_history),
            "users": int(n_users),
            "ads": int(ad_ids.size),
            "events": grouped.events,
            "user_ttl_s": int(user_ttl_s),
            "event_id_window": int(id_window),
            "event_id_ttl_s": int(id_ttl_s),
            "source": log.name,
            "fingerprint": state["fingerprint"],
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        t_written = time.perf_counter()
        if read_fence(client, keys) is None:  # another load took us for dead and removed our version (fences too)
            raise LoadRemovedError(f"data version {version} of {namespace!r} was removed by another load while this "
                                   "one was stalled; run it again")
        client.set(keys.meta, json.dumps(meta))
        if placeholder is not None:  # its appends go to us only from now (parked, so merged below)
            _redirect(client, namespace, placeholder, "R", version)
        write_fences(client, keys, fence.to("S"))  # seal: from here appends apply directly ...
        merged = merge_pending(client, keys)  # ... and those parked before are merged
        previous = client.set(current_key(namespace), version, get=True)
        switched = True
        client.hdel(loading_key(namespace), version)
    except BaseException:
        if not switched:
            try:
                abandon_version(client, namespace, version)
            except redis.RedisError:  # the store is gone; the orphan is never current
                logger.warning("could not remove the partial data version %s of %s", version, namespace)
        raise
    previous = previous.decode() if isinstance(previous, bytes) else previous
    deleted = 0
    if previous is not None and previous != version:
        if previous != previous_live:  # another load switched meanwhile: it gets our appends too
            _redirect(client, namespace, previous, "N", version)
        if previous == placeholder:  # it held only the live events of the load's time, now merged
            _delete_placeholder(client, KeySpace(namespace=namespace, version=previous), merged)
            previous = None  # not a data version: the report says "first load", as before
        elif not keep_old:
            due = {"successor": version, "due_at": time.time() + grace_s, "owner": _owner()}  # a load stopped in the grace
            client.hset(retiring_key(namespace), previous, json.dumps(due))  # period leaves it to the next load
            try:
                time.sleep(grace_s)  # readers still on the old version re-check the pointer by then
            except BaseException:  # Ctrl-C: delete it now rather than leave it (readers re-read the pointer on a miss)
                retire_version(client, namespace, previous, version)
                raise
            deleted = retire_version(client, namespace, previous, version)
    return LoadReport(
        namespace=namespace,
        version=version,
        previous_version=previous,
        users=int(n_users),
        events=grouped.events,
        log_events=len(log),
        bytes=total_bytes,
        seconds=time.perf_counter() - t0,
        deleted_keys=deleted,
        ads=int(ad_ids.size),
        resumed_from=start,
        merged_users=len(merged),
        prepare_seconds=round(t_prepared - t0, 3),
        write_seconds=round(t_written - t_prepared, 3),
    )


def create_empty_version(client, namespace: str, fence: Fence) -> str:
    """A serving version with no users (the first live event into an empty store creates it).

    Returns the current version: ours, or the one another process made current first.
    """
    return _new_empty_version(client, namespace, fence.to("S"))[0]


def _delete_placeholder(client, keys: KeySpace, users: Sequence[int], batch: int = 1000) -> None:
    """Remove a first load's placeholder version without a SCAN of the (now full) keyspace.

    Its only users are those whose live events were also parked for the load (it was
    fenced `N` from birth and `R` before the seal), i.e. the merged ones.
    """
    client.unlink(keys.meta)
    for a in range(0, len(users), batch):
        pipe = client.pipeline(transaction=False)
        for uid in users[a : a + batch]:
            pipe.unlink(keys.user(uid), keys.event_ids(uid))  # one slot: same hash tag
        pipe.execute()
    delete_fences(client, keys)


def _new_empty_version(client, namespace: str, fence: Fence) -> tuple[str, bool]:
    """(the current version, whether it is the one made here): see create_empty_version.

    `fence` is its state: "S", or "N" to send its appends on to a loading version as well.
    """
    version = str(client.incr(seq_key(namespace)))
    keys = KeySpace(namespace=namespace, version=version)
    write_fences(client, keys, fence)
    meta = {
        "format_version": FORMAT_VERSION, "profile_fields": [], "ad_fields": list(AD_FIELDS),
        "max_history": fence.max_history, "users": 0, "ads": 0, "events": 0, "user_ttl_s": fence.user_ttl_s,
        "event_id_window": fence.id_window, "event_id_ttl_s": fence.id_ttl_s, "source": "live events",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    client.set(keys.meta, json.dumps(meta))
    if client.set(current_key(namespace), version, nx=True):
        return version, True
    delete_version(client, keys)
    return _current(client, namespace), False
