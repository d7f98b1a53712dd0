"""The paper's model comparison, reproducibly: every model x every seed on one sample set.

    data SPEC -> behaviour log -> samples (built ONCE: every model and seed sees the same
    train / validation / test samples) -> fit each model with each seed (select the epoch on
    validation, evaluate test once) -> aggregate -> results.json, report.md, figures

Seeds change the initialisation and the batch order; the data split and the sampled
negatives are fixed by `split_seed`, so the test set is the same for every line of the
table. The figures of the paper's Fig. 5 and 6 come from the first seed's DIN.
Rendering (markdown, plots) lives in model/report.py; this module owns the runs and numbers.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.bundle import finite
from model.cpu import cores
from model.data.log import BehaviourLog
from model.data.samples import SampleConfig, Samples, build_samples
from model.data.sources import load_source
from model.inputs import split_inputs
from model.contract import PAD_ROW, cand_input, hist_input
from model.metrics import rela_impr
from model.registry import DISPLAY_NAMES, MODELS
from model.train import FitResult, TrainConfig, fit

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("lr", "base", "wdl", "pnn", "deepfm", "din", "din_dice")
METRICS = ("auc", "gauc", "logloss", "relaimpr")
BASELINE = "base"


@dataclass(frozen=True)
class ExperimentConfig:
    data: str = "synthetic"
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: int = 3
    epochs: int = 5
    out: Path = Path("reports/experiment")
    batch_size: int = 1024
    lr: float = 1e-3
    embedding_dim: int = 16
    max_history: int = 50
    split_seed: int = 0  # data split and sampled negatives: the same for every model and seed
    # torch intra-op threads per run. One: these models' ops are small, and on a busy machine
    # two threads spin-wait on each other (measured: 2.5 s vs 30 s for a BaseModel epoch)
    threads: int | None = 1
    progress: bool = True
    command: str = ""  # the command line that ran this, for the report

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(MODELS)}")
        if not self.models:
            raise ValueError("--models needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--models lists a model twice: {','.join(self.models)}")
        for name in ("seeds", "epochs", "batch_size", "embedding_dim", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def train_config(self, model: str, seed: int) -> TrainConfig:
        return TrainConfig(
            data=self.data, model=model, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
            max_history=self.max_history, embedding_dim=self.embedding_dim, threads=self.threads, progress=False,
            split_seed=self.split_seed,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["models"] = list(self.models)
        return d


@dataclass
class AttentionExample:
    """Fig. 5: one test user's behaviours and DIN's weight of each for two candidate ads."""

    user_id: int
    behaviour_items: list[int]  # raw ids, newest first
    behaviour_cates: list[int]
    candidates: list[tuple[int, int]]  # (raw item id, raw category id)
    weights: list[list[float]]  # one row per candidate, aligned with the behaviours


@dataclass
class EmbeddingExample:
    """Fig. 6: learned item embeddings of the largest categories, and DIN's CTR for one test user."""

    user_id: int
    items: np.ndarray  # raw item ids
    cates: np.ndarray  # raw category ids
    vectors: np.ndarray  # (n, k) item embedding rows
    ctr: np.ndarray  # (n,) predicted CTR of each item as a candidate for `user_id`


@dataclass
class ExperimentResult:
    results: dict  # what results.json holds
    attention: AttentionExample | None = None
    embeddings: EmbeddingExample | None = None
    files: list[Path] = field(default_factory=list)


def summary(values: list[float]) -> dict:
    """{mean, std, per_seed}; std is the sample standard deviation (ddof=1), None for one seed (no spread)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()), "std": std, "per_seed": [float(v) for v in arr]}


def data_statistics(behaviour_log: BehaviourLog, samples: Samples) -> dict:
    """The paper's Table 1 columns, plus the split sizes and click rates."""
    splits = {name: samples.split(name) for name in ("train", "validation", "test")}
    n = sum(len(s) for s in splits.values())
    clicks = sum(float(s.label.sum()) for s in splits.values())
    return {
        "name": behaviour_log.name,
        "users": int(np.unique(behaviour_log.user_id).size),
        "items": int(np.unique(behaviour_log.item_id).size),
        "categories": int(np.unique(behaviour_log.cate_id).size),
        "events": len(behaviour_log),
        "behaviours": int(behaviour_log.behaviour_mask().sum()),
        "samples": n,
        "click_rate": clicks / n if n else float("nan"),
        "split_samples": {k: len(s) for k, s in splits.items()},
        "split_users": {k: int(s.users.size) for k, s in splits.items()},
        "has_labels": behaviour_log.label is not None,
        "has_split_column": behaviour_log.split is not None,
        "profile_fields": list(behaviour_log.profile_fields),
        "max_history": samples.spec.max_history,
    }


