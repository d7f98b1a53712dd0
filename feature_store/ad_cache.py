"""An in-process cache of ad features in front of the store: bounded, expiring, vectorised.

A direct-mapped table of `capacity` slots (a power of two): an ad id's slot is a
multiplicative hash of the id, so a lookup of N ads is a handful of numpy operations, no
per-ad Python. A newer entry overwrites whatever shared its slot (the size bound), and an
entry is used for at most `ttl_s` seconds after it was fetched (ads can change category
with a new `din load`). Ads the store does not know are cached as "not found" too, so an
unknown id does not cost a round trip on every request.
"""

from __future__ import annotations

import time

import numpy as np

from feature_store.base import AdFeatures

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: Fibonacci hashing


class AdFeatureCache:
    def __init__(self, size: int, ttl_s: float, fields: tuple[str, ...] = ("cate_id",)):
        if size < 1 or ttl_s <= 0:
            raise ValueError(f"ad cache needs size >= 1 and ttl_s > 0, got {size}, {ttl_s}")
        self.bits = max(1, int(np.ceil(np.log2(size))))
        self.capacity = 1 << self.bits
        self.ttl_s = float(ttl_s)
        self.fields = tuple(fields)
        self.hits = 0
        self.misses = 0
        self._ids = np.zeros(self.capacity, dtype=np.int64)
        self._found = np.zeros(self.capacity, dtype=bool)
        self._values = np.full((self.capacity, len(self.fields)), -1, dtype=np.int64)
        self._expires = np.zeros(self.capacity, dtype=np.float64)  # 0: empty slot

    def _slots(self, ad_ids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((ad_ids.view(np.uint64) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.intp)

    def get(self, ad_ids: np.ndarray, now: float | None = None) -> tuple[np.ndarray, AdFeatures]:
        """(hit (N,) bool, features of the hits; rows of misses are -1 / not found)."""
        ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
        now = time.monotonic() if now is None else now
        slots = self._slots(ids)
        hit = (self._ids[slots] == ids) & (self._expires[slots] > now)
        values = np.where(hit[:, None], self._values[slots], -1)
        found = hit & self._found[slots]
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += ids.size - n_hit
        return hit, AdFeatures(self.fields, found, values)

    def put(self, ad_ids: np.ndarray, features: AdFeatures, now: float | None = None) -> None:
        if features.fields != self.fields:  # a load changed the ad fields: start over
            self.__init__(self.capacity, self.ttl_s, features.fields)
        ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
        now = time.monotonic() if now is None else now
        slots = self._slots(ids)
        self._ids[slots] = ids
        self._found[slots] = features.found
        self._values[slots] = features.values
        self._expires[slots] = now + self.ttl_s

    def clear(self) -> None:
        self._expires[:] = 0.0
