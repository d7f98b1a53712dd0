"""One bounded-memory pass over a sorted Parquet log: everything streamed training needs up front.

Streamed training never holds the log. Before the first step it reads the log once, in
record batches, and keeps only what is O(vocabulary) or O(1):

- sortedness: the log must be sorted by (user_id, timestamp), so a user's events are
  contiguous and histories can be built block by block; the pass checks it across batch
  boundaries and names the first offending row (`din prepare` sorts a log that is not);
- the split: users go to train / validation / test by a seeded hash of their id (no
  global user list needed, the same user always lands in the same split);
- id -> row maps fitted on the training users (vocabularies), or hashed buckets, and the
  per-row counts over the training events (how often each row's ids occur; mini-batch aware
  regularisation's n_j counts samples instead, model/data/stream.py `sample_counts`);
- the negative-sampling pool: a uniform sample of training events (bottom-k), so
  negatives follow training popularity as in model/data/samples.py;
- blocks: row ranges cut at user boundaries once they hold `block_events` events, with
  their sample counts per split. Blocks are the unit of sharding (model/data/stream.py).

The plan is saved next to the run's checkpoints, so a resumed run does not redo the pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.contract import UNKNOWN_ID, FeatureSpec, Vocabulary
from model.data.log import REQUIRED_COLUMNS, LogFormatError, NotEnoughUsersError, UntrainableLogError, check_clicks, int_column
from model.data.reservoir import BottomKSample
from model.hashing import HashedIds, IdMapping, row_counts, unit_interval

SEQUENCE_FIELDS = ("item_id", "cate_id")
TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_SALT, _POOL_SALT = 1, 2  # salts of the user-split hash and the negative pool's keys
PLAN_ARRAYS = "stream_plan.npz"
PLAN_JSON = "stream_plan.json"


@dataclass(frozen=True)
class StreamConfig:
    max_history: int = 50
    negatives: int = 1  # per positive, for logs without labels
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test users
    seed: int = 0
    hash_buckets: int | None = None  # per id field; None = vocabularies of the training users
    block_events: int = 32_768  # events per block (blocks end at a user boundary)
    negative_pool: int = 1 << 20  # training events kept to draw negatives from
    read_rows: int = 65_536  # rows per Parquet record batch

    def __post_init__(self) -> None:
        for name in ("max_history", "negatives", "block_events", "negative_pool", "read_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"hash buckets must be >= 1, got {self.hash_buckets}")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1.0) > 1e-9:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {self.split}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StreamConfig":
        return cls(**{**d, "split": tuple(d["split"])})


def user_split(user_ids: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """int8 split (TRAIN, VALIDATION, TEST) of each user id: a seeded hash, stable per user."""
    u = unit_interval(np.asarray(user_ids, np.int64), salt=(seed << 8) | _SPLIT_SALT)
    return np.where(u < fractions[0], TRAIN, np.where(u < fractions[0] + fractions[1], VALIDATION, TEST)).astype(np.int8)


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _IdCounter:
    """Distinct raw ids of a stream with their counts; merges buffered chunks, O(distinct ids)."""

    def __init__(self, flush_rows: int = 1 << 22):
        self.ids = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._flush_rows = flush_rows

    def add(self, ids: np.ndarray) -> None:
        self._buffer.append(np.asarray(ids, np.int64))
        self._buffered += ids.size
        if self._buffered >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        new, cnt = np.unique(np.concatenate(self._buffer), return_counts=True)
        ids, inv = np.unique(np.concatenate([self.ids, new]), return_inverse=True)
        self.counts = np.bincount(inv, weights=np.concatenate([self.counts, cnt]), minlength=ids.size).astype(np.int64)
        self.ids = ids
        self._buffer, self._buffered = [], 0


@dataclass
class StreamPlan:
    source: dict  # path, size, mtime_ns of the Parquet log
    config: StreamConfig
    spec: FeatureSpec
    mappings: dict[str, IdMapping]  # field -> Vocabulary or HashedIds
    row_counts: dict[str, np.ndarray]  # field -> int64 [rows]: occurrences in the training events
    block_rows: np.ndarray  # int64 [blocks + 1]: block b is rows [block_rows[b], block_rows[b + 1])
    block_samples: np.ndarray  # int64 [blocks, 3]: samples of each split in each block
    pool_item: np.ndarray  # raw ids of the negative pool (training events)
    pool_cate: np.ndarray
    has_label: bool
    events: int
    users: tuple[int, int, int]  # per split
    fingerprint: str  # sha256 of the streamed columns, first 16 hex digits

    @property
    def path(self) -> Path:
        return Path(self.source["path"])

    @property
    def num_blocks(self) -> int:
        return int(self.block_samples.shape[0])

    def num_samples(self, split: int) -> int:
        return int(self.block_samples[:, split].sum())

    @property
    def samples_per_event(self) -> int:
        return 1 if self.has_label else 1 + self.config.negatives

    def describe(self) -> str:
        s = [self.num_samples(i) for i in range(3)]
        return (
            f"{self.events} events in {self.num_blocks} blocks; users train {self.users[0]}, validation "
            f"{self.users[1]}, test {self.users[2]}; samples train {s[0]}, validation {s[1]}, test {s[2]}"
        )

    def check_source(self) -> None:
        """The log on disk is the one the plan was made from (size and mtime)."""
        now = _file_identity(self.path) if self.path.is_file() else None
        if now is None or now["size"] != self.source["size"] or now["mtime_ns"] != self.source["mtime_ns"]:
            raise LogFormatError(
                f"{self.path} changed (or vanished) since the run's data plan was made; "
                "start a new run instead of resuming this one"
            )

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "block_rows": self.block_rows,
            "block_samples": self.block_samples,
            "pool_item": self.pool_item,
            "pool_cate": self.pool_cate,
        }
        mapping_json = {}
        for f, m in self.mappings.items():
            arrays[f"counts_{f}"] = self.row_counts[f]
            if isinstance(m, HashedIds):
                mapping_json[f] = m.to_json()
            else:
                arrays[f"vocab_{f}"] = m.ids
                mapping_json[f] = {"kind": "vocab"}
        tmp = directory / f".{PLAN_ARRAYS}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(directory / PLAN_ARRAYS)
        meta = {
            "source": self.source,
            "config": self.config.to_json(),
            "spec": self.spec.to_json(),
            "mappings": mapping_json,
            "has_label": self.has_label,
            "events": self.events,
            "users": list(self.users),
            "fingerprint": self.fingerprint,
        }
        tmp = directory / f".{PLAN_JSON}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / PLAN_JSON)

    @classmethod
    def load(cls, directory: Path) -> "StreamPlan":
        directory = Path(directory)
        meta = json.loads((directory / PLAN_JSON).read_text())
        with np.load(directory / PLAN_ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        mappings: dict[str, IdMapping] = {}
        for f, entry in meta["mappings"].items():
            mappings[f] = HashedIds.from_json(entry) if entry["kind"] == "hash" else Vocabulary(arrays[f"vocab_{f}"])
        return cls(
            source=meta["source"],
            config=StreamConfig.from_json(meta["config"]),
            spec=FeatureSpec.from_json(meta["spec"]),
            mappings=mappings,
            row_counts={f: arrays[f"counts_{f}"] for f in mappings},
            block_rows=arrays["block_rows"],
            block_samples=arrays["block_samples"],
            pool_item=arrays["pool_item"],
            pool_cate=arrays["pool_cate"],
            has_label=bool(meta["has_label"]),
            events=int(meta["events"]),
            users=tuple(meta["users"]),
            fingerprint=meta["fingerprint"],
        )


def log_columns(path: Path) -> tuple[str, ...]:
    """The columns streamed training reads; a LogFormatError names what is missing."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LogFormatError(
            f"{path}: cannot be read as Parquet ({e}); streamed training reads Parquet logs: "
            f"`din prepare {path} SORTED.parquet` converts and sorts one"
        ) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise LogFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; a behaviour log needs "
            f"{', '.join(REQUIRED_COLUMNS)} and may have label"
        )
    return (*REQUIRED_COLUMNS, "label") if "label" in schema.names else REQUIRED_COLUMNS