def aggregate(runs: dict[str, list[FitResult]]) -> dict:
    """Per model: test metrics (mean, std, per seed), RelaImpr against `base`, time, size, curves."""
    models: dict[str, dict] = {}
    base = runs.get(BASELINE)
    for name, fits in runs.items():
        entry: dict = {"display_name": DISPLAY_NAMES.get(name, name)}
        for metric in ("auc", "gauc", "logloss"):
            entry[metric] = summary([f.test[metric] for f in fits])
        if base is not None:
            # the paper's RelaImpr (eq. 10) is on its user-weighted AUC, i.e. our GAUC; seed i vs base seed i
            entry["relaimpr"] = summary([rela_impr(f.test["gauc"], b.test["gauc"]) for f, b in zip(fits, base)])
        else:
            entry["relaimpr"] = None
        entry["train_seconds"] = summary([f.fit_seconds for f in fits])
        entry["num_params"] = int(fits[0].num_params)
        entry["best_epoch"] = [int(f.best_epoch) for f in fits]
        entry["validation_gauc"] = [[float(v["gauc"]) for v in f.validation] for f in fits]
        entry["validation_auc"] = [[float(v["auc"]) for v in f.validation] for f in fits]
        models[name] = entry
    return models


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Fit every model with every seed, write results.json, report.md and the figures under `config.out`."""
    from model import report  # matplotlib / scikit-learn only when a report is written

    started = time.perf_counter()
    behaviour_log = load_source(config.data)
    samples = build_samples(behaviour_log, SampleConfig(max_history=config.max_history, seed=config.split_seed))
    samples.require_every_split(config.data)
    stats = data_statistics(behaviour_log, samples)
    log.info(
        "experiment on %s: %d samples (train %d, validation %d, test %d); %d models x %d seeds x %d epochs",
        config.data, stats["samples"], *stats["split_samples"].values(), len(config.models), config.seeds, config.epochs,
    )

    runs: dict[str, list[FitResult]] = {}
    figure_name = next((m for m in _FIGURE_PREFERENCE if m in config.models), None)  # seed 0 of DIN
    figure_model: nn.Module | None = None
    bar = tqdm(
        total=len(config.models) * config.seeds * config.epochs, unit="epoch", file=sys.stderr,
        disable=not config.progress, desc="experiment",
    )
    try:
        for name in config.models:
            runs[name] = []
            for seed in range(config.seeds):
                bar.set_description(f"{name} seed {seed}")

                def on_epoch(epoch: int, val: dict[str, float]) -> None:
                    bar.set_postfix(val_gauc=f"{val['gauc']:.4f}")
                    bar.update(1)

                fitted = fit(config.train_config(name, seed), samples, on_epoch=on_epoch)
                runs[name].append(fitted)
                if seed == 0 and name == figure_name:
                    figure_model = fitted.model
                fitted.model = None  # keep the numbers, free the weights
    finally:
        bar.close()
    fit_seconds = time.perf_counter() - started

    attention = embeddings = None
    if figure_model is not None:
        attention, embeddings = figure_examples(figure_model, behaviour_log, samples)
    results = {
        "data": config.data,
        "command": config.command,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": cores(),
            "torch_threads": config.threads or cores(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "config": config.to_json(),
        "data_stats": stats,
        "baseline": BASELINE if BASELINE in runs else None,
        "models": aggregate(runs),
        "figure_model": figure_name,
        "seconds": {"fit_total": fit_seconds},
    }
    config.out.mkdir(parents=True, exist_ok=True)
    files = report.write_figures(config.out, results, attention, embeddings)
    results["seconds"]["total"] = time.perf_counter() - started
    files.append(report.write_report(config.out, results))
    path = config.out / "results.json"
    path.write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    files.append(path)
    return ExperimentResult(results=results, attention=attention, embeddings=embeddings, files=files)


_FIGURE_PREFERENCE = ("din", "din_dice")  # the figures show DIN, as the paper's do




# ------------------------------------------------------------------------------ figure data


def _item_categories(behaviour_log: BehaviourLog) -> dict[int, int]:
    """raw item id -> raw category id (an item's category is the same on every event)."""
    return dict(zip(behaviour_log.item_id.tolist(), behaviour_log.cate_id.tolist()))


def _pick_user(samples: Samples, min_history: int = 15, min_categories: int = 3) -> int:
    """Index into samples.test of the sample with the longest history of the first fitting test user.

    The first user (by id) whose longest test history has >= min_history behaviours from
    >= min_categories categories; else the longest history of all.
    """
    test = samples.test
    length = np.minimum(test.hist_end - test.hist_start, samples.spec.max_history)
    best_of_user: dict[int, int] = {}
    for i in np.argsort(-length, kind="stable"):  # longest first, so the first seen per user is its longest
        best_of_user.setdefault(int(test.user_id[i]), int(i))
    cates = samples.behaviour_rows["cate_id"]
    for user in sorted(best_of_user):
        i = best_of_user[user]
        lo = max(int(test.hist_start[i]), int(test.hist_end[i]) - samples.spec.max_history)
        if length[i] >= min_history and np.unique(cates[lo : int(test.hist_end[i])]).size >= min_categories:
            return i
    return int(np.argmax(length))


@torch.no_grad()
def _score(model: nn.Module, samples: Samples, sample: int, items: np.ndarray, cates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ctr (n,), attention (n, T)) of raw (item, category) candidates for the user of test sample `sample`."""
    batch = samples.batch(samples.test, np.array([sample]))
    inputs = dict(batch.inputs)
    inputs[cand_input("item_id")] = torch.from_numpy(samples.vocabularies["item_id"].lookup(items))
    inputs[cand_input("cate_id")] = torch.from_numpy(samples.vocabularies["cate_id"].lookup(cates))
    inputs["cand_user"] = torch.zeros(len(items), dtype=torch.int64)
    model.eval()
    logit, attention = model(*split_inputs(samples.spec, inputs))
    return torch.sigmoid(logit).numpy(), attention.numpy()


def figure_examples(model: nn.Module, behaviour_log: BehaviourLog, samples: Samples) -> tuple[AttentionExample, EmbeddingExample]:
    """The data behind Fig. 5 (attention for two candidates) and Fig. 6 (item embeddings, CTR)."""
    sample = _pick_user(samples)
    user = int(samples.test.user_id[sample])
    batch = samples.batch(samples.test, np.array([sample]))
    hist_rows = batch.inputs[hist_input("item_id")][0].numpy()
    real = hist_rows != PAD_ROW
    item_vocab = samples.vocabularies["item_id"]
    # raw ids of the history (rows of unseen ids are UNK; take the raw ids from the log's behaviours)
    start, end = int(samples.test.hist_start[sample]), int(samples.test.hist_end[sample])
    srt = behaviour_log.sorted_by_user_time()
    beh = srt.behaviour_mask()
    beh_items, beh_cates = srt.item_id[beh], srt.cate_id[beh]
    lo = max(start, end - samples.spec.max_history)
    hist_items = beh_items[lo:end][::-1]  # newest first, as the model sees them
    hist_cates = beh_cates[lo:end][::-1]
    assert hist_items.size == int(real.sum())

    # two candidates: a popular training item of the user's most frequent and second category, not yet seen
    train_rows = samples.train.cand_rows["item_id"][samples.train.label == 1]
    popularity = np.bincount(train_rows, minlength=samples.spec.vocab_sizes["item_id"])
    cate_of = _item_categories(behaviour_log)
    cats, counts = np.unique(hist_cates, return_counts=True)
    ranked = cats[np.argsort(-counts, kind="stable")].tolist()
    if len(ranked) < 2:
        ranked += [c for c in np.unique(behaviour_log.cate_id).tolist() if c not in ranked][:1]
    known_items = item_vocab.ids
    known_cates = np.array([cate_of[int(i)] for i in known_items], dtype=np.int64)
    pop = popularity[np.arange(known_items.size) + 2]
    candidates: list[tuple[int, int]] = []
    for c in ranked[:2]:
        ok = (known_cates == c) & ~np.isin(known_items, hist_items)
        if not ok.any():
            ok = known_cates == c
        pick = int(np.flatnonzero(ok)[np.argmax(pop[ok])]) if ok.any() else 0
        candidates.append((int(known_items[pick]), int(c)))
    _, att = _score(model, samples, sample, np.array([c[0] for c in candidates]), np.array([c[1] for c in candidates]))
    attention = AttentionExample(
        user_id=user,
        behaviour_items=hist_items.tolist(),
        behaviour_cates=hist_cates.tolist(),
        candidates=candidates,
        weights=[row[real].tolist() for row in att],
    )

    # item embeddings of the (up to) 8 categories with the most training items
    top = np.unique(known_cates, return_counts=True)
    top_cates = top[0][np.argsort(-top[1], kind="stable")][:8]
    keep = np.isin(known_cates, top_cates)
    rows = np.flatnonzero(keep) + 2
    table = model.embed.tables["item_id"].weight.detach().numpy()
    ctr, _ = _score(model, samples, sample, known_items[keep], known_cates[keep])
    embeddings = EmbeddingExample(
        user_id=user, items=known_items[keep], cates=known_cates[keep], vectors=table[rows], ctr=ctr
    )
    return attention, embeddings
