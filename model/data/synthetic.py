"""A seeded behaviour log with planted structure, so DIN has something real to find.

The world:
- items have Zipf-like popularity and belong to exactly one category each;
- every user has a few (3-6 by default) interests: categories with Dirichlet weights, so a
  sum-pooled history blurs several unrelated interests together;
- behaviours are generated one step at a time by a *local activation* rule: the next
  behaviour's category, with probability `p_local`, repeats the category of one of the
  user's `recent_window` most recent behaviours (and, with probability `p_repeat_item`, the
  very item); otherwise it is drawn from the user's interests, and with probability
  `p_noise` it is any category. Noise categories then spread through the local rule, so
  users drift into short-lived interests that a sum over the whole history dilutes.

Every row is a behaviour (a click): there is no label column. Negatives are sampled when
samples are built (model/data/samples.py).

Scale: users are generated in fixed-size RNG blocks, vectorised across the users of a
block and stepped over event positions, so memory grows with the block, not the
population. `write_synthetic` streams blocks to Parquet; its file equals `generate()`
for the same config, whatever `chunk_users` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.data.log import REQUIRED_COLUMNS, BehaviourLog

RNG_BLOCK_USERS = 4096  # users per independent RNG stream; output never depends on chunking
_T0 = 1_700_000_000  # first timestamp (unix seconds), so the log looks like a real one


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 5_000
    items: int = 3_000
    categories: int = 60
    events_per_user: tuple[int, int] = (15, 45)  # inclusive range, uniform
    interests_per_user: tuple[int, int] = (3, 6)  # inclusive range, uniform
    zipf_exponent: float = 1.0  # item popularity ~ 1 / rank**exponent
    p_local: float = 0.6  # next category repeats one of the recent behaviours' categories
    p_repeat_item: float = 0.3  # ... and, given that, the very item
    recent_window: int = 5  # how many recent behaviours the local rule looks at
    p_noise: float = 0.1  # next category is any category (popularity-weighted)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "items", "categories", "recent_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.items < self.categories:
            raise ValueError(
                f"SyntheticConfig.items ({self.items}) must be >= categories ({self.categories}): "
                "every category needs at least one item"
            )
        for name in ("events_per_user", "interests_per_user"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"SyntheticConfig.{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if self.interests_per_user[1] > self.categories:
            raise ValueError("SyntheticConfig.interests_per_user max exceeds the number of categories")
        for name in ("p_local", "p_repeat_item", "p_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be a probability in [0, 1]")
        if self.p_local + self.p_noise > 1.0:
            raise ValueError("SyntheticConfig.p_local + p_noise must be <= 1")


# Sized so that `din train --model din` (3 epochs) takes about a minute on a 2-core CPU
# (BaseModel ~10 s), with DIN's test GAUC clearly above BaseModel's (0.889 vs 0.807).
DEFAULT_SYNTHETIC = SyntheticConfig()


@dataclass(frozen=True)
class _World:
    """What every user shares: items, their categories and popularity."""

    item_cate: np.ndarray  # int64 [items]: category index of each item index
    cate_weight: np.ndarray  # float64 [C]: popularity of each category (sums to 1)
    cate_cdf: np.ndarray  # float64 [C]: cumulative cate_weight
    # Items sorted by category; key = category + within-category cumulative weight, so a
    # draw for category c with u ~ U[0,1) is searchsorted(key, c + u, "right").
    sorted_items: np.ndarray  # int64 [items]
    sorted_key: np.ndarray  # float64 [items]


def _world(config: SyntheticConfig) -> _World:
    rng = np.random.default_rng([config.seed, 0])
    n, c = config.items, config.categories
    # every category gets one item, the rest are spread uniformly
    item_cate = rng.permutation(np.concatenate([np.arange(c), rng.integers(0, c, n - c)])).astype(np.int64)
    rank = rng.permutation(n)
    weight = 1.0 / (rank + 1.0) ** config.zipf_exponent
    cate_weight = np.bincount(item_cate, weights=weight, minlength=c)
    order = np.lexsort((rank, item_cate))
    sorted_cate = item_cate[order]
    cum = np.cumsum(weight[order])
    block_start = np.searchsorted(sorted_cate, np.arange(c))
    before = np.concatenate([[0.0], cum])[block_start]  # weight before each category block
    within = (cum - before[sorted_cate]) / cate_weight[sorted_cate]  # in (0, 1]
    within[np.r_[block_start[1:] - 1, n - 1]] = 1.0  # exact block ends despite rounding
    cate_weight = cate_weight / cate_weight.sum()
    cate_cdf = np.cumsum(cate_weight)
    cate_cdf[-1] = 1.0
    return _World(item_cate, cate_weight, cate_cdf, order.astype(np.int64), sorted_cate + within)


def _draw_item(world: _World, cate: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One popularity-weighted item index of each given category."""
    pos = np.searchsorted(world.sorted_key, cate + rng.random(cate.size), side="right")
    return world.sorted_items[np.minimum(pos, world.sorted_items.size - 1)]


