"""AUC, user-weighted GAUC, logloss and RelaImpr: the paper's metrics, numpy only.

The trainer's validation, its test report and any model comparison call these same
functions, so a number in a report means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of `scores` within each group, ties sharing their average rank.

    Returns (ranks, order): ranks[i] belongs to element order[i].
    """
    n = scores.size
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    order = np.lexsort((scores, groups))
    s, g = scores[order], groups[order]
    group_start = np.r_[True, g[1:] != g[:-1]]
    new_value = group_start | np.r_[True, s[1:] != s[:-1]]
    pos = np.arange(n)
    first_of_group = np.maximum.accumulate(np.where(group_start, pos, 0))
    tie_id = np.cumsum(new_value) - 1
    tie_first = pos[new_value]
    tie_last = np.r_[tie_first[1:], n] - 1
    # average of 1-based ranks (within the group) over the tie run
    avg = (tie_first + tie_last) / 2.0 + 1.0
    ranks = avg[tie_id] - first_of_group
    return ranks, order


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half). NaN if one class."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks, order = _average_ranks(scores)
    rank_sum = ranks[labels[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_user_auc(
    labels: np.ndarray, scores: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, AUC per user, impressions per user) for users with both classes; vectorised."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    users = np.asarray(users).ravel()
    if not labels.size == scores.size == users.size:
        raise ValueError("labels, scores and users must have the same length")
    uniq, group = np.unique(users, return_inverse=True)
    ranks, order = _average_ranks(scores, group)
    g = group[order]
    pos = labels[order]
    k = uniq.size
    n = np.bincount(g, minlength=k)
    n_pos = np.bincount(g, weights=pos, minlength=k)
    n_neg = n - n_pos
    rank_sum = np.bincount(g, weights=np.where(pos, ranks, 0.0), minlength=k)
    both = (n_pos > 0) & (n_neg > 0)
    user_auc = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
    return uniq[both], user_auc, n[both]


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """User-weighted AUC (paper, eq. 1): sum_u #impressions_u * AUC_u / sum_u #impressions_u.

    Users whose samples are all clicks or all non-clicks have no AUC and are skipped.
    NaN when no user has both classes.
    """
    _, user_auc, weight = per_user_auc(labels, scores, users)
    if weight.size == 0:
        return float("nan")
    return float(np.sum(weight * user_auc) / np.sum(weight))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size != p.size:
        raise ValueError(f"labels ({y.size}) and probs ({p.size}) differ in length")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def rela_impr(auc_model: float, auc_base: float) -> float:
    """RelaImpr (paper, eq. 10) as a fraction: (AUC(model) - 0.5) / (AUC(base) - 0.5) - 1.

    NaN when undefined (a base AUC of exactly 0.5, or NaN): reported as "n/a", so a
    degenerate baseline does not throw away a finished experiment.
    """
    if not auc_base != 0.5:  # also NaN
        return float("nan")
    return float((auc_model - 0.5) / (auc_base - 0.5) - 1.0)


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """The trio every evaluation reports: auc, gauc, logloss."""
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, users), "logloss": logloss(labels, probs)}
