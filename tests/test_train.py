"""The trainer end to end on a tiny synthetic log: bundle, metrics, determinism, one scoring path."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model.bundle import load_bundle
from model.contract import FIRST_ID_ROW, OUTPUT_NAMES, UNK_ROW
from model.data.log import read_log
from model.data.samples import build_samples
from model.embedding import IdTable
from model.data.synthetic import SyntheticConfig, write_synthetic
from model.metrics import ctr_metrics
from model.train import TrainConfig, fit, train

TINY = SyntheticConfig(users=120, items=60, categories=6, events_per_user=(4, 10), seed=5)


@pytest.fixture(scope="module")
def tiny_log_path(tmp_path_factory) -> Path:
    return write_synthetic(TINY, tmp_path_factory.mktemp("data") / "tiny.parquet")


def tiny_config(path: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=f"events:{path}", epochs=1, batch_size=64, embedding_dim=4, max_history=8, out=out, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def din_run(tiny_log_path, tmp_path_factory):
    config = tiny_config(tiny_log_path, tmp_path_factory.mktemp("bundles"), epochs=2)
    return config, train(config)


def test_train_writes_a_loadable_bundle_with_metrics(din_run, tiny_log_path):
    config, result = din_run
    bundle = load_bundle(result.bundle)
    assert result.bundle.parent == config.out
    assert bundle.model_type == "din" and bundle.has_attention
    m = bundle.manifest
    assert m["metrics"]["test"] == pytest.approx(result.metrics)
    assert set(result.metrics) == {"auc", "gauc", "logloss"}
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("auc", "gauc"))
    assert m["metrics"]["best_epoch"] == result.best_epoch
    assert m["metrics"]["validation"] == pytest.approx(result.validation[result.best_epoch - 1])
    assert m["data_spec"] == config.data
    assert m["data_fingerprint"] == read_log(tiny_log_path).fingerprint()
    assert m["model_config"] == {
        "embedding_dim": 4, "attention_hidden": [80, 40], "mlp_hidden": [200, 80], "attention_softmax": False,
        "activation": "prelu", "wide_buckets": 1_000_003,
    }
    assert m["train_config"]["seed"] == 0 and m["train_config"]["model"] == "din"
    assert m["parity_max_abs_diff"] <= 1e-5
    assert bundle.spec.max_history == 8
    assert result.num_params > 0 and result.train_seconds > 0


def test_best_epoch_is_chosen_on_validation_gauc(din_run):
    _, result = din_run
    assert [h["epoch"] for h in result.validation] == [1, 2]
    gaucs = [h["gauc"] for h in result.validation]
    assert result.best_epoch == int(np.argmax(gaucs)) + 1


def test_bundle_graph_reproduces_the_reported_test_metrics(din_run, tiny_log_path):
    """One scoring path: the exported ONNX graph on the test split gives the trainer's numbers."""
    config, result = din_run
    bundle = load_bundle(result.bundle)
    samples = build_samples(read_log(tiny_log_path), config.sample_config())
    for name, vocab in bundle.vocabularies.items():
        np.testing.assert_array_equal(vocab.ids, samples.vocabularies[name].ids)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    probs = []
    for batch in samples.batches(samples.test, 100):
        feeds = {k: v.numpy() for k, v in batch.inputs.items()}
        probs.append(session.run([OUTPUT_NAMES[0]], feeds)[0])
    got = ctr_metrics(samples.test.label, np.concatenate(probs), samples.test.user_id)
    assert got["auc"] == pytest.approx(result.metrics["auc"], abs=1e-4)
    assert got["gauc"] == pytest.approx(result.metrics["gauc"], abs=1e-4)
    assert got["logloss"] == pytest.approx(result.metrics["logloss"], abs=1e-5)


@pytest.mark.parametrize("model", ["din", "base"])
def test_same_seed_same_metrics(tiny_log_path, tmp_path, model):
    a = train(tiny_config(tiny_log_path, tmp_path / "a", model=model))
    b = train(tiny_config(tiny_log_path, tmp_path / "b", model=model))
    assert a.metrics == b.metrics
    assert a.validation == b.validation
    c = train(tiny_config(tiny_log_path, tmp_path / "c", model=model, seed=1))
    assert c.metrics != a.metrics


def test_nothing_on_stdout_even_with_progress(tiny_log_path, tmp_path, capsys):
    train(tiny_config(tiny_log_path, tmp_path, model="base", progress=True))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "base epoch 1" in captured.err


