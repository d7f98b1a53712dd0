"""The local activation unit a(e_j, v_A) (paper, section 4.3 and Fig. 2).

An MLP (80-40-1, PReLU or Dice) over [e_j, v_A, e_j - v_A, e_j * v_A] gives each behaviour
a weight for the candidate ad. Dice sees the padding mask, so its batch statistics cover
real behaviours only. As in the paper, the weights are NOT normalised (softmax is
an option); padding slots get weight exactly 0 either way.

The first layer is linear, so it splits exactly by input part:

    W [e, v, e - v, e * v] + b = (W_e + W_d) e  +  ((W_v - W_d) v + b)  +  W_p (e * v)
                                 per user (U,T)     per candidate (N)       per pair (N,T)

Only the last term needs every (candidate, behaviour) pair; the first is computed once
per user and the second once per candidate. Same weights and the same function as the
concatenation (tests pin it); a quarter of the pairwise work, which is most of the cost of
scoring hundreds of candidates for one user.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from model.activation import PReLU, activate
from model.mlp import MLP

_MASKED_LOGIT = -1e9  # finite, so a user with no behaviours gets zeros, never NaN


class LocalActivationUnit(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden: tuple[int, ...] = (80, 40),
        softmax: bool = False,
        activation: Callable[[int], nn.Module] = PReLU,
    ):
        super().__init__()
        if not hidden:
            raise ValueError("the local activation unit needs at least one hidden layer")
        self.dim = dim
        self.first = nn.Linear(4 * dim, hidden[0])  # over [e, v, e - v, e * v]
        self.first_act = activation(hidden[0])
        self.rest = MLP(hidden[0], tuple(hidden[1:]), out_dim=1, activation=activation)
        self.softmax = softmax

    def forward(self, behaviours: Tensor, ad: Tensor, cand_user: Tensor, mask: Tensor) -> Tensor:
        """behaviours (U, T, D) per user, ad (N, D), cand_user (N,), mask (U, T) -> weights (N, T)."""
        w_e, w_v, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # (H, D) each
        e_n = behaviours.index_select(0, cand_user)  # (N, T, D)
        h_user = behaviours @ (w_e + w_d).T  # (U, T, H)
        h_ad = ad @ (w_v - w_d).T + self.first.bias  # (N, H)
        h_pair = (e_n * ad.unsqueeze(1)) @ w_p.T  # (N, T, H)
        h = h_user.index_select(0, cand_user) + h_ad.unsqueeze(1) + h_pair  # (N, T, H) = first([e, v, e-v, e*v])
        mask_n = mask.index_select(0, cand_user)  # (N, T)
        w = self.rest(activate(self.first_act, h, mask_n), mask_n).squeeze(-1)  # (N, T)
        if self.softmax:
            w = w.masked_fill(~mask_n, _MASKED_LOGIT).softmax(dim=-1)  # (N, T)
        return w.masked_fill(~mask_n, 0.0)  # (N, T), exactly 0 on padding
