"""Live behaviour events: a batch of them, read from a file or an HTTP body, grouped per user.

An event is `(user_id, item_id, cate_id, timestamp, event_id)`: ids and the timestamp
are int64 (the timestamp in the same unit as the loaded log's), `event_id` is a string of
1..128 bytes chosen by the sender and unique per event, so that a retried batch can be
recognised and is not appended twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.records import make_records
from model.data.log import LogFormatError, read_table

EVENT_COLUMNS = ("user_id", "item_id", "cate_id", "timestamp", "event_id")
MAX_EVENT_ID_BYTES = 128


@dataclass(frozen=True)
class EventBatch:
    """Events in arrival order: int64 columns and one event id (bytes) per event."""

    user_id: np.ndarray
    item_id: np.ndarray
    cate_id: np.ndarray
    timestamp: np.ndarray
    event_id: tuple[bytes, ...]

    def __post_init__(self) -> None:
        n = len(self.user_id)
        for name in ("item_id", "cate_id", "timestamp", "event_id"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"events: column {name} has {len(getattr(self, name))} values, user_id has {n}")
        for i, e in enumerate(self.event_id):
            if not 1 <= len(e) <= MAX_EVENT_ID_BYTES:
                raise ValueError(f"events: event_id of event {i} is {len(e)} bytes; it must be 1..{MAX_EVENT_ID_BYTES}")

    @classmethod
    def from_columns(cls, user_id, item_id, cate_id, timestamp, event_id: Sequence[str | bytes | int]) -> "EventBatch":
        ids = tuple(e if isinstance(e, bytes) else str(e).encode() for e in event_id)
        return cls(*(np.asarray(c, dtype=np.int64) for c in (user_id, item_id, cate_id, timestamp)), ids)

    def __len__(self) -> int:
        return len(self.user_id)

    def slice(self, a: int, b: int) -> "EventBatch":
        return EventBatch(self.user_id[a:b], self.item_id[a:b], self.cate_id[a:b], self.timestamp[a:b], self.event_id[a:b])

    def by_user(self) -> list[tuple[int, bytes, tuple[bytes, ...]]]:
        """Per user: (user_id, packed records in arrival order, event ids): what one script call takes."""
        if len(self) == 0:
            return []
        order = np.argsort(self.user_id, kind="stable")  # arrival order kept within a user
        uid = self.user_id[order]
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], uid.size]
        blob = make_records(self.item_id[order], self.cate_id[order], self.timestamp[order]).tobytes()
        ids = [self.event_id[i] for i in order.tolist()]
        return [
            (int(uid[a]), blob[24 * a : 24 * b], tuple(ids[a:b]))
            for a, b in zip(starts.tolist(), ends.tolist())
        ]


@dataclass(frozen=True)
class AppendReport:
    """What one append call did; `version` is the live data version as the appender knows it afterwards."""

    events: int  # events in the request
    applied: int  # appended (not duplicates)
    duplicates: int  # event ids already seen for that user: not appended again
    users: int
    version: str

    def to_json(self) -> dict:
        return {
            "events": self.events, "applied": self.applied, "duplicates": self.duplicates,
            "users": self.users, "data_version": self.version,
        }


def read_events(path: str | Path) -> EventBatch:
    """Events from CSV or Parquet with columns user_id, item_id, cate_id, timestamp, event_id."""
    path = Path(path)
    table = read_table(
        path, EVENT_COLUMNS,
        f"an events file needs {', '.join(EVENT_COLUMNS)} (event_id: a unique string per event, so a re-sent "
        "file is not appended twice)",
        column_types={"event_id": pa.string()},
    )
    cols = []
    for name in EVENT_COLUMNS[:4]:
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise LogFormatError(f"{path}: column {name!r} must be integer, found {col.type}")
        if col.null_count:
            raise LogFormatError(f"{path}: column {name!r} has {col.null_count} empty values")
        cols.append(pc.cast(col, pa.int64()).to_numpy())
    ev = table.column("event_id")
    if ev.null_count:
        raise LogFormatError(f"{path}: column 'event_id' has {ev.null_count} empty values")
    ids = pc.cast(ev, pa.string()).to_pylist()
    try:
        return EventBatch.from_columns(*cols, ids)
    except ValueError as e:
        raise LogFormatError(f"{path}: {e}") from None
