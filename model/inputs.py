"""Named scoring inputs (the ONNX names of model.contract) -> the tensors a model's forward takes.

Models take `hist`, `profile`, `cand` (dicts keyed by field name) and `cand_user`; the
trainer's batches and the ONNX graph both use the flat contract names. This is the one
place that translates, so training and serving cannot disagree about which tensor is which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from model.contract import CAND_USER, FeatureSpec, cand_input, hist_input, profile_input

ScoringInputs = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]


def split_inputs(spec: FeatureSpec, named: Mapping[str, Tensor]) -> ScoringInputs:
    """(hist [U, T] per sequence field, profile [U] per profile field, cand [N] per field, cand_user [N])."""
    missing = [n for n in spec.input_names() if n not in named]
    if missing:
        raise KeyError(f"scoring inputs lack {missing}; expected {spec.input_names()}")
    return (
        {f: named[hist_input(f)] for f in spec.sequence_fields},
        {f: named[profile_input(f)] for f in spec.profile_fields},
        {f: named[cand_input(f)] for f in spec.sequence_fields},
        named[CAND_USER],
    )


def split_flat(spec: FeatureSpec, tensors: Sequence[Tensor]) -> ScoringInputs:
    """The same, from positional tensors in `spec.input_names()` order (the ONNX signature)."""
    names = spec.input_names()
    if len(tensors) != len(names):
        raise ValueError(f"expected {len(names)} inputs {names}, got {len(tensors)}")
    return split_inputs(spec, dict(zip(names, tensors)))
