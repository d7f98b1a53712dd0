"""Streamed samples: the plan's checks, histories across blocks, exactly-once sharding, resume, prepare."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.log import BehaviourLog, LogFormatError, read_log, write_log
from model.data.prepare import prepare_log
from model.data.reservoir import BottomKSample
from model.data.stream import LogReader, block_samples, shard_batches, shard_layout
from model.data.stream_loader import process_batches
from model.data.stream_plan import SPLIT_NAMES, TRAIN, StreamConfig, StreamPlan, plan_stream, user_split
from model.data.synthetic import SyntheticConfig, generate, write_synthetic
from model.metric_sums import MetricSums
from model.metrics import ctr_metrics

SMALL = SyntheticConfig(users=200, items=50, categories=8, events_per_user=(3, 12), seed=2)


def _log_with_ties(label: bool, seed: int = 0) -> BehaviourLog:
    """A small sorted log whose users have same-time events (and labels, if asked)."""
    log = generate(SMALL)
    rng = np.random.default_rng(seed)
    ts = log.timestamp // 7200  # coarse clock: many same-time events
    lab = rng.integers(0, 2, len(log)).astype(np.int8) if label else None
    return BehaviourLog(log.user_id, log.item_id, log.cate_id, ts, label=lab).sorted_by_user_time()


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    return write_synthetic(SMALL, tmp_path_factory.mktemp("stream") / "log.parquet", chunk_users=4096)


CONFIG = StreamConfig(max_history=6, negatives=2, seed=4, block_events=150, read_rows=97)


def test_plan_rejects_an_unsorted_log_naming_the_row(tmp_path):
    log = generate(SMALL)
    swapped = log.user_id.copy()
    swapped[[200, 201]] = swapped[[201, 200]]
    if swapped[200] == swapped[201]:  # make sure the swap breaks the order
        swapped[201] = swapped[200] - 1
    bad = BehaviourLog(swapped, log.item_id, log.cate_id, log.timestamp)
    path = write_log(bad, tmp_path / "bad.parquet")
    with pytest.raises(LogFormatError, match=r"not sorted by \(user_id, timestamp\) at row 20[01].*din prepare"):
        plan_stream(path, StreamConfig(read_rows=100))  # the violation also straddles a batch boundary


def test_blocks_end_at_user_boundaries_and_count_every_sample(log_path):
    plan = plan_stream(log_path, CONFIG)
    log = read_log(log_path)
    cuts = plan.block_rows
    assert cuts[0] == 0 and cuts[-1] == len(log) and plan.num_blocks > 5
    assert np.all(log.user_id[cuts[1:-1]] != log.user_id[cuts[1:-1] - 1])  # never inside a user
    assert np.all(np.diff(cuts)[:-1] >= CONFIG.block_events)
    split = user_split(log.user_id, CONFIG.split, CONFIG.seed)
    for s in range(3):
        assert plan.num_samples(s) == 3 * int(np.sum(split == s))  # event + 2 negatives
        assert plan.users[s] == np.unique(log.user_id[split == s]).size
    train = split == TRAIN
    np.testing.assert_array_equal(plan.mappings["item_id"].ids, np.unique(log.item_id[train]))
    np.testing.assert_array_equal(plan.row_counts["item_id"], np.bincount(plan.mappings["item_id"].lookup(log.item_id[train]), minlength=plan.mappings["item_id"].num_rows))
    assert plan.row_counts["item_id"][:2].sum() == 0


@pytest.mark.parametrize("labelled", [False, True])
def test_streamed_histories_equal_brute_force(tmp_path, labelled):
    log = _log_with_ties(labelled)
    path = write_log(log, tmp_path / "log.parquet")
    plan = plan_stream(path, CONFIG)
    reader = LogReader(plan)
    inverse = {f: np.r_[-1, -2, plan.mappings[f].ids] for f in ("item_id", "cate_id")}  # row -> raw id
    behaviour = log.label == 1 if labelled else np.ones(len(log), bool)
    checked = 0
    for split in range(3):
        for b in range(plan.num_blocks):
            cols = reader.read(int(plan.block_rows[b]), int(plan.block_rows[b + 1]))
            samples = block_samples(plan, b, cols, split)
            batch = samples.take(np.arange(len(samples)), CONFIG.max_history)
            per_event = 1 if labelled else 3
            for i in range(len(samples)):
                row = int(samples.sample_id[i]) // per_event
                u, t = log.user_id[row], log.timestamp[row]
                mine = np.flatnonzero((log.user_id == u) & (log.timestamp < t) & behaviour)[::-1][: CONFIG.max_history]
                got = batch.hist["item_id"][i]
                got = got[got != 0]
                want = plan.mappings["item_id"].lookup(log.item_id[mine])
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(batch.hist["cate_id"][i][: got.size], plan.mappings["cate_id"].lookup(log.cate_id[mine]))
                if samples.sample_id[i] % per_event == 0:  # the event itself is the candidate
                    assert inverse["item_id"][batch.cand["item_id"][i]] in (log.item_id[row], -2)
                    assert samples.label[i] == (log.label[row] if labelled else 1)
                else:
                    assert samples.label[i] == 0
                checked += 1
    assert checked == sum(plan.num_samples(s) for s in range(3))


def _global_steps(plan: StreamPlan, world: int, workers: int, epoch: int, batch_size: int, shards: int) -> list[np.ndarray]:
    layout = shard_layout(plan, epoch, shards, batch_size)
    per_rank = [
        list(process_batches(plan, layout, rank=r, world=world, epoch=epoch, workers=workers, shuffle_window=200))
        for r in range(world)
    ]
    assert all(len(steps) == layout.steps for steps in per_rank)
    out = []
    for g in range(layout.steps):
        ids = np.concatenate([per_rank[r][g].sample_id for r in range(world)])
        assert ids.size == layout.global_batch_size(g)
        out.append(np.sort(ids))
    return out


def test_every_training_sample_is_used_once_per_epoch_whatever_the_processes_and_workers(log_path):
    plan = plan_stream(log_path, CONFIG)
    log = read_log(log_path)
    train_rows = np.flatnonzero(user_split(log.user_id, CONFIG.split, CONFIG.seed) == TRAIN)
    expected = np.sort((train_rows[:, None] * 3 + np.arange(3)).ravel())
    reference = None
    for world, workers in [(1, 0), (2, 0), (4, 0), (2, 2)]:
        for epoch in (1, 2):
            steps = _global_steps(plan, world, workers, epoch, batch_size=40, shards=4)
            used = np.sort(np.concatenate(steps))
            np.testing.assert_array_equal(used, expected)  # each sample exactly once
            if epoch == 1:
                if reference is None:
                    reference = steps
                else:  # the same global batches, whoever computes them
                    assert len(steps) == len(reference)
                    for a, b in zip(steps, reference):
                        np.testing.assert_array_equal(a, b)
    epoch2 = _global_steps(plan, 1, 0, 2, batch_size=40, shards=4)
    assert not np.array_equal(epoch2[0], reference[0])  # a new order each epoch


def test_skipping_batches_resumes_the_stream_exactly(log_path):
    plan = plan_stream(log_path, CONFIG)
    reader = LogReader(plan)
    layout = shard_layout(plan, 3, 2, 30)
    for shard in range(2):
        full = list(shard_batches(plan, reader, layout, shard, 3, shuffle_window=100))
        assert len(full) == layout.shard_batches(shard)
        for skip in (1, 7, len(full) - 1):
            tail = list(shard_batches(plan, reader, layout, shard, 3, shuffle_window=100, skip_batches=skip))
            assert len(tail) == len(full) - skip
            for a, b in zip(tail, full[skip:]):
                np.testing.assert_array_equal(a.sample_id, b.sample_id)
                np.testing.assert_array_equal(a.hist["item_id"], b.hist["item_id"])
                np.testing.assert_array_equal(a.cand["cate_id"], b.cand["cate_id"])


def test_hashed_plan_counts_per_bucket(log_path):
    plan = plan_stream(log_path, StreamConfig(hash_buckets=13, block_events=150))
    log = read_log(log_path)
    train = user_split(log.user_id, (0.8, 0.1, 0.1), 0) == TRAIN
    assert plan.spec.vocab_sizes == {"item_id": 15, "cate_id": 15}
    np.testing.assert_array_equal(plan.row_counts["cate_id"], np.bincount(plan.mappings["cate_id"].lookup(log.cate_id[train]), minlength=15))


def test_plan_round_trips_through_the_run_directory(log_path, tmp_path):
    plan = plan_stream(log_path, CONFIG)
    plan.save(tmp_path)
    again = StreamPlan.load(tmp_path)
    again.check_source()
    assert again.config == plan.config and again.spec == plan.spec and again.fingerprint == plan.fingerprint
    for name in ("block_rows", "block_samples", "pool_item", "pool_cate"):
        np.testing.assert_array_equal(getattr(again, name), getattr(plan, name))
    np.testing.assert_array_equal(again.mappings["item_id"].ids, plan.mappings["item_id"].ids)


def test_prepare_sorts_a_log_larger_than_its_memory_budget(tmp_path):
    log = generate(SyntheticConfig(users=3000, items=200, categories=10, seed=1))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(log))
    shuffled = BehaviourLog(log.user_id[perm], log.item_id[perm], log.cate_id[perm], log.timestamp[perm] // 3600,
                            label=rng.integers(0, 2, len(log)).astype(np.int8))  # fmt: skip
    for name in ("in.parquet", "in.csv"):
        src = write_log(shuffled, tmp_path / name)
        out = tmp_path / "sorted.parquet"
        # ~90k rows * 5 columns * 8 bytes * 4 working copies = 14 MiB > 16 MiB / a few partitions
        report = prepare_log(src, out, memory_mb=16, row_group_rows=5000, read_rows=7000)
        assert report.rows == len(log) and report.users == 3000
        got, want = read_log(out), read_log(src).sorted_by_user_time()  # ties keep file order
        for c in ("user_id", "item_id", "cate_id", "timestamp", "label"):
            np.testing.assert_array_equal(getattr(got, c), getattr(want, c))
        plan_stream(out, StreamConfig(block_events=500))  # passes the sortedness check


def test_prepare_uses_several_partitions_when_memory_is_short(tmp_path, monkeypatch):
    import model.data.prepare as prepare

    log = generate(SyntheticConfig(users=2000, items=200, categories=10, seed=3))
    perm = np.random.default_rng(1).permutation(len(log))
    src = write_log(BehaviourLog(log.user_id[perm], log.item_id[perm], log.cate_id[perm], log.timestamp[perm]), tmp_path / "in.parquet")
    monkeypatch.setattr(prepare, "_WORKING_COPIES", 400)  # pretend rows are 100x bigger: many partitions
    report = prepare_log(src, tmp_path / "out.parquet", memory_mb=16, row_group_rows=3000)
    assert report.partitions > 3
    got, want = read_log(tmp_path / "out.parquet"), read_log(src).sorted_by_user_time()
    for c in ("user_id", "item_id", "cate_id", "timestamp"):
        np.testing.assert_array_equal(getattr(got, c), getattr(want, c))


def test_prepare_names_the_file_and_column_of_a_bad_value_in_a_later_csv_block(tmp_path, monkeypatch):
    """Arrow infers a CSV's types from its first block; a bad value in a later one used to be
    "In CSV column #3: ..." with neither the file nor the column's name."""
    import model.data.prepare as prepare

    monkeypatch.setattr(prepare, "_CSV_BLOCK_BYTES", 4096)
    src = tmp_path / "late.csv"
    src.write_text("user_id,item_id,cate_id,timestamp\n" + "".join(f"{u},{u % 7},{u % 3},{u}\n" for u in range(2000)) + "5,2,3,1.5\n")
    with pytest.raises(LogFormatError, match=r"late\.csv: .*column #3 \('timestamp'\).*'1\.5'"):
        prepare_log(src, tmp_path / "out.parquet")


