"""Regularisers: MBA's gradient (zero on absent rows, 2 lambda w_j / n_j on present ones), plain L2,
n_j counted over the training samples, id dropout."""

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.contract import FIRST_ID_ROW, PAD_ROW, FeatureSpec, cand_input, hist_input, profile_input
from model.data.log import BehaviourLog, UserProfiles
from model.data.samples import SampleConfig, build_samples
from model.embedding import IdTable
from model.inputs import split_inputs
from model.regularization import (
    RegularizationConfig,
    drop_ids,
    id_counts,
    id_tables,
    l2_penalty,
    mba_penalty,
    present_rows,
)
from model.objective import Objective
from model.registry import build_model

SPEC = FeatureSpec(profile_fields=("gender",), vocab_sizes={"item_id": 12, "cate_id": 5, "gender": 4}, max_history=4)
BATCH = {
    hist_input("item_id"): torch.tensor([[3, 4, 0], [4, 0, 0]]),
    hist_input("cate_id"): torch.tensor([[2, 2, 0], [3, 0, 0]]),
    profile_input("gender"): torch.tensor([2, 3]),
    cand_input("item_id"): torch.tensor([7, 3]),
    cand_input("cate_id"): torch.tensor([4, 2]),
    "cand_user": torch.tensor([0, 1]),
}
PRESENT = {  # per id input: its rows in BATCH, padding excluded
    hist_input("item_id"): {3, 4}, cand_input("item_id"): {3, 7},
    hist_input("cate_id"): {2, 3}, cand_input("cate_id"): {2, 4},
    profile_input("gender"): {2, 3},
}  # fmt: skip


def test_present_rows_are_the_batch_ids_without_padding():
    rows = present_rows(SPEC, BATCH)
    assert {name: set(r.tolist()) for name, r in rows.items()} == PRESENT


def _counts() -> dict[str, torch.Tensor]:
    """n_j per input, different per input so that a table's sum is visible: (j + 1) * (k + 1)."""
    return {
        name: torch.arange(1, SPEC.vocab_sizes[name.split("_", 1)[1]] + 1, dtype=torch.float32) * (k + 1)
        for k, name in enumerate(PRESENT)
    }


@pytest.mark.parametrize("name", ["deepfm", "din", "lr"])
def test_mba_gradient_is_zero_on_absent_rows_and_2_lambda_w_over_n_on_present_rows(name):
    torch.manual_seed(0)
    model = build_model(name, SPEC, ModelConfig(embedding_dim=3))
    with torch.no_grad():
        for t in id_tables(model):
            t.weight.normal_()  # also the zero-initialised first-order tables of lr and DeepFM
    counts = _counts()
    lam = 0.3
    penalty = mba_penalty(model, SPEC, BATCH, counts, lam)
    penalty.backward()
    tables = id_tables(model)
    assert len(tables) == {"din": 3, "deepfm": 3 + 5, "lr": 5}[name]  # first-order: ad, bag per field, profile weights
    expected_total = 0.0
    for t in tables:
        present = sorted(set().union(*(PRESENT[i] for i in t.inputs)))
        absent = [j for j in range(t.weight.shape[0]) if j not in present]
        w, n = t.weight.detach(), sum(counts[i] for i in t.inputs)
        assert torch.all(t.weight.grad[absent] == 0), (t.inputs, t.weight.grad)
        torch.testing.assert_close(t.weight.grad[present], 2 * lam * w[present] / n[present].unsqueeze(1), rtol=1e-6, atol=0)
        expected_total += float((w[present].pow(2).sum(1) / n[present]).sum())
    assert float(penalty.detach()) == pytest.approx(lam * expected_total, rel=1e-6)
    # only id tables get a gradient: the MLPs are not regularised
    assert all(p.grad is None for n, p in model.named_parameters() if "mlp" in n)


def test_mba_leaves_a_first_order_weight_alone_in_a_batch_without_its_feature():
    """lr's "the ad is item 4" weight: item 4 is only in a history here, so the batch does not
    hold that feature (its data gradient is 0) and MBA must not shrink it either; the shared
    embedding of item 4 (used by that history) is penalised."""
    torch.manual_seed(0)
    model = build_model("lr", SPEC)
    with torch.no_grad():
        for t in id_tables(model):
            t.weight.normal_()
    logit, _ = model(*split_inputs(SPEC, BATCH))
    data = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([1.0, 0.0]))
    penalty = mba_penalty(model, SPEC, BATCH, _counts(), 0.3)
    (data + penalty).backward()
    ad = next(t for t in id_tables(model) if t.inputs == (cand_input("item_id"),))
    bag = next(t for t in id_tables(model) if t.inputs == (hist_input("item_id"),))
    assert ad.weight.grad[4].item() == 0.0  # item 4: history only
    assert bag.weight.grad[7].item() == 0.0  # item 7: candidate only
    assert ad.weight.grad[7].item() != 0.0 and bag.weight.grad[4].item() != 0.0



