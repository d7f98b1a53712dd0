"""The MLPs' activations: PReLU (the default) and Dice (model/dice.py), picked by name.

PReLU over the last dimension: f(s) = s if s > 0 else alpha * s, one alpha per channel.
torch's nn.PReLU puts channels on dim 1, which is T for the attention unit's (N, T, H)
input; the paper's activations act per hidden unit, i.e. on the last dimension. Flattening
to (M, H) lets the fused prelu kernel (and ONNX's PRelu) do it in one op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.dice import Dice


class PReLU(nn.Module):
    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), init))

    def forward(self, s: Tensor) -> Tensor:
        flat = s.reshape(-1, s.shape[-1])  # (M, H)
        return F.prelu(flat, self.alpha).reshape(s.shape)  # (..., H)


def activation_factory(name: str) -> Callable[[int], nn.Module]:
    """channels -> a fresh activation layer; `name` is ModelConfig.activation."""
    factories: dict[str, Callable[[int], nn.Module]] = {"prelu": PReLU, "dice": Dice}
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(factories)}")
    return factories[name]


def activate(layer: nn.Module, s: Tensor, mask: Tensor | None) -> Tensor:
    """Apply `layer`; a mask-aware one (Dice) also gets the real-position mask."""
    return layer(s, mask) if getattr(layer, "takes_mask", False) else layer(s)
