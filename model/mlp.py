"""A fully connected tower: Linear -> activation per hidden layer, then Linear to the output."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from model.activation import PReLU, activate


class MLP(nn.Sequential):
    """in_dim -> hidden[0] -> ... -> hidden[-1] -> out_dim (no activation on the output).

    `mask` (the input's shape without the last dim, True = real) reaches mask-aware
    activations (Dice), so padded positions never enter their batch statistics.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...],
        out_dim: int = 1,
        activation: Callable[[int], nn.Module] = PReLU,
    ):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), activation(h)]
            d = h
        layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self:
            x = activate(layer, x, mask) if not isinstance(layer, nn.Linear) else layer(x)
        return x
