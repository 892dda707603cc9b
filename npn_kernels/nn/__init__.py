"""Gated layers (npn.nn): GatedLinear, GatedConv2d, convert and the model-wide penalty."""

from npn_kernels.nn.convert import convert
from npn_kernels.nn.modules import (
    GatedConv2d,
    GatedLinear,
    GatedModule,
    gated_modules,
    penalty,
)

__all__ = ["GatedConv2d", "GatedLinear", "GatedModule", "convert", "gated_modules", "penalty"]
