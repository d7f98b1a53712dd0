"""Where the GPU time of the serving graph goes (run by `scripts/gpu_bench.sh profile`).

`din bench scoring --device cuda` times the Scorer end to end: ids copied in, scores copied
out (and the attention weights, for explain). This splits that time: the same ONNX graph with inputs and outputs
left on the GPU (ONNX Runtime's pure compute), the same serving graph in PyTorch eager on
the GPU, and a kernel table of the latter (torch.profiler), so a slow run can be placed:
transfers, ONNX Runtime's kernels, or the graph's own memory traffic.

Prints a Markdown table and the top kernels; `--device cpu` runs the same code on the CPU
(a smoke test of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _median_ms(fn: Callable[[], object], sync: Callable[[], None], repeat: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _pair_bytes(users: int, history: int, candidates: int, dim: int, hidden: tuple[int, ...]) -> int:
    """A floor on the graph's device-memory traffic: the (N, T, .) tensors it must write and read once."""
    pairs = candidates * history
    per_pair = 2 * dim + 2 * sum(hidden) + 2  # pair (N,T,D) and each attention layer's output, written + read
    return 4 * pairs * per_pair


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--cases", default="1x50x200,16x50x3200,256x50x51200")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from model.contract import CAND_USER, cand_input, hist_input
    from model.export import to_onnx
    from model.serving_graph import serving_modules
    from service.bench_scoring import BenchModel, bench_inputs, build_bench_model, useful_flops, write_bench_bundle
    from service.scorer import RuntimeOptions, Scorer
    from model.cpu import cores

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if args.device == "cuda" else (lambda: None)
    m = BenchModel(max_history=max(int(c.split("x")[1]) for c in args.cases.split(",")))
    model, spec, vocabularies = build_bench_model(m)
    onnx_bytes = to_onnx(model, spec)
    with torch.device(dev):  # the serving graphs keep folded weights as plain tensors: build them on the device
        general, single_user = serving_modules(model.to(dev), spec)
    provider = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores()  # as the Scorer below: the same CPU threads for both
    session = ort.InferenceSession(onnx_bytes, options, providers=provider)

    rows, kernel_tables = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bench_bundle(Path(tmp), onnx_bytes, spec, vocabularies, "din")
        scorer = Scorer.load(str(bundle), options=RuntimeOptions(device=args.device, intra_op_threads=cores(), shape_buckets=False))
        for case in args.cases.split(","):
            users, history, candidates = map(int, case.split("x"))
            x = bench_inputs(m, users, history, candidates, seed=1)
            names = spec.input_names()
            flat = [torch.from_numpy(x[n]).to(dev) for n in names]
            graph = single_user if users == 1 else general

            def torch_run() -> object:
                with torch.inference_mode():
                    return graph(*flat)

            binding = session.io_binding()
            for n in names:
                binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x[n]), args.device, 0))
            for out in session.get_outputs():
                binding.bind_output(out.name, args.device)

            def ort_compute() -> object:
                session.run_with_iobinding(binding)
                return binding

            hist = {f: x[hist_input(f)] for f in spec.sequence_fields}
            cand = {f: x[cand_input(f)] for f in spec.sequence_fields}

            def scorer_run(attention: bool) -> object:
                return scorer.score(hist, {}, cand, x[CAND_USER], attention=attention)

            flops = useful_flops(users, history, candidates, m)
            floor_bytes = _pair_bytes(users, history, candidates, m.dim, m.attention_hidden)
            for name, fn in (
                ("scorer_with_attention (explain)", lambda: scorer_run(True)),
                ("scorer_scores_only (/rank)", lambda: scorer_run(False)),
                ("ort_on_device", ort_compute),
                ("torch_eager_serving_graph", torch_run),
            ):
                ms = _median_ms(fn, sync, args.repeat)
                rows.append({
                    "case": case, "impl": name, "ms": round(ms, 3), "cand_per_s": round(candidates / ms * 1e3),
                    "gflops": round(flops / ms / 1e6, 1), "floor_gb_per_s": round(floor_bytes / ms / 1e6, 1),
                })  # fmt: skip
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    torch_run()
                sync()
            key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
            try:
                kernel_tables[case] = prof.key_averages().table(sort_by=key, row_limit=args.top)
            except (AttributeError, KeyError, ValueError):
                kernel_tables[case] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.top)

    for case, table in kernel_tables.items():
        print(f"\n## torch eager serving graph, {case}, 3 calls: top kernels\n{table}")
    print(json.dumps(rows))
    print("\n| case | impl | ms | cand/s | useful GFLOP/s | pair-tensor floor GB/s |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r['cand_per_s']:,} | {r['gflops']:,.1f} | {r['floor_gb_per_s']:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
