"""Training samples built the way the paper builds them, without materialising histories.

For each target event of a user, the history is the user's behaviours strictly earlier in
time, newest first, truncated to `max_history`:

- a log without `label`: every event is a behaviour and a positive sample; for each
  positive, `negatives` negative candidates are drawn. Distribution: a uniformly random
  event of the TRAINING users, i.e. items in proportion to their training popularity,
  with the drawn event's own category (redrawn when it hits the positive's item). Positives
  follow that same popularity, so popularity alone cannot separate the classes; what
  separates them is whether the candidate fits the user's history.
- a log with `label` (e.g. MovieLens: rating >= 4 is a click): every event is a sample
  with its label; the history holds the user's earlier behaviours.
- which events are behaviours is `BehaviourLog.behaviour_mask()` (the feature store uses
  the same rule): the events marked by `is_behaviour` when the log has it (MovieLens: every
  rating; Amazon: the reviews, so a sampled negative is a candidate only, never in a
  history, and it gets the same history as its paired review: same user, same time, and
  history is strictly earlier); else the clicks of a labelled log, every event otherwise.

Split: when the log has a `split` column (the Amazon protocol: each user's last review is
test, the second-to-last validation), each event goes to the split it names. Otherwise
users are split (seeded) into train / validation / test, so no validation or test target
ever appears in training. Vocabularies are fitted on the training events' ids only; ids
first seen in validation or test map to UNK_ROW, as at serving time.

Memory: a sample is (history start, history end, candidate rows, label, user), all indices
into one shared behaviour array; a batch's `[B, T]` history is gathered on the fly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from model.contract import CAND_USER, PAD_ROW, FeatureSpec, Vocabulary, cand_input, hist_input, profile_input
from model.data.negatives import draw_negatives
from model.data.log import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    BehaviourLog,
    NotEnoughUsersError,
    UntrainableLogError,
    check_clicks,
)

SEQUENCE_FIELDS = ("item_id", "cate_id")


@dataclass(frozen=True)
class SampleConfig:
    max_history: int = 50
    negatives: int = 1  # negatives per positive, for logs without labels
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test users; unused when the log has `split`
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1.0) > 1e-9:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {self.split}")


@dataclass(frozen=True)
class SampleSet:
    """One split. Arrays are aligned, one entry per sample (int64 unless noted)."""

    hist_start: np.ndarray  # index of the user's first behaviour in the shared arrays
    hist_end: np.ndarray  # one past the last behaviour strictly before the target
    cand_rows: dict[str, np.ndarray]  # sequence field -> candidate row
    profile_rows: dict[str, np.ndarray]  # profile field -> row
    label: np.ndarray  # float32, 1 = click
    user_id: np.ndarray  # raw user ids (for GAUC)

    def __len__(self) -> int:
        return int(self.label.size)

    @property
    def users(self) -> np.ndarray:
        return np.unique(self.user_id)


@dataclass(frozen=True)
class Batch:
    """Named int64 inputs of the scoring graph (U = N = B, cand_user = arange(B)) + targets."""

    inputs: dict[str, torch.Tensor]
    label: torch.Tensor  # float32 [B]
    user_id: torch.Tensor  # int64 [B]

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class Samples:
    spec: FeatureSpec
    vocabularies: dict[str, Vocabulary]
    behaviour_rows: dict[str, np.ndarray]  # sequence field -> row of every behaviour
    train: SampleSet
    validation: SampleSet
    test: SampleSet

    def split(self, name: str) -> SampleSet:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; use train, validation or test")
        return getattr(self, name)

    def require_every_split(self, data: str) -> None:
        """Training needs samples in all three splits (users are split, not events)."""
        for name in ("train", "validation", "test"):
            if len(self.split(name)) == 0:
                raise NotEnoughUsersError(f"data {data!r} gave an empty {name} split; it needs more users")

    def batch(self, samples: SampleSet, index: np.ndarray) -> Batch:
        """Gather the samples at `index` into one batch; T = longest history in the batch."""
        index = np.asarray(index, dtype=np.int64)
        start, end = samples.hist_start[index], samples.hist_end[index]
        length = np.minimum(end - start, self.spec.max_history)  # (B,)
        t = max(1, int(length.max(initial=0)))
        slots = np.arange(t)
        valid = slots[None, :] < length[:, None]  # (B, T)
        pos = np.where(valid, end[:, None] - 1 - slots[None, :], 0)  # (B, T) newest first
        inputs: dict[str, torch.Tensor] = {}
        for f in self.spec.sequence_fields:
            rows = np.where(valid, self.behaviour_rows[f][pos], PAD_ROW)  # (B, T)
            inputs[hist_input(f)] = torch.from_numpy(rows.astype(np.int64, copy=False))
        for f in self.spec.profile_fields:
            inputs[profile_input(f)] = torch.from_numpy(samples.profile_rows[f][index])
        for f in self.spec.sequence_fields:
            inputs[cand_input(f)] = torch.from_numpy(samples.cand_rows[f][index])
        inputs[CAND_USER] = torch.arange(index.size, dtype=torch.int64)
        return Batch(
            inputs=inputs,
            label=torch.from_numpy(samples.label[index]),
            user_id=torch.from_numpy(samples.user_id[index]),
        )

    def batches(
        self,
        samples: SampleSet,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(samples))
        if shuffle:
            if rng is None:
                raise ValueError("shuffle=True needs a seeded numpy Generator (rng=...)")
            order = rng.permutation(order)
        for i in range(0, order.size, batch_size):
            yield self.batch(samples, order[i : i + batch_size])

    def num_batches(self, samples: SampleSet, batch_size: int) -> int:
        return -(-len(samples) // batch_size)


def split_users(user_ids: np.ndarray, fractions: tuple[float, float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Seeded disjoint (train, validation, test) user id arrays, sorted."""
    users = np.unique(user_ids)
    perm = np.random.default_rng([seed, 7]).permutation(users)
    n = users.size
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:  # tiny logs still get one user per non-empty split
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"the log has {n} user(s): too few to split into train/validation/test")
    return (
        np.sort(perm[:n_train]),
        np.sort(perm[n_train : n_train + n_val]),
        np.sort(perm[n_train + n_val :]),
    )


