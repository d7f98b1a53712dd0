"""An experiment's numbers as the paper shows them: Table 1, Table 3, Fig. 4, 5 and 6.

Input is the results dict of model/experiment.py (what results.json holds) plus the figure
data; output is report.md and PNGs. Nothing here trains or changes a number: the tables
print the values of results.json, rounded to 4 decimals.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from model.data.movielens import GENRES

VALIDATION_PLOT = "validation_gauc.png"
ATTENTION_PLOT = "attention.png"
EMBEDDING_PLOT = "embeddings.png"


def _pm(summary: dict | None, digits: int = 4, percent: bool = False) -> str:
    if summary is None:
        return "–"
    scale = 100.0 if percent else 1.0
    mean, std = summary["mean"], summary["std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    unit = "%" if percent else ""
    if std is None:  # one seed: no spread to show
        return f"{mean * scale:.{digits}f}{unit}"
    return f"{mean * scale:.{digits}f}{unit} ± {std * scale:.{digits}f}{unit}"


def comparison_table(results: dict) -> str:
    """The paper's Table 3 layout: one line per model, test metrics mean ± std over seeds."""
    n = results["config"]["seeds"]
    lines = [
        f"| Model | GAUC | AUC | Logloss | RelaImpr (GAUC) | Params | Train s / seed | best epochs |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for name, m in results["models"].items():
        rel = "0.00% (baseline)" if name == results.get("baseline") else _pm(m["relaimpr"], 2, percent=True)
        lines.append(
            f"| {m['display_name']} (`{name}`) | {_pm(m['gauc'])} | {_pm(m['auc'])} | {_pm(m['logloss'])} | {rel} "
            f"| {m['num_params']:,} | {m['train_seconds']['mean']:.1f} | {', '.join(map(str, m['best_epoch']))} |"
        )
    lines.append("")
    if n == 1:
        lines.append("Test split, one seed: no spread over seeds (run --seeds 2 or more to see one); values in `results.json`.")
    else:
        lines.append(f"Test split, mean ± sample std (ddof=1) over {n} seeds; per-seed values in `results.json`.")
    return "\n".join(lines)


def data_table(results: dict) -> str:
    """The paper's Table 1 columns (users, goods, categories, samples) plus the split."""
    s = results["data_stats"]
    split = s["split_samples"]
    users = s["split_users"]
    return "\n".join(
        [
            "| Dataset | Users | Items | Categories | Samples | train / validation / test samples | train / validation / test users | click rate |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
            f"| {s['name']} | {s['users']:,} | {s['items']:,} | {s['categories']:,} | {s['samples']:,} "
            f"| {split['train']:,} / {split['validation']:,} / {split['test']:,} "
            f"| {users['train']:,} / {users['validation']:,} / {users['test']:,} | {s['click_rate']:.3f} |",
        ]
    )


def din_vs_base(results: dict) -> str:
    """One sentence: does DIN (and DIN with Dice) beat BaseModel in test GAUC by more than the std?"""
    models = results["models"]
    if "base" not in models:
        return ""
    base = models["base"]["gauc"]
    out = []
    for name in ("din", "din_dice"):
        if name not in models:
            continue
        m = models[name]["gauc"]
        diff = m["mean"] - base["mean"]
        if m["std"] is None or base["std"] is None:  # one seed: nothing to weigh the difference against
            out.append(
                f"- {models[name]['display_name']}: GAUC {m['mean']:.4f} vs BaseModel {base['mean']:.4f} "
                f"(difference {diff:+.4f}) over one seed: no spread to judge it by; run --seeds 2 or more."
            )
            continue
        std = max(m["std"], base["std"])
        if diff > std:
            verdict = "beats BaseModel by more than the std over seeds"
        elif diff > 0:
            verdict = "is above BaseModel, but NOT by more than the std over seeds (not a clear win)"
        else:
            verdict = "does NOT beat BaseModel"
        out.append(
            f"- {models[name]['display_name']}: GAUC {m['mean']:.4f} vs BaseModel {base['mean']:.4f} "
            f"(difference {diff:+.4f}; larger std {std:.4f}): {verdict}."
        )
    return "\n".join(out)


def _protocol(results: dict) -> str:
    c, s = results["config"], results["data_stats"]
    if s["has_split_column"]:
        split = (
            "the log's own `split` column (Amazon protocol: each user's last review is the test target, "
            "the second-to-last the validation target, the rest train)"
        )
    else:
        split = (
            f"users split 80/10/10 into train / validation / test (seeded with split seed {c['split_seed']}): "
            "no validation or test user's event is ever a training sample or in a training history"
        )
    if s["has_labels"]:
        samples = (
            "every event is a sample with its label; a history holds the user's earlier behaviours, strictly "
            f"before the target's time ({s['behaviours']:,} of the {s['events']:,} events are behaviours, by "
            "`BehaviourLog.behaviour_mask`: every rating for MovieLens, the reviews but never a sampled negative "
            "for Amazon, the clicks of a labelled event log)"
        )
    else:
        samples = (
            "every event is a positive; one negative per positive is drawn from the training events "
            "(item popularity, redrawn when it hits the positive's item) and shares the positive's history; "
            "a history holds the user's events strictly before the target's time"
        )
    m = results["machine"]
    return "\n".join(
        [
            f"- Split: {split}.",
            f"- Samples: {samples}; newest first, at most {c['max_history']} behaviours.",
            "- Model selection on validation only: each (model, seed) keeps the epoch with the best validation "
            "GAUC; the test split is evaluated once, with those weights. No hyperparameter was tuned on test.",
            f"- Seeds 0..{c['seeds'] - 1} change the initialisation and the batch order; the data split and the "
            f"sampled negatives are fixed (split seed {c['split_seed']}), so every line is measured on the same test set.",
            f"- Training: Adam, learning rate {c['lr']}, batch {c['batch_size']}, {c['epochs']} epochs, embeddings "
            f"{c['embedding_dim']} per id field (item ++ category = {2 * c['embedding_dim']}), MLP 200-80-1 (PReLU; "
            "Dice for DIN with Dice), attention unit 80-40-1 without softmax, no regularisation. Every model scores "
            "through the same user-batched forward pass that is exported to ONNX.",
            "- Metrics: AUC over all test samples; GAUC = impression-weighted mean of per-user AUC (paper eq. 1), "
            "users whose samples are all one class skipped; logloss; RelaImpr = (GAUC(model) - 0.5) / "
            "(GAUC(BaseModel) - 0.5) - 1 (paper eq. 10, whose AUC is the user-weighted one), seed i against "
            "BaseModel's seed i.",
            f"- Machine: {m['cpus']} CPUs, torch threads per run: {m['torch_threads']}, torch {m['torch']}, Python {m['python']}. "
            "Train time is the wall clock of the epochs (training and validation) of one seed.",
        ]
    )


def render_report(results: dict) -> str:
    c = results["config"]
    seconds = results["seconds"]
    total = seconds.get("total", seconds["fit_total"])
    figures = [
        f"![validation GAUC per epoch]({VALIDATION_PLOT})",
        "",
        "Validation GAUC after each epoch, mean over seeds (band: min to max), like the paper's Fig. 4.",
    ]
    if results.get("figure_model"):
        figures += [
            "",
            f"![attention of one test user's behaviours for two candidates]({ATTENTION_PLOT})",
            "",
            f"Like the paper's Fig. 5: the weights {results['models'][results['figure_model']]['display_name']} "
            "(seed 0) gives each behaviour of one test user, for two candidate ads of different categories.",
            "",
            f"![item embeddings]({EMBEDDING_PLOT})",
            "",
            "Like the paper's Fig. 6: t-SNE of the learned item embeddings of the largest categories (marker = "
            "category), coloured by the predicted CTR of each item as a candidate for the same test user.",
        ]
    return "\n".join(
        [
            f"# Model comparison on `{results['data']}`",
            "",
            f"Produced by `din experiment` ({results['created_at']}); {len(results['models'])} models x "
            f"{c['seeds']} seeds x {c['epochs']} epochs in {total / 60:.1f} min. Every number below is "
            "printed from `results.json` of the same run.",
            "",
            "## Data (like the paper's Table 1)",
            "",
            data_table(results),
            "",
            "## Results (like the paper's Table 3)",
            "",
            comparison_table(results),
            "",
            din_vs_base(results),
            "",
            "## Protocol",
            "",
            _protocol(results),
            "",
            "## Figures",
            "",
            *figures,
            "",
            "## Reproduce",
            "",
            "```",
            results["command"] or "(run from Python: model.experiment.run_experiment)",
            "```",
            "",
        ]
    )


def write_report(out: Path, results: dict) -> Path:
    path = out / "report.md"
    path.write_text(render_report(results))
    return path


# ------------------------------------------------------------------------------ figures


def category_name(data: str, cate: int) -> str:
    """A readable category label: MovieLens genres by name, anything else by id."""
    if data.split(":", 1)[0].strip().lower() == "movielens" and 0 <= cate < len(GENRES):
        return GENRES[cate]
    return f"category {cate}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_validation_gauc(results: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in results["models"].items():
        curves = np.array([[np.nan if v is None else v for v in seed] for seed in m["validation_gauc"]], dtype=float)
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = np.nanmean(curves, axis=0)
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=m["display_name"])
        if curves.shape[0] > 1:
            ax.fill_between(epochs, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("validation GAUC")
    ax.set_title(f"Validation GAUC per epoch ({results['data']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention(data: str, example, path: Path) -> Path:
    plt = _pyplot()
    n = len(example.behaviour_items)
    fig, axes = plt.subplots(len(example.candidates), 1, figsize=(max(8, 0.28 * n + 2), 5.5), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (item, cate), weights in zip(axes, example.candidates, example.weights):
        same = np.array(example.behaviour_cates) == cate
        ax.bar(np.arange(n), weights, color=np.where(same, "tab:red", "tab:gray"))
        ax.set_ylabel("attention")
        ax.set_title(f"candidate item {item} ({category_name(data, cate)}); red: behaviours of the same category", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    labels = [f"{category_name(data, c)} · {i}" for i, c in zip(example.behaviour_items, example.behaviour_cates)]
    axes[-1].set_xticks(np.arange(n))
    axes[-1].set_xticklabels(labels, rotation=90, fontsize=6)
    axes[-1].set_xlabel(f"behaviours of test user {example.user_id}, newest first (category · item)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def project_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE (scikit-learn) of the rows; PCA when there are too few rows for t-SNE."""
    if vectors.shape[0] > 10:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, (vectors.shape[0] - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
        return xy, "t-SNE"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(vectors), "PCA"


def plot_embeddings(data: str, example, path: Path) -> Path:
    plt = _pyplot()
    xy, method = project_2d(example.vectors)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    fig, ax = plt.subplots(figsize=(8, 6.5))
    vmin, vmax = float(example.ctr.min()), float(example.ctr.max())
    scatter = None
    for k, cate in enumerate(np.unique(example.cates)):
        sel = example.cates == cate
        scatter = ax.scatter(
            xy[sel, 0], xy[sel, 1], c=example.ctr[sel], cmap="viridis", vmin=vmin, vmax=vmax,
            marker=markers[k % len(markers)], s=18, edgecolors="none", label=category_name(data, int(cate)),
        )
    fig.colorbar(scatter, ax=ax, label=f"predicted CTR for test user {example.user_id}")
    legend = ax.legend(fontsize=7, loc="best", markerscale=1.3)
    for handle in legend.legend_handles:
        handle.set_color("black")
    ax.set_title(f"{method} of learned item embeddings (marker: category; colour: CTR)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(out: Path, results: dict, attention, embeddings) -> list[Path]:
    """The run's figures; one this run does not draw (no DIN among the models) is removed, not left from an earlier run."""
    files = [plot_validation_gauc(results, out / VALIDATION_PLOT)]
    for example, plot, name in ((attention, plot_attention, ATTENTION_PLOT), (embeddings, plot_embeddings, EMBEDDING_PLOT)):
        if example is not None:
            files.append(plot(results["data"], example, out / name))
        else:
            (out / name).unlink(missing_ok=True)
    return files
