"""Why does (or doesn't) DIN beat BaseModel on a dataset? Numbers that answer it.

    PYTHONPATH=. python docs/experiments/investigate_din_vs_base.py --data movielens:PATH [--epochs 5] [--lr 0.001]

Same samples as `din experiment` (split seed 0). Prints a markdown report:
1. no-model scorers on the test split: how much of the ranking signal is the candidate's own
   quality (its training click rate) and how much is "the candidate fits the history"
   (share of the history in the candidate's category: the signal local activation exploits);
2. BaseModel and DIN, seed 0, with the experiment's settings: test GAUC, and a paired
   bootstrap over TEST USERS of the GAUC difference (how noisy the comparison is);
3. DIN's attention: mean weight of behaviours in the candidate's category vs the others.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from model.contract import PAD_ROW, cand_input, hist_input
from model.data.samples import SampleConfig, build_samples
from model.data.sources import load_source
from model.inputs import split_inputs
from model.metrics import auc, gauc, per_user_auc
from model.train import TrainConfig, fit, predict


def history_category_share(samples, split) -> np.ndarray:
    """Per sample: fraction of its (truncated) history whose category is the candidate's."""
    out = np.zeros(len(split))
    for start in range(0, len(split), 4096):
        idx = np.arange(start, min(start + 4096, len(split)))
        batch = samples.batch(split, idx)
        h = batch.inputs[hist_input("cate_id")].numpy()
        real = batch.inputs[hist_input("item_id")].numpy() != PAD_ROW
        c = batch.inputs[cand_input("cate_id")].numpy()[:, None]
        out[idx] = ((h == c) & real).sum(1) / np.maximum(real.sum(1), 1)
    return out


def item_click_rate(samples, split) -> np.ndarray:
    """Per sample: the candidate item's click rate in the training samples (smoothed to the mean)."""
    rows, label = samples.train.cand_rows["item_id"], samples.train.label
    v = samples.spec.vocab_sizes["item_id"]
    clicks = np.bincount(rows, weights=label, minlength=v)
    shows = np.bincount(rows, minlength=v)
    prior = label.mean()
    rate = (clicks + 10 * prior) / (shows + 10)
    return rate[split.cand_rows["item_id"]]


def user_gauc_terms(labels, scores, users):
    ids, user_auc, weight = per_user_auc(labels, scores, users)
    return ids, user_auc, weight


def paired_bootstrap(labels, a, b, users, rounds=2000, seed=0):
    """GAUC(b) - GAUC(a), and its 2.5/97.5 percentiles when test users are resampled."""
    ids_a, auc_a, w = user_gauc_terms(labels, a, users)
    ids_b, auc_b, _ = user_gauc_terms(labels, b, users)
    assert np.array_equal(ids_a, ids_b)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, ids_a.size, (rounds, ids_a.size))
    diffs = (w[pick] * (auc_b[pick] - auc_a[pick])).sum(1) / w[pick].sum(1)
    point = float((w * (auc_b - auc_a)).sum() / w.sum())
    return point, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)), float((auc_b > auc_a).mean())


@torch.no_grad()
def attention_by_category(model, samples, split, max_samples=4000) -> tuple[float, float, float]:
    """Mean DIN weight of same-category vs other-category behaviours, and the share of same-category ones."""
    model.eval()
    idx = np.arange(min(len(split), max_samples))
    same_w, other_w, same_n, total = 0.0, 0.0, 0, 0
    for start in range(0, idx.size, 1024):
        batch = samples.batch(split, idx[start : start + 1024])
        _, att = model(*split_inputs(samples.spec, batch.inputs))
        h = batch.inputs[hist_input("cate_id")]
        real = batch.inputs[hist_input("item_id")] != PAD_ROW
        same = (h == batch.inputs[cand_input("cate_id")].unsqueeze(1)) & real
        other = ~same & real
        same_w += float(att[same].sum())
        other_w += float(att[other].sum())
        same_n += int(same.sum())
        total += int(real.sum())
    return same_w / max(same_n, 1), other_w / max(total - same_n, 1), same_n / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip-scorers", action="store_true")
    args = parser.parse_args()

    log = load_source(args.data)
    samples = build_samples(log, SampleConfig(max_history=50, seed=0))
    test = samples.test
    print(f"## DIN vs BaseModel on `{args.data}` (split seed 0, test: {len(test)} samples, {test.users.size} users)\n")

    scorers = () if args.skip_scorers else (
        ("candidate item's training click rate (item quality only)", item_click_rate(samples, test)),
        ("share of the history in the candidate's category (interest match only)", history_category_share(samples, test)),
    )
    if scorers:
        print("### 1. Scorers without a model (test split)\n")
        print("| scorer | AUC | GAUC |\n| --- | ---: | ---: |")
    for name, score in scorers:
        print(f"| {name} | {auc(test.label, score):.4f} | {gauc(test.label, score, test.user_id):.4f} |")

    print(f"\n### 2. BaseModel and DIN, seed 0, {args.epochs} epochs, Adam learning rate {args.lr}\n")
    probs = {}
    for name in ("base", "din"):
        config = TrainConfig(
            data=args.data, model=name, epochs=args.epochs, lr=args.lr, progress=False, threads=1, split_seed=0, seed=0
        )
        result = fit(config, samples)
        probs[name] = predict(result.model, samples, test, 4096)
        if name == "din":
            din_model = result.model
        curve = ", ".join(f"{v['gauc']:.4f}" for v in result.validation)
        print(
            f"- {name}: test GAUC {result.test['gauc']:.4f}, AUC {result.test['auc']:.4f} (best epoch {result.best_epoch}; "
            f"validation GAUC per epoch {curve})"
        )
    point, lo, hi, share = paired_bootstrap(test.label, probs["base"], probs["din"], test.user_id)
    print(
        f"\nGAUC(DIN) - GAUC(BaseModel) = {point:+.4f}; 95% interval over resampled test users "
        f"[{lo:+.4f}, {hi:+.4f}]; DIN has the higher AUC for {share:.0%} of the test users."
    )

    same, other, frac = attention_by_category(din_model, samples, test)
    print("\n### 3. DIN's attention (seed 0, first 4,000 test samples)\n")
    print(
        f"Mean weight of a behaviour in the candidate's category: {same:.4f}; of any other behaviour: {other:.4f} "
        f"(ratio {same / other if other else float('nan'):.2f}); {frac:.1%} of the history behaviours share the "
        "candidate's category."
    )


if __name__ == "__main__":
    main()