def _one_adam_step(reg: RegularizationConfig, lr: float = 0.01) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(id tables' weights before, after) one training step on BATCH as the trainers take it."""
    torch.manual_seed(0)
    model = build_model("din", SPEC)
    with torch.no_grad():
        for t in id_tables(model):
            t.weight.normal_()
    counts = {name: c.numpy() for name, c in _counts().items()} if reg.kind == "mba" else None
    objective = Objective.build(SPEC, reg, counts)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    before = [t.weight.detach().clone() for t in id_tables(model)]
    logit, _ = model(*split_inputs(SPEC, BATCH))
    objective(logit, torch.tensor([1.0, 0.0])).backward()
    optimizer.step()
    objective.regularize(model, objective.rows(BATCH), lr)
    return before, [t.weight.detach().clone() for t in id_tables(model)]


def test_mba_is_the_papers_step_beside_adam_not_a_loss_term_adam_rescales():
    """With Adam, MBA is eq. 8's decay w_j -= lr * 2 lambda / n_j * w_j on the batch's rows only.

    As a loss term, Adam's per-coordinate scaling made a row's shrinkage ~lr whatever its n_j,
    and its momentum moved rows absent from the batch; compared with the same step without a
    regulariser, rows absent from the batch must be untouched and present ones scaled by n_j.
    """
    lam, lr = 0.3, 0.01
    _, plain = _one_adam_step(RegularizationConfig("none"), lr)
    _, mba = _one_adam_step(RegularizationConfig("mba", lam), lr)
    counts = _counts()
    model = build_model("din", SPEC)
    for t, p, m in zip(id_tables(model), plain, mba):
        present = sorted(set().union(*(PRESENT[i] for i in t.inputs)))
        absent = [j for j in range(p.shape[0]) if j not in present]
        n = sum(counts[i] for i in t.inputs)
        assert torch.equal(m[absent], p[absent]), t.inputs
        torch.testing.assert_close(m[present], p[present] * (1 - lr * 2 * lam / n[present]).unsqueeze(1), rtol=1e-6, atol=1e-7)
        assert not torch.equal(m[present], p[present])


def test_the_loss_the_optimiser_sees_is_the_data_loss_alone():
    logit, label = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    objective = Objective.build(SPEC, RegularizationConfig("l2", 0.5))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(objective(logit, label), bce(logit, label))
    torch.testing.assert_close(objective(logit, label, share=0.25), bce(logit, label, reduction="sum") * 0.25)


def test_l2_step_decays_every_row_of_every_id_table():
    lam, lr = 0.3, 0.01
    _, plain = _one_adam_step(RegularizationConfig("none"), lr)
    _, l2 = _one_adam_step(RegularizationConfig("l2", lam), lr)
    for p, w in zip(plain, l2):
        torch.testing.assert_close(w, p * (1 - lr * 2 * lam), rtol=1e-6, atol=1e-7)

def test_plain_l2_reaches_every_row():
    torch.manual_seed(1)
    model = build_model("base", SPEC, ModelConfig(embedding_dim=3))
    l2_penalty(model, 0.5).backward()
    for t in id_tables(model):
        torch.testing.assert_close(t.weight.grad, 2 * 0.5 * t.weight.detach(), rtol=1e-6, atol=0)
        assert torch.all(t.weight.grad[FIRST_ID_ROW:].abs().sum(1) > 0)  # every id's row, present in a batch or not (PAD and UNK start at 0)


def test_id_counts_are_occurrences_in_the_training_samples():
    """Brute force: gather every training sample's (truncated) history and count rows."""
    rng = np.random.default_rng(0)
    n = 120
    log = BehaviourLog(
        user_id=rng.integers(1, 16, n), item_id=rng.integers(1, 25, n), cate_id=rng.integers(1, 5, n),
        timestamp=rng.integers(0, 50, n),
        profiles=UserProfiles(user_id=np.arange(1, 16), fields={"gender": np.arange(15) % 2}),
    )
    s = build_samples(log, SampleConfig(max_history=3, seed=1))
    counts = id_counts(s)
    batch = s.batch(s.train, np.arange(len(s.train)))
    inputs = {name: f for f in s.spec.sequence_fields for name in (hist_input(f), cand_input(f))}
    inputs |= {profile_input(f): f for f in s.spec.profile_fields}
    assert counts.keys() == inputs.keys()
    for name, f in inputs.items():
        want = np.bincount(batch.inputs[name].reshape(-1).numpy(), minlength=s.spec.vocab_sizes[f]).astype(float)
        want[PAD_ROW] = 0
        np.testing.assert_array_equal(counts[name], want)
    assert counts[hist_input("item_id")].sum() > len(s.train)  # every behaviour of every window
    assert counts[cand_input("item_id")].sum() == len(s.train)  # one candidate per sample


def test_id_dropout_drops_each_id_independently_to_padding():
    big = {k: (v.repeat(200, 30) if v.dim() == 2 else v.repeat(3000)) for k, v in BATCH.items()}
    g = torch.Generator().manual_seed(0)
    out = drop_ids(SPEC, big, 0.5, g)
    for name, x in big.items():
        if name == "cand_user":
            assert torch.equal(out[name], x)  # never an id
            continue
        real = x != PAD_ROW
        dropped = (out[name] == PAD_ROW) & real
        assert torch.equal(out[name][~dropped], x[~dropped])
        assert abs(dropped.sum().item() / real.sum().item() - 0.5) < 0.02, name
    assert torch.equal(drop_ids(SPEC, BATCH, 0.0, g)[hist_input("item_id")], BATCH[hist_input("item_id")])
    again = drop_ids(SPEC, big, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], out[k]) for k in big)


def test_config_validation_names_the_switch():
    with pytest.raises(ValueError, match="reg-lambda"):
        RegularizationConfig(kind="mba", lam=0.0)
    with pytest.raises(ValueError, match="none, l2, mba, dropout"):
        RegularizationConfig(kind="l1")
    with pytest.raises(ValueError, match="dropout"):
        RegularizationConfig(kind="dropout", id_dropout=1.0)
    assert RegularizationConfig(kind="l2", lam=0.01).lam == 0.01


def test_tables_know_their_field():
    model = build_model("lr", SPEC)
    assert sorted(t.field for t in id_tables(model)) == ["cate_id", "cate_id", "gender", "item_id", "item_id"]
    assert all(isinstance(t, IdTable) for t in id_tables(model))
