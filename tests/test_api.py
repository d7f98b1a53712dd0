"""The HTTP API through the real ASGI app: real lifespan, real bundle, real redis-server.

The bundle is trained once per session on a tiny synthetic log by the real trainer; the
PyTorch model it exported is kept (the trainer's own `export_bundle` runs unchanged, we
only keep a reference to the model it is handed) so scores can be checked against it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from torch import nn

import model.train as trainer
from feature_store.embedded import free_port
from feature_store.redis_store import RedisHistoryStore
from model.bundle import Bundle, BundleError, load_bundle
from model.contract import CAND_USER, PAD_ROW, cand_input, hist_input
from model.data.log import BehaviourLog, read_log
from model.data.synthetic import SyntheticConfig, write_synthetic
from model.export import torch_scores
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio

MAX_CANDIDATES = 50
BIG = 2**53 + 1  # not exact in float64: must survive as an int64


@dataclass(frozen=True)
class Trained:
    bundle: Bundle
    torch_model: nn.Module
    log: BehaviourLog


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny DIN trained by `model.train.train`, its bundle, its PyTorch model and its log."""
    root = tmp_path_factory.mktemp("service_api")
    data = write_synthetic(SyntheticConfig(users=300, items=200, categories=12, seed=3), root / "log.parquet")
    kept: list[nn.Module] = []
    real_export = trainer.export_bundle

    def export_and_keep(model: nn.Module, **kwargs):
        kept.append(model)
        return real_export(model, **kwargs)

    config = trainer.TrainConfig(
        data=f"events:{data}", model="din", epochs=1, batch_size=256, embedding_dim=4,
        max_history=30, out=root / "bundles", progress=False, threads=1,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "export_bundle", export_and_keep)
        result = trainer.train(config)
    (model,) = kept
    return Trained(bundle=load_bundle(result.bundle), torch_model=model.eval(), log=read_log(data))


@pytest.fixture
def loaded_redis(redis_url: str, trained: Trained) -> str:
    """The tests' redis-server holding every user's history of the training log.

    The store keeps twice the model's max_history, so the service must truncate itself.
    """
    store = RedisHistoryStore.from_url(redis_url)
    store.bulk_load(trained.log, max_history=2 * trained.bundle.spec.max_history)
    return redis_url


def settings_for(bundle: Path, redis_url: str | None, **overrides) -> Settings:
    values = dict(
        bundle=bundle, redis_url=redis_url, max_candidates=MAX_CANDIDATES, intra_op_threads=1,
        store_timeout_ms=5000,  # generous: a loaded CI machine must not turn reads degraded
        store_read_timeout_ms=5000, store_connect_timeout_ms=5000,
    )
    return Settings(**(values | overrides))


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (start-up really happens), and a client on it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


# ---------------------------------------------------------------------------------------
# What the PyTorch model says, computed from the log (not through the service's code).
def newest_first_history(log: BehaviourLog, user_id: int, max_history: int) -> dict[str, np.ndarray]:
    rows = np.flatnonzero(log.user_id == user_id)
    rows = rows[np.lexsort((rows, log.timestamp[rows]))][::-1][:max_history]  # newest first
    return {"item_id": log.item_id[rows], "cate_id": log.cate_id[rows]}


def torch_ctr(trained: Trained, user_id: int, candidates: np.ndarray) -> tuple[np.ndarray, int]:
    """(ctr of each candidate (n, 2 raw ids), history length) from the trainer's model."""
    spec, vocabs = trained.bundle.spec, trained.bundle.vocabularies
    history = newest_first_history(trained.log, user_id, spec.max_history)
    length = len(history["item_id"])
    inputs: dict[str, np.ndarray] = {}
    for f in spec.sequence_fields:
        rows = vocabs[f].lookup(history[f]) if length else np.array([PAD_ROW], dtype=np.int64)
        inputs[hist_input(f)] = rows[None, :]  # (1, T)
    cand = {"item_id": candidates[:, 0], "cate_id": candidates[:, 1]}
    for f in spec.sequence_fields:
        inputs[cand_input(f)] = vocabs[f].lookup(cand[f])  # (n,)
    inputs[CAND_USER] = np.zeros(len(candidates), dtype=np.int64)
    ctr, _ = torch_scores(trained.torch_model, spec, inputs)
    return ctr, length


