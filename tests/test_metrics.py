"""AUC, GAUC, logloss, RelaImpr against numbers worked out by hand."""

import math

import numpy as np
import pytest

from model.metrics import auc, ctr_metrics, gauc, logloss, per_user_auc, rela_impr


def brute_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_example():
    # positives 0.9, 0.7, 0.5; negatives 0.8, 0.3
    # pairs won: 0.9>0.8, 0.9>0.3, 0.7>0.3, 0.5>0.3 -> 4 of 6
    assert auc([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.3, 0.5]) == pytest.approx(4 / 6, abs=1e-12)


def test_auc_ties_count_one_half():
    # positives 0.5, 0.8; negatives 0.5, 0.2
    # 0.5 vs 0.5 tie = 0.5; 0.5>0.2 = 1; 0.8>0.5 = 1; 0.8>0.2 = 1 -> 3.5 / 4
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.8, 0.2]) == pytest.approx(0.875, abs=1e-12)
    # all scores equal: every pair a tie
    assert auc([1, 0, 1, 0, 0], [0.3] * 5) == pytest.approx(0.5, abs=1e-12)


def test_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 7, 300).astype(float)  # heavy ties
    assert auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_gauc_hand_example_weights_by_impressions_and_skips_single_class_users():
    users = [7, 7, 7, 8, 8, 8, 8, 9, 9]
    labels = [1, 0, 0, 1, 1, 0, 0, 1, 1]
    scores = [0.6, 0.7, 0.2, 0.9, 0.4, 0.5, 0.3, 0.1, 0.05]
    # user 7: pos 0.6 vs neg 0.7 (lose), 0.2 (win) -> AUC 1/2, 3 impressions
    # user 8: pos 0.9 beats 0.5 and 0.3; pos 0.4 beats 0.3 only -> AUC 3/4, 4 impressions
    # user 9: only clicks -> skipped
    # GAUC = (3 * 0.5 + 4 * 0.75) / (3 + 4) = 4.5 / 7
    assert gauc(labels, scores, users) == pytest.approx(4.5 / 7, abs=1e-12)
    ids, user_auc, weight = per_user_auc(labels, scores, users)
    assert ids.tolist() == [7, 8]
    assert user_auc.tolist() == pytest.approx([0.5, 0.75])
    assert weight.tolist() == [3, 4]


def test_gauc_with_ties_matches_per_user_pairwise_auc():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 20, 500)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 5, 500).astype(float)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            num += m.sum() * brute_auc(labels[m], scores[m])
            den += m.sum()
    assert gauc(labels, scores, users) == pytest.approx(num / den, abs=1e-12)


def test_gauc_no_user_with_both_classes_is_nan():
    assert math.isnan(gauc([1, 0], [0.2, 0.3], [1, 2]))


def test_logloss_hand_example():
    # -(ln 0.8 + ln 0.6) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx((0.2231435513 + 0.5108256238) / 2, abs=1e-9)


def test_rela_impr():
    # (0.75 - 0.5) / (0.7 - 0.5) - 1 = 0.25
    assert rela_impr(0.75, 0.7) == pytest.approx(0.25, abs=1e-12)
    # undefined against a base of exactly 0.5 (or NaN): NaN, reported as n/a, never an exception
    assert np.isnan(rela_impr(0.7, 0.5)) and np.isnan(rela_impr(0.7, float("nan")))


def test_ctr_metrics_bundles_the_three():
    m = ctr_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6]), np.array([1, 1, 2, 2]))
    assert m["auc"] == pytest.approx(0.75)
    assert m["gauc"] == pytest.approx(0.5)  # user 1: 1.0, user 2: 0.0, 2 impressions each
    assert set(m) == {"auc", "gauc", "logloss"}
