"""Trained model -> ONNX scoring graph -> parity-checked model bundle.

The graph follows the user-batched contract (model.contract): inputs named
`FeatureSpec.input_names()` with dynamic U, T, N; outputs `ctr = sigmoid(logit)` (N,) and
`attention` (N, T). Models with a serving graph (DIN, BaseModel) export that: the same
function rearranged for inference (model/serving_graph.py), one-user and batch variants
under an `If` (model/user_branch.py). Before a bundle is written, ONNX Runtime must
reproduce the training graph's PyTorch scores on random inputs (U > 1 and U = 1, ragged
histories, unknown ids) within `PARITY_TOLERANCE`.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.bundle import new_model_version, write_bundle
from model.contract import (
    CAND_USER,
    FIRST_ID_ROW,
    OUTPUT_NAMES,
    PAD_ROW,
    UNK_ROW,
    FeatureSpec,
    Vocabulary,
    cand_input,
    hist_input,
    profile_input,
)
from model.inputs import split_flat
from model.registry import has_attention
from model.serving_graph import serving_modules
from model.user_branch import branch_on_single_user

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree: the exported graph must not be served."""


class _ScoringGraph(nn.Module):
    """Flat ONNX signature -> the model's named forward -> (ctr, attention)."""

    def __init__(self, model: nn.Module, spec: FeatureSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        logit, attention = self.model(*split_flat(self.spec, tensors))
        return torch.sigmoid(logit), attention  # (N,), (N, T)


def _dynamic_axes(spec: FeatureSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for f in spec.sequence_fields:
        axes[hist_input(f)] = {0: "U", 1: "T"}
        axes[cand_input(f)] = {0: "N"}
    for f in spec.profile_fields:
        axes[profile_input(f)] = {0: "U"}
    axes[CAND_USER] = {0: "N"}
    axes[OUTPUT_NAMES[0]] = {0: "N"}
    axes[OUTPUT_NAMES[1]] = {0: "N", 1: "T"}
    return axes


def random_inputs(spec: FeatureSpec, users: int, slots: int, candidates: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random int64 inputs: ragged histories (user 0 empty and user 1 full when U > 1), ~10% UNK rows."""
    rng = np.random.default_rng(seed)

    def rows(field: str, shape: tuple[int, ...]) -> np.ndarray:
        size = spec.vocab_sizes[field]
        r = rng.integers(FIRST_ID_ROW, max(size, FIRST_ID_ROW + 1), shape) if size > FIRST_ID_ROW else np.full(shape, UNK_ROW)
        r = np.where(rng.random(shape) < 0.1, UNK_ROW, r)
        return r.astype(np.int64)

    length = rng.integers(0, slots + 1, users)
    if users > 1:
        length[0], length[1] = 0, slots  # an unknown/new user, and a full history
    else:
        length[0] = slots
    valid = np.arange(slots)[None, :] < length[:, None]
    out: dict[str, np.ndarray] = {}
    for f in spec.sequence_fields:
        out[hist_input(f)] = np.where(valid, rows(f, (users, slots)), PAD_ROW).astype(np.int64)
    for f in spec.profile_fields:
        out[profile_input(f)] = rows(f, (users,))
    for f in spec.sequence_fields:
        out[cand_input(f)] = rows(f, (candidates,))
    cand_user = rng.integers(0, users, candidates)
    cand_user[:users] = np.arange(min(users, candidates))  # every user has a candidate
    out[CAND_USER] = cand_user.astype(np.int64)
    return out


def export_module(module: nn.Module, spec: FeatureSpec, users: int = 2) -> bytes:
    """Any module with the flat contract signature -> ONNX bytes (TorchScript exporter, opset 17, dynamic U, T, N).

    `users` is the U of the example the tracer runs (1 for a one-user graph).
    """
    example = random_inputs(spec, users=users, slots=3, candidates=4, seed=1)
    names = spec.input_names()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (the TorchScript exporter handles our graph at opset 17)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            tuple(torch.from_numpy(example[n]) for n in names),
            buf,
            input_names=names,
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=_dynamic_axes(spec),
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def to_onnx(model: nn.Module, spec: FeatureSpec, *, optimize: bool = True) -> bytes:
    """The model as ONNX bytes: the serving graph (model/serving_graph.py) when the model
    has one and `optimize`, else the training graph exported as it is."""
    modules = serving_modules(model, spec) if optimize else None
    if modules is None:
        return export_module(_ScoringGraph(model, spec), spec)
    general, single_user = modules
    return branch_on_single_user(export_module(general, spec), export_module(single_user, spec, users=1), spec)


def torch_scores(model: nn.Module, spec: FeatureSpec, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ctr (N,), attention (N, T)) from the PyTorch model, for the same named numpy inputs."""
    graph = _ScoringGraph(model, spec).eval()
    with torch.no_grad():
        ctr, attention = graph(*(torch.from_numpy(inputs[n]) for n in spec.input_names()))
    return ctr.numpy(), attention.numpy()


def check_parity(
    model: nn.Module,
    spec: FeatureSpec,
    onnx_bytes: bytes,
    *,
    users: int = 5,
    slots: int = 12,
    candidates: int = 40,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |ONNX - torch| over ctr and attention on random inputs; ParityError above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, (u, t) in enumerate(((users, slots), (1, max(1, slots // 3)))):  # a batch, and one user
        inputs = random_inputs(spec, users=u, slots=t, candidates=candidates, seed=seed + i)
        want_ctr, want_att = torch_scores(model, spec, inputs)
        got_ctr, got_att = session.run(list(OUTPUT_NAMES), inputs)
        if got_ctr.shape != want_ctr.shape or got_att.shape != want_att.shape:
            raise ParityError(
                f"ONNX output shapes {got_ctr.shape}, {got_att.shape} differ from torch's "
                f"{want_ctr.shape}, {want_att.shape} (U={u}, T={t}, N={candidates})"
            )
        diff = max(float(np.max(np.abs(got_ctr - want_ctr))), float(np.max(np.abs(got_att - want_att), initial=0.0)))
        worst = max(worst, diff)
    if not worst <= tolerance:
        raise ParityError(
            f"ONNX Runtime and PyTorch disagree by {worst:.3g} (> {tolerance:g}) on random inputs; "
            "the exported graph is wrong, refusing to write the bundle"
        )
    return worst


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    model_version: str
    parity_max_abs_diff: float


def export_bundle(
    model: nn.Module,
    *,
    model_type: str,
    spec: FeatureSpec,
    vocabularies: dict[str, Vocabulary],
    out_dir: Path,
    data_fingerprint: str,
    extra: dict,
) -> ExportResult:
    """Export, check parity, write `<out_dir>/<model_version>/` atomically.

    `extra` holds manifest entries the caller owns (model_config, metrics, data_spec,
    train_config); this adds has_attention, data_fingerprint, parity_max_abs_diff and
    onnx_graph ("serving": model/serving_graph.py, or "training": the model as it is).
    """
    model = model.eval()
    graph = "serving" if serving_modules(model, spec) is not None else "training"
    try:
        onnx_bytes = to_onnx(model, spec, optimize=graph == "serving")
        diff = check_parity(model, spec, onnx_bytes)
    except Exception as e:  # noqa: BLE001 - any failure of the serving graph falls back, loudly
        if graph == "training":
            raise
        # A model variant the serving graph gets wrong must still ship: warn, use its training graph.
        log.warning("the serving graph of %s failed (%s: %s); exporting the training graph", model_type, type(e).__name__, e)
        graph = "training"
        onnx_bytes = to_onnx(model, spec, optimize=False)
        diff = check_parity(model, spec, onnx_bytes)
    version = new_model_version(model_type, data_fingerprint)
    path = write_bundle(
        out_dir,
        model_version=version,
        model_type=model_type,
        spec=spec,
        vocabularies=vocabularies,
        onnx_bytes=onnx_bytes,
        extra={
            **extra,
            "has_attention": has_attention(model),
            "data_fingerprint": data_fingerprint,
            "parity_max_abs_diff": diff,
            "onnx_graph": graph,
        },
    )
    return ExportResult(bundle=path, model_version=version, parity_max_abs_diff=diff)
