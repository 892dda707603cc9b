"""The noise stream in Triton: `tl.randint4x` is the stream's definition (DESIGN 4.1)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from npn_kernels.ops.aot import AotSpec


@triton.jit
def uniform_at(seed, offset, idx):
    """Noise element ``idx`` (an int64 block) of the stream starting at counter ``offset``.

    Each element runs its own Philox (4x the work of `_uniforms_kernel`'s interleave), which is
    what a kernel needs when its elements are not 4-aligned runs, e.g. a tile of a gate matrix.
    """
    r0, r1, r2, r3 = tl.randint4x(seed, offset + (idx >> 2))
    word = idx & 3
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.uint_to_uniform_float(r)


@triton.jit
def uniform_block(seed, offset, start, BLOCK: tl.constexpr):
    """Noise elements ``start`` ... ``start + BLOCK - 1`` (start and BLOCK multiples of 4).

    Four elements per Philox call, from the BLOCK // 4 counters ``offset + start // 4 + c``.
    """
    c = (start >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, offset + c)
    u0 = tl.uint_to_uniform_float(r0)
    u1 = tl.uint_to_uniform_float(r1)
    u2 = tl.uint_to_uniform_float(r2)
    u3 = tl.uint_to_uniform_float(r3)
    # join(join(u0, u2), join(u1, u3))[c, i, j] = word 2i + j: row-major order is u0 u1 u2 u3.
    return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK,))


@triton.jit
def uniform_rows(seed, offset, starts, BLOCK: tl.constexpr):
    """[R, BLOCK]: row r holds noise elements ``starts[r]`` ... ``starts[r] + BLOCK - 1``.

    :func:`uniform_block` for R runs at once (starts [R] int64, starts and BLOCK multiples of 4):
    a tile of a row-major gate matrix whose row length is a multiple of 4.
    """
    c = (starts >> 2)[:, None] + tl.arange(0, BLOCK // 4).to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offset + c)
    u0 = tl.uint_to_uniform_float(r0)
    u1 = tl.uint_to_uniform_float(r1)
    u2 = tl.uint_to_uniform_float(r2)
    u3 = tl.uint_to_uniform_float(r3)
    return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (c.shape[0], BLOCK))


@triton.jit
def _uniforms_kernel(out_ptr, n, seed_ptr, offset_ptr, BLOCK: tl.constexpr):
    """out[n] float32; each program writes BLOCK elements from BLOCK // 4 Philox counters."""
    pid = tl.program_id(0).to(tl.int64)
    u = uniform_block(tl.load(seed_ptr), tl.load(offset_ptr), pid * BLOCK, BLOCK)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + idx, u, mask=idx < n)


_BLOCK = 1024

AOT = [
    AotSpec(
        _uniforms_kernel,
        {"out_ptr": "*fp32", "n": "i64", "seed_ptr": "*i64", "offset_ptr": "*i64"},
        {"BLOCK": _BLOCK},
    ),
]


def uniforms(seed: Tensor, offset: Tensor, out: Tensor) -> None:
    """Fill ``out`` (float32 [n], contiguous) with the stream; seed, offset: int64 scalars."""
    n = out.numel()
    if n > 0:
        _uniforms_kernel[(triton.cdiv(n, _BLOCK),)](out, n, seed, offset, BLOCK=_BLOCK)
