"""Validation of (seed, offset), the address of a draw in the noise stream (DESIGN 4.1)."""

from __future__ import annotations

import torch
from torch import Tensor

SEED_LIMIT = 2**63  # seeds are ints in [0, 2^63): the Philox key is the seed's 64 bits


def _as_int64_scalar(value, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise TypeError(
                f"{name}: expected a Python int or an int64 tensor with one element, "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        # Tensors are not range-checked: reading a CUDA value would cost a host sync per op.
        return value.reshape(()).to(device, non_blocking=True)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int or an int64 tensor, got {type(value).__name__}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {value}")
    return torch.tensor(value, dtype=torch.int64, device=device)


def rng_tensors(seed, offset, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(seed, offset) as int64 scalar tensors on ``device``; ints are range-checked."""
    device = torch.device(device)
    return _as_int64_scalar(seed, "seed", device), _as_int64_scalar(offset, "offset", device)


def counters_for(numel: int) -> int:
    """Philox counters a draw of ``numel`` noise elements consumes: each counter gives 4 words."""
    return (numel + 3) // 4
