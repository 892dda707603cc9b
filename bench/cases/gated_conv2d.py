"""Rows C5 and C5w: the gated conv2d layer forward + backward against a dense nn.Conv2d.

On the 2-core CI VM a fresh page costs far more than the work done on it (a clone of an 8 MB
tensor: 8 ms; a copy into an existing one: 0.1 ms), and glibc hands large freed blocks back to
the OS, so every fwd+bwd at this shape pays ~235 ms of page faults, dense and gated alike (the
conv outputs, dx, oneDNN's reorders). With MALLOC_MMAP_THRESHOLD_=4000000000
MALLOC_TRIM_THRESHOLD_=8000000000 (or tcmalloc/jemalloc, as oneDNN's docs advise) C5 measures
the convolutions instead: cpu 0.32x dense, against 0.62x with glibc's defaults.
"""

from __future__ import annotations

import torch

import npn_kernels as npn
from bench.registry import Case, Target, grads, npn_variants, register

HC = npn.HardConcrete()


def _dense(small):
    """x [B, C_in, H, W], a 3×3 padding-1 nn.Conv2d and the upstream gradient of its output."""
    b, c_in, hw, c_out = (4, 16, 12, 32) if small else (32, 64, 32, 128)
    x = torch.randn(b, c_in, hw, hw, requires_grad=True)
    layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    g = torch.randn(b, c_out, hw, hw)
    return x, layer, g


def _dense_variant(x, layer, g):
    return {"dense nn.Conv2d": lambda: grads(layer(x), (x, layer.weight, layer.bias), g)}


# ---- C5: binary "out" gates, 90% closed ------------------------------------------------------


def _c5(small):
    x, layer, g = _dense(small)
    w, b = layer.weight, layer.bias
    open_ = torch.rand(w.shape[0]) < 0.1
    phi = torch.where(open_, 40 / 7, -40 / 7).requires_grad_()  # pi = sigmoid(±40): 10% open
    inputs = (x, w, b, phi)

    def gated():
        y = npn.ops.gated_conv2d(x, w, b, phi, npn.Binary(7.0), "out", 1, 1, seed=7, offset=0)
        return grads(y, inputs, g)

    return npn_variants(_dense_variant(x, layer, g), gated)


register(
    Case(
        name="gated_conv2d",
        row="C5",
        description="Binary 'out' gates, 90% closed, fwd+bwd, 32x64x32x32 -> 128, 3x3, padding 1, vs dense",
        baseline="dense nn.Conv2d",
        make=_c5,
        targets=(Target("cpu", "<=", 0.35),),
    )
)


# ---- C5w: hard-concrete weight gates ----------------------------------------------------------


def _c5w(small):
    x, layer, g = _dense(small)
    w, b = layer.weight, layer.bias
    phi = torch.full(w.shape, 2.0).add_(torch.randn(w.shape) * 0.01).requires_grad_()  # Louizos' init: mostly open
    inputs = (x, w, b, phi)

    def gated():
        return grads(npn.ops.gated_conv2d(x, w, b, phi, HC, "weight", 1, 1, seed=7, offset=0), inputs, g)

    return npn_variants(_dense_variant(x, layer, g), gated)


register(
    Case(
        name="gated_conv2d_weight",
        row="C5w",
        description="HardConcrete weight gates fwd+bwd, 32x64x32x32 -> 128, 3x3, padding 1, vs dense",
        baseline="dense nn.Conv2d",
        make=_c5w,
        targets=(Target("cpu", "<=", 1.3),),
    )
)
