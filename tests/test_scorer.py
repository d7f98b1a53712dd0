"""The scoring runtime: raw ids -> rows -> ONNX Runtime, for U users at once (one call, or chunks of users)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.bundle import Bundle, BundleError, load_bundle
from model.contract import PAD_ROW, UNK_ROW, FeatureSpec, Vocabulary
from service.scorer import RankInput, RuntimeOptions, Scorer, build_batch, rank_order, user_chunks


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@pytest.fixture
def tiny_bundle() -> Bundle:
    """A bundle's id mapping only (no graph): enough to pin build_batch's numbers."""
    vocabs = {
        "item_id": Vocabulary(_i64(10, 20, 30)),  # rows 2, 3, 4
        "cate_id": Vocabulary(_i64(5, 6)),  # rows 2, 3
        "gender": Vocabulary(_i64(1, 2)),  # rows 2, 3
    }
    spec = FeatureSpec(
        profile_fields=("gender",),
        vocab_sizes={k: v.num_rows for k, v in vocabs.items()},
        max_history=4,
    )
    return Bundle(path=Path("unused"), manifest={"model_version": "t", "model_type": "din"}, spec=spec, vocabularies=vocabs)


def test_build_batch_maps_pads_truncates_and_flattens(tiny_bundle):
    requests = [
        RankInput(  # history of 3 (one unknown item and category), known profile
            history={"item_id": _i64(30, 10, 99), "cate_id": _i64(6, 5, 7)},
            profile={"gender": 2},
            candidates={"item_id": _i64(10, 77), "cate_id": _i64(5, 6)},
        ),
        RankInput(  # unknown user: no history, no profile
            history={}, profile={}, candidates={"item_id": _i64(20), "cate_id": _i64(6)}
        ),
        RankInput(  # history of 6 > max_history 4: the 4 newest stay; unknown profile id
            history={"item_id": _i64(20, 20, 30, 10, 10, 10), "cate_id": _i64(5, 6, 5, 6, 5, 6)},
            profile={"gender": 7},
            candidates={"item_id": _i64(30, 20, 10), "cate_id": _i64(6, 6, 6)},
        ),
    ]
    b = build_batch(tiny_bundle, requests)
    np.testing.assert_array_equal(
        b.hist_rows["item_id"],
        [[4, 2, UNK_ROW, PAD_ROW], [PAD_ROW] * 4, [3, 3, 4, 2]],
    )
    np.testing.assert_array_equal(
        b.hist_rows["cate_id"],
        [[3, 2, UNK_ROW, PAD_ROW], [PAD_ROW] * 4, [2, 3, 2, 3]],
    )
    np.testing.assert_array_equal(b.profile_rows["gender"], [3, UNK_ROW, UNK_ROW])
    np.testing.assert_array_equal(b.cand_rows["item_id"], [2, UNK_ROW, 3, 4, 3, 2])
    np.testing.assert_array_equal(b.cand_rows["cate_id"], [2, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(b.cand_user, [0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(b.history_lengths, [3, 0, 4])
    np.testing.assert_array_equal(b.cand_offsets, [0, 2, 3, 6])
    for rows in (*b.hist_rows.values(), *b.profile_rows.values(), *b.cand_rows.values(), b.cand_user):
        assert rows.dtype == np.int64


def test_build_batch_t_is_the_longest_history_and_at_least_one(tiny_bundle):
    short = RankInput(
        history={"item_id": _i64(10), "cate_id": _i64(5)}, profile={}, candidates={"item_id": _i64(1), "cate_id": _i64(1)}
    )
    empty = RankInput(history={}, profile={}, candidates={"item_id": _i64(1), "cate_id": _i64(1)})
    assert build_batch(tiny_bundle, [short, empty]).hist_rows["item_id"].shape == (2, 1)
    only_empty = build_batch(tiny_bundle, [empty])
    np.testing.assert_array_equal(only_empty.hist_rows["item_id"], [[PAD_ROW]])
    assert only_empty.history_lengths.tolist() == [0]


def test_rank_order_descending_stable_and_top_k():
    ctr = np.array([0.2, 0.9, 0.2, 0.5, 0.9], dtype=np.float32)
    assert rank_order(ctr).tolist() == [1, 4, 3, 0, 2]  # ties keep request order
    assert rank_order(ctr, 2).tolist() == [1, 4]
    assert rank_order(ctr, 99).tolist() == [1, 4, 3, 0, 2]


# ---------------------------------------------------------------------------------------
# The real runtime: a bundle trained by the real trainer, a real ONNX Runtime session.
@pytest.fixture(scope="session", params=["din", "base", "lr", "wdl", "pnn", "deepfm", "din_dice"])  # the service serves any model
def trained_bundle(request, tmp_path_factory) -> Bundle:
    from model.data.synthetic import SyntheticConfig, write_synthetic
    from model.train import TrainConfig, train

    root = tmp_path_factory.mktemp(f"scorer_{request.param}")
    data = write_synthetic(SyntheticConfig(users=200, items=150, categories=10, seed=5), root / "log.parquet")
    result = train(
        TrainConfig(
            data=f"events:{data}", model=request.param, epochs=1, batch_size=256, embedding_dim=4,
            max_history=8, out=root / "bundles", progress=False, threads=1,
        )
    )
    return load_bundle(result.bundle)


def _request(rng: np.random.Generator, length: int, n: int) -> RankInput:
    """Raw ids in 0..40: about half of them are in the tiny vocabularies, the rest unknown."""
    hist = {"item_id": rng.integers(0, 40, length), "cate_id": rng.integers(0, 12, length)}
    cands = {"item_id": rng.integers(0, 40, n), "cate_id": rng.integers(0, 12, n)}
    return RankInput(history={} if length == 0 else hist, profile={}, candidates=cands)


def test_a_batch_of_users_scores_as_each_user_alone(trained_bundle):
    scorer = Scorer.load(trained_bundle, device="cpu", intra_op_threads=1)
    rng = np.random.default_rng(0)
    max_history = trained_bundle.spec.max_history
    requests = [_request(rng, length, n) for length, n in ((3, 5), (0, 2), (max_history + 4, 7), (1, 1))]
    together = scorer.score_requests(requests)
    for req, got in zip(requests, together):
        (alone,) = scorer.score_requests([req])
        assert got.history_length == alone.history_length == min(req.history_length, max_history)
        assert got.ctr.shape == (req.num_candidates,) and got.ctr.dtype == np.float32
        assert got.attention.shape == (req.num_candidates, got.history_length)
        np.testing.assert_allclose(got.ctr, alone.ctr, rtol=0, atol=1e-6)  # padding to T changes nothing
        np.testing.assert_allclose(got.attention, alone.attention, rtol=0, atol=1e-6)
    assert np.ptp(np.concatenate([s.ctr for s in together])) > 1e-4  # scores depend on the input
    if trained_bundle.has_attention:
        assert np.abs(together[2].attention).sum() > 0
    else:
        assert not together[2].attention.any()
    batch = build_batch(trained_bundle, requests, attention=False)  # no request explains
    for got, want in zip(scorer.score_batch(batch), together):
        assert got.attention is None
        np.testing.assert_array_equal(got.ctr, want.ctr)


def test_user_chunks_pack_whole_consecutive_users():
    assert user_chunks(_i64(200, 200), 256) == [(0, 1), (1, 2)]  # two one-user calls
    assert user_chunks(_i64(32, 32, 32, 32), 256) == [(0, 4)]  # small requests stay one call
    assert user_chunks(np.full(16, 20), 256) == [(0, 12), (12, 16)]
    assert user_chunks(_i64(500), 256) == [(0, 1)]  # a big user is never split
    assert user_chunks(_i64(0, 300, 10, 0), 256) == [(0, 2), (2, 4)]  # users without candidates ride along
    assert user_chunks(_i64(200, 200), 0) == [(0, 2)]  # 0: off


def test_chunked_calls_score_as_one_call(trained_bundle):
    one = Scorer.load(trained_bundle, options=RuntimeOptions(device="cpu", chunk_candidates=0))
    chunked = Scorer.load(trained_bundle, options=RuntimeOptions(device="cpu", chunk_candidates=8))
    rng = np.random.default_rng(1)
    max_history = trained_bundle.spec.max_history
    shapes = ((max_history + 2, 6), (1, 5), (0, 3), (2, 9), (max_history, 2), (1, 1))  # histories shorter than T too
    batch = build_batch(trained_bundle, [_request(rng, length, n) for length, n in shapes])
    shuffle = rng.permutation(batch.cand_user.shape[0])  # candidates in any order, not only grouped by user
    for order in (np.arange(shuffle.shape[0]), shuffle):
        args = (batch.hist_rows, batch.profile_rows, {f: r[order] for f, r in batch.cand_rows.items()}, batch.cand_user[order])
        one.calls = chunked.calls = 0
        want_ctr, want_attention = one.score(*args)
        got_ctr, got_attention = chunked.score(*args)
        assert one.calls == 1 and chunked.calls == 4  # (6) (5 3) (9) (2 1): whole users, at most 8 unless alone
        np.testing.assert_allclose(got_ctr, want_ctr, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_attention, want_attention, rtol=0, atol=1e-6)
        assert chunked.score(*args, attention=False)[1] is None
    assert np.ptp(want_ctr) > 1e-4


def test_unknown_ids_score_as_the_unknown_row(trained_bundle):
    scorer = Scorer.load(trained_bundle, device="cpu", intra_op_threads=1)
    spec = trained_bundle.spec
    cands = {"item_id": _i64(-5, 10**15), "cate_id": _i64(-7, 2**62)}  # never in a vocabulary
    (got,) = scorer.score_requests([RankInput(history={}, profile={}, candidates=cands)])
    ctr, _ = scorer.score(
        {f: np.full((1, 1), PAD_ROW, np.int64) for f in spec.sequence_fields},
        {},
        {f: np.full(2, UNK_ROW, np.int64) for f in spec.sequence_fields},
        np.zeros(2, np.int64),
    )
    np.testing.assert_array_equal(got.ctr, ctr)
    assert got.ctr[0] == got.ctr[1]


def test_cpu_and_auto_devices_choose_quietly(trained_bundle, capfd):
    cpu = Scorer.load(trained_bundle, device="cpu", intra_op_threads=1)
    assert cpu.providers == ["CPUExecutionProvider"] and cpu.device_problem is None
    auto = Scorer.load(trained_bundle, device="auto", intra_op_threads=1)
    assert auto.device_problem is None
    assert auto.providers[-1] == "CPUExecutionProvider"
    assert "onnxruntime" not in capfd.readouterr().err  # no provider-load error spam on CPU machines
    assert not auto.warmed
    auto.warm_up()
    assert auto.warmed


def test_cuda_that_cannot_start_is_reported_not_hidden(trained_bundle):
    scorer = Scorer.load(trained_bundle, device="cuda", intra_op_threads=1)
    if "CUDAExecutionProvider" in scorer.providers:
        assert scorer.device_problem is None  # a machine with a usable GPU
    else:
        assert scorer.device_problem is not None and "CUDA" in scorer.device_problem
        assert scorer.providers == ["CPUExecutionProvider"]


def test_graph_that_does_not_match_the_spec_is_a_bundle_error(trained_bundle, tmp_path):
    path = Path(shutil.copytree(trained_bundle.path, tmp_path / "bundle"))
    manifest = json.loads((path / "bundle.json").read_text())
    manifest["feature_spec"]["profile_fields"] = ["gender"]
    manifest["feature_spec"]["vocab_sizes"]["gender"] = 4
    (path / "bundle.json").write_text(json.dumps(manifest))
    np.save(path / "vocab" / "gender.npy", _i64(1, 2))
    with pytest.raises(BundleError, match="profile_gender"):
        Scorer.load(load_bundle(path), device="cpu")
