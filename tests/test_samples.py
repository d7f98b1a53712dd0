"""Samples: histories strictly before the target, newest first, truncated; user split; negatives."""

import numpy as np
import pytest
import torch

from model.contract import CAND_USER, PAD_ROW, UNK_ROW, cand_input, hist_input, profile_input
from model.data.log import BehaviourLog, UserProfiles
from model.data.samples import SampleConfig, build_samples, split_users
from model.data.synthetic import SyntheticConfig, generate
from model.metrics import auc

MAX_HISTORY = 4


def tiny_log(with_label=False, with_ties=False, seed=0) -> BehaviourLog:
    """20 users, 3-9 events each, shuffled rows; optional labels and same-time events."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(20):
        n = int(rng.integers(3, 10))
        ts = np.cumsum(rng.integers(1, 5, n)) + 1000
        if with_ties:
            ts[1] = ts[0]  # two events at the same second
        for t in ts:
            item = int(rng.integers(1, 30))
            rows.append((100 + u, item, item % 5 + 1, int(t), int(rng.integers(0, 2))))
    rows = np.array(rows, dtype=np.int64)[rng.permutation(len(rows))]
    return BehaviourLog(
        user_id=rows[:, 0],
        item_id=rows[:, 1],
        cate_id=rows[:, 2],
        timestamp=rows[:, 3],
        label=rows[:, 4].astype(np.int8) if with_label else None,
    )


def expected_history(log, user, ts, vocab_item, max_history, clicks_only):
    """Brute force: the user's behaviours strictly before ts, newest first, truncated."""
    m = (log.user_id == user) & (log.timestamp < ts)
    if clicks_only:
        m &= log.label == 1
    # oldest first with ties in file order, reversed: among same-time events the later row is newer
    order = np.argsort(log.timestamp[m], kind="stable")[::-1]
    return vocab_item.lookup(log.item_id[m][order][:max_history]).tolist()


def hist_rows(batch, i):
    row = batch.inputs[hist_input("item_id")][i].tolist()
    return [r for r in row if r != PAD_ROW]


@pytest.mark.parametrize("with_label", [False, True])
def test_history_is_strictly_before_newest_first_truncated(with_label):
    log = tiny_log(with_label=with_label, with_ties=True)
    s = build_samples(log, SampleConfig(max_history=MAX_HISTORY, seed=1))
    vocab = s.vocabularies["item_id"]
    ts_of = {}
    for u, i, t in zip(log.user_id, log.item_id, log.timestamp):
        ts_of.setdefault((int(u), int(i)), []).append(int(t))
    checked = 0
    for split in (s.train, s.validation, s.test):
        batch = s.batch(split, np.arange(len(split)))
        for k in range(len(split)):
            if split.label[k] != 1 and not with_label:
                continue  # a negative shares its positive's history (checked below)
            user = int(split.user_id[k])
            # the target's timestamp: positives are log events of this user
            cand = int(batch.inputs[cand_input("item_id")][k])
            matches = [
                int(t) for u2, i2, t in zip(log.user_id, log.item_id, log.timestamp)
                if u2 == user and vocab.lookup(np.array([i2]))[0] == cand
            ]
            got = hist_rows(batch, k)
            assert len(got) <= MAX_HISTORY
            options = [expected_history(log, user, t, vocab, MAX_HISTORY, with_label) for t in matches]
            assert got in options, (user, cand, got, options)
            checked += 1
    assert checked >= len(log) // 2


def test_history_gather_matches_brute_force_per_sample():
    """Exact check per sample: rebuild each target's timestamp from the sample's own offsets."""
    log = tiny_log(with_ties=True, seed=5)
    s = build_samples(log, SampleConfig(max_history=MAX_HISTORY, seed=2))
    srt = log.sorted_by_user_time()
    vocab = s.vocabularies["item_id"]
    for split in (s.train, s.validation, s.test):
        batch = s.batch(split, np.arange(len(split)))
        for k in range(len(split)):
            start, end = int(split.hist_start[k]), int(split.hist_end[k])
            user = int(split.user_id[k])
            assert np.all(srt.user_id[start:end] == user)  # the history is this user's
            # the first event NOT in the history is at or after the target time, and every
            # history event is strictly before the next one: history = prefix of the user's events
            want = vocab.lookup(srt.item_id[start:end][::-1][:MAX_HISTORY]).tolist()
            assert hist_rows(batch, k) == want
            if end > start and end < len(srt) and srt.user_id[end] == user:
                assert srt.timestamp[end - 1] < srt.timestamp[end]


