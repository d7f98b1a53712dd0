"""The regularisers of the paper's study (section 5.1, 6.5), switchable on any model.

- `l2`: lambda * sum ||w_j||^2 over EVERY row of every id table, each mini-batch (eq. 5):
  the plain approach, whose cost grows with the vocabulary, not the batch.
- `mba`, mini-batch aware (eq. 6-7): lambda * sum_{j in B} ||w_j||^2 / n_j over the rows
  j of ids PRESENT in the mini-batch B only, each weighted by 1 / n_j, n_j = how often id
  j occurs in the training samples. Both are per table, over the inputs that index it
  (`IdTable.inputs`): a field's embedding counts an id as candidate and in history windows,
  lr's first-order `ad` weights only as candidate, its `bag` weights only in histories, so
  each feature is penalised only in the batches that hold it. Rows and counts are therefore
  kept per input (`present_rows`, `id_counts`). The streamed trainer counts n_j the same way,
  block by block (model/data/stream.py `sample_counts`; per bucket with hashed ids), and B is
  the global batch of all processes (model/train_dist.py).
  Rows absent from the batch get exactly zero gradient; a present row gets 2 lambda w_j / n_j.
- `dropout`: each id of a training sample is replaced by PAD_ROW with probability
  `id_dropout` (the paper's "randomly discard 50% of feature ids in each sample"). A
  behaviour whose item id is dropped leaves the history (the mask follows the item row).
  The coins come from a torch generator (in memory) or are hashed from the sample's id
  (`HashedCoins`, streamed: the same on any number of processes and after a resume).

model/objective.py applies them, once, for both trainers: l2 and mba as their own gradient step
on the id tables after the optimiser's (the paper's eq. 8 for mba), not as a loss term that
Adam would rescale.

"Id tables" are the `IdTable`s (model/embedding.py): the field embeddings and the
first-order weights of lr / DeepFM. Wide&Deep's hashed cross-product weights are features
of pairs, not ids, and are not regularised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from model.contract import PAD_ROW, FeatureSpec, cand_input, hist_input, profile_input
from model.data.samples import Samples
from model.embedding import IdTable
from model.hashing import splitmix64, unit_interval

REGULARIZERS = ("none", "l2", "mba", "dropout")


@dataclass(frozen=True)
class RegularizationConfig:
    kind: str = "none"  # one of REGULARIZERS
    lam: float = 0.0  # lambda of l2 / mba
    id_dropout: float = 0.5  # drop probability of `dropout` (the paper's 50%)

    def __post_init__(self) -> None:
        if self.kind not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.kind!r}")
        if self.lam < 0:
            raise ValueError(f"the regularization lambda must be >= 0, got {self.lam}")
        if self.kind in ("l2", "mba") and not self.lam > 0:
            raise ValueError(f"--reg {self.kind} needs --reg-lambda > 0 (got {self.lam})")
        if self.lam and self.kind not in ("l2", "mba"):
            raise ValueError(f"--reg-lambda {self.lam:g} would be ignored: only --reg l2 / mba take a lambda, not --reg {self.kind}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id dropout must be in [0, 1), got {self.id_dropout}")


def id_tables(model: nn.Module) -> list[IdTable]:
    return [m for m in model.modules() if isinstance(m, IdTable)]


def window_coverage(hist_start: np.ndarray, hist_end: np.ndarray, max_history: int, behaviours: int) -> np.ndarray:
    """float64 (behaviours,): how many samples' (truncated) history windows hold each behaviour.

    A sample's window is behaviours [max(start, end - max_history), end): +1 at its first
    behaviour, -1 one past its last, then a running sum (no loop over samples).
    """
    lo = np.maximum(hist_start, hist_end - max_history)
    delta = np.bincount(lo, minlength=behaviours + 1)[: behaviours + 1] - np.bincount(hist_end, minlength=behaviours + 1)[: behaviours + 1]
    return np.cumsum(delta)[:behaviours].astype(np.float64)


def sequence_counts(
    behaviour_rows: np.ndarray, coverage: np.ndarray, cand_rows: np.ndarray, num_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """n_j of one sequence field's two inputs: (each behaviour once per window holding it,
    each candidate once), float64 (rows) each."""
    in_histories = np.bincount(behaviour_rows, weights=coverage, minlength=num_rows)[:num_rows]
    as_candidate = np.bincount(cand_rows, minlength=num_rows)[:num_rows].astype(np.float64)
    return in_histories, as_candidate


def id_counts(samples: Samples) -> dict[str, np.ndarray]:
    """n_j per id input (hist_f, cand_f, profile_p): occurrences of each row in the TRAINING
    samples, as the model sees them.

    A behaviour counts once per training sample whose (truncated) history window holds it;
    candidates and profile ids once per sample. float64 (rows), PAD_ROW's count is 0. The
    streamed trainer counts the same way, block by block (model/data/stream.py `sample_counts`).
    """
    spec, s = samples.spec, samples.train
    n_beh = next(iter(samples.behaviour_rows.values())).size
    coverage = window_coverage(s.hist_start, s.hist_end, spec.max_history, n_beh)
    counts: dict[str, np.ndarray] = {}
    for f in spec.sequence_fields:
        counts[hist_input(f)], counts[cand_input(f)] = sequence_counts(
            samples.behaviour_rows[f], coverage, s.cand_rows[f], spec.vocab_sizes[f]
        )
    for f in spec.profile_fields:
        v = spec.vocab_sizes[f]
        counts[profile_input(f)] = np.bincount(s.profile_rows[f], minlength=v)[:v].astype(np.float64)
    for c in counts.values():
        c[PAD_ROW] = 0.0
    return counts


def l2_penalty(model: nn.Module, lam: float) -> Tensor:
    """lambda * sum over all rows of all id tables of ||w_j||^2 (PAD_ROW is zero anyway)."""
    return lam * sum(t.weight.pow(2).sum() for t in id_tables(model))


def present_rows(spec: FeatureSpec, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per id input, the distinct rows a batch uses (PAD_ROW excluded): its ids j in B."""
    rows = {name: torch.unique(inputs[name].reshape(-1)) for name in id_inputs(spec)}
    return {name: r[r != PAD_ROW] for name, r in rows.items()}


