"""Model name -> class: the one place a new model (lr, wdl, pnn, deepfm, din_dice) is added."""

from __future__ import annotations

from torch import nn

from model.base_model import BaseModel
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.din import DIN

MODELS: dict[str, type[nn.Module]] = {
    "din": DIN,
    "base": BaseModel,
}


def build_model(name: str, spec: FeatureSpec, config: ModelConfig = ModelConfig()) -> nn.Module:
    """A freshly initialised model; every model's forward returns (logit (N,), attention (N, T))."""
    cls = MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return cls(spec, config)


def has_attention(model: nn.Module) -> bool:
    return bool(getattr(model, "has_attention", False))
