"""The noise stream in pure PyTorch (DESIGN 4.1): the oracle every backend matches bit for bit.

uint32 values are held in int64 tensors. Philox needs the high 32 bits of a 32x32-bit product,
which can reach 2^64 and overflow int64, so products are taken against 16-bit halves.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
ROUNDS = 10
# tl.rand's scale: the largest float32 with INT32_MAX * scale < 1 after rounding.
UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b, for a uint32 constant ``a`` and uint32 values ``b``."""
    b_hi = b >> 16
    p_hi = a * b_hi  # < 2^48
    p_lo = a * (b & 0xFFFF)  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor | int, k1: Tensor | int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of counters (c0..c3) under keys (k0, k1); all uint32 values in int64."""
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def words(n: int, seed: Tensor | int, offset: Tensor | int, device=None) -> Tensor:
    """The first n raw 32-bit words of the stream at (seed, offset), as int64 [n]."""
    if isinstance(seed, Tensor):
        device = seed.device
    counters = torch.arange((n + 3) // 4, dtype=torch.int64, device=device) + offset
    zero = torch.zeros_like(counters)
    key_lo = seed & MASK32
    key_hi = seed >> 32
    # counters past 2^63 wrap to negative int64 (as uint64 ones wrap in the kernels): the mask
    # keeps the high word unsigned where an arithmetic shift would sign-extend it
    out = philox4x32(counters & MASK32, (counters >> 32) & MASK32, zero, zero, key_lo, key_hi)
    return torch.stack(out, dim=1).reshape(-1)[:n]


def to_uniform(x: Tensor) -> Tensor:
    """tl.rand's word -> float: view as int32, fold negatives with ~x, scale into [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)
    return signed.to(torch.float32) * scale


def uniforms(n: int, seed: Tensor | int, offset: Tensor | int, device=None) -> Tensor:
    """float32 [n]: noise element i of the stream that starts at counter ``offset``."""
    return to_uniform(words(n, seed, offset, device))