def _history_bounds(
    log: BehaviourLog, behaviour: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per event of a (user, time)-sorted log: [start, end) of its history in `behaviour` order.

    `behaviour` marks which events are behaviours. History = the user's behaviours with a
    timestamp strictly before the event's (same-time events never see each other).
    """
    n = len(log)
    # merge targets (kind 0) before behaviours (kind 1) at equal (user, time)
    kind = np.concatenate([np.zeros(n, np.int8), np.ones(int(behaviour.sum()), np.int8)])
    users = np.concatenate([log.user_id, log.user_id[behaviour]])
    times = np.concatenate([log.timestamp, log.timestamp[behaviour]])
    order = np.lexsort((kind, times, users))
    is_beh = kind[order] == 1
    behaviours_before = np.cumsum(is_beh) - is_beh  # behaviours strictly ahead in merge order
    end = np.empty(n, np.int64)
    end[order[~is_beh]] = behaviours_before[~is_beh]
    beh_users = log.user_id[behaviour]
    start = np.searchsorted(beh_users, log.user_id, side="left").astype(np.int64)
    return start, end


def _event_split(log: BehaviourLog, config: SampleConfig) -> np.ndarray:
    """int8 SPLIT_* of every event of a sorted log: the log's own `split`, else by user."""
    if log.split is not None:
        split = np.asarray(log.split, dtype=np.int8)
        bad = ~np.isin(split, (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST))
        if bad.any():
            raise ValueError(
                f"behaviour log {log.name!r}: column split must be {SPLIT_TRAIN} (train), {SPLIT_VALID} "
                f"(validation) or {SPLIT_TEST} (test); found {int(split[bad][0])}"
            )
        return split
    train_users, val_users, test_users = split_users(log.user_id, config.split, config.seed)
    split = np.full(len(log), SPLIT_TRAIN, dtype=np.int8)
    split[np.isin(log.user_id, val_users)] = SPLIT_VALID
    split[np.isin(log.user_id, test_users)] = SPLIT_TEST
    return split


def build_samples(log: BehaviourLog, config: SampleConfig = SampleConfig()) -> Samples:
    """Split `log` (its own `split`, else by user), fit vocabularies on training events, index every sample."""
    if len(log) == 0:
        raise UntrainableLogError(f"behaviour log {log.name!r} is empty; nothing to train on")
    if log.label is not None:
        check_clicks(log.name, int(np.count_nonzero(log.label == 1)), len(log))
    log = log.sorted_by_user_time()
    has_label = log.label is not None
    behaviour = log.behaviour_mask()
    hist_start, hist_end = _history_bounds(log, behaviour)

    event_split = _event_split(log, config)
    in_train = event_split == SPLIT_TRAIN
    vocabularies = {
        "item_id": Vocabulary.fit(log.item_id[in_train]),
        "cate_id": Vocabulary.fit(log.cate_id[in_train]),
    }
    profile_fields = log.profile_fields
    user_profile: dict[str, np.ndarray] = {}
    if profile_fields:
        user_profile = log.profiles.lookup(log.user_id)  # per event, -1: user has no profile
        for f in profile_fields:
            known = user_profile[f][in_train]
            vocabularies[f] = Vocabulary.fit(known[known != -1])  # -1 stays UNK_ROW
    behaviour_rows = {
        "item_id": vocabularies["item_id"].lookup(log.item_id[behaviour]),
        "cate_id": vocabularies["cate_id"].lookup(log.cate_id[behaviour]),
    }
    spec = FeatureSpec(
        sequence_fields=SEQUENCE_FIELDS,
        profile_fields=profile_fields,
        vocab_sizes={name: v.num_rows for name, v in vocabularies.items()},
        max_history=config.max_history,
    )

    neg_pool = np.flatnonzero(in_train & behaviour)  # negatives follow the training popularity
    sets = []
    for i, which in enumerate((SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)):
        if has_label:  # every event of the split is a sample, impressions included
            ev = np.flatnonzero(event_split == which)
            cand_item, cand_cate = log.item_id[ev], log.cate_id[ev]
            label = log.label[ev].astype(np.float32)
            take = ev
        else:  # every behaviour is a positive; negatives are drawn
            ev = np.flatnonzero((event_split == which) & behaviour)
            if neg_pool.size == 0:
                raise UntrainableLogError(f"behaviour log {log.name!r} has no training behaviours to draw negatives from")
            rng = np.random.default_rng([config.seed, 11, i])
            neg = neg_pool[draw_negatives(log.item_id[neg_pool], log.item_id[ev], config.negatives, rng)]  # (S, K)
            # sample layout: each positive followed by its negatives
            take = np.repeat(ev, 1 + config.negatives)
            cand_ev = np.concatenate([ev[:, None], neg], axis=1).reshape(-1)
            cand_item, cand_cate = log.item_id[cand_ev], log.cate_id[cand_ev]
            label = np.tile(np.r_[1.0, np.zeros(config.negatives)], ev.size).astype(np.float32)
        sets.append(
            SampleSet(
                hist_start=hist_start[take],
                hist_end=hist_end[take],
                cand_rows={
                    "item_id": vocabularies["item_id"].lookup(cand_item),
                    "cate_id": vocabularies["cate_id"].lookup(cand_cate),
                },
                profile_rows={f: vocabularies[f].lookup(user_profile[f][take]) for f in profile_fields},
                label=label,
                user_id=log.user_id[take].astype(np.int64),
            )
        )
    return Samples(
        spec=spec,
        vocabularies=vocabularies,
        behaviour_rows=behaviour_rows,
        train=sets[0],
        validation=sets[1],
        test=sets[2],
    )
