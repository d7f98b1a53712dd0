"""Train a CTR model on a behaviour log, select on validation, report test once, export.

The trainer owns the loss and the regulariser (model/objective.py, shared with the streamed
trainer model/train_dist.py) and the metrics; models only map inputs to (logit, attention). Every sample goes through the
same scoring path as serving: a batch is U = N = B users/candidates with cand_user = arange(B).

`fit` trains one model on already built samples (the experiment runner reuses one sample
set for every model and seed); `train` is data -> samples -> fit -> export.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.config import ModelConfig
from model.cpu import cores
from model.data.samples import SampleConfig, Samples, SampleSet, build_samples
from model.data.sources import load_source
from model.export import export_bundle
from model.inputs import split_inputs
from model.metrics import ctr_metrics
from model.objective import Objective
from model.regularization import RegularizationConfig, id_counts
from model.registry import MODELS, build_model, check_attention_softmax

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str = "synthetic"
    model: str = "din"
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    out: Path = Path("artifacts/bundles")
    max_history: int = 50
    embedding_dim: int = 16
    attention_softmax: bool = False
    negatives: int = 1  # per positive, for logs without labels
    eval_batch_size: int = 4096
    threads: int | None = None  # torch intra-op threads; None = one per CPU core
    progress: bool = True
    reg: str = "none"  # none | l2 | mba | dropout (model/regularization.py)
    reg_lambda: float = 0.0  # lambda of l2 / mba
    id_dropout: float = 0.5  # drop probability of reg=dropout
    split_seed: int | None = None  # seed of the data split and negatives; None = `seed`

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_history", "embedding_dim", "negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        self.regularization()  # validates reg, reg_lambda, id_dropout
        check_attention_softmax(self.model, self.attention_softmax)

    def model_config(self) -> ModelConfig:
        return ModelConfig(embedding_dim=self.embedding_dim, attention_softmax=self.attention_softmax)

    def sample_config(self) -> SampleConfig:
        seed = self.seed if self.split_seed is None else self.split_seed
        return SampleConfig(max_history=self.max_history, negatives=self.negatives, seed=seed)

    def regularization(self) -> RegularizationConfig:
        return RegularizationConfig(kind=self.reg, lam=self.reg_lambda, id_dropout=self.id_dropout)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class TrainResult:
    bundle: Path
    model: str
    metrics: dict[str, float]  # test split: auc, gauc, logloss
    validation: list[dict[str, float]] = field(default_factory=list)  # one per epoch
    best_epoch: int = 0  # 1-based
    train_seconds: float = 0.0  # wall clock of train(): data, fit, test, export
    num_params: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        return d


@contextmanager
def _deterministic(config: TrainConfig) -> Iterator[None]:
    """Seeded, deterministic kernels, `threads` intra-op threads; global torch state restored after."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # deterministic mode would also NaN-fill every new tensor (a debugging aid): ~15% of DIN's step
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(config.threads or cores())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        torch.utils.deterministic.fill_uninitialized_memory = previous[3]


