"""The behaviour log: the one in-memory shape every data source is turned into.

Columns are int64 numpy arrays named after what they are, not after any dataset:
`user_id, item_id, cate_id, timestamp` and an optional `label` (1 = click). User profile
ids (gender, age bucket, ...) live in an optional side table keyed by user id.

Two optional columns serve protocols that fix their own samples:
`is_behaviour` (bool; which events enter histories, see `behaviour_mask`: False marks an
impression, e.g. an Amazon sampled negative, that is a candidate but never history; the
MovieLens loader marks every rating True) and `split` (int8: 0 train, 1 validation, 2 test;
None = the sample builder splits by user; the DIN Amazon protocol sets it).

Torch-free: the feature store's bulk loader reads logs too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("user_id", "item_id", "cate_id", "timestamp")
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


class LogFormatError(ValueError):
    """A behaviour log that cannot be read; the message names the file and the column."""


class UntrainableLogError(ValueError):
    """A readable log that no model can be trained on; the message says what it lacks."""


def check_clicks(name: str, clicks: int, events: int) -> None:
    """A labelled log needs clicks (histories and positives) and non-clicks (its negatives)."""
    if clicks == 0:
        raise UntrainableLogError(f"behaviour log {name!r} has no clicks (label = 1): nothing can be a history or a positive")
    if clicks == events:
        raise UntrainableLogError(
            f"behaviour log {name!r} has only clicks (label = 1): no negative to learn from; "
            "drop the label column to have negatives sampled from the items"
        )


class NotEnoughUsersError(UntrainableLogError):
    """A readable log whose users do not fill the train, validation and test splits."""


@dataclass
class UserProfiles:
    """Profile ids per user: `fields[name][i]` belongs to `user_id[i]`."""

    user_id: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    def lookup(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Profile ids for `user_ids`; users without a profile get -1 (an unknown id)."""
        order = np.argsort(self.user_id, kind="stable")
        sorted_users = self.user_id[order]
        pos = np.searchsorted(sorted_users, user_ids)
        pos_c = np.minimum(pos, max(sorted_users.size - 1, 0))
        found = (sorted_users[pos_c] == user_ids) if sorted_users.size else np.zeros(len(user_ids), bool)
        return {name: np.where(found, col[order][pos_c], -1).astype(np.int64) for name, col in self.fields.items()}


@dataclass
class BehaviourLog:
    user_id: np.ndarray
    item_id: np.ndarray
    cate_id: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray | None = None
    profiles: UserProfiles | None = None
    name: str = "log"
    is_behaviour: np.ndarray | None = None  # bool; None = clicks (with label) or every event
    split: np.ndarray | None = None  # int8 SPLIT_*; None = split by user downstream

    def __post_init__(self) -> None:
        n = len(self.user_id)
        for col in ("item_id", "cate_id", "timestamp"):
            if len(getattr(self, col)) != n:
                raise LogFormatError(f"column {col} has {len(getattr(self, col))} rows, user_id has {n}")
        for col in ("label", "is_behaviour", "split"):
            values = getattr(self, col)
            if values is not None and len(values) != n:
                raise LogFormatError(f"column {col} has {len(values)} rows, user_id has {n}")

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def profile_fields(self) -> tuple[str, ...]:
        return tuple(self.profiles.fields) if self.profiles else ()

    def behaviour_mask(self) -> np.ndarray:
        """Which events enter a history: THE rule, shared by the trainer's samples and the feature store.

        With an `is_behaviour` column, exactly the events it marks (MovieLens: every rating,
        liked or not, since the user chose to watch it; Amazon: the reviews, never the sampled
        negatives). Without it: the clicks (`label == 1`) of a labelled log, every event of an
        unlabelled one. Serving must see exactly the histories the model was trained on.
        """
        if self.is_behaviour is not None:
            return np.asarray(self.is_behaviour, dtype=bool).copy()
        if self.label is not None:
            return np.asarray(self.label) == 1
        return np.ones(len(self), dtype=bool)

    def sorted_by_user_time(self) -> "BehaviourLog":
        """Events grouped by user, oldest first within a user (ties keep file order)."""
        order = np.lexsort((self.timestamp, self.user_id))
        return BehaviourLog(
            user_id=self.user_id[order],
            item_id=self.item_id[order],
            cate_id=self.cate_id[order],
            timestamp=self.timestamp[order],
            label=None if self.label is None else self.label[order],
            profiles=self.profiles,
            name=self.name,
            is_behaviour=None if self.is_behaviour is None else self.is_behaviour[order],
            split=None if self.split is None else self.split[order],
        )

    def fingerprint(self) -> str:
        """A short content hash, written into the bundle so a model names its data."""
        import hashlib

        h = hashlib.sha256()
        for col in (self.user_id, self.item_id, self.cate_id, self.timestamp):
            h.update(np.ascontiguousarray(col).tobytes())
        for col in (self.label, self.is_behaviour, self.split):
            if col is not None:
                h.update(np.ascontiguousarray(col).tobytes())
        return h.hexdigest()[:16]

    def to_table(self) -> pa.Table:
        cols = {c: getattr(self, c) for c in REQUIRED_COLUMNS}
        if self.label is not None:
            cols["label"] = self.label
        return pa.table(cols)