def mba_penalty(
    model: nn.Module, spec: FeatureSpec, inputs: Mapping[str, Tensor], counts: Mapping[str, Tensor], lam: float
) -> Tensor:
    """lambda * sum_{j in B} ||w_j||^2 / n_j over every id table (eq. 7 for one mini-batch).

    `counts` per id input: float tensors of n_j (id_counts).
    """
    return mba_penalty_on_rows(model, present_rows(spec, inputs), counts, lam)


def mba_penalty_on_rows(model: nn.Module, rows: Mapping[str, Tensor], counts: Mapping[str, Tensor], lam: float) -> Tensor:
    """The same over given present rows per input (data-parallel training passes the global batch's).

    A table's j in B are the rows any of its inputs uses; its n_j sums their counts (at
    least 1: a row counted nowhere, e.g. a hashed bucket, is not divided by zero).
    """
    total = torch.zeros((), device=next(model.parameters()).device)
    for table in id_tables(model):
        r = torch.unique(torch.cat([rows[name] for name in table.inputs]))
        n = sum(counts[name].index_select(0, r) for name in table.inputs).clamp_min(1.0)
        w = table.weight.index_select(0, r)  # (|B|, dim)
        total = total + (w.pow(2).sum(dim=1) / n).sum()
    return lam * total


@dataclass(frozen=True)
class HashedCoins:
    """Id dropout's coins as a hash of (sample id, input, position, salt): no RNG state at all.

    A sample's dropped ids then do not depend on which process trains it, next to which other
    samples, or whether the run was interrupted and resumed (streamed data-parallel training
    salts with seed and epoch, model/train_dist.py).
    """

    sample_ids: np.ndarray  # int64 (n,): one per sample of the batch
    salt: int

    def uniform(self, k: int, shape: torch.Size) -> Tensor:
        """U[0, 1) per element of input number `k` of shape (n,) or (n, T)."""
        width = shape[1] if len(shape) == 2 else 1
        with np.errstate(over="ignore"):  # uint64 wraparound, as in the hash itself
            keys = splitmix64(self.sample_ids)[:, None] + np.arange(width, dtype=np.uint64)  # (n, width)
        u = unit_interval(keys.view(np.int64), salt=self.salt * 64 + k + 1)
        return torch.from_numpy(u.astype(np.float32).reshape(tuple(shape)))


def id_inputs(spec: FeatureSpec) -> list[str]:
    """The inputs that hold ids (what dropout may drop): histories, candidates, profiles."""
    names = [hist_input(f) for f in spec.sequence_fields] + [cand_input(f) for f in spec.sequence_fields]
    return names + [profile_input(f) for f in spec.profile_fields]


def drop_ids(
    spec: FeatureSpec, inputs: Mapping[str, Tensor], rate: float, coins: torch.Generator | HashedCoins
) -> dict[str, Tensor]:
    """Each id of the batch -> PAD_ROW with probability `rate` (training only).

    `coins`: a torch generator (the in-memory trainer), or HashedCoins (the streamed one).
    """
    out = dict(inputs)
    for k, name in enumerate(id_inputs(spec)):
        x = inputs[name]
        if isinstance(coins, HashedCoins):
            u = coins.uniform(k, x.shape).to(x.device)
        else:
            u = torch.rand(x.shape, generator=coins)
        out[name] = x.masked_fill(u < rate, PAD_ROW)
    return out
