"""Hashed ids: the function (golden values, int64 edge cases), the bundle record, and trainer == service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.bundle import BUNDLE_FORMAT_VERSION, HASHED_FORMAT_VERSION, BundleError, load_bundle
from model.contract import FIRST_ID_ROW, UNK_ROW, UNKNOWN_ID, Vocabulary
from model.data.stream import LogReader, block_samples
from model.data.stream_plan import TRAIN, StreamConfig, plan_stream
from model.data.synthetic import SyntheticConfig, write_synthetic
from model.hashing import HashedIds, row_counts, splitmix64
from model.train_dist import DistTrainConfig, train_dist
from service.scorer import RankInput, Scorer, build_batch

_M = (1 << 64) - 1


def _reference(x: int) -> int:
    """SplitMix64's finaliser in plain Python integers (no numpy, explicit mod 2**64)."""
    z = (x + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _reference_rows(ids: np.ndarray, buckets: int) -> np.ndarray:
    """HashedIds' rows by the reference: UNKNOWN_ID (reserved, "not known") is UNK_ROW."""
    return np.array([UNK_ROW if i == UNKNOWN_ID else _reference(int(i) & _M) % buckets + FIRST_ID_ROW for i in ids])


def _edge_ids(n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64, endpoint=True)
    special = np.array(
        [0, 1, -1, 2**53, 2**53 + 1, -(2**53) - 1, 2**62 + 12345, np.iinfo(np.int64).max, np.iinfo(np.int64).min],
        dtype=np.int64,
    )
    return np.concatenate([special, ids])


def test_splitmix64_golden_values():
    # SplitMix64 seeded with 0 yields 0xE220A8397B1DCDAF first: our mix of id 0 is that step
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    ids = _edge_ids()
    want = np.array([_reference(int(i) & _M) for i in ids], dtype=np.uint64)
    np.testing.assert_array_equal(splitmix64(ids), want)


def test_hashed_rows_are_in_range_and_deterministic():
    ids = _edge_ids()
    h = HashedIds(1000)
    rows = h.lookup(ids)
    assert rows.dtype == np.int64 and h.num_rows == 1002
    assert rows[ids != UNKNOWN_ID].min() >= FIRST_ID_ROW and rows.max() < h.num_rows
    np.testing.assert_array_equal(rows, _reference_rows(ids, 1000))
    # ids that differ only above bit 53 (a float64 would merge them) still get different rows
    assert len({int(r) for r in h.lookup(np.array([2**60, 2**60 + 1, 2**60 + 2], np.int64))}) == 3
    np.testing.assert_array_equal(h.lookup(ids.reshape(-1, 1)).ravel(), rows)


def test_row_counts_are_per_bucket():
    h = HashedIds(7)
    ids = np.array([5, 5, 12, -3, 2**60], np.int64)
    counts = row_counts(h, ids)
    assert counts.shape == (9,) and counts.sum() == 5 and counts[:FIRST_ID_ROW].sum() == 0
    np.testing.assert_array_equal(counts, np.bincount(h.lookup(ids), minlength=9))
    row_counts(h, ids[:2], counts)  # accumulates in place
    assert counts[h.lookup(np.array([5]))[0]] >= 4


@pytest.fixture(scope="module")
def hashed_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hashed")
    log = write_synthetic(SyntheticConfig(users=150, items=60, categories=6, events_per_user=(4, 10), seed=3), d / "log.parquet")
    config = DistTrainConfig(
        data=f"events:{log}", epochs=1, batch_size=64, embedding_dim=4, max_history=8, out=d / "bundles",
        run_dir=d / "run", hash_buckets=97, block_events=300, shards=2, progress=False, threads=1,
    )  # fmt: skip
    return config, train_dist(config), log


def test_hashed_bundle_records_function_and_buckets(hashed_run):
    config, result, _ = hashed_run
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["format_version"] == HASHED_FORMAT_VERSION
    assert manifest["id_mapping"] == {f: {"kind": "hash", "function": "splitmix64", "buckets": 97} for f in ("item_id", "cate_id")}
    assert not (result.bundle / "vocab" / "item_id.npy").exists()
    bundle = load_bundle(result.bundle)
    assert bundle.vocabularies == {"item_id": HashedIds(97), "cate_id": HashedIds(97)}
    assert bundle.spec.vocab_sizes == {"item_id": 99, "cate_id": 99}


def test_service_rows_equal_trainer_rows_for_random_int64_ids(hashed_run):
    config, result, log = hashed_run
    bundle = load_bundle(result.bundle)
    plan = plan_stream(log, StreamConfig(max_history=8, seed=0, hash_buckets=97, block_events=300))
    ids = _edge_ids(500, seed=1)
    hist = ids[:8]
    request = RankInput(history={"item_id": hist, "cate_id": hist[::-1].copy()}, profile={},
                        candidates={"item_id": ids, "cate_id": ids[::-1].copy()})  # fmt: skip
    batch = build_batch(bundle, [request])  # the service's mapping
    trainer = plan.mappings  # the trainer's mapping (stream_plan -> block samples)
    np.testing.assert_array_equal(batch.cand_rows["item_id"], trainer["item_id"].lookup(ids))
    np.testing.assert_array_equal(batch.cand_rows["cate_id"], trainer["cate_id"].lookup(ids[::-1]))
    np.testing.assert_array_equal(batch.hist_rows["item_id"][0], trainer["item_id"].lookup(hist))
    np.testing.assert_array_equal(batch.cand_rows["item_id"], _reference_rows(ids, 97))
    # and the trainer's samples really use that mapping
    reader = LogReader(plan)
    cols = reader.read(int(plan.block_rows[0]), int(plan.block_rows[1]))
    samples = block_samples(plan, 0, cols, TRAIN)
    positives = samples.label == 1
    ev = np.flatnonzero(np.isin(cols["user_id"], np.unique(samples.user_id)))
    np.testing.assert_array_equal(samples.cand["item_id"][positives], trainer["item_id"].lookup(cols["item_id"][ev]))


def test_unseen_ids_score_through_the_real_scorer(hashed_run):
    _, result, log = hashed_run
    scorer = Scorer.load(result.bundle, device="cpu")
    scorer.warm_up(8)
    unseen = np.array([10**15, -(10**15), 2**62 + 7, 2**53 + 1], np.int64)  # never in the log (ids < 100)
    seen = np.array([1, 2, 3], np.int64)
    request = RankInput(history={"item_id": unseen[:2], "cate_id": seen[:2]}, profile={},
                        candidates={"item_id": np.r_[unseen, seen], "cate_id": np.r_[unseen, seen]})  # fmt: skip
    (scored,) = scorer.score_requests([request])
    assert scored.ctr.shape == (7,) and np.all(np.isfinite(scored.ctr)) and np.all((scored.ctr > 0) & (scored.ctr < 1))
    rows = build_batch(scorer.bundle, [request]).cand_rows["item_id"]
    assert np.all(rows != UNK_ROW)  # an unseen id gets a trained bucket, not the unknown row
    np.testing.assert_array_equal(rows[:4], HashedIds(97).lookup(unseen))
    # an unseen id scores exactly like a seen id of the same bucket: it uses that learned row
    h = HashedIds(97)
    u = unseen[0]
    twin = next(i for i in range(1, 100_000) if h.lookup(np.array([i]))[0] == h.lookup(np.array([u]))[0])
    pair = RankInput(history={"item_id": seen, "cate_id": seen}, profile={},
                     candidates={"item_id": np.array([u, twin]), "cate_id": np.array([3, 3])})  # fmt: skip
    (both,) = scorer.score_requests([pair])
    assert both.ctr[0] == both.ctr[1]



def test_the_unknown_id_is_the_unknown_row_in_hashed_and_fitted_fields():
    ids = np.array([UNKNOWN_ID, -1, 5], np.int64)
    rows = HashedIds(16).lookup(ids)
    assert rows[0] == UNK_ROW and np.all(rows[1:] >= FIRST_ID_ROW)
    vocab = Vocabulary.fit(ids)  # a log that holds the reserved id does not give it a row
    assert vocab.lookup(ids).tolist() == [UNK_ROW, FIRST_ID_ROW, FIRST_ID_ROW + 1]


@pytest.mark.anyio
async def test_an_ad_without_a_known_category_scores_with_the_unknown_row_not_a_bucket(hashed_run, redis_url):
    """/rank fills in a missing cate_id from the store; an ad the store does not know keeps an
    unknown category, which a hashed bundle must score as UNK_ROW, not as whatever category
    shares a bucket with the placeholder id."""
    from feature_store.redis_store import RedisHistoryStore
    from model.data.log import read_log
    from test_api import serving, settings_for

    _, result, log_path = hashed_run
    log = read_log(log_path)
    RedisHistoryStore.from_url(redis_url).bulk_load(log, max_history=8)
    h = HashedIds(97)
    twin = next(c for c in range(1, 100_000) if h.lookup(np.array([c]))[0] == h.lookup(np.array([-1]))[0])
    ad = 10**12 + 1  # in no log: the store has no category for it
    body = {"user_id": int(log.user_id[0]), "candidates": [{"item_id": ad}, {"item_id": ad, "cate_id": twin}]}
    async with serving(settings_for(result.bundle, redis_url)) as client:
        r = await client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    ctr = {x["cate_id"]: x["ctr"] for x in r.json()["ranked"]}
    assert set(ctr) == {None, twin}
    scorer = Scorer.load(result.bundle, device="cpu")
    history = log.user_id == log.user_id[0]
    newest_first = np.argsort(-log.timestamp[history], kind="stable")
    request = RankInput(history={f: getattr(log, f)[history][newest_first] for f in ("item_id", "cate_id")}, profile={},
                        candidates={"item_id": np.array([ad]), "cate_id": np.array([UNKNOWN_ID])})  # fmt: skip
    (alone,) = scorer.score_requests([request])
    assert ctr[None] == pytest.approx(float(alone.ctr[0]), abs=1e-6)  # the unknown row's score
    assert ctr[None] != pytest.approx(ctr[twin], abs=1e-6)  # not the bucket-mate's

def test_vocabulary_bundles_stay_format_1_and_load(tmp_path, hashed_run):
    config, _, log = hashed_run
    vocab_config = DistTrainConfig(**{**config.__dict__, "hash_buckets": None, "out": tmp_path / "b", "run_dir": tmp_path / "r"})
    result = train_dist(vocab_config)
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION and "id_mapping" not in manifest
    bundle = load_bundle(result.bundle)
    assert (result.bundle / "vocab" / "item_id.npy").is_file()
    assert bundle.vocabularies["item_id"].lookup(np.array([10**15]))[0] == UNK_ROW


def test_a_bundle_with_an_unknown_hash_function_is_refused(hashed_run, tmp_path):
    import shutil

    _, result, _ = hashed_run
    copy = tmp_path / "bundle"
    shutil.copytree(result.bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["id_mapping"]["item_id"]["function"] = "murmur3"
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="id_mapping.item_id.*murmur3"):
        load_bundle(copy)
    manifest["format_version"] = 3
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 3 is not supported"):
        load_bundle(Path(copy))
