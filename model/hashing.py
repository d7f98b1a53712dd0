"""Hashed ids: raw int64 id -> one of a fixed number of embedding rows, no vocabulary.

The paper trains on 0.6 billion goods ids; a vocabulary that size does not fit a table, and
ids first seen after training all collapse onto UNK_ROW. Hashing bounds every table at
`buckets + FIRST_ID_ROW` rows and gives an unseen id a row that training has shaped (the
row its bucket shares with seen ids).

The function is SplitMix64's finaliser (Steele, Lea, Flood 2014; the `splitmix64` used to
seed xoshiro generators) on the id's two's-complement bits, with uint64 wraparound:

    z  = id + 0x9E3779B97F4A7C15
    z  = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z  = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z ^= z >> 31
    row = FIRST_ID_ROW + z mod buckets

Trainer and service both call `HashedIds.lookup` (numpy, vectorised), so the two sides
cannot disagree. Torch-free: the service imports it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from model.contract import FIRST_ID_ROW, UNK_ROW, UNKNOWN_ID

HASH_FUNCTION = "splitmix64"
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


class IdMapping(Protocol):
    """What trainer and scorer need from a field's id -> row map (a Vocabulary or HashedIds)."""

    @property
    def num_rows(self) -> int: ...

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray: ...


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """uint64 mix of int64 ids (any shape); negative ids use their two's-complement bits."""
    z = np.array(ids, dtype=np.int64, copy=True).view(np.uint64)  # same bits, no overflow
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as intended
        z += _GAMMA
        z = (z ^ (z >> _S30)) * _MUL1
        z = (z ^ (z >> _S27)) * _MUL2
        z ^= z >> _S31
    return z


def unit_interval(ids: np.ndarray, salt: int = 0) -> np.ndarray:
    """A deterministic float64 in [0, 1) per id (top 53 bits of the mix); `salt` decorrelates uses."""
    ids = np.asarray(ids, dtype=np.int64)
    if salt:
        ids = ids ^ np.int64(splitmix64(np.array([salt], np.int64))[0].view(np.int64))
    return (splitmix64(ids) >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


class HashedIds:
    """Raw id -> FIRST_ID_ROW + splitmix64(id) mod buckets. PAD_ROW stays padding; UNK_ROW is UNKNOWN_ID's."""

    __slots__ = ("buckets",)

    def __init__(self, buckets: int):
        buckets = int(buckets)
        if buckets < 1:
            raise ValueError(f"hash buckets must be >= 1, got {buckets}")
        self.buckets = buckets

    @property
    def num_rows(self) -> int:
        return self.buckets + FIRST_ID_ROW

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray:
        z = splitmix64(raw_ids)
        rows = (z % np.uint64(self.buckets)).astype(np.int64) + FIRST_ID_ROW
        return np.where(np.asarray(raw_ids) == UNKNOWN_ID, UNK_ROW, rows)  # "not known" is no bucket's

    def to_json(self) -> dict:
        """The bundle.json entry of a hashed field."""
        return {"kind": "hash", "function": HASH_FUNCTION, "buckets": self.buckets}

    @classmethod
    def from_json(cls, entry: dict) -> "HashedIds":
        function = entry.get("function")
        if function != HASH_FUNCTION:
            raise ValueError(f"hash function {function!r} is not known (this code implements {HASH_FUNCTION!r})")
        return cls(int(entry["buckets"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashedIds) and other.buckets == self.buckets

    def __hash__(self) -> int:
        return hash((HASH_FUNCTION, self.buckets))

    def __repr__(self) -> str:
        return f"HashedIds(buckets={self.buckets})"


def row_counts(mapping: IdMapping, raw_ids: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Occurrences per embedding row, int64 [num_rows].

    With a HashedIds mapping the count is per bucket: the ids sharing a row share it. Pass `counts` to accumulate
    over a stream of chunks (it is updated in place and returned).
    """
    rows = mapping.lookup(np.asarray(raw_ids, dtype=np.int64))
    chunk = np.bincount(rows.ravel(), minlength=mapping.num_rows).astype(np.int64)
    if counts is None:
        return chunk
    if counts.shape != (mapping.num_rows,):
        raise ValueError(f"counts has shape {counts.shape}, the mapping has {mapping.num_rows} rows")
    counts += chunk
    return counts