def test_bottom_k_sample_does_not_depend_on_chunking():
    values = np.arange(10_000, dtype=np.int64) * 3
    a = BottomKSample(500, salt=9, columns=("v",))
    a.add(np.arange(10_000), v=values)
    b = BottomKSample(500, salt=9, columns=("v",))
    for lo in range(0, 10_000, 777):
        b.add(np.arange(lo, min(lo + 777, 10_000)), v=values[lo : lo + 777])
    np.testing.assert_array_equal(a.values()["v"], b.values()["v"])
    assert len(a) == 500 and np.unique(a.values()["v"]).size == 500
    small = BottomKSample(500, salt=9, columns=("v",))
    small.add(np.arange(20), v=values[:20])
    np.testing.assert_array_equal(small.values()["v"], values[:20])  # fewer rows than k: all of them


def test_metric_sums_equal_exact_metrics_when_added_block_by_block():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(400), rng.integers(1, 30, 400))
    labels = (rng.random(users.size) < 0.3).astype(np.float32)
    probs = np.clip(rng.beta(2, 5, users.size) + 0.2 * labels, 1e-4, 1 - 1e-4).astype(np.float32)
    exact = ctr_metrics(labels, probs, users)
    cuts = np.r_[0, np.flatnonzero(np.diff(users)) + 1][::37].tolist() + [users.size]  # whole users per block
    parts = [MetricSums(), MetricSums()]
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        parts[i % 2].update(labels[lo:hi], probs[lo:hi], users[lo:hi])  # two "processes"
    total = parts[0].reduce(lambda a: a + parts[1].scalars if a.dtype == np.float64 else a + parts[1].hist)
    got = total.result()
    assert got["auc"] == pytest.approx(exact["auc"], abs=2e-5)
    assert got["gauc"] == pytest.approx(exact["gauc"], abs=1e-12)
    assert got["logloss"] == pytest.approx(exact["logloss"], abs=1e-6)
    assert SPLIT_NAMES == ("train", "validation", "test")