def test_same_time_events_do_not_see_each_other():
    log = BehaviourLog(
        user_id=np.array([1, 1, 1, 2, 2, 3, 3], np.int64),
        item_id=np.array([10, 11, 12, 10, 11, 10, 12], np.int64),
        cate_id=np.array([1, 1, 2, 1, 1, 1, 2], np.int64),
        timestamp=np.array([5, 5, 9, 1, 2, 1, 2], np.int64),
    )
    s = build_samples(log, SampleConfig(max_history=10, split=(1.0, 0.0, 0.0)))
    item = s.vocabularies["item_id"]
    pos = np.flatnonzero((s.train.label == 1) & (s.train.user_id == 1))
    batch = s.batch(s.train, pos)
    hists = sorted(tuple(hist_rows(batch, k)) for k in range(len(pos)))
    # events at t=5 have empty histories; the t=9 event sees both, newest first (file order
    # breaks the tie: 11 after 10)
    assert hists == sorted([(), (), tuple(item.lookup(np.array([11, 10])).tolist())])


def test_split_is_by_user_and_covers_everyone():
    log = generate(SyntheticConfig(users=200, items=100, categories=8, events_per_user=(3, 8), seed=1))
    s = build_samples(log, SampleConfig(seed=4))
    train, val, test = (set(np.unique(x.user_id).tolist()) for x in (s.train, s.validation, s.test))
    assert not train & test and not train & val and not val & test
    assert train | val | test == set(np.unique(log.user_id).tolist())
    assert len(test) == 20 and len(val) == 20
    # every history row of a test sample comes from that test user's own events
    assert np.all(np.isin(s.test.user_id, list(test)))


