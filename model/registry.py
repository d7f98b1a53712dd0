"""Model name -> class: the one place a model is added (the paper's Table 3 line-up).

Every model takes (hist, profile, cand, cand_user) and returns (logit (N,), attention (N, T)),
so every one exports to the same ONNX contract and the service can serve any of them.
"""

from __future__ import annotations

from torch import nn

from model.base_model import BaseModel
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.deepfm import DeepFM
from model.din import DIN, DINDice
from model.lr import LogisticRegression
from model.pnn import PNN
from model.wide_deep import WideDeep

MODELS: dict[str, type[nn.Module]] = {
    "lr": LogisticRegression,
    "base": BaseModel,
    "wdl": WideDeep,
    "pnn": PNN,
    "deepfm": DeepFM,
    "din": DIN,
    "din_dice": DINDice,
}

# The names of the paper's Table 3, for reports.
DISPLAY_NAMES: dict[str, str] = {
    "lr": "LR",
    "base": "BaseModel",
    "wdl": "Wide&Deep",
    "pnn": "PNN",
    "deepfm": "DeepFM",
    "din": "DIN",
    "din_dice": "DIN with Dice",
}


def build_model(name: str, spec: FeatureSpec, config: ModelConfig = ModelConfig()) -> nn.Module:
    """A freshly initialised model; every model's forward returns (logit (N,), attention (N, T))."""
    cls = MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return cls(spec, config)


def has_attention(model: nn.Module) -> bool:
    return bool(getattr(model, "has_attention", False))


def check_attention_softmax(model_name: str, attention_softmax: bool) -> None:
    """The softmax switch normalises attention: asked of a model without any, it would be ignored."""
    if attention_softmax and not has_attention(MODELS[model_name]):
        with_attention = ", ".join(name for name, cls in MODELS.items() if has_attention(cls))
        raise ValueError(f"--attention-softmax needs a model with attention ({with_attention}); --model {model_name} has none")


def model_config(model: nn.Module) -> ModelConfig:
    """The configuration a model was actually built with (DIN with Dice forces its activation)."""
    return model.config
