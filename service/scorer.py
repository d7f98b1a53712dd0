"""The scoring runtime: raw ids of U users' requests -> one ONNX Runtime call -> CTRs.

The graph is user-batched (DESIGN.md, contract 2): history and profile inputs are per user
([U, T], [U]), candidate inputs are flat ([N]) with `cand_user` naming each candidate's
user. One request is U = 1; the micro-batcher will hand several requests to
`Scorer.score_requests` at once. Everything between raw ids and the session is numpy,
vectorised over candidates; Python loops run over users only.

Torch-free: this module runs in the serving image.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from model.bundle import Bundle, BundleError, load_bundle
from model.contract import ATTENTION, CAND_USER, CTR, PAD_ROW, UNK_ROW, cand_input, hist_input, profile_input

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A user without a profile has raw profile id -1, as in training (UserProfiles.lookup):
# it maps to the row training learned for "no profile", or to UNK_ROW if there was none.
NO_PROFILE_ID = -1
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
    attention: np.ndarray  # (n, history_length) float32
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


def build_batch(bundle: Bundle, requests: Sequence[RankInput]) -> ScoringBatch:
    """Map raw ids to rows (unknown -> UNK_ROW) and pad histories to T for U users at once.

    T = the longest history in the batch, capped by the bundle's max_history, at least 1
    (a fully padded slot scores exactly as an empty history).
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
    return ScoringBatch(hist_rows, profile_rows, cand_rows, cand_user, lengths, offsets)


def rank_order(ctr: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Indices of `ctr` from highest to lowest (stable: ties keep request order), first k."""
    order = np.argsort(-ctr, kind="stable")
    return order if top_k is None else order[:top_k]


# ---------------------------------------------------------------------------------------
# ONNX Runtime session and device choice.
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


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    return so


def open_session(onnx_path: str, device: str, intra_op_threads: int) -> tuple[ort.InferenceSession, str | None]:
    """Create the session on the device asked for; return it and a problem, if any.

    onnxruntime-gpu lists the CUDA provider even where it cannot load (no GPU, no CUDA
    libraries) and then falls back to the CPU silently, so the only proof is the session's
    own provider list. `auto` quietly settles for the CPU; `cuda` reports the problem
    (readiness fails instead of serving slowly on the CPU).
    """
    so = session_options(intra_op_threads)
    if device == "cpu":
        return ort.InferenceSession(onnx_path, so, providers=[CPU]), None
    if CUDA not in ort.get_available_providers():
        problem = "CUDA was asked for, but this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
        return ort.InferenceSession(onnx_path, so, providers=[CPU]), (problem if device == "cuda" else None)
    if device == "auto" and not _cuda_driver_present():
        return ort.InferenceSession(onnx_path, so, providers=[CPU]), None
    with _ort_quiet():
        session = ort.InferenceSession(onnx_path, so, providers=[CUDA, CPU])
    if CUDA in session.get_providers():
        return session, None
    problem = (
        "CUDA was asked for, but the CUDA provider could not start (no usable GPU, or CUDA/cuDNN "
        "libraries missing); the model runs on the CPU"
    )
    return session, (problem if device == "cuda" else None)


# ---------------------------------------------------------------------------------------
class Scorer:
    """A loaded bundle and its ONNX Runtime session; scores U users' candidates per call.

    Build it with `Scorer.load(...)` (opens the session) and call `warm_up()` before
    serving. `score` and `score_requests` are thread-safe (ONNX Runtime sessions are) and
    release the GIL while the graph runs, so callers run them in a worker thread.
    """

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, device_problem: str | None = None):
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
        self.warmed = False

    @classmethod
    def load(cls, bundle: Bundle | str, *, device: str = "auto", intra_op_threads: int = 1) -> "Scorer":
        """Open the bundle's model on `device` and log the providers chosen (once)."""
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        try:
            session, problem = open_session(str(bundle.onnx_path), device, intra_op_threads)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{bundle.onnx_path} cannot be loaded by ONNX Runtime ({e}); the bundle is corrupt") from None
        scorer = cls(bundle, session, problem)
        if problem:
            log.error("%s", problem)
        log.info(
            "model %s (%s) on %s (device=%s, intra-op threads=%d)",
            bundle.model_version,
            bundle.model_type,
            ", ".join(scorer.providers),
            device,
            intra_op_threads,
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

    def score(
        self,
        hist_rows: dict[str, np.ndarray],
        profile_rows: dict[str, np.ndarray],
        cand_rows: dict[str, np.ndarray],
        cand_user: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows in, (ctr (N,), attention (N, T)) out: exactly one ONNX Runtime call."""
        feeds: dict[str, np.ndarray] = {CAND_USER: np.ascontiguousarray(cand_user, dtype=np.int64)}
        for f, rows in hist_rows.items():
            feeds[hist_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (U, T)
        for f, rows in profile_rows.items():
            feeds[profile_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (U,)
        for f, rows in cand_rows.items():
            feeds[cand_input(f)] = np.ascontiguousarray(rows, dtype=np.int64)  # (N,)
        ctr, attention = self.session.run([CTR, ATTENTION], feeds)
        return ctr, attention

    def score_requests(self, requests: Sequence[RankInput]) -> list[Scored]:
        """Score U users' requests in one call; results come back per request, in order."""
        batch = build_batch(self.bundle, requests)
        ctr, attention = self.score(batch.hist_rows, batch.profile_rows, batch.cand_rows, batch.cand_user)
        off = batch.cand_offsets
        return [
            Scored(
                ctr=ctr[off[i] : off[i + 1]],
                attention=attention[off[i] : off[i + 1], : batch.history_lengths[i]],
                history_length=int(batch.history_lengths[i]),
            )
            for i in range(len(requests))
        ]

    def warm_up(self, candidates: int = 64) -> None:
        """Run the graph once at full history length so the first request pays no set-up."""
        spec = self.bundle.spec
        t, n = spec.max_history, candidates
        self.score(
            {f: np.full((1, t), UNK_ROW, dtype=np.int64) for f in spec.sequence_fields},
            {f: np.full((1,), UNK_ROW, dtype=np.int64) for f in spec.profile_fields},
            {f: np.full((n,), UNK_ROW, dtype=np.int64) for f in spec.sequence_fields},
            np.zeros((n,), dtype=np.int64),
        )
        self.warmed = True
