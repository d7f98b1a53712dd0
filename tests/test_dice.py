"""Dice (paper, eq. 9-10): the formula, batch statistics over real positions only, running averages at eval."""

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.contract import PAD_ROW, FeatureSpec, hist_input
from model.dice import Dice
from model.export import random_inputs
from model.inputs import split_inputs
from model.registry import build_model
from tests.ddp_worker import CASES, launch, run


def test_eval_mode_is_the_papers_formula_on_the_running_statistics():
    dice = Dice(2, eps=1e-8).eval()
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, 0.5]))
        dice.running_mean.copy_(torch.tensor([1.0, -2.0]))
        dice.running_var.copy_(torch.tensor([4.0, 0.25]))
    s = torch.tensor([[3.0, -2.5], [-1.0, 0.0]])
    # p = sigmoid((s - mean) / sqrt(var + eps)); f = p s + (1 - p) alpha s
    # [0,0]: p = sigmoid(1) = 0.7310586; f = 0.7310586*3 + 0.2689414*0.1*3 = 2.2738582
    # [0,1]: p = sigmoid(-1) = 0.2689414; f = 0.2689414*-2.5 + 0.7310586*0.5*-2.5 = -1.5861768
    # [1,0]: p = sigmoid(-1) = 0.2689414; f = -0.2689414 + 0.7310586*0.1*-1 = -0.3420473
    # [1,1]: s = 0 -> 0
    want = torch.tensor([[2.2738582, -1.5861768], [-0.3420473, 0.0]])
    torch.testing.assert_close(dice(s), want, rtol=0, atol=1e-6)
    assert dice.running_mean.tolist() == [1.0, -2.0]  # eval never updates the statistics


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, 6, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([0.5, -1.0, 2.0])
    lengths = torch.tensor([6, 3, 0, 1])
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (4, 6): user 2 has no behaviours
    return s, mask


def test_training_statistics_exclude_padded_positions():
    s, mask = padded_batch()
    dice = Dice(3, momentum=0.1).train()
    out = dice(s, mask)
    real = s[mask]  # (10, 3)
    mean, var = real.mean(0), real.var(0, unbiased=False)
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(out, s * (p + (1 - p) * 0.25), rtol=0, atol=1e-6)
    torch.testing.assert_close(dice.running_mean, 0.1 * mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(dice.running_var, 0.9 + 0.1 * var, rtol=0, atol=1e-6)
    # garbage in the padded positions changes nothing at the real ones
    garbage = torch.where(mask.unsqueeze(-1), s, torch.full_like(s, 1e3))
    again = Dice(3).train()(garbage, mask)
    torch.testing.assert_close(again[mask], out[mask], rtol=0, atol=0)
    # without the mask the padding WOULD pollute the statistics (so the test above can fail)
    assert (Dice(3).train()(garbage)[mask] - out[mask]).abs().max() > 1e-2


def test_train_and_eval_modes_agree_once_running_statistics_converged():
    s, mask = padded_batch(seed=1)
    dice = Dice(3, momentum=0.1)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([-0.3, 0.2, 0.7]))
        dice.train()
        for _ in range(400):  # (1 - 0.1)^400 ~ 5e-19: converged to float precision
            train_out = dice(s, mask)
        eval_out = dice.eval()(s, mask)
    torch.testing.assert_close(eval_out[mask], train_out[mask], rtol=0, atol=1e-6)
    # before convergence they differ: the comparison above is not vacuous
    fresh = Dice(3).train()
    with torch.no_grad():
        first = fresh(s, mask)
        assert (fresh.eval()(s, mask)[mask] - first[mask]).abs().max() > 1e-2



def test_a_short_last_batch_moves_the_running_statistics_in_proportion_to_its_size():
    """An epoch's leftover batch (here 1 sample after batches of 1024) must not pull the
    statistics every later score uses by a full batch's momentum."""
    torch.manual_seed(0)
    dice = Dice(1).train()
    for _ in range(200):
        dice(torch.randn(1024, 1) * 2 + 1)  # mean 1, variance 4
    mean, var = dice.running_mean.clone(), dice.running_var.clone()
    dice(torch.tensor([[5.0]]))  # a one-sample tail: its mean is 5, its variance 0
    assert abs(float(dice.running_mean - mean)) < 1e-3 and abs(float(dice.running_var - var)) < 1e-2
    half = torch.randn(512, 1) * 2 + 9  # half a batch, far from the running mean
    before = dice.running_mean.clone()
    dice(half)
    torch.testing.assert_close(dice.running_mean, torch.lerp(before, half.mean(0), 0.1 * 512 / 1024))


