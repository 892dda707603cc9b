"""The gate formulas as Triton device functions, and the host side's packing of their parameters.

Shared by the gate kernels of triton.py. Gate math runs in float32 (float16/bfloat16/float32 phi)
or float64 (float64 phi). Scalar parameters travel as float32 pairs (hi, lo) with hi + lo = the
float64 value to 2^-48: the interpreter passes every Python float as float32, whatever the
annotation says.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from npn_kernels.gates import BINARY, from_family

U_EPS = tl.constexpr(1e-6)  # as reference.U_EPS: hard-concrete noise lies in [U_EPS, 1 - U_EPS]


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """A float64 parameter split as float32 hi + lo, in ACC (float32: hi + lo rounds to hi)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def binary_pi(x, k, K_INF: tl.constexpr):
    """sigmoid(k·x); k = inf: 1[x > 0] exactly (sigmoid(inf·0) would be NaN)."""
    if K_INF:
        pi = tl.where(x > 0, 1.0, 0.0).to(x.dtype)
    else:
        pi = tl.sigmoid(k * x)
    return pi


@triton.jit
def hc_s(x, u, beta, TRAINING: tl.constexpr):
    """The concrete sample s (training) or sigmoid(x) (evaluation), in x's dtype."""
    if TRAINING:
        uc = tl.minimum(tl.maximum(u, U_EPS), 1 - U_EPS).to(x.dtype)
        s = tl.sigmoid((tl.log(uc) - tl.log(1 - uc) + x) / beta)
    else:
        s = tl.sigmoid(x)
    return s


@triton.jit
def gate_value(
    x, u, p0, p1, p2, FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ANTITHETIC: tl.constexpr
):
    """(z, dz/dx) of gate parameters x and noise u (unused in evaluation), in x's dtype.

    p0..p2: k (binary) or beta, gamma, zeta. Binary gates have no pathwise gradient (dz = 0);
    ANTITHETIC (binary training only) gives ARM's z' = 1[u > 1 − pi] from the same u.
    """
    if FAMILY == 0:
        pi = binary_pi(x, p0, K_INF)
        if TRAINING:
            if ANTITHETIC:
                z = tl.where(u.to(x.dtype) > 1 - pi, 1.0, 0.0).to(x.dtype)
            else:
                z = tl.where(u.to(x.dtype) < pi, 1.0, 0.0).to(x.dtype)
        else:
            z = tl.where(pi >= 0.5, pi, 0.0)
        dz = tl.zeros_like(x)
    else:
        s = hc_s(x, u, p0, TRAINING)
        pre = s * (p2 - p1) + p1
        z = tl.minimum(tl.maximum(pre, 0.0), 1.0)
        # torch.clamp passes the gradient where min <= pre <= max (both ends included)
        dz = tl.where((pre >= 0) & (pre <= 1), (p2 - p1) * ((1 - s) * s), 0.0)
        if TRAINING:
            dz = dz / p0
    return z, dz


@triton.jit
def penalty_terms(x, w, a, FAMILY: tl.constexpr, K_INF: tl.constexpr, HAS_WEIGHT: tl.constexpr, SUMSQ: tl.constexpr):
    """(p, 1 − p, ||W_g||^2) per element, p = P(z != 0); a is k (binary) or beta·log(−gamma/zeta).

    1 − p is sigmoid(−t), not 1 − sigmoid(t): near p = 1 the subtraction would keep no digits
    (float32, t = 14: 1 − p = 8e-7 from a p with ulp 6e-8), and p(1 − p) is the gradient.
    """
    if FAMILY == 0:
        if K_INF:
            p = binary_pi(x, a, K_INF)
            q = 1 - p
        else:
            p = tl.sigmoid(a * x)
            q = tl.sigmoid(-(a * x))
    else:
        p = tl.sigmoid(x - a)
        q = tl.sigmoid(a - x)
    sq = tl.zeros_like(x)
    if HAS_WEIGHT:
        if SUMSQ:
            sq = w
        else:
            sq = w * w
    return p, q, sq


def acc_dtype(dtype: torch.dtype):
    """The gate math's Triton dtype for phi's dtype: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def split(values) -> list[float]:
    """Each float64 value as float32 (hi, lo), hi + lo = value to 2^-48 (hi only if not finite)."""
    out = []
    for value in values:
        hi = float(np.float32(value))
        out += [hi, float(np.float32(value - hi)) if math.isfinite(hi) else 0.0]
    return out


def gate_scalars(family: int, params) -> tuple[list[float], bool]:
    """The kernels' p0..p2 split (params padded with zeros) and whether k = inf."""
    padded = (tuple(float(p) for p in params) + (0.0, 0.0, 0.0))[:3]
    return split(padded), family == BINARY and math.isinf(padded[0])


def penalty_scalars(family: int, params, group_size: float, l0: float, weight_decay: float):
    family_gate = from_family(family, params)
    a = family_gate.k if family == BINARY else family_gate.shift
    return split((a, l0 * group_size, weight_decay / 2)), family == BINARY and math.isinf(a)


def mul_dtype(a: Tensor, phi: Tensor):
    """gate_mul's product dtype: float64 if a or phi is float64, else float32."""
    return tl.float64 if torch.float64 in (a.dtype, phi.dtype) else tl.float32
