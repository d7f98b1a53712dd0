"""A fixed-size uniform sample of a stream's rows, deterministic and vectorised (bottom-k).

Every row gets a pseudo-random key from its global position (`unit_interval` of
model/hashing.py, salted); the sample is the `k` rows with the smallest keys. That is a
uniform sample without replacement whatever the stream's length, it does not depend on
how the stream is cut into chunks, and memory is O(k). Used for the negative-sampling pool
of streamed training and for the quantiles of `din prepare`'s external sort.
"""

from __future__ import annotations

import numpy as np

from model.hashing import unit_interval


class BottomKSample:
    """Keep the `k` rows (columns of int64 values) with the smallest keys seen so far."""

    def __init__(self, k: int, salt: int, columns: tuple[str, ...]):
        if k < 1:
            raise ValueError(f"sample size must be >= 1, got {k}")
        self.k = int(k)
        self.salt = int(salt)
        self.columns = columns
        self._keys = np.zeros(0, np.float64)
        self._position = np.zeros(0, np.int64)
        self._values = {c: np.zeros(0, np.int64) for c in columns}

    def add(self, position: np.ndarray, **values: np.ndarray) -> None:
        """Offer rows at global stream `position`s (int64, unique over the stream)."""
        position = np.asarray(position, np.int64)
        keys = unit_interval(position, self.salt)
        vals = {c: np.asarray(values[c], np.int64) for c in self.columns}
        if self._keys.size >= self.k:  # full: only keys below the current k-th can enter
            enter = keys <= self._keys.max()
            keys, position, vals = keys[enter], position[enter], {c: v[enter] for c, v in vals.items()}
        keys = np.concatenate([self._keys, keys])
        pos = np.concatenate([self._position, position])
        vals = {c: np.concatenate([self._values[c], vals[c]]) for c in self.columns}
        if keys.size > self.k:
            # order by (key, position): ties on the key never make the result depend on chunking
            kth = np.partition(keys, self.k - 1)[self.k - 1]
            below = np.flatnonzero(keys < kth)
            at = np.flatnonzero(keys == kth)
            at = at[np.argsort(pos[at], kind="stable")][: self.k - below.size]
            keep = np.sort(np.concatenate([below, at]))
            keys, pos = keys[keep], pos[keep]
            vals = {c: v[keep] for c, v in vals.items()}
        self._keys, self._position, self._values = keys, pos, vals

    def __len__(self) -> int:
        return int(self._keys.size)

    def values(self) -> dict[str, np.ndarray]:
        """The sampled rows in stream order."""
        order = np.argsort(self._position, kind="stable")
        return {c: v[order] for c, v in self._values.items()}