def _draw_category(world: _World, size: int, rng: np.random.Generator) -> np.ndarray:
    pos = np.searchsorted(world.cate_cdf, rng.random(size), side="right")
    return np.minimum(pos, world.cate_weight.size - 1).astype(np.int64)


def _block(config: SyntheticConfig, world: _World, block: int) -> BehaviourLog:
    """Users [block * RNG_BLOCK_USERS, ...) of the population, from their own RNG stream."""
    rng = np.random.default_rng([config.seed, 1, block])
    first = block * RNG_BLOCK_USERS
    n = min(RNG_BLOCK_USERS, config.users - first)
    lo, hi = config.events_per_user
    length = rng.integers(lo, hi + 1, n)
    t_max = int(length.max())

    # interests: k distinct popularity-weighted categories with Dirichlet(1) weights
    k_max = config.interests_per_user[1]
    k = rng.integers(config.interests_per_user[0], k_max + 1, n)
    interests = _draw_category(world, n * k_max, rng).reshape(n, k_max)
    for _ in range(64):  # redraw a slot that repeats an earlier slot of the same user
        dup = np.zeros(interests.shape, dtype=bool)
        for j in range(1, k_max):
            dup[:, j] = (interests[:, j : j + 1] == interests[:, :j]).any(axis=1)
        if not dup.any():
            break
        interests[dup] = _draw_category(world, int(dup.sum()), rng)
    weight = rng.gamma(1.0, size=(n, k_max)) * (np.arange(k_max) < k[:, None])
    interest_cdf = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
    interest_cdf[np.arange(k_max)[None, :] >= (k - 1)[:, None]] = 1.0  # never an unused slot

    cate = np.zeros((n, t_max), dtype=np.int64)
    item = np.zeros((n, t_max), dtype=np.int64)
    rows = np.arange(n)
    for t in range(t_max):
        # from the user's interests
        slot = (interest_cdf < rng.random(n)[:, None]).sum(axis=1)
        c_t = interests[rows, np.minimum(slot, k_max - 1)]
        u = rng.random(n)
        if t > 0:
            # local activation: repeat one of the recent behaviours
            back = 1 + (rng.random(n) * min(t, config.recent_window)).astype(np.int64)
            local = u < config.p_local
            c_t = np.where(local, cate[rows, t - back], c_t)
            repeat = local & (rng.random(n) < config.p_repeat_item)
        else:
            repeat = np.zeros(n, dtype=bool)
        noise = u >= 1.0 - config.p_noise
        c_t = np.where(noise, _draw_category(world, n, rng), c_t)
        i_t = _draw_item(world, c_t, rng)
        if t > 0:
            i_t = np.where(repeat & ~noise, item[rows, t - back], i_t)
        cate[:, t] = c_t
        item[:, t] = i_t

    gaps = rng.exponential(3600.0, size=(n, t_max)).astype(np.int64) + 1
    start = _T0 + rng.integers(0, 30 * 86_400, n)
    ts = start[:, None] + np.cumsum(gaps, axis=1)
    keep = np.arange(t_max) < length[:, None]
    user = np.broadcast_to((first + rows + 1)[:, None], (n, t_max))
    return BehaviourLog(
        user_id=user[keep].astype(np.int64),
        item_id=item[keep] + 1,  # raw ids start at 1: readable, and never confused with a row
        cate_id=cate[keep] + 1,
        timestamp=ts[keep].astype(np.int64),
        name="synthetic",
    )


def _num_blocks(config: SyntheticConfig) -> int:
    return -(-config.users // RNG_BLOCK_USERS)


def generate(config: SyntheticConfig = DEFAULT_SYNTHETIC) -> BehaviourLog:
    """The whole log in memory, grouped by user, oldest first. Deterministic for a config."""
    world = _world(config)
    blocks = [_block(config, world, b) for b in range(_num_blocks(config))]
    return BehaviourLog(
        *(np.concatenate([getattr(b, c) for b in blocks]) for c in REQUIRED_COLUMNS),
        name="synthetic",
    )


_SCHEMA = pa.schema([(c, pa.int64()) for c in REQUIRED_COLUMNS])


def write_synthetic(
    config: SyntheticConfig, path: str | Path, chunk_users: int = 65_536, progress: bool = False
) -> Path:
    """Stream the log to Parquet, one chunk of users at a time (bounded memory at any scale).

    `chunk_users` is rounded up to whole RNG blocks; the file equals `generate(config)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_chunk = max(1, -(-chunk_users // RNG_BLOCK_USERS))
    world = _world(config)
    n_blocks = _num_blocks(config)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.users, unit="user", desc="synth")  # stderr
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, _SCHEMA) as writer:
            for b0 in range(0, n_blocks, per_chunk):
                logs = [_block(config, world, b) for b in range(b0, min(b0 + per_chunk, n_blocks))]
                chunk = {c: np.concatenate([getattr(log, c) for log in logs]) for c in REQUIRED_COLUMNS}
                writer.write_table(pa.table(chunk, schema=_SCHEMA))  # one row group per chunk
                if bar is not None:
                    bar.update(len(np.unique(chunk["user_id"])))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return path
