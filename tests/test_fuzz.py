"""Property tests: every available backend equals the reference composition, forward and gradients.

Hypothesis draws the shapes (sizes 1 and odd ones included), the gate family and its parameters,
the granularity, the noise ("batch"/"example"), training or evaluation, ARM's paired batch, the
address (seed, offset) anywhere in the stream (offsets near the 2^32 carry and the 2^63 top too),
the conv geometry, and the layout of x (transposed, channels-last, or a strided view into a buffer
padded with NaN, which a kernel reading the wrong elements cannot hide). The examples per property
come from the hypothesis profile (tests/conftest.py; NPN_FUZZ_EXAMPLES for a longer fuzz).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import npn_kernels as npn
from npn_kernels.ops.gated_conv2d import reference as conv_reference
from npn_kernels.ops.gated_linear import reference as linear_reference
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import (
    BINARY_ROUNDING,
    assert_close,
    assert_layer_matches_oracle,
    backend_device,
)

INF = float("inf")
BACKENDS = [name for name, ok in npn.backends.available().items() if ok]
pytestmark = [
    # the interpreter's numpy exp overflows to inf on sigmoid of large arguments: the result is what we want
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    # the oracle's F.conv2d with padding="same" and an even kernel: a note about speed
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning"),
]

SEEDS = st.integers(0, 2**63 - 1)
OFFSETS = st.one_of(
    st.integers(0, 2**63 - 1),
    st.integers(2**32 - 64, 2**32 + 64),  # the carry from the counter's low word into its high word
    st.integers(2**63 - 64, 2**63 - 1),  # counters past 2^63 wrap (uint64) in every backend
)
GATES = st.one_of(
    st.sampled_from([npn.Binary(0.0), npn.Binary(1.0), npn.Binary(7.0), npn.Binary(INF), npn.HardConcrete()]),
    st.builds(npn.HardConcrete, beta=st.floats(0.1, 2.0), gamma=st.floats(-0.5, -0.01), zeta=st.floats(1.01, 1.5)),
)
DTYPES = st.sampled_from([torch.float32, torch.float64])
# fraction of units firmly closed: 0.95 reaches the gathered (compacted) GEMM/conv paths
CLOSED = st.sampled_from([0.0, 0.5, 0.95])


def _phi(shape, dtype, closed: float) -> torch.Tensor:
    phi = torch.randn(shape, dtype=torch.float64) * 2
    return torch.where(torch.rand(shape) < closed, torch.full_like(phi, -12.0), phi).to(dtype)


def _binary_ambiguous(phi, gate, u, training: bool, paired: bool = False) -> bool:
    """Whether a binary gate's threshold lies within rounding of its noise (BINARY_ROUNDING): pi for
    z = 1[u < pi], 1 - pi for ARM's z' = 1[u > 1 - pi], 1/2 for evaluation's pi·1[pi >= 1/2].
    Such draws are rejected (a chance of about 2e-6 per gate), as backends may differ on them."""
    if not isinstance(gate, npn.Binary) or gate.k in (0.0, INF):  # pi exactly 1/2, or 0 or 1
        return False
    pi = gate.probs(phi.double())
    if not training:
        return bool(((pi - 0.5).abs() < BINARY_ROUNDING).any())
    u = u.double()
    near = (u - pi).abs() < BINARY_ROUNDING
    if paired:
        near |= (u - (1 - pi)).abs() < BINARY_ROUNDING
    return bool(near.any())


def _noise(shape, seed, offset) -> torch.Tensor:
    return uniforms_reference.uniforms(math.prod(shape), seed, offset).view(shape)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout (a view, except "contiguous")."""
    if layout == "transposed":  # the last two dims' strides swapped
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a NaN-padded buffer
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _on(backend: str, tensors):
    device = backend_device(backend)
    return [None if t is None else t.to(device) for t in tensors]


@example(n=9, seed=2**63 - 1, offset=2**63 - 1)  # the second and third counters wrap past 2^63
@given(n=st.integers(0, 70), seed=SEEDS, offset=OFFSETS)
def test_uniforms(n, seed, offset):
    """The stream itself: bit-identical on every backend, and in [0, 1)."""
    expected = _noise((n,), seed, offset)
    assert ((expected >= 0) & (expected < 1)).all()
    for backend in BACKENDS:
        with npn.backends.use(backend):
            u = npn.ops.uniforms(n, seed=seed, offset=offset, device=backend_device(backend))
        assert u.dtype == torch.float32 and torch.equal(u.cpu(), expected), backend


@st.composite
def _gates_case(draw):
    gate = draw(GATES)
    training = draw(st.booleans())
    return gate, training, draw(SEEDS), draw(OFFSETS), draw(DTYPES), draw(st.integers(0, 2**32 - 1))


