"""`din bench scoring`: naive and optimised DIN scoring side by side, against the GEMM peak.

Three implementations of the same model (same weights, same CTRs):

- `torch_eager_naive`: model/naive_din.py in PyTorch eager mode; the history repeated for
  every candidate and the full [e, v, e - v, e * v] attention input (how model zoos score);
- `onnx_naive`: that model exported as it is, run by ONNX Runtime;
- `onnx_optimized`: the serving graph (model/serving_graph.py) through the service's own
  Scorer, exactly as `/rank` runs it.

Each case (users, history, candidates) runs every implementation in many short
interleaved rounds (with a short pause between runtimes, so one runtime's spinning workers
do not steal the next one's cores), so machine noise hits all of them alike. On a machine
shared with other work the load changes faster than a case runs, so throughput
(`cand_per_s`) and GFLOP/s use each implementation's best call, and the peak is the best
GEMM reading (measured before, between and after the cases): best against best, the
machine's capability without interference. `cand_per_s_p50` and `cand_per_s_mean` are the
median- and mean-based rates, and p50 / p99 the call latencies, as observed under the load.

Useful FLOPs are the minimal work of the optimised algorithm (`useful_flops`), the same
number for every implementation, so GFLOP/s compares like with like and utilisation is
never inflated by work an implementation does not need: multiply-adds count 2.

    per user       T*D*H1                      attention first layer, user part
    per candidate  D*H1 + MLP(P+2D -> ... -> 1) attention first layer ad part, CTR MLP
    per pair       D*H1 + H1*H2 + ... + Hk*1    pair GEMM, rest of the attention MLP
                   + D                          pooling a_j * e_j
    and D multiplies per pair for e * v.

The peak is the best fp32 GEMM rate measured here at the same thread count, over numpy
(OpenBLAS), torch and ONNX Runtime's own MatMul (MLAS), whichever is fastest.

Needs torch (the `train` extra): the baseline is a PyTorch model.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from model.cpu import cores

CASES: tuple[tuple[int, int, int], ...] = ((1, 50, 200), (1, 100, 500), (16, 50, 3200))
IMPLS: tuple[str, ...] = ("torch_eager_naive", "onnx_naive", "onnx_optimized")


@dataclass(frozen=True)
class BenchModel:
    """The benchmark's DIN: item and category embeddings of 64 each, attention 80-40-1."""

    embedding_dim: int = 64
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    items: int = 100_000  # raw item ids 0..items-1
    categories: int = 1_000
    max_history: int = 100
    seed: int = 0

    @property
    def dim(self) -> int:  # D: item ++ category
        return 2 * self.embedding_dim


@dataclass(frozen=True)
class ScoringBenchConfig:
    cases: tuple[tuple[int, int, int], ...] = CASES
    impls: tuple[str, ...] = IMPLS
    threads: int = field(default_factory=cores)
    seconds: float = 2.0  # per implementation and case, split over `rounds`
    rounds: int = 10
    device: str = "cpu"  # cpu | cuda | tensorrt: ONNX Runtime's device (torch follows on CUDA)
    allow_spinning: bool = False  # ORT workers spin between ops: on a shared machine spinning loses (measured)
    chunk_candidates: int | None = None  # RuntimeOptions.chunk_candidates (None: the service's default)
    model: BenchModel = BenchModel()
    peak_sizes: tuple[int, ...] = (768, 1024, 1536)  # square GEMMs for the peak


def useful_flops(users: int, history: int, candidates: int, m: BenchModel, profile_dim: int = 0) -> int:
    """Minimal FLOPs of one optimised scoring call (see the module docstring)."""
    d, (h1, *h_rest) = m.dim, m.attention_hidden
    att_rest = sum(a * b for a, b in zip((h1, *h_rest), (*h_rest, 1)))  # H1*H2 + ... + Hk*1
    mlp_dims = (profile_dim + 2 * d, *m.mlp_hidden, 1)
    mlp = sum(a * b for a, b in zip(mlp_dims[:-1], mlp_dims[1:]))
    pairs = candidates * history
    macs = users * history * d * h1 + candidates * (d * h1 + mlp) + pairs * (d * h1 + att_rest + d)
    return 2 * macs + pairs * d


# ---------------------------------------------------------------------------------------
# The peak: the best fp32 GEMM this machine does at this thread count.
@contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy then uses its default (all cores)
        yield
        return
    with threadpool_limits(limits=threads):
        yield