@torch.no_grad()
def predict(model: nn.Module, samples: Samples, split: SampleSet, batch_size: int) -> np.ndarray:
    """CTR of every sample of `split`, in order."""
    model.eval()
    out = []
    for batch in samples.batches(split, batch_size):
        logit, _ = model(*split_inputs(samples.spec, batch.inputs))
        out.append(torch.sigmoid(logit).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(model: nn.Module, samples: Samples, split: SampleSet, batch_size: int) -> dict[str, float]:
    probs = predict(model, samples, split, batch_size)
    return ctr_metrics(split.label, probs, split.user_id)


@dataclass
class FitResult:
    """A trained model (its best validation epoch's weights) and what the fit measured."""

    model: nn.Module
    test: dict[str, float]  # auc, gauc, logloss of the best epoch, evaluated once
    validation: list[dict[str, float]]  # one per epoch
    best_epoch: int  # 1-based
    fit_seconds: float  # epochs (training + validation), wall clock
    num_params: int


EpochCallback = Callable[[int, dict[str, float]], None]


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` on `config.data`; write a bundle under `config.out`; test once."""
    with _deterministic(config):
        return _train(config)


def _train(config: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    behaviour_log = load_source(config.data)
    samples = build_samples(behaviour_log, config.sample_config())
    samples.require_every_split(config.data)
    _info(
        config,
        f"data {config.data}: {len(behaviour_log)} events; samples train {len(samples.train)}, "
        f"validation {len(samples.validation)}, test {len(samples.test)}",
    )
    fitted = _fit(config, samples, None)
    model, test, history, best_epoch = fitted.model, fitted.test, fitted.validation, fitted.best_epoch
    exported = export_bundle(
        model,
        model_type=config.model,
        spec=samples.spec,
        vocabularies=samples.vocabularies,
        out_dir=config.out,
        data_fingerprint=behaviour_log.fingerprint(),
        extra={
            "model_config": model.config.to_json(),
            "metrics": {"test": test, "validation": history[best_epoch - 1], "best_epoch": best_epoch},
            "data_spec": config.data,
            "train_config": config.to_json(),
            "num_params": fitted.num_params,
        },
    )
    train_seconds = time.perf_counter() - started  # data to bundle, wall clock
    _info(config, f"bundle written: {exported.bundle} (ONNX parity {exported.parity_max_abs_diff:.2g})")
    return TrainResult(
        bundle=exported.bundle,
        model=config.model,
        metrics=test,
        validation=history,
        best_epoch=best_epoch,
        train_seconds=train_seconds,
        num_params=fitted.num_params,
    )


def fit(config: TrainConfig, samples: Samples, on_epoch: EpochCallback | None = None) -> FitResult:
    """Train `config.model` on `samples` (seeded by `config.seed`), select on validation, test once.

    `config.data` is not read: the samples are. `on_epoch(epoch, validation_metrics)` is
    called after each epoch (e.g. to advance an outer progress bar).
    """
    with _deterministic(config):
        return _fit(config, samples, on_epoch)


def _fit(config: TrainConfig, samples: Samples, on_epoch: EpochCallback | None) -> FitResult:
    started = time.perf_counter()
    model = build_model(config.model, samples.spec, config.model_config())
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng([config.seed, 3])
    reg = config.regularization()
    objective = Objective.build(samples.spec, reg, id_counts(samples) if reg.kind == "mba" else None)
    drop_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 17)

    history: list[dict[str, float]] = []
    best_state, best_epoch, best_gauc = None, 0, -np.inf
    n_batches = samples.num_batches(samples.train, config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        bar = tqdm(
            samples.batches(samples.train, config.batch_size, shuffle=True, rng=rng),
            total=n_batches,
            desc=f"{config.model} epoch {epoch}/{config.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not config.progress,
            leave=False,
        )
        running = 0.0  # the progress bar's recent loss (about the last 50 batches)
        loss_sum, seen = 0.0, 0  # the epoch's mean per sample: what history records, as the streamed trainer does
        for i, batch in enumerate(bar, 1):
            inputs = objective.drop(batch.inputs, drop_generator)
            logit, _ = model(*split_inputs(samples.spec, inputs))
            data_loss = objective(logit, batch.label)
            optimizer.zero_grad(set_to_none=True)
            data_loss.backward()
            optimizer.step()
            objective.regularize(model, objective.rows(inputs), config.lr)
            running += (data_loss.item() - running) / min(i, 50)
            loss_sum, seen = loss_sum + data_loss.item() * len(batch), seen + len(batch)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
        bar.close()
        val = evaluate(model, samples, samples.validation, config.eval_batch_size)
        train_loss = loss_sum / max(seen, 1)
        history.append({"epoch": epoch, "train_loss": train_loss, **val})
        _info(
            config,
            f"{config.model} epoch {epoch}: train loss {train_loss:.4f}; validation auc {val['auc']:.4f} "
            f"gauc {val['gauc']:.4f} logloss {val['logloss']:.4f}",
        )
        score = val["gauc"] if np.isfinite(val["gauc"]) else val["auc"]
        if best_state is None or score > best_gauc:
            best_state, best_epoch, best_gauc = copy.deepcopy(model.state_dict()), epoch, score
        if on_epoch is not None:
            on_epoch(epoch, val)

    fit_seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    test = evaluate(model, samples, samples.test, config.eval_batch_size)  # once, for the selected epoch
    _info(config, f"{config.model} test (best epoch {best_epoch}): auc {test['auc']:.4f} gauc {test['gauc']:.4f} logloss {test['logloss']:.4f}")
    return FitResult(
        model=model.eval(),
        test=test,
        validation=history,
        best_epoch=best_epoch,
        fit_seconds=fit_seconds,
        num_params=num_params,
    )


def _info(config: TrainConfig, message: str) -> None:
    """Progress for people: stderr only (stdout is reserved for `--json`)."""
    if config.progress:
        log.info(message)
    else:
        log.debug(message)