@given(case=_gates_case(), shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       batch=st.one_of(st.none(), st.integers(1, 4)), layout=st.sampled_from(["contiguous", "transposed", "strided"]))  # fmt: skip
def test_sample_gates(case, shape, batch, layout):
    gate, training, seed, offset, dtype, torch_seed = case
    torch.manual_seed(torch_seed)
    phi = _phi(shape, dtype, 0.0)
    gate_shape = tuple(shape) if batch is None else (batch, *shape)
    u = _noise(gate_shape, seed, offset) if training else None
    assume(not _binary_ambiguous(phi, gate, u, training))
    leaf = phi.detach().requires_grad_(True)
    expected = gates_reference.gates(leaf, gate, u, training, batch)
    weights = torch.randn(gate_shape, dtype=dtype)
    if isinstance(gate, npn.Binary):
        expected_grad = torch.zeros_like(phi)  # no pathwise gradient (ARM comes from the objective)
    else:
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), leaf)
    if layout == "transposed" and phi.dim() < 2:
        layout = "contiguous"
    for backend in BACKENDS:
        p, w = _on(backend, (phi, weights))
        p = _layout(p, layout).requires_grad_(True)
        with npn.backends.use(backend):
            z = npn.ops.sample_gates(p, gate, seed=seed, offset=offset, training=training, batch=batch)
            (grad,) = torch.autograd.grad((z * w).sum(), p)
        assert z.shape == gate_shape and z.dtype == dtype and grad.dtype == dtype, backend
        assert_close(z.cpu(), expected.detach().to(dtype), msg=lambda s, b=backend: f"{b} z: {s}")
        assert_close(grad.cpu(), expected_grad.to(dtype), msg=lambda s, b=backend: f"{b} d phi: {s}")


@st.composite
def _layer_case(draw):
    """(gate, granularity, noise, training, paired, seed, offset, dtype, closed, bias, torch seed)."""
    gate = draw(GATES)
    granularity = draw(st.sampled_from(linear_reference.GRANULARITIES))
    noise = "batch" if granularity == "weight" else draw(st.sampled_from(["batch", "example"]))
    training = draw(st.booleans())
    paired = training and isinstance(gate, npn.Binary) and draw(st.booleans())
    return (gate, granularity, noise, training, paired, draw(SEEDS), draw(OFFSETS), draw(DTYPES), draw(CLOSED),
            draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))  # fmt: skip


def _check_layer(layer, case, make_inputs, conv=()):
    gate, granularity, noise, training, paired, seed, offset, dtype, closed, bias, torch_seed = case
    torch.manual_seed(torch_seed)
    x, weight, b, phi = make_inputs(dtype, bias, closed, paired)
    rows = (x.numel() // x.shape[-1] if layer == "linear" else x.shape[0]) // (2 if paired else 1)
    gate_shape = (rows, *phi.shape) if noise == "example" else tuple(phi.shape)
    u = _noise(gate_shape, seed, offset) if training else None
    assume(not _binary_ambiguous(phi, gate, u, training, paired))
    for backend in BACKENDS:
        inputs = _on(backend, (x, weight, b, phi))
        assert_layer_matches_oracle(backend, layer, inputs, gate, granularity, seed, offset, conv=conv,
                                    training=training, noise=noise, paired=paired)  # fmt: skip


@given(case=_layer_case(), m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 10),
       layout=st.sampled_from(["contiguous", "transposed", "strided", "3d"]))  # fmt: skip
def test_gated_linear(case, m, k, n, layout):
    granularity, paired = case[1], case[4]
    assume(not (paired and layout == "3d"))  # paired halves are rows of a 2-D batch

    def make(dtype, bias, closed, paired):
        if layout == "3d":  # x [2, m, k]: a non-contiguous view, flattened to rows by the op
            x = torch.randn(k, 2, m, dtype=dtype).permute(1, 2, 0)
        else:
            x = torch.randn(m, k, dtype=dtype)
            x = _layout(torch.cat([x, x]) if paired else x, layout)  # paired: the doubled batch of ARM
        weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
        phi = _phi(linear_reference.phi_shape(granularity, n, k), dtype, closed)
        return x, weight, torch.randn(n, dtype=dtype) if bias else None, phi

    _check_layer("linear", case, make)


@st.composite
def _conv_geometry(draw):
    """(b, c_in, c_out, (h, w), (kh, kw), stride, padding, dilation, groups) with an output >= 1x1."""
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if stride == (1, 1) and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 1)))
    pad = (0, 0) if isinstance(padding, str) else padding
    # the smallest input the dilated kernel fits in, plus up to 4
    hw = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4)) for d, k, p in zip(dilation, kernel, pad))
    return draw(st.integers(1, 3)), c_in, c_out, hw, kernel, stride, padding, dilation, groups


@given(case=_layer_case(), geometry=_conv_geometry(),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed", "strided"]))  # fmt: skip
def test_gated_conv2d(case, geometry, layout):
    b, c_in, c_out, hw, kernel, stride, padding, dilation, groups = geometry
    granularity = case[1]

    def make(dtype, bias, closed, paired):
        x = torch.randn(b, c_in, *hw, dtype=dtype)
        x = _layout(torch.cat([x, x]) if paired else x, layout)  # paired: the doubled batch of ARM
        weight = torch.randn(c_out, c_in // groups, *kernel, dtype=dtype) / math.sqrt(c_in // groups * math.prod(kernel))
        phi = _phi(conv_reference.phi_shape(granularity, weight.shape, groups), dtype, closed)
        return x, weight, torch.randn(c_out, dtype=dtype) if bias else None, phi

    _check_layer("conv2d", case, make, conv=(stride, padding, dilation, groups))