_INT64_LIMIT = 2.0**63  # exactly representable: ids as doubles must lie in [-2^63, 2^63)


def int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_null(col.type) and len(col) == 0:  # a CSV with a header and no rows
        return np.zeros(0, np.int64)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise LogFormatError(f"{path}: column {name!r} must be integer, found {col.type}")
    if col.null_count:
        raise LogFormatError(f"{path}: column {name!r} has {col.null_count} empty values")
    if pa.types.is_floating(col.type):  # e.g. a CSV column pyarrow read as double
        arr = col.to_numpy()
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LogFormatError(f"{path}: column {name!r} must hold whole numbers")
        if arr.size and not (-_INT64_LIMIT <= arr.min() and arr.max() < _INT64_LIMIT):
            raise LogFormatError(f"{path}: column {name!r} holds values outside int64 (ids up to 2^63 - 1)")
        return arr.astype(np.int64)
    try:
        return pc.cast(col, pa.int64()).to_numpy()
    except pa.ArrowInvalid as e:  # an unsigned 64-bit id above 2^63 - 1
        raise LogFormatError(f"{path}: column {name!r} holds values outside int64 ({e})") from None


def read_table(path: str | Path, required: Sequence[str], what: str, column_types: dict | None = None) -> pa.Table:
    """A CSV/TSV or Parquet file as an Arrow table, with every `required` column present.

    Errors name the file and what to fix; `what` says what the file should be ("a behaviour
    log needs ...").
    """
    path = Path(path)
    if path.is_dir():
        raise LogFormatError(f"{path}: a directory, not a log file")
    if not path.is_file():
        raise LogFormatError(f"{path}: no such file")
    text = path.suffix.lower() in (".csv", ".tsv", ".txt")
    try:
        if text:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            convert = pacsv.ConvertOptions(column_types=column_types or {})
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=convert)
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LogFormatError(f"{path}: cannot be read as {'CSV' if text else 'Parquet'} ({e})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise LogFormatError(f"{path}: missing column(s) {', '.join(missing)}; {what}")
    return table


def read_log(path: str | Path) -> BehaviourLog:
    """Read a behaviour log from Parquet or CSV (`user_id, item_id, cate_id, timestamp[, label]`)."""
    path = Path(path)
    table = read_table(
        path, REQUIRED_COLUMNS, f"a behaviour log needs {', '.join(REQUIRED_COLUMNS)} and may have label"
    )
    label = None
    if "label" in table.column_names:
        label = int_column(table, "label", path)
        if not np.isin(label, (0, 1)).all():
            raise LogFormatError(f"{path}: column 'label' must be 0 or 1")
        label = label.astype(np.int8)
    return BehaviourLog(
        *(int_column(table, c, path) for c in REQUIRED_COLUMNS), label=label, name=path.name
    )


def write_log(log: BehaviourLog, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = log.to_table()
    if path.suffix.lower() == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path
