"""Shared test helpers: the one tolerance table, poisoned outputs, backend parametrization, and the
layer ops' oracle (the reference composition under autograd, fed the stream's noise)."""

from __future__ import annotations

import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels.ops.gated_conv2d import reference as conv_reference
from npn_kernels.ops.gated_linear import reference as linear_reference
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.uniforms import reference as uniforms_reference

# (rtol, atol) per dtype for results that are not bit-exact by design (gate formulas, sums).
# float16/bfloat16 inputs run the gate math in float32, so only the final rounding differs.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# Layer outputs and their gradients are sums (over features, rows and kernel taps) that the vendor
# GEMM/conv and the composition associate differently, from operands rounded once or twice
# (W ⊙ z in float32 then rounded, or z rounded first): TOL[dtype] times this factor. Measured at
# the sizes of tests/test_dtypes.py and tests/test_fuzz.py (up to ~100 terms per sum): up to 2x.
LAYER_FACTOR = 4
# A binary gate is 1[u < pi]: where u and pi agree to within the rounding of pi's float32 formula
# (sigmoid: ~1 ulp, and k·phi's rounding times sigmoid' <= 1/4), backends may differ.
BINARY_ROUNDING = 1e-6


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *, layer: bool = False, **kw
):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's);
    ``layer``: a layer's output or gradient (LAYER_FACTOR times it)."""
    rtol, atol = TOL[dtype or expected.dtype]
    factor = LAYER_FACTOR if layer else 1
    torch.testing.assert_close(actual, expected, rtol=rtol * factor, atol=atol * factor, **kw)


def poisoned(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An output buffer a kernel must overwrite: NaN for floats, the max value for integers; on
    ``device``, else torch's default device (CUDA in the GPU backends' tests, tests/conftest.py)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def backend_device(backend: str) -> str:
    """Where a backend's tensors live: CUDA for cuda, and for triton when a GPU is present."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def backend_params(*names: str):
    """pytest params for backends, each carrying the marker that skips it (with a reason)."""
    marks = {"cpu": [pytest.mark.ext], "cuda": [pytest.mark.gpu, pytest.mark.ext], "triton": [pytest.mark.triton]}
    names = names or npn.backends.NAMES
    return [pytest.param(name, marks=marks.get(name, []), id=name) for name in names]


def layer_oracle(layer, x, weight, bias, phi, gate, granularity, seed, offset, *, conv=(), training=True,
                 noise="batch", paired=False):  # fmt: skip
    """The oracle of npn.ops.gated_linear (layer "linear") or gated_conv2d ("conv2d", ``conv`` =
    (stride, padding, dilation, groups)): the reference composition under autograd with the gates
    of the stream at (seed, offset). Returns (y, y1, leaves): y detached (linear: rows of x
    flattened to [M, K], so [M, N]); y1 the first half's y (the whole batch unless paired), to
    backpropagate; leaves: clones of (x, weight, bias, phi) that require grad (None for no bias).
    """
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, bias, phi)]
    xl, wl, bl, pl = leaves
    rows = xl.reshape(-1, xl.shape[-1]) if layer == "linear" else xl

    def apply(inp, z):
        if layer == "linear":
            return linear_reference.gated_linear(inp, wl, bl, z, granularity)
        return conv_reference.gated_conv2d(inp, wl, bl, z, granularity, *conv)

    m = rows.shape[0] // 2 if paired else rows.shape[0]
    batch = m if noise == "example" else None
    shape = tuple(phi.shape) if batch is None else (batch, *phi.shape)
    u = uniforms_reference.uniforms(math.prod(shape), seed, offset).view(shape).to(phi.device) if training else None
    z = gates_reference.gates(pl, gate, u, training, batch)
    if isinstance(gate, npn.Binary):
        z = z.detach()  # binary gates carry no pathwise gradient (ARM comes from the objective)
    y1 = apply(rows[:m], z)
    y = y1
    if paired:
        z2 = gates_reference.gates(pl, gate, u, training, batch, antithetic=True)
        y = torch.cat([y1, apply(rows[m:], z2)])
    return y.detach(), y1, leaves


def assert_layer_matches_oracle(backend, layer, inputs, gate, granularity, seed, offset, *, conv=(), training=True,
                                noise="batch", paired=False, dtype=None):  # fmt: skip
    """npn.ops.gated_linear / gated_conv2d on ``backend`` equals :func:`layer_oracle`: y in x's
    dtype, and the gradients of x, weight, bias and phi (in their own dtypes) for a random dy, at
    the layer tolerance of ``dtype`` (default x's). The second half of a paired batch gets no
    gradient. ``inputs``: (x, weight, bias or None, phi)."""
    x = inputs[0]
    dtype = dtype or x.dtype
    y_ref, y1, leaves = layer_oracle(layer, *inputs, gate, granularity, seed, offset, conv=conv, training=training,
                                     noise=noise, paired=paired)  # fmt: skip
    args = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    op = npn.ops.gated_linear if layer == "linear" else npn.ops.gated_conv2d
    with npn.backends.use(backend):  # the backward runs on the forward's backend
        y = op(*args, gate, granularity, *conv, seed=seed, offset=offset, training=training, noise=noise, paired=paired)
    assert y.dtype == x.dtype and y.device == x.device
    if layer == "linear":
        assert y.shape == (*x.shape[:-1], y_ref.shape[-1])
    y_rows = y.reshape(y_ref.shape)
    assert_close(y_rows, y_ref, dtype, layer=True, msg=lambda s: f"y: {s}")
    dy = torch.randn_like(y_rows)
    m = y1.shape[0]
    y1.backward(dy[:m])
    y.backward(dy.view_as(y))
    for name, got, want in zip(("x", "weight", "bias", "phi"), args, leaves):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
        grad = got.grad.reshape(-1, got.shape[-1]) if (name == "x" and layer == "linear") else got.grad
        if name == "x" and paired:
            assert torch.count_nonzero(grad[m:]) == 0, "the second half of a paired batch gets no gradient"
            grad = grad[:m]
        expected = want.grad if want.grad is not None else torch.zeros_like(want)
        if name == "x" and layer == "linear":
            expected = expected.reshape(-1, got.shape[-1])[:m]
        elif name == "x":
            expected = expected[:m]
        assert_close(grad, expected, dtype, layer=True, msg=lambda s, name=name: f"d{name}: {s}")
    return y
