"""Gated linear in pure PyTorch with injected gates: the oracle of `npn::gated_linear`.

  "weight": y = x (W ⊙ z)ᵀ + b     z [N, K]
  "in":     y = (x ⊙ z) Wᵀ + b     z [K] (batch noise) or [M, K] (example noise)
  "out":    y = (x Wᵀ + b) ⊙ z     z [N] or [M, N]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

GRANULARITIES = ("weight", "in", "out")


def phi_shape(granularity: str, out_features: int, in_features: int) -> tuple[int, ...]:
    """The gate parameter's shape for a weight [out_features, in_features]."""
    return {"weight": (out_features, in_features), "in": (in_features,), "out": (out_features,)}[granularity]


def gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, granularity: str) -> Tensor:
    """y [M, N] from x [M, K], weight [N, K], bias [N] or None and gate values z (shapes above)."""
    z = z.to(x.dtype)
    if granularity == "weight":
        return F.linear(x, weight * z, bias)
    if granularity == "in":
        return F.linear(x * z, weight, bias)
    return F.linear(x, weight, bias) * z
