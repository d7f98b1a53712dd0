"""Scorer runtime options: GPU asked for but missing fails readiness (not silently slow),
shape buckets change nothing but the shapes, the optimised graph can be saved, settings
map onto the session."""

from __future__ import annotations

import contextlib

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.app import create_app
from service.scorer import CPU, CPU_CALL_CANDIDATES, CUDA, TENSORRT, RankInput, RuntimeOptions, Scorer, bucket, build_batch
from service.settings import Settings

from tests.tiny_bundle import bundle, candidates  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(settings: Settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            yield client


@pytest.mark.parametrize("device, provider", [("cuda", CUDA), ("tensorrt", TENSORRT)])
async def test_gpu_asked_for_but_missing_fails_readiness_with_a_clear_message(bundle, device, provider):  # noqa: F811
    scorer = Scorer.load(bundle, options=RuntimeOptions(device=device, intra_op_threads=1))
    if provider in scorer.providers:
        pytest.skip(f"{provider} really works on this machine")
    assert scorer.device_problem and f"DEVICE={device}" in scorer.device_problem and provider in scorer.device_problem
    settings = Settings(bundle=bundle.path, redis_url=None, device=device, intra_op_threads=1)
    async with serving(settings) as client:
        ready = await client.get("/readyz")
        ranked = await client.post("/rank", json={"user_id": 1, "candidates": [{"item_id": 100, "cate_id": 1}]})
    assert ready.status_code == 503
    body = ready.json()
    assert body["ready"] is False and f"DEVICE={device}" in body["model"] and "CPU" in body["model"]
    assert body["providers"] == [CPU]
    assert ranked.status_code == 200  # it still answers (on the CPU); the balancer routes around it


async def test_auto_on_a_machine_without_gpu_is_ready_on_the_cpu(bundle):  # noqa: F811
    scorer = Scorer.load(bundle, options=RuntimeOptions(device="auto", intra_op_threads=1))
    assert scorer.device_problem is None and scorer.providers[-1] == CPU


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 16, 17, 200, 256, 257, 3000)] == [16, 16, 32, 256, 256, 512, 4096]


def _requests(rng: np.random.Generator, shapes: tuple[tuple[int, int], ...]) -> list[RankInput]:
    """One request per (history length, candidates): random known ids, no profile."""
    return [
        RankInput(history={"item_id": rng.choice(np.arange(100, 140), t), "cate_id": rng.choice(np.arange(1, 6), t)} if t else {},
                  profile={}, candidates=candidates(t, n))
        for t, n in shapes
    ]  # fmt: skip


def test_shape_buckets_pad_the_run_and_change_no_score(bundle):  # noqa: F811
    plain = Scorer.load(bundle, options=RuntimeOptions(device="cpu", intra_op_threads=1, shape_buckets=False))
    padded = Scorer.load(bundle, options=RuntimeOptions(device="cpu", intra_op_threads=1, shape_buckets=True))
    assert padded.shape_buckets and not plain.shape_buckets
    requests = _requests(np.random.default_rng(0), ((3, 5), (0, 2), (6, 17)))
    for got, want in zip(padded.score_requests(requests), plain.score_requests(requests)):
        assert got.ctr.shape == want.ctr.shape and got.attention.shape == want.attention.shape
        np.testing.assert_allclose(got.ctr, want.ctr, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.attention, want.attention, rtol=0, atol=1e-6)
    shapes = padded.warm_up_shapes()
    assert (1, bundle.spec.max_history, 16) in shapes and all(n == bucket(n) for _, _, n in shapes)


@pytest.mark.parametrize("buckets", [True, False])
def test_io_binding_the_gpu_path_scores_as_a_plain_run(bundle, buckets):  # noqa: F811
    """The GPU's IO-binding code (reused per-shape buffers, attention left in its buffer
    unless asked for) run with CPU buffers, so CI covers it without a GPU."""
    plain = Scorer.load(bundle, options=RuntimeOptions(device="cpu", intra_op_threads=1, shape_buckets=False))
    bound = Scorer.load(bundle, options=RuntimeOptions(device="cpu", intra_op_threads=1, shape_buckets=buckets, io_binding=True))
    requests = _requests(np.random.default_rng(1), ((3, 5), (0, 2), (6, 17), (2, 5)))
    want = plain.score_requests(requests)
    first = bound.score_requests(requests)
    again = bound.score_requests(requests[::-1])[::-1]  # the same shapes: the same buffers, reused
    for w, a, b in zip(want, first, again):
        np.testing.assert_allclose(a.ctr, w.ctr, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.attention, w.attention, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a.ctr, b.ctr)  # a later run did not overwrite an earlier answer
    scores_only = bound.score_batch(build_batch(bundle, requests, attention=False))
    assert all(s.attention is None for s in scores_only)
    for s, w in zip(scores_only, want):
        np.testing.assert_allclose(s.ctr, w.ctr, rtol=0, atol=1e-6)


def test_optimized_graph_is_saved_and_settings_reach_the_session(bundle, tmp_path):  # noqa: F811
    settings = Settings(bundle=bundle.path, ort_optimized_model_dir=tmp_path, ort_spinning=True, intra_op_threads=1,
                        batch_max_candidates=777)  # fmt: skip
    options = settings.runtime_options()
    assert options.allow_spinning and options.max_batch_candidates == max(777, settings.max_candidates)
    scorer = Scorer.load(bundle, options=options)
    saved = list(tmp_path.glob("*.optimized.onnx"))
    assert len(saved) == 1 and bundle.model_version in saved[0].name and saved[0].stat().st_size > 0
    config = scorer.session.get_session_options()
    assert config.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert config.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    batching = settings.batcher_config()
    assert batching.max_batch_candidates == 777 and batching.max_wait_s == settings.batch_max_wait_ms / 1000
    assert scorer.chunk_candidates == CPU_CALL_CANDIDATES  # unset: the CPU's default
    chunked = Scorer.load(bundle, options=Settings(bundle=bundle.path, score_chunk_candidates=0).runtime_options())
    assert chunked.chunk_candidates == 0


def test_batch_size_default_depends_on_the_device(bundle):  # noqa: F811
    settings = Settings(bundle=bundle.path)
    assert settings.batcher_config(on_gpu=False).max_batch_candidates == 256
    assert settings.batcher_config(on_gpu=True).max_batch_candidates == 8192
    assert Settings(bundle=bundle.path, batch_max_candidates=100).batcher_config(on_gpu=True).max_batch_candidates == 100
