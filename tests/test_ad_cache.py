"""The in-process ad feature cache: hits, expiry, the size bound, negative entries."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.ad_cache import AdFeatureCache
from feature_store.base import AdFeatures


def features(found, cates) -> AdFeatures:
    return AdFeatures(("cate_id",), np.array(found, dtype=bool), np.array(cates, dtype=np.int64).reshape(-1, 1))


def test_hits_until_the_ttl_then_misses():
    cache = AdFeatureCache(size=1000, ttl_s=10.0)
    ids = np.array([7, 2**53 + 1, -3])
    cache.put(ids, features([True, True, False], [70, 5, -1]), now=100.0)
    hit, got = cache.get(np.array([-3, 7, 8, 2**53 + 1]), now=109.9)
    assert hit.tolist() == [True, True, False, True]
    assert got.found.tolist() == [False, True, False, True]  # -3: cached as "not in the store"
    assert got.column("cate_id").tolist() == [-1, 70, -1, 5]
    hit, _ = cache.get(ids, now=110.0)
    assert not hit.any()  # expired
    assert (cache.hits, cache.misses) == (3, 4)


def test_the_size_bound_evicts_by_slot():
    cache = AdFeatureCache(size=4, ttl_s=60.0)
    assert cache.capacity == 4
    ids = np.arange(1000, dtype=np.int64)
    cache.put(ids, features([True] * 1000, ids * 10), now=0.0)
    hit, got = cache.get(ids, now=1.0)
    assert 1 <= hit.sum() <= 4  # at most one id per slot survives
    assert (got.column("cate_id")[hit] == ids[hit] * 10).all()  # never another id's value


def test_a_change_of_ad_fields_starts_over():
    cache = AdFeatureCache(size=8, ttl_s=60.0)
    cache.put(np.array([1]), features([True], [10]), now=0.0)
    cache.put(np.array([2]), AdFeatures(("cate_id", "brand"), np.array([True]), np.array([[20, 3]])), now=0.0)
    hit, got = cache.get(np.array([1, 2]), now=1.0)
    assert hit.tolist() == [False, True] and got.fields == ("cate_id", "brand") and got.values[1].tolist() == [20, 3]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="size >= 1 and ttl_s > 0"):
        AdFeatureCache(size=0, ttl_s=1.0)