def _best_rate(fn: Callable[[], object], flops: float, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def measure_peak(threads: int, sizes: tuple[int, ...] = (768, 1024, 1536)) -> dict[str, float]:
    """GFLOP/s of square fp32 GEMMs per library (best size, best of 10); 'peak' is the max.

    Mid-sized GEMMs (a few ms each): near the large-GEMM rate, and short enough to catch
    the moments a shared machine leaves the cores free, as the scoring calls do."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from service.scorer import session_options

    rng = np.random.default_rng(0)
    rates: dict[str, float] = {"numpy": 0.0, "torch": 0.0, "onnxruntime": 0.0}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            flops = 2.0 * n**3
            with _blas_threads(threads):
                rates["numpy"] = max(rates["numpy"], _best_rate(lambda: a @ b, flops))
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            rates["torch"] = max(rates["torch"], _best_rate(lambda: ta @ tb, flops))
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                 helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
            )  # fmt: skip
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 9  # what every supported onnxruntime reads
            session = ort.InferenceSession(
                model.SerializeToString(),
                session_options(threads, allow_spinning=True),
                providers=["CPUExecutionProvider"],
            )
            feeds = {"a": a, "b": b}
            rates["onnxruntime"] = max(rates["onnxruntime"], _best_rate(lambda: session.run(None, feeds), flops))
    finally:
        torch.set_num_threads(previous)
    return {**rates, "peak": max(rates.values())}


def measure_gpu_peak(device_id: int = 0, n: int = 8192) -> dict[str, float]:
    """fp32 GEMM (TF32 off) and fp16 GEMM GFLOP/s on the GPU through torch."""
    import torch

    dev = torch.device("cuda", device_id)
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, float] = {}
    for name, dtype in (("cuda_fp32", torch.float32), ("cuda_fp16", torch.float16)):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)

        def gemm() -> None:
            a @ b
            torch.cuda.synchronize(dev)

        out[name] = _best_rate(gemm, 2.0 * n**3)
    out["peak"] = out["cuda_fp32"]
    return out


# ---------------------------------------------------------------------------------------
# The model, its inputs, and one runner per implementation.
def build_bench_model(m: BenchModel):
    """(DIN with random weights of the benchmark's shapes, its FeatureSpec, its vocabularies)."""
    import torch

    from model.config import ModelConfig
    from model.contract import FeatureSpec, Vocabulary
    from model.registry import build_model

    vocabularies = {"item_id": Vocabulary(np.arange(m.items)), "cate_id": Vocabulary(np.arange(m.categories))}
    spec = FeatureSpec(vocab_sizes={k: v.num_rows for k, v in vocabularies.items()}, max_history=m.max_history)
    config = ModelConfig(embedding_dim=m.embedding_dim, attention_hidden=m.attention_hidden, mlp_hidden=m.mlp_hidden)
    torch.manual_seed(m.seed)
    model = build_model("din", spec, config).eval()
    return model, spec, vocabularies


def bench_inputs(m: BenchModel, users: int, history: int, candidates: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows for full histories (no padding) and `candidates` split evenly over the users."""
    from model.contract import CAND_USER, FIRST_ID_ROW, cand_input, hist_input

    rng = np.random.default_rng(seed)
    return {
        hist_input("item_id"): rng.integers(FIRST_ID_ROW, m.items + FIRST_ID_ROW, (users, history)),
        hist_input("cate_id"): rng.integers(FIRST_ID_ROW, m.categories + FIRST_ID_ROW, (users, history)),
        cand_input("item_id"): rng.integers(FIRST_ID_ROW, m.items + FIRST_ID_ROW, candidates),
        cand_input("cate_id"): rng.integers(FIRST_ID_ROW, m.categories + FIRST_ID_ROW, candidates),
        CAND_USER: np.repeat(np.arange(users), -(-candidates // users))[:candidates],
    }


def write_bench_bundle(out_dir: Path, onnx_bytes: bytes, spec, vocabularies, model_type: str) -> Path:
    from model.bundle import new_model_version, write_bundle

    return write_bundle(
        out_dir,
        model_version=new_model_version(model_type, "bench0000"),
        model_type=model_type,
        spec=spec,
        vocabularies=vocabularies,
        onnx_bytes=onnx_bytes,
        extra={"has_attention": True, "benchmark": True},
    )


def _onnx_runner(bundle_path: Path, config: ScoringBenchConfig, x: dict[str, np.ndarray]) -> Callable[[], object]:
    """One Scorer.score call on prepared rows: the service's own path, minus HTTP and Redis."""
    from model.contract import CAND_USER, cand_input, hist_input
    from service.scorer import RuntimeOptions, Scorer

    options = RuntimeOptions(
        device=config.device, intra_op_threads=config.threads, allow_spinning=config.allow_spinning, shape_buckets=False,
        chunk_candidates=config.chunk_candidates,
    )
    scorer = Scorer.load(str(bundle_path), options=options)
    if scorer.device_problem:
        raise RuntimeError(scorer.device_problem)
    fields = scorer.bundle.spec.sequence_fields
    hist = {f: x[hist_input(f)] for f in fields}
    cand = {f: x[cand_input(f)] for f in fields}
    # as /rank without explain: the scores come back to the host, the attention weights stay
    # where they were computed (on a GPU, as torch_eager_naive's do; on the CPU no difference)
    return lambda: scorer.score(hist, {}, cand, x[CAND_USER], attention=False)


def _torch_runner(naive, spec, config: ScoringBenchConfig, x: dict[str, np.ndarray]) -> Callable[[], object]:
    import torch

    from model.inputs import split_inputs

    dev = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(naive).to(dev)  # a copy: `.to` moves in place, and the reference scores stay on the CPU
    hist, profile, cand, cand_user = split_inputs(spec, {k: torch.from_numpy(v).to(dev) for k, v in x.items()})

    def run() -> object:
        with torch.inference_mode():
            logit, attention = model(hist, profile, cand, cand_user)
            ctr = torch.sigmoid(logit)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return ctr, attention

    return run


# Scores must agree with the training graph (CPU, fp32) before they are timed. On CUDA the
# naive graph's big reductions land ~2e-4 apart at 1024x50x204800 (cuBLAS picks other
# algorithms, TF32 off); TensorRT runs in fp16.
_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3, "tensorrt": 2e-2}


@dataclass
class _Timings:
    calls: list[float] = field(default_factory=list)

    def summary(self) -> tuple[float, float, float, float]:
        """(best, mean, p50, p99) seconds per call."""
        ts = np.asarray(self.calls)
        return float(ts.min()), float(ts.mean()), float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


_QUIET_S = 0.02  # ORT and OpenMP workers spin for a while after a run; on few cores they would
# steal the next implementation's cores (measured: torch eager 30x slower right after ORT)


def _time_interleaved(runners: dict[str, Callable[[], object]], seconds: float, rounds: int) -> dict[str, _Timings]:
    """Every runner gets `seconds / rounds` per round, rounds interleaved."""
    timings = {name: _Timings() for name in runners}
    per_call = {}
    for name, run in runners.items():  # warm-up, and a first estimate of the call time
        time.sleep(_QUIET_S)
        run()
        t0 = time.perf_counter()
        run()
        per_call[name] = max(time.perf_counter() - t0, 1e-6)
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(_QUIET_S)  # the previous runtime's spinning threads go to sleep first
            calls = max(3, int(seconds / rounds / per_call[name]))
            for _ in range(calls):
                t0 = time.perf_counter()
                run()
                timings[name].calls.append(time.perf_counter() - t0)
    return timings


def run_scoring_bench(config: ScoringBenchConfig = ScoringBenchConfig(), log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole benchmark; returns the JSON document of `din bench scoring --json`."""
    import torch

    from model.export import to_onnx, torch_scores
    from model.naive_din import NaiveDIN
    from service.scorer import RuntimeOptions

    unknown = set(config.impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    m = config.model
    if any(t > m.max_history for _, t, _ in config.cases):
        m = replace(m, max_history=max(t for _, t, _ in config.cases))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    log(f"building the benchmark DIN (embeddings {m.embedding_dim}+{m.embedding_dim}, attention "
        f"{'-'.join(map(str, m.attention_hidden))}-1) and exporting both graphs")  # fmt: skip
    model, spec, vocabularies = build_bench_model(m)
    naive = NaiveDIN(model).eval()
    try:
        with tempfile.TemporaryDirectory(prefix="din-bench-") as tmp:
            bundles = {}
            if "onnx_naive" in config.impls:
                bundles["onnx_naive"] = write_bench_bundle(Path(tmp), to_onnx(naive, spec, optimize=False), spec, vocabularies, "din_naive")
            if "onnx_optimized" in config.impls:
                bundles["onnx_optimized"] = write_bench_bundle(Path(tmp), to_onnx(model, spec), spec, vocabularies, "din")
            log(f"measuring the fp32 GEMM peak ({config.threads} threads)")
            peak = measure_gpu_peak() if config.device != "cpu" else measure_peak(config.threads, config.peak_sizes)
            cases = []
            for users, history, candidates in config.cases:
                x = bench_inputs(m, users, history, candidates, seed=m.seed)
                want, _ = torch_scores(model, spec, x)
                runners: dict[str, Callable[[], object]] = {}
                for impl in config.impls:
                    if impl == "torch_eager_naive":
                        runners[impl] = _torch_runner(naive, spec, config, x)
                    else:
                        runners[impl] = _onnx_runner(bundles[impl], config, x)
                    got = runners[impl]()[0]
                    got = got.cpu().numpy() if hasattr(got, "cpu") else got
                    diff = float(np.max(np.abs(np.asarray(got) - want)))
                    if diff > _TOLERANCE[config.device]:
                        raise RuntimeError(f"{impl} disagrees with the training graph by {diff:.3g} at {users}x{history}x{candidates}")
                log(f"case users={users} history={history} candidates={candidates}: "
                    f"{', '.join(config.impls)} interleaved, {config.seconds:.1f}s each")  # fmt: skip
                timings = _time_interleaved(runners, config.seconds, config.rounds)
                flops = useful_flops(users, history, candidates, m)
                for impl in config.impls:
                    best, mean, p50, p99 = timings[impl].summary()
                    gflops = flops / best / 1e9
                    cases.append({
                        "impl": impl, "users": users, "history": history, "candidates": candidates,
                        "cand_per_s": round(candidates / best, 1),
                        "p50_ms": round(p50 * 1e3, 4), "p99_ms": round(p99 * 1e3, 4),
                        "gflops": round(gflops, 2), "utilization": round(gflops / peak["peak"], 4),
                        "cand_per_s_p50": round(candidates / p50, 1), "cand_per_s_mean": round(candidates / mean, 1),
                    })  # fmt: skip
                if config.device == "cpu":  # the peak between cases too: keep the best reading
                    again = measure_peak(config.threads, config.peak_sizes)
                    peak = {k: max(peak[k], again[k]) for k in peak}
            # the peak once more at the end: the machine is shared, keep the higher reading
            if config.device == "cpu":
                again = measure_peak(config.threads, config.peak_sizes)
                peak = {k: max(peak[k], again[k]) for k in peak}
                for c in cases:
                    c["utilization"] = round(c["gflops"] / peak["peak"], 4)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "peak_gflops": round(peak["peak"], 2),
        "cases": cases,
        "threads": config.threads,
        "device": config.device,
        "peak_by_library": {k: round(v, 2) for k, v in peak.items() if k != "peak"},
        "chunk_candidates": RuntimeOptions(chunk_candidates=config.chunk_candidates).call_candidates(on_gpu=config.device != "cpu"),
        "useful_flops_per_call": {f"{u}x{t}x{n}": useful_flops(u, t, n, m) for u, t, n in config.cases},
    }


def format_table(result: dict) -> str:
    """The benchmark as a Markdown table, with speed-ups over the naive implementations."""
    rows = [
        f"peak fp32 GEMM: {result['peak_gflops']:.1f} GFLOP/s ({result['threads']} threads, device {result['device']}; "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.get("peak_by_library", {}).items())
        + ")",
        "",
        "| users | history | candidates | impl | cand/s | p50 ms | p99 ms | GFLOP/s | utilisation | vs torch naive | vs onnx naive |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_case: dict[tuple[int, int, int], dict[str, dict]] = {}
    for c in result["cases"]:
        by_case.setdefault((c["users"], c["history"], c["candidates"]), {})[c["impl"]] = c
    for (u, t, n), impls in by_case.items():
        for impl, c in impls.items():
            ratios = []
            for base in ("torch_eager_naive", "onnx_naive"):
                b = impls.get(base)
                ratios.append(f"{c['cand_per_s'] / b['cand_per_s']:.2f}x" if b else "")
            rows.append(
                f"| {u} | {t} | {n} | {impl} | {c['cand_per_s']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                f"{c['gflops']:.1f} | {c['utilization']:.2f} | {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(rows)
