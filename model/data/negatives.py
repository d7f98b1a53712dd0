"""Negative sampling for logs of clicks only: K items per positive, never the positive's own.

Negatives follow the training popularity (they are drawn from a pool of training
behaviours), so a popular item is often drawn against itself. Clashes are redrawn from the
whole pool a few times, which settles almost all of them; the few left (an item holding a
large share of the pool) are drawn from the pool without that item.
"""

from __future__ import annotations

import numpy as np

from model.data.log import UntrainableLogError

REDRAWS = 8


def draw_negatives(pool_item: np.ndarray, positive_item: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k) indices into the pool, each pointing at an item other than its row's positive."""
    neg = rng.integers(0, pool_item.size, (positive_item.size, k))
    for _ in range(REDRAWS):
        clash = pool_item[neg] == positive_item[:, None]
        if not clash.any():
            return neg
        neg[clash] = rng.integers(0, pool_item.size, int(clash.sum()))
    clash = pool_item[neg] == positive_item[:, None]
    rows, cols = np.nonzero(clash)
    for item in np.unique(positive_item[rows]):
        others = np.flatnonzero(pool_item != item)
        if others.size == 0:
            raise UntrainableLogError(f"every training behaviour is item {int(item)}: no negative can differ from the positive")
        at = positive_item[rows] == item
        neg[rows[at], cols[at]] = others[rng.integers(0, others.size, int(at.sum()))]
    return neg
