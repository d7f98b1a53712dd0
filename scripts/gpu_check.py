"""CUDA (or TensorRT) vs CPU parity of the serving graph, through the service's own Scorer.

Run by scripts/gpu_bench.sh on a machine with a GPU; prints one JSON line and exits
non-zero when the GPU provider is missing or the scores disagree beyond the tolerance
(1e-4 for fp32 CUDA, 2e-2 for TensorRT fp16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "tensorrt", "cpu"])
    args = parser.parse_args()

    from model.export import export_bundle, random_inputs
    from model.contract import CAND_USER, cand_input, hist_input
    from service.bench_scoring import BenchModel, build_bench_model
    from service.scorer import RuntimeOptions, Scorer

    m = BenchModel(max_history=50)
    model, spec, vocabularies = build_bench_model(m)
    with tempfile.TemporaryDirectory() as tmp:
        result = export_bundle(
            model, model_type="din", spec=spec, vocabularies=vocabularies, out_dir=Path(tmp),
            data_fingerprint="gpucheck", extra={},
        )  # fmt: skip
        cpu = Scorer.load(str(result.bundle), options=RuntimeOptions(device="cpu", intra_op_threads=4))
        gpu = Scorer.load(str(result.bundle), options=RuntimeOptions(device=args.device, shape_buckets=True))
        auto = Scorer.load(str(result.bundle), options=RuntimeOptions(device="auto"))  # what a default deployment gets
        report = {
            "device": args.device, "providers": gpu.providers, "device_problem": gpu.device_problem,
            "auto_providers": auto.providers,
        }  # fmt: skip
        if gpu.device_problem:
            print(json.dumps(report))
            return 2
        gpu.warm_up()
        worst = 0.0
        for users, slots, candidates, seed in [(1, 50, 200, 0), (4, 50, 800, 1), (16, 37, 3200, 2), (1, 3, 5, 3)]:
            x = random_inputs(spec, users, slots, candidates, seed)  # ragged histories, unknown ids
            hist = {f: x[hist_input(f)] for f in spec.sequence_fields}
            cand = {f: x[cand_input(f)] for f in spec.sequence_fields}
            want = cpu.score(hist, {}, cand, x[CAND_USER])
            got = gpu.score(hist, {}, cand, x[CAND_USER])
            for w, g in zip(want, got):
                assert w.shape == g.shape, (w.shape, g.shape)
                worst = max(worst, float(np.max(np.abs(w - g))))
        tolerance = 2e-2 if args.device == "tensorrt" else 1e-4
        report |= {"max_abs_diff": worst, "tolerance": tolerance, "ok": worst <= tolerance}
        print(json.dumps(report))
        return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