def some_candidates(log: BehaviourLog, n: int, seed: int = 0) -> np.ndarray:
    """n distinct (item_id, cate_id) pairs: mostly from the log, plus unknown ids and a big one."""
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([log.item_id, log.cate_id], axis=1), axis=0)  # distinct, so results key by pair
    known = pairs[rng.choice(len(pairs), size=n - 3, replace=False)]
    unknown = np.array([[10**9, 5], [BIG, BIG], [int(log.item_id[0]), 10**12]], dtype=np.int64)
    return np.concatenate([known, unknown]).astype(np.int64)


def rank_body(user_id: int, candidates: np.ndarray, top_k: int | None = None) -> dict:
    body = {"user_id": user_id, "candidates": [{"item_id": i, "cate_id": c} for i, c in candidates.tolist()]}
    if top_k is not None:
        body["top_k"] = top_k
    return body


def users_by_history(log: BehaviourLog, max_history: int) -> tuple[int, int]:
    """A user with fewer behaviours than max_history, and one with more (truncated)."""
    users, counts = np.unique(log.user_id, return_counts=True)
    return int(users[counts < max_history][0]), int(users[counts > max_history][0])


# ---------------------------------------------------------------------------------------
async def test_scores_equal_the_pytorch_model(trained, loaded_redis):
    spec = trained.bundle.spec
    cands = some_candidates(trained.log, 40)
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        for user in users_by_history(trained.log, spec.max_history):
            r = await client.post("/rank", json=rank_body(user, cands))
            assert r.status_code == 200, r.text
            body = r.json()
            want, length = torch_ctr(trained, user, cands)
            assert body["history_length"] == length > 0
            assert body["degraded"] is False
            assert body["model_version"] == trained.bundle.model_version
            assert body["user_id"] == user
            got = {(x["item_id"], x["cate_id"]): x["ctr"] for x in body["ranked"]}
            assert len(got) == len(cands)  # every candidate, no top_k
            np.testing.assert_allclose([got[tuple(c)] for c in cands.tolist()], want, rtol=0, atol=1e-5)
        # the spread of scores is real: a constant model would pass the parity check trivially
        assert np.ptp(want) > 1e-3


async def test_ranked_descending_ids_exact_and_top_k_is_the_head(trained, loaded_redis):
    user = int(trained.log.user_id[0])
    cands = some_candidates(trained.log, 30, seed=1)
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        full = (await client.post("/rank", json=rank_body(user, cands))).json()["ranked"]
        top = (await client.post("/rank", json=rank_body(user, cands, top_k=7))).json()["ranked"]
        more = (await client.post("/rank", json=rank_body(user, cands, top_k=MAX_CANDIDATES))).json()["ranked"]
    ctr = [x["ctr"] for x in full]
    assert ctr == sorted(ctr, reverse=True)
    assert len(full) == 30 and len(top) == 7 and len(more) == 30
    assert top == full[:7]
    assert sorted((x["item_id"], x["cate_id"]) for x in full) == sorted(map(tuple, cands.tolist()))
    assert any(x["item_id"] == BIG and x["cate_id"] == BIG for x in full)  # int64 survives


async def test_unknown_user_ranks_with_empty_history(trained, loaded_redis):
    cands = some_candidates(trained.log, 12, seed=2)
    unknown = int(trained.log.user_id.max()) + 1000
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        body = (await client.post("/rank", json=rank_body(unknown, cands))).json()
    assert body["history_length"] == 0
    assert body["degraded"] is False
    want, _ = torch_ctr(trained, unknown, cands)
    got = {(x["item_id"], x["cate_id"]): x["ctr"] for x in body["ranked"]}
    np.testing.assert_allclose([got[tuple(c)] for c in cands.tolist()], want, rtol=0, atol=1e-5)


