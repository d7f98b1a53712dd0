"""A tiny DIN bundle (exported by the real exporter, random weights, no training) and a
matching behaviour log, shared by the batcher and runtime tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feature_store.redis_store import RedisHistoryStore
from model.bundle import Bundle, load_bundle
from model.config import ModelConfig
from model.contract import FeatureSpec, Vocabulary
from model.data.log import BehaviourLog
from model.export import export_bundle
from model.registry import build_model

ITEMS = np.arange(100, 140, dtype=np.int64)
CATES = np.arange(1, 6, dtype=np.int64)
USERS = range(1, 9)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    vocabs = {"item_id": Vocabulary(ITEMS), "cate_id": Vocabulary(CATES)}
    spec = FeatureSpec(vocab_sizes={k: v.num_rows for k, v in vocabs.items()}, max_history=6)
    torch.manual_seed(0)
    model = build_model("din", spec, ModelConfig(embedding_dim=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    result = export_bundle(
        model, model_type="din", spec=spec, vocabularies=vocabs, out_dir=tmp_path_factory.mktemp("bundles"),
        data_fingerprint="batcher0", extra={},
    )  # fmt: skip
    return load_bundle(result.bundle)


def behaviour_log() -> BehaviourLog:
    """Users 1..8 with 1..8 behaviours each (so some are truncated to max_history 6)."""
    rng = np.random.default_rng(1)
    users = np.repeat(np.array(list(USERS)), list(USERS))
    n = len(users)
    return BehaviourLog(
        user_id=users.astype(np.int64), item_id=rng.choice(ITEMS, n), cate_id=rng.choice(CATES, n),
        timestamp=np.arange(n, dtype=np.int64),
    )  # fmt: skip


@pytest.fixture
def store_url(redis_url: str) -> str:
    RedisHistoryStore.from_url(redis_url).bulk_load(behaviour_log(), max_history=10)
    return redis_url


def candidates(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"item_id": rng.choice(np.append(ITEMS, [7, 8]), n), "cate_id": rng.choice(np.append(CATES, 99), n)}
