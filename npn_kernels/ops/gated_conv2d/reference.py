"""Gated conv2d in pure PyTorch with injected gates: the oracle of `npn::gated_conv2d`.

  "weight": y = conv(x, W ⊙ z) + b     z [C_out, C_in/groups, kh, kw]
  "in":     y = conv(x ⊙ z, W) + b     z [C_in] (batch noise) or [B, C_in] (example noise)
  "out":    y = (conv(x, W) + b) ⊙ z   z [C_out] or [B, C_out]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

GRANULARITIES = ("weight", "in", "out")


def phi_shape(granularity: str, weight_shape, groups: int) -> tuple[int, ...]:
    """The gate parameter's shape for a weight [C_out, C_in/groups, kh, kw]."""
    c_out, c_in = weight_shape[0], weight_shape[1] * groups
    return {"weight": tuple(weight_shape), "in": (c_in,), "out": (c_out,)}[granularity]


def _channels(z: Tensor) -> Tensor:
    """z [C] or [B, C] viewed to broadcast over [B, C, H, W]."""
    return z.view(1, -1, 1, 1) if z.dim() == 1 else z[:, :, None, None]


def gated_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, granularity: str, stride, padding, dilation, groups: int
) -> Tensor:
    """y [B, C_out, H_out, W_out] from x [B, C_in, H, W], weight, bias [C_out] or None, gates z (above)."""
    z = z.to(x.dtype)
    if granularity == "weight":
        return F.conv2d(x, weight * z, bias, stride, padding, dilation, groups)
    if granularity == "in":
        return F.conv2d(x * _channels(z), weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups) * _channels(z)
