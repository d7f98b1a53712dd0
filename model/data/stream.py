"""Streamed samples: blocks of a sorted Parquet log -> samples -> shard batches, in bounded memory.

Samples are built the way model/data/samples.py builds them (history = the user's
behaviours strictly before the target, newest first, at most `max_history`; negatives from
the training popularity; a labelled log's history holds only clicks), but one block at a
time: a block is a run of whole users (stream_plan.py), so every history lies inside it.

Order, and who sees what (the same for any number of processes):

- an epoch permutes the blocks (seeded by seed and epoch) and lays their training samples
  end to end; that sequence is cut into `shards` equal contiguous ranges (virtual shards);
- a shard reads the blocks of its range, in windows of about `shuffle_window` samples,
  shuffles each window (seeded by seed, epoch, shard, window) and yields batches of
  `batch_size // shards` samples (the first `batch_size % shards` shards one more);
- global step g is the union of every shard's batch g. A process owns shards
  `rank, rank + world, ...` and a data-loader worker a subset of those, so every training
  sample is used exactly once per epoch, and the global batches do not depend on how many
  processes or workers share the shards.
- position: after g global steps every shard has used exactly its first g batches, so a
  resumed run skips them by arithmetic, reading only the window it resumes in.

Numpy and pyarrow only: the torch-side loader is model/data/stream_loader.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from model.contract import CAND_USER, PAD_ROW, cand_input, hist_input
from model.data.negatives import draw_negatives
from model.data.stream_plan import SEQUENCE_FIELDS, TRAIN, StreamPlan, batch_columns, log_columns, user_split
from model.regularization import sequence_counts, window_coverage

DEFAULT_SHARDS = 8
DEFAULT_SHUFFLE_WINDOW = 1 << 16  # samples shuffled together in one shard (memory: shards x this)


# ---------------------------------------------------------------------------------------
# Reading row ranges.
class LogReader:
    """Rows [row0, row1) of a Parquet log, read by row group in record batches.

    Small row groups (`din prepare` writes them) keep reads close to the rows asked for; a
    file with huge row groups still works, decoding up to the end of the range in its group.
    """

    def __init__(self, plan: StreamPlan):
        self.path = plan.path
        self.columns = log_columns(self.path)
        self.read_rows = plan.config.read_rows
        self._pf = pq.ParquetFile(self.path)
        sizes = [self._pf.metadata.row_group(i).num_rows for i in range(self._pf.metadata.num_row_groups)]
        self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def read(self, row0: int, row1: int) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        first = int(np.searchsorted(self._group_start, row0, side="right")) - 1
        for g in range(max(first, 0), self._group_start.size - 1):
            at = int(self._group_start[g])
            if at >= row1:
                break
            for batch in self._pf.iter_batches(batch_size=self.read_rows, row_groups=[g], columns=list(self.columns)):
                lo, hi = max(row0 - at, 0), min(row1 - at, batch.num_rows)
                if hi > lo:
                    cols = batch_columns(batch.slice(lo, hi - lo), self.path, self.columns)
                    for c in self.columns:
                        parts[c].append(cols[c])
                at += batch.num_rows
                if at >= row1:
                    break
        return {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in parts.items()}


# ---------------------------------------------------------------------------------------
# Samples of blocks (histories as index ranges) and materialised batches.
@dataclass
class SampleBatch:
    """Materialised samples: the scoring graph's inputs (U = N = n) plus targets and identity."""

    hist: dict[str, np.ndarray]  # field -> int64 (n, T), newest first, PAD_ROW after the end
    cand: dict[str, np.ndarray]  # field -> int64 (n,)
    label: np.ndarray  # float32 (n,)
    user_id: np.ndarray  # int64 (n,)
    sample_id: np.ndarray  # int64 (n,): event row * samples_per_event + k (k = 0: the event itself)

    def __len__(self) -> int:
        return int(self.label.size)

    def named_inputs(self) -> dict[str, np.ndarray]:
        """int64 arrays under the contract's ONNX input names (no profile fields)."""
        out = {hist_input(f): v for f, v in self.hist.items()}
        out.update({cand_input(f): v for f, v in self.cand.items()})
        out[CAND_USER] = np.arange(len(self), dtype=np.int64)
        return out

    def to_dict(self) -> dict[str, np.ndarray]:
        """Flat numpy dict (what data-loader workers send); `from_dict` inverts it."""
        d = {f"hist:{f}": v for f, v in self.hist.items()}
        d.update({f"cand:{f}": v for f, v in self.cand.items()})
        d.update(label=self.label, user_id=self.user_id, sample_id=self.sample_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SampleBatch":
        d = {k: np.asarray(v) for k, v in d.items()}
        return cls(
            hist={k[5:]: v for k, v in d.items() if k.startswith("hist:")},
            cand={k[5:]: v for k, v in d.items() if k.startswith("cand:")},
            label=d["label"],
            user_id=d["user_id"],
            sample_id=d["sample_id"],
        )

    @staticmethod
    def concat(batches: list["SampleBatch"], fields: tuple[str, ...] = SEQUENCE_FIELDS) -> "SampleBatch":
        """Samples of several batches in order; histories padded to the longest T (at least 1)."""
        t = max([1, *(b.hist[fields[0]].shape[1] for b in batches)])

        def pad(a: np.ndarray) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, t - a.shape[1])), constant_values=PAD_ROW) if a.shape[1] < t else a

        return SampleBatch(
            hist={f: np.concatenate([pad(b.hist[f]) for b in batches] or [np.zeros((0, t), np.int64)]) for f in fields},
            cand={f: np.concatenate([b.cand[f] for b in batches] or [np.zeros(0, np.int64)]) for f in fields},
            label=np.concatenate([b.label for b in batches] or [np.zeros(0, np.float32)]),
            user_id=np.concatenate([b.user_id for b in batches] or [np.zeros(0, np.int64)]),
            sample_id=np.concatenate([b.sample_id for b in batches] or [np.zeros(0, np.int64)]),
        )


