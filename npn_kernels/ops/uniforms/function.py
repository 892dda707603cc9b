"""`npn::uniforms`: the noise stream as a custom op, on whichever backend is selected."""

from __future__ import annotations

import torch
from torch import Tensor

from npn_kernels import _ext, backends
from npn_kernels.ops import eager
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference


@eager.custom_op("npn::uniforms")
def uniforms_op(n: int, seed: Tensor, offset: Tensor) -> Tensor:
    """float32 [n] on seed's device; seed, offset: int64 scalars."""
    backend = backends.select(seed.device)
    if backend == "reference":
        return reference.uniforms(n, seed, offset)
    out = torch.empty(n, dtype=torch.float32, device=seed.device)
    if backend == "triton":
        from npn_kernels.ops.uniforms import triton as uniforms_triton

        uniforms_triton.uniforms(seed, offset, out)
    else:
        _ext.ops.uniforms(seed, offset, out)
    return out


@uniforms_op.register_fake
def _(n: int, seed: Tensor, offset: Tensor) -> Tensor:
    return seed.new_empty(n, dtype=torch.float32)


def uniforms(n: int, *, seed, offset, device: torch.device | str = "cpu") -> Tensor:
    """The first ``n`` noise values at (seed, offset): float32 [n] in [0, 1).

    Element i uses Philox counter ``offset + i // 4`` and word ``i % 4`` (DESIGN 4.1), so every
    backend returns the same bits. ``seed`` in [0, 2^63), ``offset`` >= 0: Python ints or int64
    scalar tensors.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists device types, never the argument
        raise ValueError(f"device: expected a torch.device or a device string such as 'cpu', got {device!r}") from None
    seed_t, offset_t = rng_tensors(seed, offset, device)
    return uniforms_op(n, seed_t, offset_t)
