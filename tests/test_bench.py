"""The benchmarks' arithmetic and JSON shapes (tiny sizes: these are not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from service.bench_scoring import BenchModel, ScoringBenchConfig, format_table, run_scoring_bench, useful_flops


def test_useful_flops_is_the_hand_count():
    m = BenchModel(embedding_dim=2, attention_hidden=(3, 2), mlp_hidden=(5,))  # D = 4
    u, t, n = 2, 3, 7
    macs = (
        u * t * 4 * 3  # user part of the first attention layer
        + n * (4 * 3 + (8 * 5 + 5 * 1))  # ad part; CTR MLP 2D -> 5 -> 1
        + n * t * (4 * 3 + 3 * 2 + 2 * 1 + 4)  # pair GEMM, rest of the attention, pooling
    )
    assert useful_flops(u, t, n, m) == 2 * macs + n * t * 4  # + e * v


def test_scoring_bench_json_shape_and_parity_of_the_three_implementations():
    m = BenchModel(embedding_dim=4, attention_hidden=(8, 4), mlp_hidden=(8,), items=50, categories=5, max_history=6)
    config = ScoringBenchConfig(
        cases=((1, 6, 10), (2, 4, 6)), threads=1, seconds=0.02, rounds=1, model=m, peak_sizes=(64,), chunk_candidates=3
    )  # 2x4x6 runs as two one-user calls
    result = run_scoring_bench(config)  # raises if an implementation disagrees with the training graph
    assert result["peak_gflops"] > 0 and result["threads"] == 1 and result["chunk_candidates"] == 3
    assert [(c["impl"], c["users"], c["history"], c["candidates"]) for c in result["cases"]] == [
        (impl, u, t, n) for u, t, n in config.cases for impl in ("torch_eager_naive", "onnx_naive", "onnx_optimized")
    ]
    for c in result["cases"]:
        assert set(c) >= {"impl", "users", "history", "candidates", "cand_per_s", "p50_ms", "p99_ms", "gflops", "utilization"}
        assert c["cand_per_s"] > 0 and c["p99_ms"] >= c["p50_ms"] > 0
        assert abs(c["utilization"] - c["gflops"] / result["peak_gflops"]) < 1e-3
    assert "onnx_optimized" in format_table(result)


def test_service_bench_runs_the_real_service_and_reports_every_level(tmp_path):
    from model.export import export_bundle
    from service.bench_scoring import build_bench_model
    from service.bench_service import ServiceBenchConfig, run_service_bench

    m = BenchModel(embedding_dim=4, attention_hidden=(8, 4), mlp_hidden=(8,), items=50, categories=5, max_history=6)
    model, spec, vocabularies = build_bench_model(m)
    bundle = export_bundle(
        model, model_type="din", spec=spec, vocabularies=vocabularies, out_dir=tmp_path, data_fingerprint="t", extra={}
    ).bundle
    config = ServiceBenchConfig(
        users=40, history=6, candidates=8, levels=(0.01, 0.02), seconds=1.0, half_seconds=1.5, threads=1,
        distinct_bodies=50, bundle=bundle,
    )  # fmt: skip
    result = run_service_bench(config)
    assert [round(level["offered_rps"] / result["levels"][0]["offered_rps"]) for level in result["levels"]] == [1, 2]
    for level in [*result["levels"], result["half_saturation"]]:
        assert set(level) >= {"offered_rps", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "mean_batch_users"}
        assert level["rps"] > 0 and level["p99_ms"] >= level["p50_ms"] > 0  # real answers came back
    assert result["saturation_rps"] == max(level["rps"] for level in result["levels"])
    assert result["scoring_ratio"] == round(result["saturation_rps"] / result["scoring_rps"], 4)
    assert result["half_saturation"]["seconds"] == 1.5  # the p99 level runs for its own duration
    assert abs(result["half_saturation"]["offered_rps"] - result["saturation_rps"] / 2) < 1


def test_the_gpu_profile_script_runs_on_the_cpu():
    """scripts/gpu_profile.py runs only where a GPU is lent; its CPU mode keeps it from rotting here."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "scripts/gpu_profile.py", "--device", "cpu", "--cases", "1x6x10,2x6x20", "--repeat", "2", "--top", "3"],
        cwd=root, capture_output=True, text=True, check=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("[{")))
    impls = ["scorer_with_attention (explain)", "scorer_scores_only (/rank)", "ort_on_device", "torch_eager_serving_graph"]
    assert [(r["case"], r["impl"]) for r in rows] == [(c, i) for c in ("1x6x10", "2x6x20") for i in impls]
    assert all(r["ms"] > 0 and r["cand_per_s"] > 0 for r in rows)
    assert "top kernels" in out.stdout