def test_bad_configs_are_rejected_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="xgboost")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    tiny = write_synthetic(SyntheticConfig(users=2, items=10, categories=6, events_per_user=(2, 3)), tmp_path / "two.parquet")
    with pytest.raises(ValueError, match="empty validation split"):
        train(tiny_config(tiny, tmp_path))


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(reg="none", reg_lambda=0.5), "--reg-lambda 0.5 would be ignored"),
        (dict(reg="dropout", reg_lambda=0.1), "--reg-lambda 0.1 would be ignored"),
        (dict(model="base", attention_softmax=True), "--attention-softmax needs a model with attention"),
        (dict(model="lr", attention_softmax=True), "--attention-softmax needs a model with attention"),
    ],
)
def test_switches_the_run_would_ignore_are_refused(kw, flag):
    """A switch the chosen regulariser or model does not use is an error naming the flag, not silently dropped."""
    with pytest.raises(ValueError, match=flag) as refused:
        TrainConfig(**kw)
    if "attention_softmax" in kw:  # the models with attention, from the registry
        assert "(din, din_dice)" in str(refused.value)
    TrainConfig(model="din_dice", attention_softmax=True)  # what they are for is still accepted
    TrainConfig(reg="l2", reg_lambda=0.5)


@pytest.mark.parametrize("reg,kw", [("l2", {"reg_lambda": 0.05}), ("mba", {"reg_lambda": 0.5}), ("dropout", {"id_dropout": 0.5})])
def test_regularisers_are_wired_into_training(tiny_log_path, tmp_path, reg, kw):
    plain = fit(tiny_config(tiny_log_path, tmp_path, model="base"), _samples(tiny_log_path))
    config = tiny_config(tiny_log_path, tmp_path, model="base", reg=reg, **kw)
    regularised = fit(config, _samples(tiny_log_path))
    assert np.isfinite(regularised.test["auc"])
    a = plain.model.embed.tables["item_id"].weight.detach()
    b = regularised.model.embed.tables["item_id"].weight.detach()
    assert (a - b).abs().max() > 1e-4  # same seed, same data: only the regulariser differs
    if reg in ("l2", "mba"):
        assert b.norm() < a.norm()  # and it shrinks the embeddings
    with pytest.raises(ValueError, match="reg-lambda"):
        tiny_config(tiny_log_path, tmp_path, reg="mba")


@pytest.mark.parametrize("model", ["lr", "wdl", "pnn", "deepfm", "din_dice"])
def test_every_model_trains_and_exports(tiny_log_path, tmp_path, model):
    result = train(tiny_config(tiny_log_path, tmp_path, model=model))
    bundle = load_bundle(result.bundle)
    assert bundle.model_type == model and bundle.has_attention == (model == "din_dice")
    assert bundle.manifest["parity_max_abs_diff"] <= 1e-5
    assert bundle.manifest["model_config"]["activation"] == ("dice" if model == "din_dice" else "prelu")
    assert 0.0 <= result.metrics["auc"] <= 1.0


def _samples(path):
    return build_samples(read_log(path), tiny_config(path, Path("unused")).sample_config())


def test_recorded_train_loss_is_the_epochs_mean_per_sample(tiny_log_path, tmp_path):
    """As the streamed trainer records it. With a learning rate of ~0 the model does not move,
    so the epoch's mean data loss is the (unmoved) model's log loss over the training samples;
    the progress bar's moving average over ~50 batches of 8 would not be."""
    from model.train import evaluate

    config = tiny_config(tiny_log_path, tmp_path, model="base", batch_size=8, lr=1e-12)
    samples = build_samples(read_log(tiny_log_path), config.sample_config())
    assert samples.num_batches(samples.train, 8) > 100
    fitted = fit(config, samples)
    want = evaluate(fitted.model, samples, samples.train, 4096)["logloss"]
    assert fitted.validation[0]["train_loss"] == pytest.approx(want, abs=2e-5)


@pytest.mark.parametrize("model", ["lr", "base", "din", "din_dice", "wdl", "pnn", "deepfm"])
def test_unseen_ids_have_a_zero_row_not_a_random_one(tiny_log_path, tmp_path, model):
    """Vocabularies come from training events, so no training sample holds UNK_ROW: the row
    keeps its start, which must be zero (an unseen ad scored by its other fields, the same
    for every seed), not the random init the other rows leave behind."""
    samples = _samples(tiny_log_path)
    result = fit(tiny_config(tiny_log_path, tmp_path, model=model, reg="l2", reg_lambda=1e-4), samples)
    tables = [m for m in result.model.modules() if isinstance(m, IdTable)]
    assert tables
    for table in tables:
        w = table.weight.detach()
        assert float(w[UNK_ROW].abs().max()) == 0.0, (table.field, table.inputs)
        assert float(w[FIRST_ID_ROW:].abs().max()) > 0.0  # the other rows did move or start away from zero