def test_a_resumed_run_weighs_its_batches_as_the_uninterrupted_one():
    """The largest batch seen is training state: saved and restored with the running statistics."""
    torch.manual_seed(0)
    batches = [torch.randn(64, 2) * 3 + 1 for _ in range(3)] + [torch.randn(5, 2) - 4]
    straight = Dice(2).train()
    for b in batches:
        straight(b)
    first = Dice(2).train()
    for b in batches[:3]:
        first(b)
    resumed = Dice(2).train()
    resumed.load_state_dict(first.state_dict())  # a checkpoint after three batches
    resumed(batches[3])
    torch.testing.assert_close(resumed.running_mean, straight.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(resumed.running_var, straight.running_var, rtol=0, atol=0)
    old = {k: v for k, v in first.state_dict().items() if k != "largest_batch"}  # saved before it existed
    Dice(2).load_state_dict(old)

def test_gradients_flow_through_the_batch_statistics():
    s, mask = padded_batch(seed=2)
    s.requires_grad_(True)
    Dice(3).train()(s, mask)[mask].sum().backward()
    assert torch.all(s.grad[~mask] == 0)  # padding gets no gradient, even through E[s], Var[s]
    assert s.grad[mask].abs().sum() > 0


def test_din_with_dice_in_training_mode_ignores_padding():
    """The whole model in train mode: extra padded slots change neither scores nor statistics."""
    spec = FeatureSpec(vocab_sizes={"item_id": 30, "cate_id": 6}, max_history=10)
    torch.manual_seed(0)
    model = build_model("din_dice", spec, ModelConfig(embedding_dim=4)).train()
    x = {k: torch.from_numpy(v) for k, v in random_inputs(spec, 5, 6, 5, seed=3).items()}
    longer = dict(x)
    for f in spec.sequence_fields:
        h = x[hist_input(f)]
        longer[hist_input(f)] = torch.cat([h, torch.full((5, 4), PAD_ROW)], dim=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logit, att = model(*split_inputs(spec, x))
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, Dice)]
    model.load_state_dict(state)
    logit2, att2 = model(*split_inputs(spec, longer))
    stats2 = [m.running_mean.clone() for m in model.modules() if isinstance(m, Dice)]
    torch.testing.assert_close(logit2, logit, rtol=0, atol=1e-5)
    torch.testing.assert_close(att2[:, :6], att, rtol=0, atol=1e-5)
    assert len(stats) == 4  # attention unit: 2 layers, CTR MLP: 2 layers
    for a, b in zip(stats, stats2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_dice_is_used_only_by_din_dice():
    spec = FeatureSpec(vocab_sizes={"item_id": 30, "cate_id": 6})
    assert not any(isinstance(m, Dice) for m in build_model("din", spec).modules())
    assert sum(isinstance(m, Dice) for m in build_model("din_dice", spec).modules()) == 4
    with pytest.raises(ValueError):
        Dice(3)(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))  # a mask of the wrong shape


def test_two_processes_use_the_statistics_of_the_global_batch(tmp_path):
    """Like SyncBatchNorm: 2 gloo processes, each with part of a batch (or none), = 1 process with all of it."""
    launch("dice", tmp_path)
    for masked in (True, False):
        whole = run((0, 4), masked)  # one process, no process group: the reference
        for case, split in CASES.items():
            parts = [dict(np.load(tmp_path / f"{case}-{'mask' if masked else 'flat'}-rank{r}.npz")) for r in (0, 1)]
            for key in ("out", "grad"):  # each process's rows, in order, are the whole batch's
                np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), whole[key], rtol=0, atol=1e-5, err_msg=f"{case} {key}")
            for p in parts:  # summed parameter gradient and running statistics: the same on both
                for key in ("alpha_grad", "running_mean", "running_var"):
                    np.testing.assert_allclose(p[key], whole[key], rtol=0, atol=1e-5, err_msg=f"{case} {key}")
    # one process alone on half the batch (its own statistics) differs: the comparison above can fail
    half, whole = run(CASES["halves"][0], True), run((0, 4), True)
    assert np.abs(half["out"] - whole["out"][:2]).max() > 1e-2
