"""The synthetic generator: deterministic, well-typed, streamed, with its planted structure."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import model.data.synthetic as synthetic
from model.data.log import REQUIRED_COLUMNS, read_log, write_log
from model.data.sources import SOURCES, load_source
from model.data.synthetic import DEFAULT_SYNTHETIC, SyntheticConfig, generate, write_synthetic

SMALL = SyntheticConfig(users=300, items=200, categories=12, events_per_user=(5, 30), seed=3)


def assert_logs_equal(a, b):
    for c in REQUIRED_COLUMNS:
        np.testing.assert_array_equal(getattr(a, c), getattr(b, c), err_msg=c)


def test_deterministic_for_a_seed_and_different_across_seeds():
    assert_logs_equal(generate(SMALL), generate(SMALL))
    other = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(generate(SMALL).item_id[:500], other.item_id[:500])


def test_columns_are_int64_and_shapes_match_config():
    log = generate(SMALL)
    for c in REQUIRED_COLUMNS:
        assert getattr(log, c).dtype == np.int64, c
    assert log.label is None
    users, counts = np.unique(log.user_id, return_counts=True)
    assert users.size == SMALL.users
    assert counts.min() >= 5 and counts.max() <= 30
    assert log.item_id.min() >= 1 and log.item_id.max() <= SMALL.items
    assert log.cate_id.min() >= 1 and log.cate_id.max() <= SMALL.categories


def test_each_item_has_exactly_one_category():
    log = generate(SMALL)
    pairs = np.unique(np.stack([log.item_id, log.cate_id], axis=1), axis=0)
    assert pairs.shape[0] == np.unique(log.item_id).size


def test_timestamps_strictly_increase_within_each_user():
    log = generate(SMALL)
    same_user = log.user_id[1:] == log.user_id[:-1]
    assert np.all(np.diff(log.timestamp)[same_user] > 0)


def test_planted_structure_popularity_and_local_activation():
    cfg = SyntheticConfig(users=2000, items=1000, categories=50, events_per_user=(20, 40), seed=0)
    log = generate(cfg)
    # Zipf-like: the top 1% of items draw far more than 1% of events
    counts = np.sort(np.bincount(log.item_id))[::-1]
    assert counts[: cfg.items // 100].sum() / counts.sum() > 0.10
    # local activation: a behaviour's category is among the user's previous 5 far more often
    # than a category drawn by global popularity would be
    hits, chance = [], []
    cate_freq = np.bincount(log.cate_id, minlength=cfg.categories + 1) / len(log)
    starts = np.flatnonzero(np.r_[True, log.user_id[1:] != log.user_id[:-1]])
    for s, e in zip(starts[:300], np.r_[starts[1:], len(log)][:300]):
        c = log.cate_id[s:e]
        for t in range(5, len(c)):
            recent = np.unique(c[t - 5 : t])
            hits.append(c[t] in recent)
            chance.append(cate_freq[recent].sum())
    assert np.mean(hits) > 0.75
    assert np.mean(hits) > 2 * np.mean(chance)
    # several interests per user: a user's events spread over at least 3 categories
    per_user = [np.unique(log.cate_id[s:e]).size for s, e in zip(starts[:300], np.r_[starts[1:], len(log)][:300])]
    assert np.median(per_user) >= 3


def test_write_synthetic_streams_in_chunks_and_equals_generate(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "RNG_BLOCK_USERS", 16)  # many small blocks for a small config
    cfg = SyntheticConfig(users=50, items=40, categories=6, events_per_user=(2, 6), seed=9)
    expected = generate(cfg)
    one_block = write_synthetic(cfg, tmp_path / "a.parquet", chunk_users=16)
    two_blocks = write_synthetic(cfg, tmp_path / "b.parquet", chunk_users=20)  # rounds up to 32
    assert pq.ParquetFile(one_block).metadata.num_row_groups == 4  # 50 users / 16 per chunk
    assert pq.ParquetFile(two_blocks).metadata.num_row_groups == 2
    assert_logs_equal(read_log(one_block), expected)
    assert_logs_equal(read_log(two_blocks), expected)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="items"):
        SyntheticConfig(items=5, categories=10)
    with pytest.raises(ValueError, match="events_per_user"):
        SyntheticConfig(events_per_user=(5, 2))
    with pytest.raises(ValueError, match="p_local"):
        SyntheticConfig(p_local=0.95, p_noise=0.1)


def test_default_population_size():
    # the default is what `din train` uses; keep it small enough to train in about a minute
    assert 3_000 <= DEFAULT_SYNTHETIC.users <= 10_000
    assert DEFAULT_SYNTHETIC.interests_per_user[1] >= 3


def test_load_source_synthetic_is_the_default_population():
    log = load_source("synthetic")
    assert np.unique(log.user_id).size == DEFAULT_SYNTHETIC.users
    assert log.fingerprint() == generate(DEFAULT_SYNTHETIC).fingerprint()


def test_load_source_events_reads_a_file(tmp_path):
    log = generate(SMALL)
    path = write_log(log, tmp_path / "log.csv")
    assert_logs_equal(load_source(f"events:{path}"), log)


def test_load_source_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        load_source("parquet:/x")
    for scheme in SOURCES:
        assert scheme in str(e.value)
    with pytest.raises(ValueError, match="path"):
        load_source("events:")