def test_streamed_negatives_are_never_the_positive_even_for_an_item_most_clicks_hit(tmp_path):
    from test_samples import skewed_log

    path = write_log(skewed_log(0.8), tmp_path / "skewed.parquet")
    plan = plan_stream(path, CONFIG)
    reader = LogReader(plan)
    popular = plan.mappings["item_id"].lookup(np.array([7]))[0]
    checked = 0
    for b in range(plan.num_blocks):
        cols = reader.read(int(plan.block_rows[b]), int(plan.block_rows[b + 1]))
        samples = block_samples(plan, b, cols, TRAIN)
        items = samples.cand["item_id"].reshape(-1, 1 + CONFIG.negatives)
        assert np.all(items[:, 1:] != items[:, :1])
        checked += int((items[:, 0] == popular).sum())
    assert checked > 500  # the skewed item was the positive often enough to clash


def test_the_reserved_unknown_id_is_the_unknown_row_in_a_streamed_vocabulary(log_path, tmp_path):
    """A log holding UNKNOWN_ID (int64 min): the streamed vocabulary gives it no row, as
    Vocabulary.fit does, so a streamed bundle scores "category not known" with UNK_ROW too."""
    import dataclasses

    from model.contract import UNK_ROW, UNKNOWN_ID, Vocabulary

    log = read_log(log_path)
    cate = log.cate_id.copy()
    cate[::7] = UNKNOWN_ID
    path = write_log(dataclasses.replace(log, cate_id=cate), tmp_path / "unknown.parquet")
    plan = plan_stream(path, CONFIG)
    mapping = plan.mappings["cate_id"]
    assert mapping.lookup(np.array([UNKNOWN_ID]))[0] == UNK_ROW
    train = user_split(log.user_id, CONFIG.split, CONFIG.seed) == TRAIN
    np.testing.assert_array_equal(mapping.ids, Vocabulary.fit(cate[train]).ids)
    counts = np.bincount(mapping.lookup(cate[train]), minlength=mapping.num_rows)
    np.testing.assert_array_equal(plan.row_counts["cate_id"], counts)
    assert counts[UNK_ROW] == np.sum(cate[train] == UNKNOWN_ID) > 0