def batch_columns(batch: pa.RecordBatch, path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A record batch as int64 numpy columns, validated like `read_log` does."""
    table = pa.Table.from_batches([batch])
    out = {c: int_column(table, c, path) for c in columns}
    if "label" in out and not np.isin(out["label"], (0, 1)).all():
        raise LogFormatError(f"{path}: column 'label' must be 0 or 1")
    return out


def unsorted_row(user: np.ndarray, ts: np.ndarray, prev: tuple[int, int] | None) -> int | None:
    """Index of the first row whose (user_id, timestamp) is below its predecessor's, or None."""
    if prev is not None and user.size and (user[0] < prev[0] or (user[0] == prev[0] and ts[0] < prev[1])):
        return 0
    bad = (user[1:] < user[:-1]) | ((user[1:] == user[:-1]) & (ts[1:] < ts[:-1]))
    return int(np.argmax(bad)) + 1 if bad.any() else None


def plan_stream(path: str | Path, config: StreamConfig = StreamConfig(), progress: bool = False) -> StreamPlan:
    """Read `path` once in record batches; memory O(vocabulary + pool + blocks), not O(events)."""
    path = Path(path)
    if not path.is_file():
        raise LogFormatError(f"{path}: no such file")
    columns = log_columns(path)
    has_label = "label" in columns
    pf = pq.ParquetFile(path)
    hashed = config.hash_buckets is not None
    counters = {f: _IdCounter() for f in SEQUENCE_FIELDS}
    bucket_counts = {f: np.zeros(config.hash_buckets + 2, np.int64) for f in SEQUENCE_FIELDS} if hashed else {}
    pool = BottomKSample(config.negative_pool, salt=(config.seed << 8) | _POOL_SALT, columns=("item", "cate"))
    digest = hashlib.sha256()
    users = np.zeros(3, np.int64)
    cuts = [0]  # block boundaries (rows)
    block_events = []  # [blocks] of (3,) event counts per split
    current = np.zeros(3, np.int64)  # events per split of the open block
    prev: tuple[int, int] | None = None
    row = clicks = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=pf.metadata.num_rows, unit="event", desc="plan", leave=False)
    try:  # an error mid-read closes the bar first, so its message starts a line of its own
        for batch in pf.iter_batches(batch_size=config.read_rows, columns=list(columns)):
            cols = batch_columns(batch, path, columns)
            user, ts = cols["user_id"], cols["timestamp"]
            n = user.size
            if n == 0:
                continue
            bad = unsorted_row(user, ts, prev)
            if bad is not None:
                before = prev if bad == 0 else (int(user[bad - 1]), int(ts[bad - 1]))
                raise LogFormatError(
                    f"{path}: not sorted by (user_id, timestamp) at row {row + bad} "
                    f"(user {int(user[bad])}, time {int(ts[bad])} after user {before[0]}, time {before[1]}); "
                    f"streamed training needs each user's events together and in time order: "
                    f"run `din prepare {path} SORTED.parquet` once"
                )
            for c in columns:
                digest.update(np.ascontiguousarray(cols[c]).tobytes())
            split = user_split(user, config.split, config.seed)
            new_user = np.r_[prev is None or user[0] != prev[0], user[1:] != user[:-1]]
            users += np.bincount(split[new_user], minlength=3)

            # blocks: cut at the first user start at or after `block_events` events into the block
            starts = np.flatnonzero(new_user)
            local_cut = 0
            while True:
                need = cuts[-1] + config.block_events - row  # first local row where the block may end
                k = np.searchsorted(starts, max(need, cuts[-1] - row + 1))  # never an empty block
                if k >= starts.size:
                    break
                cut = int(starts[k])
                current += np.bincount(split[local_cut:cut], minlength=3)
                block_events.append(current)
                current = np.zeros(3, np.int64)
                cuts.append(row + cut)
                local_cut = cut
            current += np.bincount(split[local_cut:], minlength=3)

            train = split == TRAIN
            for f in SEQUENCE_FIELDS:
                if hashed:
                    row_counts(HashedIds(config.hash_buckets), cols[f][train], bucket_counts[f])
                else:
                    counters[f].add(cols[f][train])
            if has_label:
                clicks += int(np.count_nonzero(cols["label"] == 1))
            else:
                pool.add(row + np.flatnonzero(train), item=cols["item_id"][train], cate=cols["cate_id"][train])
            prev = (int(user[-1]), int(ts[-1]))
            row += n
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if row == 0:
        raise LogFormatError(f"{path}: the behaviour log is empty; nothing to train on")
    if has_label:
        check_clicks(str(path), clicks, row)
    block_events.append(current)
    cuts.append(row)
    events_per_split = np.stack(block_events)  # (blocks, 3)

    if hashed:
        mappings: dict[str, IdMapping] = {f: HashedIds(config.hash_buckets) for f in SEQUENCE_FIELDS}
        counts = bucket_counts
    else:
        mappings, counts = {}, {}
        for f in SEQUENCE_FIELDS:
            counters[f].flush()
            keep = counters[f].ids != UNKNOWN_ID  # reserved for "not known": UNK_ROW, never a row (Vocabulary.fit)
            mappings[f] = Vocabulary(counters[f].ids[keep])
            unknown = counters[f].counts[~keep].sum()
            counts[f] = np.concatenate([[0, unknown], counters[f].counts[keep]]).astype(np.int64)  # PAD, UNK, ids
    per_event = 1 if has_label else 1 + config.negatives
    plan = StreamPlan(
        source=_file_identity(path),
        config=config,
        spec=FeatureSpec(
            sequence_fields=SEQUENCE_FIELDS,
            profile_fields=(),
            vocab_sizes={f: m.num_rows for f, m in mappings.items()},
            max_history=config.max_history,
        ),
        mappings=mappings,
        row_counts=counts,
        block_rows=np.asarray(cuts, np.int64),
        block_samples=events_per_split * per_event,
        pool_item=pool.values()["item"],
        pool_cate=pool.values()["cate"],
        has_label=has_label,
        events=row,
        users=tuple(int(u) for u in users),
        fingerprint=digest.hexdigest()[:16],
    )
    for i, name in enumerate(SPLIT_NAMES):
        if plan.num_samples(i) == 0:
            raise NotEnoughUsersError(f"{path} gave an empty {name} split ({plan.users[i]} users); it needs more users")
    if not has_label and np.unique(plan.pool_item).size < 2:
        raise UntrainableLogError(
            f"{path}: the training events hold {np.unique(plan.pool_item).size} distinct item(s); "
            "negatives are drawn from other items, so it needs at least 2"
        )
    return plan
