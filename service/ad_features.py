"""Candidates sent without `cate_id`: their category comes from the store's ad features.

The in-process cache (feature_store/ad_cache.py) answers first; the ads it misses are
fetched from the store in one round trip (one MGET, through the app's StoreGuard: the store
deadline, the circuit breaker and the store metrics, as for histories) and cached. An ad
nobody knows, or a store that fails or keeps no categories, leaves the category unknown
(UNKNOWN_ID: the model's unknown-id row, hashed fields too) and marks the response degraded only in the second case.
"""

from __future__ import annotations

import logging

import numpy as np

from feature_store.ad_cache import AdFeatureCache
from service.store_guard import StoreCallFailed, StoreGuard

log = logging.getLogger(__name__)
CATEGORY = "cate_id"


async def resolve_categories(
    cache: AdFeatureCache | None, store, guard: StoreGuard, item_ids: np.ndarray, cate_ids: np.ndarray,
    missing: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(cate_ids with the missing ones filled, unknown (N,) bool, degraded)."""
    unknown = missing.copy()
    if not missing.any():
        return cate_ids, unknown, False
    cate_ids = cate_ids.copy()
    want = np.flatnonzero(missing)
    ids = item_ids[want]
    hit = np.zeros(ids.size, dtype=bool)
    if cache is not None:
        hit, cached = cache.get(ids)
        cate_ids[want[hit]] = cached.column(CATEGORY)[hit]
        unknown[want[hit]] = ~cached.found[hit]
    if hit.all():
        return cate_ids, unknown, False
    if store is None:
        return cate_ids, unknown, True
    fetch = np.unique(ids[~hit])
    try:
        features = await guard.call("get_ad_features", lambda: store.get_ad_features(fetch))  # the guard's deadline
    except StoreCallFailed as e:  # slow, failing or circuit open: rank with unknown categories
        log.warning("ad features unavailable (%s: %s); unknown categories for %d ads", e.reason, e, fetch.size)
        return cate_ids, unknown, True
    if CATEGORY not in features.fields:  # the data version keeps other ad fields only: nothing to cache
        log.warning("the store's ad features are %s, without %r; unknown categories for %d ads", features.fields, CATEGORY, fetch.size)
        return cate_ids, unknown, True
    if cache is not None:
        cache.put(fetch, features)
    pos = np.searchsorted(fetch, ids[~hit])  # fetch is sorted (np.unique)
    rows = want[~hit]
    cate_ids[rows] = features.column(CATEGORY)[pos]
    unknown[rows] = ~features.found[pos]
    return cate_ids, unknown, False
