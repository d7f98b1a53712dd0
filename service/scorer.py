"""The scoring runtime: raw ids of U users' requests -> ONNX Runtime -> CTRs.

The graph is user-batched (DESIGN.md, contract 2): history and profile inputs are per user
([U, T], [U]), candidate inputs are flat ([N]) with `cand_user` naming each candidate's
user. One request is U = 1; the micro-batcher will hand several requests to
`Scorer.score_requests` at once. Everything between raw ids and the session is numpy,
vectorised over candidates; Python loops run over users only (on the CPU a big batch runs
as several calls of whole users, `user_chunks`).

Torch-free: this module runs in the serving image.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.bundle import Bundle, BundleError, load_bundle
from model.contract import (
    ATTENTION, CAND_USER, CTR, PAD_ROW, UNK_ROW, FeatureSpec, cand_input, hist_input, profile_input,
)  # fmt: skip

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
# A user without a profile has raw profile id -1, as in training (UserProfiles.lookup):
# it maps to the row training learned for "no profile", or to UNK_ROW if there was none.
NO_PROFILE_ID = -1
# On the CPU a call's (candidate, behaviour) tensors should stay cache-sized, and the graph's
# one-user branch beats its batch branch per candidate (docs/benchmarks.md, "Chunked calls"):
# a big batch is scored in chunks of whole users holding at most this many candidates.
CPU_CALL_CANDIDATES = 256
_ORT_DEFAULT_SEVERITY = 2  # warning: ONNX Runtime's own default
_ORT_SILENT = 4  # fatal only


# ---------------------------------------------------------------------------------------
# Requests in raw ids, and what comes back.
@dataclass(frozen=True)
class RankInput:
    """One user's request in raw ids: what the scorer (and later the micro-batcher) takes.

    `history[field]` is int64 (L,), newest first, any length (truncated here to the
    bundle's max_history). `profile[field]` is a raw id; a missing field is NO_PROFILE_ID.
    `candidates[field]` is int64 (n,), one entry per candidate.
    """

    history: dict[str, np.ndarray]
    profile: dict[str, int]
    candidates: dict[str, np.ndarray]

    @property
    def num_candidates(self) -> int:
        return int(next(iter(self.candidates.values())).shape[0])

    @property
    def history_length(self) -> int:
        return int(next(iter(self.history.values())).shape[0]) if self.history else 0


@dataclass(frozen=True)
class Scored:
    ctr: np.ndarray  # (n,) float32, in request order
    attention: np.ndarray | None  # (n, history_length) float32; None when the batch did not ask for it
    history_length: int  # behaviours scored against (after truncation)


@dataclass
class ScoringBatch:
    """ONNX feeds for U users and N candidates, plus how to split the outputs back."""

    hist_rows: dict[str, np.ndarray]  # field -> (U, T) int64, PAD_ROW after each user's end
    profile_rows: dict[str, np.ndarray]  # field -> (U,) int64
    cand_rows: dict[str, np.ndarray]  # field -> (N,) int64
    cand_user: np.ndarray  # (N,) int64 in [0, U)
    history_lengths: np.ndarray  # (U,) int64
    cand_offsets: np.ndarray = field(repr=False)  # (U + 1,): user u owns [off[u], off[u+1])
    attention: bool = True  # return the attention weights (some request explains)


def build_batch(bundle: Bundle, requests: Sequence[RankInput], *, attention: bool = True) -> ScoringBatch:
    """Map raw ids to rows (unknown -> UNK_ROW) and pad histories to T for U users at once.

    T = the longest history in the batch, capped by the bundle's max_history, at least 1
    (a fully padded slot scores exactly as an empty history). `attention`: return the
    attention weights too (explain); without it a GPU leaves them on the device.
    """
    spec, vocabs = bundle.spec, bundle.vocabularies
    if not requests:
        raise ValueError("build_batch needs at least one request")
    u = len(requests)
    first = spec.sequence_fields[0]
    lengths = np.fromiter(
        (min(int(r.history[first].shape[0]) if r.history else 0, spec.max_history) for r in requests),
        dtype=np.int64,
        count=u,
    )
    t = int(max(1, lengths.max()))
    filled = np.arange(t)[None, :] < lengths[:, None]  # (U, T): row-major order = concatenation order

    hist_rows: dict[str, np.ndarray] = {}
    for f in spec.sequence_fields:
        raw = [r.history[f][: spec.max_history] for r in requests if r.history]
        rows = np.full((u, t), PAD_ROW, dtype=np.int64)  # (U, T)
        if raw:
            rows[filled] = vocabs[f].lookup(np.concatenate(raw))
        hist_rows[f] = rows

    profile_rows = {
        f: vocabs[f].lookup(np.fromiter((r.profile.get(f, NO_PROFILE_ID) for r in requests), np.int64, count=u))
        for f in spec.profile_fields
    }  # field -> (U,)

    counts = np.fromiter((r.num_candidates for r in requests), dtype=np.int64, count=u)
    cand_rows = {
        f: vocabs[f].lookup(np.concatenate([r.candidates[f] for r in requests]))  # (N,)
        for f in spec.sequence_fields
    }
    cand_user = np.repeat(np.arange(u, dtype=np.int64), counts)  # (N,)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ScoringBatch(hist_rows, profile_rows, cand_rows, cand_user, lengths, offsets, attention)


def rank_order(ctr: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Indices of `ctr` from highest to lowest (stable: ties keep request order), first k."""
    order = np.argsort(-ctr, kind="stable")
    return order if top_k is None else order[:top_k]


def user_chunks(counts: np.ndarray, max_candidates: int) -> list[tuple[int, int]]:
    """Consecutive users [lo, hi) packed greedily into chunks of at most `max_candidates`
    candidates; a user with more is a chunk of its own (splitting it would repeat its
    user-side work). `max_candidates` 0: one chunk. A loop over users, not candidates."""
    if max_candidates <= 0 or int(counts.sum()) <= max_candidates:
        return [(0, len(counts))]
    chunks, lo, held = [], 0, 0
    for u, n in enumerate(counts.tolist()):
        if held and held + n > max_candidates:
            chunks.append((lo, u))
            lo, held = u, 0
        held += n
    chunks.append((lo, len(counts)))
    return chunks


def _filled_width(hist_rows: dict[str, np.ndarray]) -> int:
    """Columns up to the last one any user fills (at least 1): the rest is PAD_ROW only."""
    filled = np.flatnonzero((next(iter(hist_rows.values())) != PAD_ROW).any(axis=0))
    return int(filled[-1]) + 1 if filled.size else 1


# ---------------------------------------------------------------------------------------
# ONNX Runtime session and device choice.
@dataclass(frozen=True)
class RuntimeOptions:
    """How the ONNX Runtime session runs: device, threads, and the shapes it should expect.

    `max_batch_users` / `max_batch_candidates` bound what the micro-batcher hands over:
    they size TensorRT's shape profile and the warm-up. `shape_buckets` pads N up to a
    power of two (and T up to max_history) so only a few shapes ever run: it pays on a GPU
    (reused IO-binding buffers, one engine profile); on the CPU padding is wasted work
    (docs/benchmarks.md), so it is off by default there.
    """

    device: str = "auto"  # auto | cpu | cuda | tensorrt
    intra_op_threads: int = 1
    allow_spinning: bool = False  # ORT worker threads busy-wait between ops (steals the event loop's core)
    optimized_model_dir: Path | None = None  # save ORT's optimised graph here (for inspection)
    shape_buckets: bool | None = None  # None: on for GPU devices, off on the CPU
    io_binding: bool | None = None  # None: on a GPU. On the CPU it gains nothing; the tests use it to run the GPU's binding code
    max_batch_users: int = 64
    max_batch_candidates: int = 4096
    chunk_candidates: int | None = None  # None: CPU_CALL_CANDIDATES on the CPU, 0 (one call per batch) on a GPU
    trt_fp16: bool = True
    trt_cache_dir: Path | None = None  # engine + timing cache; None: <bundle>/../.trt-cache

    def call_candidates(self, on_gpu: bool) -> int:
        """`chunk_candidates`, or its default where the session runs (0: one call per batch)."""
        if self.chunk_candidates is not None:
            return self.chunk_candidates
        return 0 if on_gpu else CPU_CALL_CANDIDATES


def _unloadable(bundle: Bundle, e: Exception) -> BundleError:
    return BundleError(f"{bundle.onnx_path} cannot be loaded by ONNX Runtime ({str(e).strip()}); the bundle is corrupt")


def check_onnx_loads(bundle: Bundle) -> None:
    """Parse model.onnx once, quickly (CPU, no graph optimisation), and check that its tables
    hold every row of the bundle's vocabularies: a BundleError if not, so a corrupt graph, or
    a model.onnx from another training run, is refused before it serves (and, within a batch,
    fails its neighbours' requests too)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(bundle.onnx_path), so, providers=[CPU])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise _unloadable(bundle, e) from None
    _check_tables(bundle, session)


def _check_tables(bundle: Bundle, session: ort.InferenceSession) -> None:
    """Score one candidate and one behaviour at each vocabulary's last row, field by field.

    On the CPU an index past a table's end is an error in ONNX Runtime's Gather (a GPU would
    not say so), so this finds the field whose table is shorter than its vocabulary.
    """
    spec = bundle.spec
    for f in (*spec.sequence_fields, *spec.profile_fields):
        last = spec.vocab_sizes[f] - 1
        feeds = {CAND_USER: np.zeros(1, dtype=np.int64)}
        for g in spec.sequence_fields:
            feeds[hist_input(g)] = np.full((1, 1), last if g == f else UNK_ROW, dtype=np.int64)
            feeds[cand_input(g)] = np.full(1, last if g == f else UNK_ROW, dtype=np.int64)
        for g in spec.profile_fields:
            feeds[profile_input(g)] = np.full(1, last if g == f else UNK_ROW, dtype=np.int64)
        try:
            session.run([CTR], feeds)
        except Exception as e:
            raise BundleError(
                f"{bundle.onnx_path} does not score row {last} of {f!r}, the last of the bundle's vocabulary "
                f"({spec.vocab_sizes[f]} rows; {str(e).strip()[:200]}): model.onnx and vocab/ come from different "
                "trainings"
            ) from None


@contextlib.contextmanager
def _ort_quiet() -> Iterator[None]:
    """Silence ONNX Runtime's logger while probing CUDA: a failed probe is not an error."""
    ort.set_default_logger_severity(_ORT_SILENT)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _cuda_driver_present() -> bool:
    """A loadable CUDA driver library is the cheapest sign that a GPU could be used at all."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def session_options(intra_op_threads: int, allow_spinning: bool = False, optimized_model_path: Path | None = None) -> ort.SessionOptions:
    """Graph optimisation ALL, one graph run at a time, `intra_op_threads` workers."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimized_model_path is not None:
        optimized_model_path.parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def _shape_profile(spec: FeatureSpec, users: int, slots: int, candidates: int) -> str:
    """TensorRT's 'name:dims,...' for every contract input at one (U, T, N)."""
    dims: list[str] = []
    for f in spec.sequence_fields:
        dims.append(f"{hist_input(f)}:{users}x{slots}")
    for f in spec.profile_fields:
        dims.append(f"{profile_input(f)}:{users}")
    for f in spec.sequence_fields:
        dims.append(f"{cand_input(f)}:{candidates}")
    dims.append(f"{CAND_USER}:{candidates}")
    return ",".join(dims)


def _tensorrt_options(spec: FeatureSpec, options: RuntimeOptions, cache_dir: Path) -> dict[str, object]:
    """fp16, a persistent engine and timing cache, and explicit min/opt/max shape profiles."""
    t = spec.max_history
    return {
        "trt_fp16_enable": options.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": _shape_profile(spec, 1, 1, 1),
        "trt_profile_opt_shapes": _shape_profile(spec, 1, t, min(256, options.max_batch_candidates)),
        "trt_profile_max_shapes": _shape_profile(spec, options.max_batch_users, t, options.max_batch_candidates),
    }


def open_session(
    onnx_path: str,
    device: str,
    intra_op_threads: int,
    *,
    options: RuntimeOptions | None = None,
    spec: FeatureSpec | None = None,
    optimized_model_path: Path | None = None,
) -> tuple[ort.InferenceSession, str | None]:
    """Create the session on the device asked for; return it and a problem, if any.

    onnxruntime-gpu lists the CUDA and TensorRT providers even where they cannot load (no
    GPU, no CUDA/TensorRT libraries) and then falls back to the CPU silently, so the only
    proof is the session's own provider list. `auto` quietly settles for the CPU; `cuda`
    and `tensorrt` report the problem (readiness fails instead of serving slowly on the CPU).
    """
    options = options or RuntimeOptions(device=device, intra_op_threads=intra_op_threads)
    so = session_options(intra_op_threads, options.allow_spinning, optimized_model_path)
    cpu_session = lambda: ort.InferenceSession(onnx_path, so, providers=[CPU])  # noqa: E731
    if device == "cpu":
        return cpu_session(), None
    wanted = TENSORRT if device == "tensorrt" else CUDA
    if wanted not in ort.get_available_providers():
        problem = (
            f"DEVICE={device} was asked for, but this onnxruntime build has no {wanted} "
            "(install onnxruntime-gpu; scripts/gpu_bench.sh shows how)"
        )
        return cpu_session(), (problem if device != "auto" else None)
    if device == "auto" and not _cuda_driver_present():
        return cpu_session(), None
    # TF32 off: fp32 GEMMs in TF32 would drift ~1e-3 from the trained model (the bundle's parity is 1e-5)
    cuda_options = {"arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1", "use_tf32": "0"}
    providers: list = [(CUDA, cuda_options), CPU]
    if device == "tensorrt":
        if spec is None:
            raise ValueError("DEVICE=tensorrt needs the feature spec for its shape profiles")
        cache = options.trt_cache_dir or Path(onnx_path).parent.parent / ".trt-cache"
        cache.mkdir(parents=True, exist_ok=True)
        providers.insert(0, (TENSORRT, _tensorrt_options(spec, options, cache)))
    with _ort_quiet():
        session = ort.InferenceSession(onnx_path, so, providers=providers)
    if wanted in session.get_providers():
        return session, None
    problem = (
        f"DEVICE={device} was asked for, but the {wanted} could not start (no usable GPU, or "
        f"CUDA/cuDNN{'/TensorRT' if device == 'tensorrt' else ''} libraries missing); the session "
        f"runs on {', '.join(session.get_providers())}"
    )
    return session, (problem if device != "auto" else None)


def bucket(n: int, floor: int = 16) -> int:
    """The padded size for n: the next power of two, at least `floor`."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


class _DeviceBuffers:
    """IO binding with preallocated device buffers, one per (name, shape), reused.

    With shape buckets only a few shapes exist, so after warm-up no call allocates device
    memory: inputs are copied into their buffer (`update_inplace`), outputs land in theirs.
    """

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0, max_buffers: int = 256):
        self.session = session
        self.device = device  # where the buffers live: "cuda", or "cpu" (tests)
        self.device_id = device_id
        self.max_buffers = max_buffers
        self._buffers: dict[tuple[str, tuple[int, ...]], ort.OrtValue] = {}
        self._lock = threading.Lock()

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        key = (name, shape)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= self.max_buffers:  # unbucketed shapes: do not grow forever
                self._buffers.clear()
            buf = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)
            self._buffers[key] = buf
        return buf

    def run(self, feeds: dict[str, np.ndarray], n: int, t: int, attention: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """One run; the (N, T) attention comes back to the host only when asked for (explain):
        at 200k candidates its copy took 28% of the call on an H200 (docs/benchmarks.md, runs J and K)."""
        with self._lock:
            binding = self.session.io_binding()
            for name, arr in feeds.items():
                buf = self._buffer(name, arr.shape, arr.dtype.type)
                buf.update_inplace(arr)
                binding.bind_ortvalue_input(name, buf)
            ctr = self._buffer(CTR, (n,), np.float32)
            weights = self._buffer(ATTENTION, (n, t), np.float32)
            binding.bind_ortvalue_output(CTR, ctr)
            binding.bind_ortvalue_output(ATTENTION, weights)
            self.session.run_with_iobinding(binding)
            return self._host(ctr), self._host(weights) if attention else None

    def _host(self, value: ort.OrtValue) -> np.ndarray:
        """A host copy: from CUDA `numpy()` copies; a CPU buffer's `numpy()` is a view the next run would overwrite."""
        out = value.numpy()
        return out.copy() if self.device == "cpu" else out


# ---------------------------------------------------------------------------------------
class Scorer:
    """A loaded bundle and its ONNX Runtime session; scores U users' candidates per call.

    Build it with `Scorer.load(...)` (opens the session) and call `warm_up()` before
    serving. `score` and `score_requests` are thread-safe (ONNX Runtime sessions are) and
    release the GIL while the graph runs, so callers run them in a worker thread.
    `calls` counts graph runs (the micro-batcher's tests and metrics read it).
    """

    def __init__(
        self,
        bundle: Bundle,
        session: ort.InferenceSession,
        device_problem: str | None = None,
        options: RuntimeOptions | None = None,
    ):
        expected = set(bundle.spec.input_names())
        actual = {i.name for i in session.get_inputs()}
        if expected != actual:
            raise BundleError(
                f"{bundle.onnx_path} has inputs {sorted(actual)} but bundle.json's feature spec needs "
                f"{sorted(expected)}; the bundle is corrupt, re-export it"
            )
        outputs = {o.name for o in session.get_outputs()}
        if not {CTR, ATTENTION} <= outputs:
            raise BundleError(f"{bundle.onnx_path} lacks the outputs {CTR!r} and {ATTENTION!r}; re-export it")
        self.bundle = bundle
        self.session = session
        self.device_problem = device_problem
        self.options = options or RuntimeOptions()
        self.warmed = False
        self.calls = 0
        self.on_gpu = self.providers[0] in (CUDA, TENSORRT)
        self.shape_buckets = self.on_gpu if self.options.shape_buckets is None else self.options.shape_buckets
        io_binding = self.on_gpu if self.options.io_binding is None else self.options.io_binding
        self._device_buffers = _DeviceBuffers(session, "cuda" if self.on_gpu else "cpu") if io_binding else None
        self.chunk_candidates = self.options.call_candidates(self.on_gpu)

    @classmethod
    def load(
        cls,
        bundle: Bundle | str,
        *,
        device: str = "auto",
        intra_op_threads: int = 1,
        options: RuntimeOptions | None = None,
    ) -> "Scorer":
        """Open the bundle's model and log the providers chosen (once).

        `options` carries every runtime knob; without it, `device` and `intra_op_threads`
        with the defaults of RuntimeOptions.
        """
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        options = options or RuntimeOptions(device=device, intra_op_threads=intra_op_threads)
        optimized = (
            options.optimized_model_dir / f"{bundle.model_version}.{options.device}.optimized.onnx"
            if options.optimized_model_dir is not None
            else None
        )
        try:
            session, problem = open_session(
                str(bundle.onnx_path), options.device, options.intra_op_threads,
                options=options, spec=bundle.spec, optimized_model_path=optimized,
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise _unloadable(bundle, e) from None
        scorer = cls(bundle, session, problem, options)
        if problem:
            log.error("%s", problem)
        log.info(
            "model %s (%s) on %s (device=%s, intra-op threads=%d, spinning=%s, shape buckets=%s, calls of %s%s)",
            bundle.model_version,
            bundle.model_type,
            ", ".join(scorer.providers),
            options.device,
            options.intra_op_threads,
            "on" if options.allow_spinning else "off",
            "on" if scorer.shape_buckets else "off",
            f"at most {scorer.chunk_candidates} candidates" if scorer.chunk_candidates else "a whole batch",
            f", optimised graph saved to {optimized}" if optimized else "",
        )
        return scorer

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def max_history(self) -> int:
        return self.bundle.spec.max_history

    def _padded(
        self, hist_rows: dict[str, np.ndarray], cand_rows: dict[str, np.ndarray], cand_user: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Histories padded to max_history and candidates to a power of two (extra rows: user 0, UNK)."""
        n = cand_user.shape[0]
        n_pad = bucket(n)
        hist_out = {}
        for f, rows in hist_rows.items():
            u, t = rows.shape
            if t < self.max_history:
                padded = np.full((u, self.max_history), PAD_ROW, dtype=np.int64)
                padded[:, :t] = rows
                rows = padded
            hist_out[f] = rows
        if n_pad == n:
            return hist_out, cand_rows, cand_user
        cand_out = {f: np.concatenate([rows, np.full(n_pad - n, UNK_ROW, dtype=np.int64)]) for f, rows in cand_rows.items()}
        return hist_out, cand_out, np.concatenate([cand_user, np.zeros(n_pad - n, dtype=np.int64)])

    def score(
        self,
        hist_rows: dict[str, np.ndarray],
        profile_rows: dict[str, np.ndarray],
        cand_rows: dict[str, np.ndarray],
        cand_user: np.ndarray,
        attention: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows in, (ctr (N,), attention (N, T) or None when not asked for) out.

        One ONNX Runtime call, or on the CPU one per chunk of whole users (`chunk_candidates`).
        """
        counts = np.bincount(cand_user, minlength=next(iter(hist_rows.values())).shape[0])
        chunks = user_chunks(counts, self.chunk_candidates)
        if len(chunks) == 1:
            return self._run(hist_rows, profile_rows, cand_rows, cand_user, attention)
        by_user = np.argsort(cand_user, kind="stable")  # a chunk's candidates: by_user[offsets[lo]:offsets[hi]]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        t = next(iter(hist_rows.values())).shape[1]
        ctr = np.empty(cand_user.shape[0], dtype=np.float32)
        weights = np.zeros((cand_user.shape[0], t), dtype=np.float32) if attention else None
        for lo, hi in chunks:
            users, cands = slice(lo, hi), by_user[offsets[lo] : offsets[hi]]
            hist = {f: rows[users] for f, rows in hist_rows.items()}
            t_chunk = _filled_width(hist)  # this chunk's longest history: padding columns cost work
            ctr[cands], w = self._run(
                {f: rows[:, :t_chunk] for f, rows in hist.items()},
                {f: rows[users] for f, rows in profile_rows.items()},
                {f: rows[cands] for f, rows in cand_rows.items()},
                cand_user[cands] - lo,
                attention,
            )
            if weights is not None:
                weights[cands, :t_chunk] = w
        return ctr, weights

    def _run(
        self,
        hist_rows: dict[str, np.ndarray],
        profile_rows: dict[str, np.ndarray],
        cand_rows: dict[str, np.ndarray],
        cand_user: np.ndarray,
        attention: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Exactly one ONNX Runtime call."""
        n = cand_user.shape[0]
        t = next(iter(hist_rows.values())).shape[1]
        if self.shape_buckets:
            hist_rows, cand_rows, cand_user = self._padded(hist_rows, cand_rows, cand_user)
        feeds: dict[str, np.ndarray] = {CAND_USER: np.ascontiguousarray(cand_user, dtype=np.int64)}
        for f, rows in hist_rows.items():
            feeds[hist_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (U, T)
        for f, rows in profile_rows.items():
            feeds[profile_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (U,)
        for f, rows in cand_rows.items():
            feeds[cand_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (N,)
        self.calls += 1
        if self._device_buffers is not None:
            n_run, t_run = feeds[CAND_USER].shape[0], feeds[hist_input(self.bundle.spec.sequence_fields[0])].shape[1]
            ctr, weights = self._device_buffers.run(feeds, n_run, t_run, attention)
        else:
            ctr, weights = self.session.run([CTR, ATTENTION], feeds)  # on the CPU it costs nothing more
        if not attention:
            return ctr[:n], None
        return ctr[:n], weights[:n, :t]

    def score_requests(self, requests: Sequence[RankInput]) -> list[Scored]:
        """Score U users' requests in one call; results come back per request, in order."""
        return self.score_batch(build_batch(self.bundle, requests))

    def score_batch(self, batch: ScoringBatch) -> list[Scored]:
        """`score_requests` for a batch already built (the batcher builds it off the scoring thread)."""
        ctr, attention = self.score(batch.hist_rows, batch.profile_rows, batch.cand_rows, batch.cand_user, batch.attention)
        off = batch.cand_offsets
        return [
            Scored(
                ctr=ctr[off[i] : off[i + 1]],
                attention=None if attention is None else attention[off[i] : off[i + 1], : batch.history_lengths[i]],
                history_length=int(batch.history_lengths[i]),
            )
            for i in range(len(batch.history_lengths))
        ]

    def warm_up_shapes(self) -> list[tuple[int, int, int]]:
        """(U, T, N) the warm-up runs: one user and a full batch at every candidate bucket
        (buckets on), else one user at full history with a typical and the largest N, and
        a batch of small requests (the batch branch, which chunked big batches skip)."""
        t, max_n, max_u = self.max_history, self.options.max_batch_candidates, self.options.max_batch_users
        if not self.shape_buckets:
            return [(1, t, 64), (1, t, 256), (min(max_u, 8), t, min(max_n, 2048)), (min(max_u, 8), t, 64)]
        shapes, n = [], bucket(1)
        while n <= bucket(max_n):
            shapes.append((1, t, n))
            shapes.append((max(1, min(max_u, n // 64)), t, n))
            n *= 2
        return list(dict.fromkeys(shapes))

    def warm_up(self, candidates: int | None = None) -> None:
        """Run the graph over the shapes serving will see, so no request pays a first-run cost.

        Both branches of the serving graph (one user, a batch) run; on TensorRT this also
        builds (or loads from the cache) the engine for the shape profile.
        """
        spec = self.bundle.spec
        shapes = self.warm_up_shapes() if candidates is None else [(1, spec.max_history, candidates)]
        for u, t, n in shapes:
            self.score(
                {f: np.full((u, t), UNK_ROW, dtype=np.int64) for f in spec.sequence_fields},
                {f: np.full((u,), UNK_ROW, dtype=np.int64) for f in spec.profile_fields},
                {f: np.full((n,), UNK_ROW, dtype=np.int64) for f in spec.sequence_fields},
                np.arange(n, dtype=np.int64) % u,
            )
        self.calls = 0
        self.warmed = True
