"""A plain in-process backend: the store's rules written the obvious way, in Python lists.

For tests (the model the Redis store is checked against, tests/test_store_model.py) and
experiments without Redis. Not for serving: nothing is shared between processes.
Same rules as the Redis backend: newest first (largest timestamp; equal timestamps:
later arrival first), at most `max_history` per user, an event id already among the
user's last `id_window` new ids is not appended again, an event for an unknown user
creates the user.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from feature_store.base import AdFeatures, HistoryStore, StoreStats
from feature_store.events import AppendReport, EventBatch
from feature_store.loader import AD_FIELDS, DEFAULT_ID_WINDOW, DEFAULT_MAX_HISTORY, LoadReport, group_ads, group_histories
from feature_store.records import RECORD_SIZE, UserHistory, make_records
from model.data.log import BehaviourLog


@dataclass
class _User:
    records: list[tuple[int, int, int]] = field(default_factory=list)  # (item, cate, ts), newest first
    profile: list[int] = field(default_factory=list)
    ids: deque = field(default_factory=deque)  # recent new event ids, newest first


class InMemoryHistoryStore(HistoryStore):
    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY, id_window: int = DEFAULT_ID_WINDOW):
        self.max_history = max_history
        self.id_window = id_window
        self._users: dict[int, _User] = {}
        self._ads: dict[int, int] = {}
        self._profile_fields: tuple[str, ...] = ()
        self._version = 0

    @property
    def profile_fields(self) -> tuple[str, ...]:
        return self._profile_fields

    async def get_histories(self, user_ids: Sequence[int]) -> list[UserHistory | None]:
        out: list[UserHistory | None] = []
        for u in user_ids:
            user = self._users.get(int(u))
            if user is None:
                out.append(None)
                continue
            recs = user.records
            out.append(UserHistory(
                profile=np.asarray(user.profile, dtype=np.int64),
                records=make_records([r[0] for r in recs], [r[1] for r in recs], [r[2] for r in recs]),
            ))
        return out

    async def get_ad_features(self, ad_ids) -> AdFeatures:
        ids = np.asarray(ad_ids, dtype=np.int64).tolist()
        found = np.array([a in self._ads for a in ids], dtype=bool)
        values = np.array([[self._ads.get(a, -1)] for a in ids], dtype=np.int64).reshape(len(ids), 1)
        return AdFeatures(AD_FIELDS, found, values)

    async def append_events(self, events: EventBatch) -> AppendReport:
        applied = dups = 0
        users = set()
        for i in range(len(events)):
            uid, eid = int(events.user_id[i]), events.event_id[i]
            users.add(uid)
            user = self._users.setdefault(uid, _User(profile=[-1] * len(self._profile_fields)))
            if eid in user.ids:
                dups += 1
                continue
            applied += 1
            user.ids.appendleft(eid)
            while len(user.ids) > self.id_window:
                user.ids.pop()
            rec = (int(events.item_id[i]), int(events.cate_id[i]), int(events.timestamp[i]))
            pos = next((j for j, r in enumerate(user.records) if r[2] <= rec[2]), len(user.records))
            user.records.insert(pos, rec)
            del user.records[self.max_history :]
        return AppendReport(len(events), applied, dups, len(users), str(self._version))

    async def stats(self) -> StoreStats:
        n = len(self._users)
        value = sum(8 + 8 * len(u.profile) + RECORD_SIZE * len(u.records) for u in self._users.values())
        return StoreStats(
            namespace="memory", version=str(self._version), users=n, ads=len(self._ads), keys=n + len(self._ads),
            version_keys={"users": n, "ads": len(self._ads)}, bytes_per_user=value / n if n else 0.0,
            value_bytes_per_user=value / n if n else 0.0, memory_used=value,
        )

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def bulk_load(self, log: BehaviourLog, *, max_history: int = DEFAULT_MAX_HISTORY, keep_old: bool = False,
                  progress: bool = False, profile_fields: Sequence[str] | None = None, user_ttl_s: int = 0) -> LoadReport:
        g = group_histories(log, max_history, profile_fields)
        self.max_history = max_history
        self._profile_fields = g.profile_fields
        users: dict[int, _User] = {}
        end = 0
        for i, (uid, count) in enumerate(zip(g.user_id.tolist(), g.counts.tolist())):
            rows = g.rows[end : end + count].tolist()
            end += count
            recs = [(int(log.item_id[r]), int(log.cate_id[r]), int(log.timestamp[r])) for r in rows]
            users[uid] = _User(records=recs, profile=g.profiles[i].tolist())
        ads, cates = group_ads(log)
        self._users, self._ads = users, dict(zip(ads.tolist(), cates[:, 0].tolist()))
        previous, self._version = self._version, self._version + 1
        return LoadReport(
            namespace="memory", version=str(self._version), previous_version=str(previous) if previous else None,
            users=len(users), events=g.events, log_events=len(log), bytes=0, seconds=0.0, deleted_keys=0,
            ads=len(self._ads),
        )