def test_split_users_is_seeded_and_keeps_tiny_splits_nonempty():
    users = np.arange(5)
    a = split_users(users, (0.8, 0.1, 0.1), seed=3)
    b = split_users(users, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [x.size for x in a] == [3, 1, 1]
    assert [x.size for x in split_users(np.arange(2), (0.8, 0.1, 0.1), seed=0)] == [2, 0, 0]
    with pytest.raises(ValueError, match="too few"):
        split_users(np.arange(4), (0.0, 0.5, 0.5), seed=0)


def test_one_negative_per_positive_with_a_consistent_category():
    log = generate(SyntheticConfig(users=200, items=100, categories=8, events_per_user=(3, 8), seed=1))
    s = build_samples(log, SampleConfig(seed=4, negatives=2))
    cate_of = dict(zip(log.item_id.tolist(), log.cate_id.tolist()))
    item_vocab, cate_vocab = s.vocabularies["item_id"], s.vocabularies["cate_id"]
    for split in (s.train, s.validation, s.test):
        lab = split.label.reshape(-1, 3)
        assert np.all(lab[:, 0] == 1) and np.all(lab[:, 1:] == 0)
        items = split.cand_rows["item_id"].reshape(-1, 3)
        assert np.all(items[:, 1:] != items[:, :1])  # a negative is never the clicked item
        assert np.all(split.hist_end.reshape(-1, 3) == split.hist_end.reshape(-1, 3)[:, :1])  # shared history
        # negatives are training items (drawn from training events), with their own category
        neg_items = items[:, 1:].ravel()
        assert np.all(neg_items >= 2)
        raw = item_vocab.ids[neg_items - 2]
        want_cate = cate_vocab.lookup(np.array([cate_of[i] for i in raw.tolist()]))
        np.testing.assert_array_equal(split.cand_rows["cate_id"].reshape(-1, 3)[:, 1:].ravel(), want_cate)


def test_popularity_alone_does_not_separate_clicks_from_negatives():
    log = generate(SyntheticConfig(users=1000, items=500, categories=20, events_per_user=(10, 20), seed=2))
    s = build_samples(log, SampleConfig(seed=0))
    popularity = np.bincount(s.train.cand_rows["item_id"][s.train.label == 1], minlength=s.spec.vocab_sizes["item_id"])
    score = popularity[s.test.cand_rows["item_id"]].astype(float)
    assert abs(auc(s.test.label, score) - 0.5) < 0.05


def test_vocabularies_are_fitted_on_training_users_only():
    log = generate(SyntheticConfig(users=60, items=400, categories=8, events_per_user=(3, 6), seed=1))
    s = build_samples(log, SampleConfig(seed=0))
    train_users = np.unique(s.train.user_id)
    in_train = np.isin(log.user_id, train_users)
    np.testing.assert_array_equal(s.vocabularies["item_id"].ids, np.unique(log.item_id[in_train]))
    np.testing.assert_array_equal(s.vocabularies["cate_id"].ids, np.unique(log.cate_id[in_train]))
    # some test item was never seen in training: it is UNK there, never an error
    test_pos = s.test.label == 1
    test_items = np.unique(log.item_id[np.isin(log.user_id, np.unique(s.test.user_id))])
    unseen = np.setdiff1d(test_items, s.vocabularies["item_id"].ids)
    assert unseen.size > 0
    assert np.any(s.test.cand_rows["item_id"][test_pos] == UNK_ROW)
    assert s.spec.vocab_sizes["item_id"] == s.vocabularies["item_id"].ids.size + 2


def test_labelled_log_uses_its_labels_and_clicks_as_history():
    log = tiny_log(with_label=True)
    s = build_samples(log, SampleConfig(max_history=MAX_HISTORY, seed=1))
    total = len(s.train) + len(s.validation) + len(s.test)
    assert total == len(log)  # one sample per event, no sampled negatives
    assert (s.train.label.sum() + s.validation.label.sum() + s.test.label.sum()) == log.label.sum()


def test_batch_holds_the_onnx_inputs_as_int64():
    log = tiny_log()
    profiles = UserProfiles(user_id=np.arange(100, 115, dtype=np.int64), fields={"gender": np.arange(15) % 2 + 1})
    log.profiles = profiles
    s = build_samples(log, SampleConfig(max_history=MAX_HISTORY, seed=1))
    assert s.spec.profile_fields == ("gender",)
    batch = next(s.batches(s.train, 7, shuffle=True, rng=np.random.default_rng(0)))
    assert set(batch.inputs) == set(s.spec.input_names())
    for name, t in batch.inputs.items():
        assert t.dtype == torch.int64, name
    assert batch.inputs[hist_input("item_id")].shape[0] == 7
    assert batch.inputs[hist_input("item_id")].shape[1] <= MAX_HISTORY
    assert torch.equal(batch.inputs[CAND_USER], torch.arange(7))
    assert batch.label.dtype == torch.float32 and batch.user_id.dtype == torch.int64
    # users 115..119 have no profile: their profile row is UNK
    rows = s.train.profile_rows["gender"]
    no_profile = s.train.user_id >= 115
    assert np.all(rows[no_profile] == UNK_ROW) and np.all(rows[~no_profile] >= 2)
    assert profile_input("gender") in batch.inputs


def test_batches_cover_every_sample_once():
    log = tiny_log()
    s = build_samples(log, SampleConfig(max_history=MAX_HISTORY, seed=1))
    labels = torch.cat([b.label for b in s.batches(s.train, 5)])
    assert labels.numpy().tolist() == s.train.label.tolist()
    assert s.num_batches(s.train, 5) == -(-len(s.train) // 5)
    with pytest.raises(ValueError, match="rng"):
        next(s.batches(s.train, 5, shuffle=True))


def skewed_log(share: float, seed: int = 0) -> BehaviourLog:
    """300 users x 6 clicks; item 7 is `share` of all events (the rest uniform over 40 items)."""
    rng = np.random.default_rng(seed)
    n = 300 * 6
    items = np.where(rng.random(n) < share, 7, rng.integers(8, 48, n))
    return BehaviourLog(
        user_id=np.repeat(np.arange(300), 6), item_id=items, cate_id=items % 5 + 1,
        timestamp=np.tile(np.arange(6), 300) + 1000,
    )


def test_a_negative_is_never_the_positive_even_for_an_item_most_clicks_hit():
    """At an 80% share, 8 redraws from the whole pool leave ~10% of its negatives on itself;
    those are drawn from the pool without it."""
    s = build_samples(skewed_log(0.8), SampleConfig(seed=4, negatives=2))
    for split in (s.train, s.validation, s.test):
        items = split.cand_rows["item_id"].reshape(-1, 3)
        assert np.all(items[:, 1:] != items[:, :1])
        assert (items[:, 0] == s.vocabularies["item_id"].lookup(np.array([7]))[0]).mean() > 0.5  # the skew is there


def test_a_log_of_a_single_item_has_no_possible_negative():
    with pytest.raises(ValueError, match="every training behaviour is item 7: no negative can differ"):
        build_samples(skewed_log(1.0), SampleConfig(seed=4))