def _bad_requests() -> list:
    ok_cand = [{"item_id": 1, "cate_id": 2}]
    too_many = [{"item_id": i, "cate_id": 1} for i in range(MAX_CANDIDATES + 1)]
    return [
        pytest.param(b"{not json", ["Invalid JSON"], id="not-json"),
        pytest.param(b"", ["Invalid JSON"], id="empty-body"),
        pytest.param(b"[1, 2]", ["object"], id="not-an-object"),
        pytest.param({"candidates": ok_cand}, ["user_id", "missing"], id="missing-user"),
        pytest.param({"user_id": 1}, ["candidates", "missing"], id="missing-candidates"),
        pytest.param({"user_id": "abc", "candidates": ok_cand}, ["user_id", "int_type"], id="user-not-int"),
        pytest.param({"user_id": 1.5, "candidates": ok_cand}, ["user_id", "int_type"], id="user-float"),
        pytest.param({"user_id": 2**63, "candidates": ok_cand}, ["user_id", str(2**63 - 1)], id="user-above-int64"),
        pytest.param(
            {"user_id": 1, "candidates": [{"item_id": "7", "cate_id": 2}]}, ["item_id", "int_type"], id="item-string"
        ),
        pytest.param({"user_id": 1, "candidates": [{"item_id": 7, "cate_id": "3"}]}, ["cate_id", "int_type"], id="cate-string"),
        pytest.param({"user_id": 1, "candidates": []}, ["candidates", "at least 1"], id="empty-candidates"),
        pytest.param(
            {"user_id": 1, "candidates": too_many},
            ["candidates", f"at most {MAX_CANDIDATES}", "MAX_CANDIDATES"],
            id="too-many-candidates",
        ),
        pytest.param({"user_id": 1, "candidates": ok_cand, "top_k": 0}, ["top_k", "greater than or equal to 1"], id="top-k-0"),
        pytest.param(
            {"user_id": 1, "candidates": ok_cand, "top_k": MAX_CANDIDATES + 1}, ["top_k", "MAX_TOP_K"], id="top-k-above-limit"
        ),
    ]


@pytest.mark.parametrize("payload, must_mention", _bad_requests())
async def test_bad_requests_get_422_naming_the_field_and_limit(trained, loaded_redis, payload, must_mention):
    settings = settings_for(trained.bundle.path, loaded_redis, max_top_k=MAX_CANDIDATES)
    async with serving(settings) as client:
        if isinstance(payload, bytes):
            r = await client.post("/rank", content=payload, headers={"content-type": "application/json"})
        else:
            r = await client.post("/rank", json=payload)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert detail and all(e["loc"][0] == "body" for e in detail)
    for word in must_mention:
        assert word in r.text
    assert "Traceback" not in r.text and "/work/" not in r.text


async def test_healthz_and_readyz_when_all_is_well(trained, loaded_redis):
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["model"] == "ok" and body["store"] == "ok"
    assert body["model_version"] == trained.bundle.model_version
    assert body["providers"][-1] == "CPUExecutionProvider"


async def test_start_up_settles_the_process_for_serving(trained, loaded_redis):
    """Start-up objects are frozen out of the garbage collector's full passes (a full pass
    over them stalls every request in flight), and the GIL switch interval is the setting's;
    shutdown gives both back."""
    import gc
    import sys

    interval, frozen = sys.getswitchinterval(), gc.get_freeze_count()
    async with serving(settings_for(trained.bundle.path, loaded_redis, gil_switch_interval_ms=0.3)) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert gc.get_freeze_count() > frozen + 10_000  # the modules, the model, the app
        assert sys.getswitchinterval() == pytest.approx(0.0003)
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == interval