def empty_batch(fields: tuple[str, ...] = SEQUENCE_FIELDS) -> SampleBatch:
    return SampleBatch.concat([], fields)


@dataclass
class BlockSamples:
    """Samples of a block (or of several, concatenated), histories as ranges into `behaviour_rows`."""

    behaviour_rows: dict[str, np.ndarray]  # field -> int64 (B,) rows of the behaviours
    hist_start: np.ndarray  # int64 (S,): first behaviour of the sample's user
    hist_end: np.ndarray  # int64 (S,): one past the last behaviour strictly before the target
    cand: dict[str, np.ndarray]  # field -> int64 (S,) candidate rows
    label: np.ndarray  # float32 (S,)
    user_id: np.ndarray  # int64 (S,)
    sample_id: np.ndarray  # int64 (S,)

    def __len__(self) -> int:
        return int(self.label.size)

    def select(self, index: np.ndarray) -> "BlockSamples":
        return BlockSamples(
            self.behaviour_rows,
            self.hist_start[index],
            self.hist_end[index],
            {f: v[index] for f, v in self.cand.items()},
            self.label[index],
            self.user_id[index],
            self.sample_id[index],
        )

    def take(self, index: np.ndarray, max_history: int) -> SampleBatch:
        """Gather the samples at `index`; T = the longest (truncated) history among them, at least 1."""
        index = np.asarray(index, np.int64)
        start, end = self.hist_start[index], self.hist_end[index]
        length = np.minimum(end - start, max_history)  # (n,)
        t = max(1, int(length.max(initial=0)))
        slots = np.arange(t)
        valid = slots[None, :] < length[:, None]  # (n, T)
        pos = np.where(valid, end[:, None] - 1 - slots[None, :], 0)  # (n, T) newest first
        hist = {}
        for f, rows in self.behaviour_rows.items():
            hist[f] = np.where(valid, rows[pos] if rows.size else PAD_ROW, PAD_ROW).astype(np.int64)
        return SampleBatch(
            hist=hist,
            cand={f: v[index] for f, v in self.cand.items()},
            label=self.label[index],
            user_id=self.user_id[index],
            sample_id=self.sample_id[index],
        )

    @staticmethod
    def concat(parts: list["BlockSamples"]) -> "BlockSamples":
        offsets = np.cumsum([0, *(p.behaviour_rows[SEQUENCE_FIELDS[0]].size for p in parts)])
        return BlockSamples(
            behaviour_rows={f: np.concatenate([p.behaviour_rows[f] for p in parts]) for f in SEQUENCE_FIELDS},
            hist_start=np.concatenate([p.hist_start + o for p, o in zip(parts, offsets)]),
            hist_end=np.concatenate([p.hist_end + o for p, o in zip(parts, offsets)]),
            cand={f: np.concatenate([p.cand[f] for p in parts]) for f in SEQUENCE_FIELDS},
            label=np.concatenate([p.label for p in parts]),
            user_id=np.concatenate([p.user_id for p in parts]),
            sample_id=np.concatenate([p.sample_id for p in parts]),
        )


