"""AUC, GAUC and logloss as sums, so processes evaluating different blocks can add them up.

Streamed evaluation never holds a split's predictions. Each process adds, per block:
- logloss: the sum of per-sample losses and the sample count;
- GAUC: sum over users of impressions_u * AUC_u and of impressions_u (a block holds whole
  users, so each user's AUC is exact; model/metrics.py's per_user_auc computes it);
- AUC: per-class counts of scores in `AUC_BINS` equal bins of the logit over
  [-LOGIT_RANGE, LOGIT_RANGE]; pairs in one bin count one half, as ties do. The result is
  within about 1e-5 of the exact AUC (tested against model/metrics.py).
The sums are reduced over processes with one all-reduce; every process gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model.metrics import per_user_auc

AUC_BINS = 1 << 20
LOGIT_RANGE = 16.0  # float32 sigmoid saturates near here
_EPS = 1e-7  # logloss clipping, as model/metrics.py


class MetricSums:
    def __init__(self, bins: int = AUC_BINS):
        self.bins = bins
        self.scalars = np.zeros(4, np.float64)  # logloss sum, samples, sum n_u * auc_u, sum n_u
        self.hist = np.zeros((2, bins), np.int64)  # [negatives, positives] per logit bin

    def update(self, labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> None:
        """Add samples; every user's samples must arrive in one call (per-user AUC)."""
        y = np.asarray(labels).astype(bool).ravel()
        p = np.asarray(probs, np.float64).ravel()
        if y.size == 0:
            return
        pc = np.clip(p, _EPS, 1.0 - _EPS)
        self.scalars[0] += -np.sum(np.where(y, np.log(pc), np.log1p(-pc)))
        self.scalars[1] += y.size
        _, user_auc, weight = per_user_auc(y, p, users)
        self.scalars[2] += float(np.sum(weight * user_auc))
        self.scalars[3] += float(np.sum(weight))
        with np.errstate(divide="ignore"):
            logit = np.log(p) - np.log1p(-p)
        scaled = (np.clip(logit, -LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) / (2 * LOGIT_RANGE)
        b = np.minimum((scaled * self.bins).astype(np.int64), self.bins - 1)
        self.hist += np.stack([np.bincount(b[~y], minlength=self.bins), np.bincount(b[y], minlength=self.bins)])

    def reduce(self, all_reduce_sum: Callable[[np.ndarray], np.ndarray]) -> "MetricSums":
        """Sum over processes with the given all-reduce (model.distributed.all_reduce_sum)."""
        out = MetricSums(self.bins)
        out.scalars = all_reduce_sum(self.scalars)
        out.hist = all_reduce_sum(self.hist)
        return out

    def auc(self) -> float:
        neg, pos = self.hist[0].astype(np.float64), self.hist[1].astype(np.float64)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)) / (n_pos * n_neg))

    def result(self) -> dict[str, float]:
        loss, n, wauc, w = self.scalars
        return {
            "auc": self.auc(),
            "gauc": float(wauc / w) if w > 0 else float("nan"),
            "logloss": float(loss / n) if n > 0 else float("nan"),
        }