async def test_redis_down_degrades_instead_of_failing(trained, loaded_redis, redis_server):
    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    cands = some_candidates(trained.log, 10, seed=3)
    try:
        async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
            normal = (await client.post("/rank", json=rank_body(user, cands))).json()
            assert normal["degraded"] is False and normal["history_length"] > 0
            redis_server.stop(save=False)
            r = await client.post("/rank", json=rank_body(user, cands))
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")
    finally:
        redis_server.start()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and body["history_length"] == 0
    # ranked exactly as a user without history
    want, _ = torch_ctr(trained, int(trained.log.user_id.max()) + 1, cands)
    got = {(x["item_id"], x["cate_id"]): x["ctr"] for x in body["ranked"]}
    np.testing.assert_allclose([got[tuple(c)] for c in cands.tolist()], want, rtol=0, atol=1e-5)
    # Still ready (the model serves, degraded): a shared Redis outage must not empty the pool.
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["model"] == "ok" and ready.json()["degraded"] is True
    assert ready.json()["store"].startswith("unreachable") and "Redis" in ready.json()["store"]
    assert alive.status_code == 200


async def test_store_on_a_closed_port_degrades_from_the_start(trained):
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with serving(settings_for(trained.bundle.path, url)) as client:
        r = await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 5)))
        ready = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["degraded"] is True
    assert ready.status_code == 200 and ready.json()["degraded"] is True and "unreachable" in ready.json()["store"]


async def test_without_a_store_every_request_is_degraded(trained):
    async with serving(settings_for(trained.bundle.path, None)) as client:
        r = await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 5)))
        ready = await client.get("/readyz")
    assert r.json()["degraded"] is True
    assert ready.status_code == 200 and ready.json()["degraded"] is True and "REDIS_URL" in ready.json()["store"]


