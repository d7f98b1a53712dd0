"""The seams between trainer, bundle and service: tensor names, feature spec, vocabularies.

Torch-free on purpose: the service imports this module, and its image has no torch.
Both the exporter and the scorer name ONNX inputs through the functions below, so the two
sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------
# Rows of every embedding table. Raw ids are int64 end to end; rows are int64 too.
PAD_ROW = 0  # padding: a history slot with no behaviour; contributes exactly 0
UNK_ROW = 1  # an id the vocabulary has never seen
FIRST_ID_ROW = 2
# The raw id that says "not known" (e.g. an ad the store has no category for): UNK_ROW in
# every field, vocabulary or hashed; never a row of its own.
UNKNOWN_ID = int(np.iinfo(np.int64).min)

# ---------------------------------------------------------------------------------------
# ONNX scoring graph (user-batched): U users, T behaviour slots, N candidates; every one
# at least 1 (a user without history is one PAD_ROW slot; the service never scores an
# empty request). ONNX Runtime's Gemm and broadcasting kernels refuse some zero-sized
# operands, so the exported graph is only promised for U, T, N >= 1.
CAND_USER = "cand_user"  # int64 [N]: which of the U users each candidate belongs to
CTR = "ctr"  # float32 [N]
ATTENTION = "attention"  # float32 [N, T]; zeros for models without attention
OUTPUT_NAMES = (CTR, ATTENTION)


def hist_input(field_name: str) -> str:
    """int64 [U, T] rows of one behaviour field, newest first, PAD_ROW after the end."""
    return f"hist_{field_name}"


def cand_input(field_name: str) -> str:
    """int64 [N] rows of one ad field."""
    return f"cand_{field_name}"


def profile_input(field_name: str) -> str:
    """int64 [U] rows of one user-profile field."""
    return f"profile_{field_name}"


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """What the model eats, independent of any dataset's column names.

    `sequence_fields` describe both a behaviour and a candidate ad (item id, category id):
    the paper concatenates their embeddings so behaviours and ads share one space.
    """

    sequence_fields: tuple[str, ...] = ("item_id", "cate_id")
    profile_fields: tuple[str, ...] = ()
    vocab_sizes: dict[str, int] = field(default_factory=dict)  # rows, PAD and UNK included
    max_history: int = 50

    def input_names(self) -> list[str]:
        return (
            [hist_input(f) for f in self.sequence_fields]
            + [profile_input(f) for f in self.profile_fields]
            + [cand_input(f) for f in self.sequence_fields]
            + [CAND_USER]
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["sequence_fields"] = list(self.sequence_fields)
        d["profile_fields"] = list(self.profile_fields)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FeatureSpec":
        return cls(
            sequence_fields=tuple(d["sequence_fields"]),
            profile_fields=tuple(d.get("profile_fields", ())),
            vocab_sizes={k: int(v) for k, v in d["vocab_sizes"].items()},
            max_history=int(d["max_history"]),
        )


class Vocabulary:
    """Raw id -> embedding row, vectorised: a sorted int64 array searched with numpy.

    Row i + FIRST_ID_ROW belongs to ids[i]; anything not in `ids` maps to UNK_ROW.

    Ids that are non-negative and compact (catalogue ids, not hashes: at most
    DENSE_SPAN_PER_ID slots per id) are also indexed by a direct table, `rows[id - lo]`: one
    memory access per id instead of a ~17-step binary search whose probes miss the caches on
    a serving core (the search was 6% of the event loop's CPU per /rank, docs/benchmarks.md).
    """

    __slots__ = ("ids", "_lo", "_rows")

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("a vocabulary is a 1-D array of raw ids")
        if ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
            raise ValueError("vocabulary ids must be sorted and unique")
        self.ids = ids
        self._lo, self._rows = _dense_index(ids)

    @classmethod
    def fit(cls, raw_ids: np.ndarray) -> "Vocabulary":
        ids = np.unique(np.asarray(raw_ids, dtype=np.int64))
        return cls(ids[ids != UNKNOWN_ID])  # reserved: it stays UNK_ROW

    @property
    def num_rows(self) -> int:
        return int(self.ids.size) + FIRST_ID_ROW

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw_ids, dtype=np.int64)
        if self._rows is not None:  # offsets wrap modulo 2**64: an id below lo lands far past the table
            offset = raw.view(np.uint64) - np.uint64(self._lo)
            return self._rows[np.minimum(offset, self._rows.size - 1)].astype(np.int64)
        if self.ids.size == 0:
            return np.full(raw.shape, UNK_ROW, dtype=np.int64)
        pos = np.searchsorted(self.ids, raw)
        pos_clipped = np.minimum(pos, self.ids.size - 1)
        found = self.ids[pos_clipped] == raw
        return np.where(found, pos_clipped + FIRST_ID_ROW, UNK_ROW).astype(np.int64)


DENSE_SPAN_PER_ID = 4  # a direct table may hold up to this many slots per known id ...
DENSE_MAX_SLOTS = 1 << 24  # ... and at most this many (64 MB of int32)


def _dense_index(ids: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(lo, rows): rows[id - lo] is id's row for lo <= id < lo + span, and rows[span] = UNK_ROW.

    None for ids that are negative, huge (offsets must not wrap back into the table) or sparse.
    """
    if ids.size == 0 or ids[0] < 0 or ids[-1] >= 1 << 62:
        return 0, None
    lo, span = int(ids[0]), int(ids[-1] - ids[0]) + 1
    if span > DENSE_SPAN_PER_ID * ids.size or span > DENSE_MAX_SLOTS:
        return 0, None
    rows = np.full(span + 1, UNK_ROW, dtype=np.int32)
    rows[ids - lo] = np.arange(FIRST_ID_ROW, FIRST_ID_ROW + ids.size, dtype=np.int32)
    return lo, rows
