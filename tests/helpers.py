"""Shared test helpers: the one tolerance table, poisoned outputs, backend parametrization."""

from __future__ import annotations

import pytest
import torch

import npn_kernels as npn

# (rtol, atol) per dtype for results that are not bit-exact by design (gate formulas, sums).
# float16/bfloat16 inputs run the gate math in float32, so only the final rounding differs.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kw)


def poisoned(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer a kernel must overwrite: NaN for floats, the max value for integers."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def backend_params(*names: str):
    """pytest params for backends, each carrying the marker that skips it (with a reason)."""
    marks = {"cpu": [pytest.mark.ext], "cuda": [pytest.mark.gpu, pytest.mark.ext], "triton": [pytest.mark.triton]}
    names = names or npn.backends.NAMES
    return [pytest.param(name, marks=marks.get(name, []), id=name) for name in names]