def history_bounds(user: np.ndarray, ts: np.ndarray, behaviour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per event of a (user, time)-sorted run: [start, end) of its history among the behaviours.

    History = the same user's behaviours with a timestamp strictly before the event's, so
    events at the same time never see each other (as model/data/samples.py).
    """
    n = user.size
    pos = np.arange(n)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_time = new_user | np.r_[True, ts[1:] != ts[:-1]]
    user_first = np.maximum.accumulate(np.where(new_user, pos, 0))  # first row of the user
    time_first = np.maximum.accumulate(np.where(new_time, pos, 0))  # first row of its (user, time)
    behaviours_before = np.concatenate([[0], np.cumsum(behaviour)])  # behaviours among rows [0, i)
    return behaviours_before[user_first].astype(np.int64), behaviours_before[time_first].astype(np.int64)


def block_samples(plan: StreamPlan, block: int, cols: dict[str, np.ndarray], split: int) -> BlockSamples:
    """The samples of `split` in block `block` (its rows in `cols`), in row order.

    Negatives are drawn per block from a generator seeded by (seed, block), for every event
    of the block before the split is selected: a block's samples are the same whichever
    process reads it, in whichever epoch.
    """
    config = plan.config
    row0 = int(plan.block_rows[block])
    user, ts = cols["user_id"], cols["timestamp"]
    n = user.size
    behaviour = (cols["label"] == 1) if plan.has_label else np.ones(n, bool)
    start, end = history_bounds(user, ts, behaviour)
    behaviour_rows = {f: plan.mappings[f].lookup(cols[f][behaviour]) for f in SEQUENCE_FIELDS}
    ev = np.flatnonzero(user_split(user, config.split, config.seed) == split)
    rows = row0 + np.arange(n, dtype=np.int64)
    if plan.has_label:
        take = ev
        cand_item, cand_cate = cols["item_id"][ev], cols["cate_id"][ev]
        label = cols["label"][ev].astype(np.float32)
        sample_id = rows[ev]
    else:
        k = config.negatives
        rng = np.random.default_rng([config.seed, 11, block])
        neg = draw_negatives(plan.pool_item, cols["item_id"], k, rng)[ev]  # (n, K) indices into the pool
        take = np.repeat(ev, 1 + k)  # each positive followed by its negatives
        cand_item = np.concatenate([cols["item_id"][ev][:, None], plan.pool_item[neg]], axis=1).reshape(-1)
        cand_cate = np.concatenate([cols["cate_id"][ev][:, None], plan.pool_cate[neg]], axis=1).reshape(-1)
        label = np.tile(np.r_[1.0, np.zeros(k)], ev.size).astype(np.float32)
        sample_id = (rows[take] * (1 + k) + np.tile(np.arange(1 + k), ev.size)).astype(np.int64)
    return BlockSamples(
        behaviour_rows=behaviour_rows,
        hist_start=start[take],
        hist_end=end[take],
        cand={
            "item_id": plan.mappings["item_id"].lookup(cand_item),
            "cate_id": plan.mappings["cate_id"].lookup(cand_cate),
        },
        label=label,
        user_id=user[take].astype(np.int64),
        sample_id=sample_id,
    )


# ---------------------------------------------------------------------------------------
# Shards: who trains on what, in which order.
@dataclass(frozen=True)
class Segment:
    block: int
    start: int  # first training sample of the block this segment uses
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardLayout:
    """One epoch's assignment of training samples to virtual shards, and their batch sizes."""

    segments: tuple[tuple[Segment, ...], ...]  # per shard, in stream order
    batch_sizes: tuple[int, ...]  # per shard
    sizes: tuple[int, ...]  # training samples per shard

    @property
    def shards(self) -> int:
        return len(self.segments)

    def shard_batches(self, shard: int) -> int:
        return -(-self.sizes[shard] // self.batch_sizes[shard]) if self.batch_sizes[shard] else 0

    @property
    def steps(self) -> int:
        """Global steps in the epoch: the longest shard's batch count."""
        return max(self.shard_batches(v) for v in range(self.shards))

    def global_batch_size(self, step: int) -> int:
        """Samples in global step `step` (0-based): every shard's batch `step`."""
        return int(sum(max(0, min(b, s - step * b)) for b, s in zip(self.batch_sizes, self.sizes)))


def shard_layout(plan: StreamPlan, epoch: int, shards: int, batch_size: int) -> ShardLayout:
    """Permute the blocks (seed, epoch) and cut their training samples into `shards` equal ranges."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if batch_size < shards:
        raise ValueError(f"batch size {batch_size} is smaller than the number of data shards {shards}")
    perm = np.random.default_rng([plan.config.seed, 21, epoch]).permutation(plan.num_blocks)
    counts = plan.block_samples[perm, TRAIN]
    cum = np.concatenate([[0], np.cumsum(counts)])
    total = int(cum[-1])
    bounds = [v * total // shards for v in range(shards + 1)]
    segments = []
    for v in range(shards):
        lo, hi = bounds[v], bounds[v + 1]
        segs = []
        first = int(np.searchsorted(cum, lo, side="right")) - 1
        for i in range(max(first, 0), perm.size):
            if cum[i] >= hi:
                break
            a, b = max(lo, int(cum[i])), min(hi, int(cum[i + 1]))
            if b > a:
                segs.append(Segment(int(perm[i]), a - int(cum[i]), b - int(cum[i])))
        segments.append(tuple(segs))
    sizes = tuple(bounds[v + 1] - bounds[v] for v in range(shards))
    batch_sizes = tuple(batch_size // shards + (1 if v < batch_size % shards else 0) for v in range(shards))
    return ShardLayout(tuple(segments), batch_sizes, sizes)


def windows(segments: tuple[Segment, ...], window: int) -> list[list[Segment]]:
    """Consecutive segments grouped into shuffle windows of at least `window` samples (the last may be less)."""
    out: list[list[Segment]] = []
    current: list[Segment] = []
    size = 0
    for s in segments:
        current.append(s)
        size += s.size
        if size >= window:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def shard_batches(
    plan: StreamPlan,
    reader: LogReader,
    layout: ShardLayout,
    shard: int,
    epoch: int,
    *,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    skip_batches: int = 0,
) -> Iterator[SampleBatch]:
    """Shard `shard`'s batches of the epoch, from batch `skip_batches` on (exactly as if not skipped)."""
    b = layout.batch_sizes[shard]
    max_history = plan.config.max_history
    skip = min(skip_batches * b, layout.sizes[shard])  # samples already used
    carry: SampleBatch | None = None
    for w, segs in enumerate(windows(layout.segments[shard], shuffle_window)):
        n_w = sum(s.size for s in segs)
        if skip >= n_w:
            skip -= n_w
            continue
        parts = []
        for s in segs:
            cols = reader.read(int(plan.block_rows[s.block]), int(plan.block_rows[s.block + 1]))
            parts.append(block_samples(plan, s.block, cols, TRAIN).select(np.arange(s.start, s.stop)))
        samples = BlockSamples.concat(parts)
        order = np.random.default_rng([plan.config.seed, 23, epoch, shard, w]).permutation(n_w)[skip:]
        skip = 0
        i = 0
        if carry is not None:
            need = b - len(carry)
            carry = SampleBatch.concat([carry, samples.take(order[:need], max_history)])
            i = need
            if len(carry) == b:
                yield carry
                carry = None
        while carry is None and i + b <= order.size:
            yield samples.take(order[i : i + b], max_history)
            i += b
        if carry is None and i < order.size:
            carry = samples.take(order[i:], max_history)
    if carry is not None and len(carry):
        yield carry


def eval_blocks(plan: StreamPlan, split: int, part: int, parts: int) -> list[int]:
    """Blocks with samples of `split` that process/worker `part` of `parts` evaluates."""
    blocks = np.flatnonzero(plan.block_samples[:, split] > 0)
    return [int(b) for b in blocks[part::parts]]


def eval_batches(
    plan: StreamPlan, reader: LogReader, block: int, split: int, batch_size: int
) -> Iterator[SampleBatch]:
    """The `split` samples of one block in row order, `batch_size` at a time."""
    cols = reader.read(int(plan.block_rows[block]), int(plan.block_rows[block + 1]))
    samples = block_samples(plan, block, cols, split)
    for i in range(0, len(samples), batch_size):
        yield samples.take(np.arange(i, min(i + batch_size, len(samples))), plan.config.max_history)


def sample_counts(plan: StreamPlan, reader: LogReader, progress: bool = False) -> dict[str, np.ndarray]:
    """n_j of mini-batch aware regularisation, per field: occurrences of each row in the
    TRAINING samples, counted exactly as the in-memory trainer counts them
    (model/regularization.py `id_counts`): each candidate (negatives included: a block's
    negatives are the same in every epoch) once, each behaviour once per sample whose
    truncated history window holds it. Per id input (hist_f, cand_f); one pass over the
    training blocks; float64 [rows].
    """
    fields = plan.spec.sequence_fields
    counts = {name: np.zeros(plan.spec.vocab_sizes[f], np.float64) for f in fields for name in (hist_input(f), cand_input(f))}
    blocks = np.flatnonzero(plan.block_samples[:, TRAIN] > 0)
    for block in tqdm(blocks, desc="n_j for --reg mba", unit="block", disable=not progress, leave=False):
        cols = reader.read(int(plan.block_rows[block]), int(plan.block_rows[block + 1]))
        s = block_samples(plan, int(block), cols, TRAIN)
        n_beh = next(iter(s.behaviour_rows.values())).size
        coverage = window_coverage(s.hist_start, s.hist_end, plan.config.max_history, n_beh)
        for f in fields:
            in_histories, as_candidate = sequence_counts(s.behaviour_rows[f], coverage, s.cand[f], plan.spec.vocab_sizes[f])
            counts[hist_input(f)] += in_histories
            counts[cand_input(f)] += as_candidate
    for c in counts.values():
        c[PAD_ROW] = 0.0
    return counts