# ---------------------------------------------------------------------------------------
async def test_missing_bundle_refuses_to_start(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        async with serving(settings_for(tmp_path / "nope", None)):
            pass


async def test_corrupt_model_refuses_to_start(trained, tmp_path):
    bundle = shutil.copytree(trained.bundle.path, tmp_path / "bundle")
    (bundle / "model.onnx").write_bytes(b"this is not an onnx graph")
    with pytest.raises(BundleError, match="model.onnx"):
        async with serving(settings_for(bundle, None)):
            pass


async def test_corrupt_manifest_refuses_to_start(trained, tmp_path):
    bundle = shutil.copytree(trained.bundle.path, tmp_path / "bundle")
    (bundle / "bundle.json").write_text("{ truncated")
    with pytest.raises(BundleError, match="bundle.json"):
        async with serving(settings_for(bundle, None)):
            pass


async def test_openapi_documents_the_hand_parsed_request(trained):
    async with serving(settings_for(trained.bundle.path, None, max_top_k=7)) as client:
        doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    op = doc["paths"]["/rank"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RankRequest"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RankResponse"}
    request = schemas["RankRequest"]
    assert set(request["required"]) == {"user_id", "candidates"}
    assert request["properties"]["candidates"]["minItems"] == 1
    assert request["properties"]["candidates"]["maxItems"] == MAX_CANDIDATES  # the setting, not a constant
    assert request["properties"]["top_k"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 7}
    assert request["properties"]["candidates"]["items"] == {"$ref": "#/components/schemas/Candidate"}
    assert schemas["Candidate"]["properties"]["item_id"]["maximum"] == 2**63 - 1
    assert "ranked" in schemas["RankResponse"]["properties"]


def test_settings_come_from_the_environment_and_are_validated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("BUNDLE", "/models/din")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("MAX_CANDIDATES", "321")
    monkeypatch.setenv("STORE_TIMEOUT_MS", "7.5")
    s = Settings()
    assert (s.bundle, s.redis_url, s.max_candidates, s.store_timeout_s) == (Path("/models/din"), "redis://cache:6380/2", 321, 0.0075)
    assert s.device == "auto" and s.redis_namespace == "din" and s.intra_op_threads >= 1
    monkeypatch.setenv("DEVICE", "gpu")
    monkeypatch.setenv("MAX_CANDIDATES", "0")
    with pytest.raises(ValidationError) as e:
        Settings()
    text = str(e.value)
    assert "device" in text and "'auto', 'cpu', 'cuda' or 'tensorrt'" in text
    assert "max_candidates" in text and "greater than or equal to 1" in text


def test_the_rank_route_runs_no_dependency_in_a_worker_thread():
    """FastAPI runs a plain `def` dependency in a thread pool: a hand-off per request on the
    hot path (measured ~1 ms of CPU each). Every dependency of /rank must be a coroutine:
    the route's own and those its router is included with (the API-key check)."""
    import inspect

    from fastapi.routing import APIRoute

    from service.routes import rank as rank_routes
    from service.security import ApiKeyDep

    (route,) = [r for r in rank_routes.router.routes if isinstance(r, APIRoute) and r.path == "/rank"]
    calls = [ApiKeyDep.dependency]

    def walk(dependant):
        for dep in dependant.dependencies:
            calls.append(dep.call)
            walk(dep)

    walk(route.dependant)
    sync = [
        getattr(c, "__name__", repr(c)) for c in calls
        if not inspect.iscoroutinefunction(c if inspect.isfunction(c) else type(c).__call__)
    ]
    assert len(calls) >= 4 and sync == []
    assert inspect.iscoroutinefunction(route.endpoint)


async def test_category_lookups_go_through_the_store_guard(trained, loaded_redis):
    """Candidates without cate_id read the store's categories through the same guard as the
    histories: once the circuit is open they skip Redis (counted as circuit_open), not wait on it."""
    import redis as redis_py
    from test_observability import samples, value

    user, _ = users_by_history(trained.log, trained.bundle.spec.max_history)
    def no_categories(k: int) -> dict:  # new ads each time: the ad cache never answers for them
        return {"user_id": int(user), "candidates": [{"item_id": 10**9 + 100 * k + i} for i in range(5)]}

    settings = settings_for(
        trained.bundle.path, loaded_redis, store_timeout_ms=200, store_read_timeout_ms=5000,
        breaker_failure_threshold=2, breaker_reset_ms=60_000,
    )  # fmt: skip
    admin = redis_py.Redis.from_url(loaded_redis, socket_timeout=30)
    try:
        async with serving(settings) as client:
            assert (await client.post("/rank", json=no_categories(0))).json()["degraded"] is False
            admin.execute_command("CLIENT", "PAUSE", 5_000, "ALL")  # Redis accepts and answers nothing
            answers = [await client.post("/rank", json=no_categories(k)) for k in range(1, 5)]
            m = samples((await client.get("/metrics")).text)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert [(r.status_code, r.json()["degraded"]) for r in answers] == [(200, True)] * 4
    assert all(x["cate_id"] is None for r in answers for x in r.json()["ranked"])  # unknown ads, unknown categories
    failures = sum(value(m, "din_store_errors_total", op=op, reason="timeout") for op in ("get_ad_features", "get_histories"))
    assert failures == 2  # the threshold: then the circuit is open for both reads
    assert value(m, "din_store_errors_total", op="get_ad_features", reason="circuit_open") >= 1


async def test_a_data_version_without_categories_ranks_degraded_not_500(trained, loaded_redis):
    """A version whose meta lists other ad fields (no cate_id): the categories are unknown."""
    import json as json_module

    import redis as redis_py

    from feature_store.keys import KeySpace, current_key

    c = redis_py.Redis.from_url(loaded_redis)
    keys = KeySpace(namespace="din", version=c.get(current_key("din")).decode())
    meta = json_module.loads(c.get(keys.meta))
    c.set(keys.meta, json_module.dumps(meta | {"ad_fields": ["brand_id"]}))
    try:
        async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
            item = int(trained.log.item_id[0])
            answers = [await client.post("/rank", json={"user_id": 1, "candidates": [{"item_id": item}]}) for _ in range(2)]
    finally:
        c.set(keys.meta, json_module.dumps(meta))
        c.close()
    assert [r.status_code for r in answers] == [200, 200], answers[0].text
    assert all(r.json()["degraded"] is True and r.json()["ranked"][0]["cate_id"] is None for r in answers)
