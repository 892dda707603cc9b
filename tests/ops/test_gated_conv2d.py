"""npn.ops.gated_conv2d: every backend against the oracle composition with the stream's gates
(float32 here; the other dtypes are in tests/test_dtypes.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import npn_kernels as npn
from npn_kernels.ops.gated_conv2d import function as gated_conv2d_function
from npn_kernels.ops.gated_conv2d import reference
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import TOL, backend_params

# example noise (one gate per example and unit) exists for "in"/"out" gates only
GRANULARITY_NOISE = [(g, n) for g in reference.GRANULARITIES for n in ("batch", "example") if (g, n) != ("weight", "example")]
BACKENDS = backend_params("reference", "cpu", "triton")
GATES = {"binary": npn.Binary(5.0), "binary_inf": npn.Binary(float("inf")), "hc": npn.HardConcrete()}
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
# (stride, padding, dilation, groups) of the geometry tests
GEOMETRIES = {"plain": (1, 0, 1, 1), "stride2_pad1": (2, 1, 1, 1), "dilation2": (1, (2, 1), 2, 1), "groups2": (1, 1, 1, 2)}


def _rng():
    return int(torch.randint(0, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())


def _oracle(x, weight, bias, phi, gate, granularity, conv, seed, offset, training, noise, paired):
    """y and the first half's y (for the gradients) from the composition and autograd."""
    m = x.shape[0] // 2 if paired else x.shape[0]
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, phi)]
    xl, wl, bl, pl = leaves
    example = noise == "example"
    shape = (m, *phi.shape) if example else tuple(phi.shape)
    u = uniforms_reference.uniforms(math.prod(shape), seed, offset).view(shape) if training else None
    batch = m if example else None
    z = gates_reference.gates(pl, gate, u, training, batch)
    if isinstance(gate, npn.Binary):
        z = z.detach()  # binary gates carry no pathwise gradient (ARM comes from the objective)
    y1 = reference.gated_conv2d(xl[:m], wl, bl, z, granularity, *conv)
    y = y1
    if paired:
        z2 = gates_reference.gates(pl, gate, u, training, batch, antithetic=True)
        y = torch.cat([y1, reference.gated_conv2d(xl[m:], wl, bl, z2, granularity, *conv)])
    return y.detach(), y1, leaves


def _inputs(b, c_in, c_out, hw, granularity, dtype, closed=0.3, groups=1, kernel=3, bias=True):
    x = torch.randn(b, c_in, *hw, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, dtype=dtype) / math.sqrt(c_in // groups * kernel**2)
    bb = torch.randn(c_out, dtype=dtype) if bias else None
    phi = torch.randn(reference.phi_shape(granularity, weight.shape, groups), dtype=dtype)
    # a fraction of units firmly closed for every family (binary pi ~ 0, hard-concrete z = 0)
    phi = torch.where(torch.rand(phi.shape) < closed, torch.full_like(phi, -12.0), phi)
    return x, weight, bb, phi


def _check(backend, x, weight, bias, phi, gate, granularity, conv=(1, 0, 1, 1), *, training=True, noise="batch",
           paired=False):  # fmt: skip
    seed, offset = _rng()
    y_ref, y1, leaves = _oracle(x, weight, bias, phi, gate, granularity, conv, seed, offset, training, noise, paired)
    args = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, phi)]
    rtol, atol = TOL[x.dtype]
    with npn.backends.use(backend):
        y = npn.ops.gated_conv2d(*args, gate, granularity, *conv, seed=seed, offset=offset, training=training,
                                 noise=noise, paired=paired)  # fmt: skip
        torch.testing.assert_close(y, y_ref, rtol=rtol * 10, atol=atol * 10)
        dy = torch.randn_like(y)
        m = y1.shape[0]
        y.backward(dy)
    y1.backward(dy[:m])
    for name, got, want in zip(("x", "weight", "bias", "phi"), args, leaves):
        if got is None:
            continue
        expected = want.grad if want.grad is not None else torch.zeros_like(want)
        if name == "x" and paired:
            assert torch.count_nonzero(got.grad[m:]) == 0, "the second half of a paired batch gets no gradient"
        torch.testing.assert_close(got.grad, expected, rtol=rtol * 10, atol=atol * 10, msg=lambda s: f"d{name}: {s}")
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_oracle(backend, gate_name, granularity, training):
    x, weight, bias, phi = _inputs(5, 4, 6, (7, 9), granularity, torch.float32)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, training=training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
def test_geometry(backend, geometry, granularity):
    """Stride, padding, dilation and groups, batch 1, hard-concrete (every gradient nonzero)."""
    groups = GEOMETRIES[geometry][3]
    x, weight, bias, phi = _inputs(1, 4, 6, (7, 9), granularity, torch.float32, groups=groups)
    _check(backend, x, weight, bias, phi, npn.HardConcrete(), granularity, GEOMETRIES[geometry])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", ["binary", "hc"])
@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_example_noise(backend, gate_name, granularity, training):
    x, weight, bias, phi = _inputs(3, 5, 4, (5, 6), granularity, torch.float32)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, (1, 1, 1, 1), training=training, noise="example")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity, noise", GRANULARITY_NOISE)
def test_paired_matches_two_reference_passes(backend, granularity, noise):
    x, weight, bias, phi = _inputs(2, 4, 5, (5, 7), granularity, torch.float32)
    x = torch.cat([x, x])  # the doubled batch of the ARM objective
    _check(backend, x, weight, bias, phi, npn.Binary(3.0), granularity, (1, 1, 1, 1), noise=noise, paired=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", ["binary", "hc"])
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_mostly_closed_channels_are_skipped_exactly(backend, gate_name, granularity):
    """90% closed: the gathered (compacted) conv path, with exact zero gradients of closed units."""
    x, weight, bias, phi = _inputs(3, 20, 20, (6, 5), granularity, torch.float32, closed=0.9)
    y = _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, (1, 1, 1, 1))
    if granularity == "out":
        assert torch.count_nonzero(y[:, phi < -10]) == 0


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_all_channels_closed(backend, granularity):
    """Nothing open: the gathered conv has no channel (y is the bias ("in") or 0 ("out"))."""
    x, weight, bias, phi = _inputs(2, 4, 3, (5, 5), granularity, torch.float32, closed=1.0)
    y = _check(backend, x, weight, bias, phi, npn.Binary(5.0), granularity)
    expected = bias.view(1, -1, 1, 1).expand_as(y) if granularity == "in" else torch.zeros_like(y)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity, noise", GRANULARITY_NOISE)
def test_channels_last_and_non_contiguous_x(backend, granularity, noise):
    x, weight, bias, phi = _inputs(2, 4, 6, (7, 9), granularity, torch.float32, closed=0.7)  # "in"/"out" gather
    seed, offset = _rng()
    results = []
    for layout in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        leaf = layout.detach().requires_grad_(True)
        with npn.backends.use(backend):
            y = npn.ops.gated_conv2d(leaf, weight, bias, phi, npn.HardConcrete(), granularity, 1, 1, seed=seed,
                                     offset=offset, noise=noise)  # fmt: skip
            y.backward(torch.ones_like(y))
        results.append((y, leaf.grad))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    for y, dx in results[1:]:
        torch.testing.assert_close(y, results[0][0])
        torch.testing.assert_close(dx, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_empty_batch(backend):
    x, weight, _, phi = _inputs(0, 4, 5, (6, 6), "in", torch.float32)
    x.requires_grad_(True)
    with npn.backends.use(backend):
        y = npn.ops.gated_conv2d(x, weight, None, phi, npn.Binary(), "in", seed=1, offset=0)
        assert y.shape == (0, 5, 4, 4)
        y.sum().backward()
    assert x.grad.shape == (0, 4, 6, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [3, 4])
def test_same_and_valid_padding(backend, kernel):
    """padding="same" (also with an even kernel: the odd pixel on the right/bottom) and "valid", as F.conv2d."""
    x, weight, bias, phi = _inputs(2, 3, 4, (7, 9), "weight", torch.float64, kernel=kernel)
    seed, offset = _rng()
    with npn.backends.use(backend):
        z = npn.ops.sample_gates(phi, npn.HardConcrete(), seed=seed, offset=offset)
        for padding in ("same", "valid"):
            y = npn.ops.gated_conv2d(x, weight, bias, phi, npn.HardConcrete(), "weight", 1, padding, 2, seed=seed,
                                     offset=offset)  # fmt: skip
            torch.testing.assert_close(y, F.conv2d(x, weight * z, bias, 1, padding, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_gates_as_sample_gates(backend):
    """out gates with example noise: y equals conv(x) ⊙ sample_gates(phi, batch=B) for the same (seed, offset)."""
    x, weight, bias, phi = _inputs(3, 4, 5, (6, 6), "out", torch.float64)
    seed, offset = _rng()
    with npn.backends.use(backend):
        z = npn.ops.sample_gates(phi, npn.HardConcrete(), seed=seed, offset=offset, batch=3)
        y = npn.ops.gated_conv2d(x, weight, bias, phi, npn.HardConcrete(), "out", seed=seed, offset=offset, noise="example")
    torch.testing.assert_close(y, F.conv2d(x, weight, bias) * z[:, :, None, None])


def test_opcheck():
    x, weight, bias, phi = _inputs(2, 4, 6, (5, 6), "out", torch.float32, groups=2)
    seed, offset = rng_tensors(3, 9, "cpu")
    conv = ([2, 2], [1, 1], [1, 1], 2)
    for family, params in ((0, [2.0]), (1, [2 / 3, -0.1, 1.1])):
        for xl in (x, x.to(memory_format=torch.channels_last)):
            args = (xl.requires_grad_(), weight.requires_grad_(), bias, phi.requires_grad_(), seed, offset, *conv,
                    family, params, "out", True, False, False)  # fmt: skip
            torch.library.opcheck(torch.ops.npn.gated_conv2d.default, args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(2, 5, 6, 6)}, ValueError, r"x: expected shape \[B, 4, H, W\]"),
        ({"x": torch.randn(4, 6, 6)}, ValueError, r"x: expected shape \[B, 4, H, W\]"),
        ({"x": torch.randn(2, 4, 2, 2)}, ValueError, r"x: spatial size \(2, 2\)"),
        ({"phi": torch.randn(6)}, ValueError, r"phi: expected shape \(4,\) for granularity 'in'"),
        ({"phi": torch.randn(6), "granularity": "weight"}, ValueError, r"phi: expected shape \(6, 4, 3, 3\)"),
        ({"weight": torch.randn(6, 4, 3, 3, dtype=torch.float64)}, TypeError, "weight: expected dtype torch.float32"),
        ({"weight": torch.randn(6, 4, 3)}, ValueError, "weight: expected a 4-D tensor"),
        ({"bias": torch.randn(4)}, ValueError, r"bias: expected shape \(6,\)"),
        ({"x": torch.ones(2, 4, 6, 6, dtype=torch.int64)}, TypeError, "x: expected a float16"),
        ({"granularity": "rows"}, ValueError, "granularity: expected one of weight, in, out"),
        ({"noise": "sample"}, ValueError, "noise: expected 'batch' or 'example'"),
        ({"noise": "example", "granularity": "weight", "phi": torch.randn(6, 4, 3, 3)}, ValueError, "noise: 'example'"),
        ({"gate": 7.0}, TypeError, "gate: expected npn.Binary"),
        ({"groups": 4}, ValueError, "groups: expected an int >= 1 dividing weight's 6"),
        ({"groups": 2}, ValueError, r"x: expected shape \[B, 8, H, W\] \(weight.shape\[1\] = 4 times groups = 2"),
        ({"stride": (1, 0)}, ValueError, r"stride: expected an int >= 1 or a pair"),
        ({"padding": "full"}, ValueError, r"padding: expected an int >= 0 or a pair"),
        ({"padding": "same", "stride": 2}, ValueError, r"padding: 'same' needs stride 1"),
        ({"paired": True, "x": torch.randn(3, 4, 6, 6)}, ValueError, "paired: needs Binary gates in training and an even"),
        ({"paired": True, "gate": npn.HardConcrete()}, ValueError, "paired: needs Binary gates in training"),
    ],
)
def test_bad_input(change, error, match):
    kwargs = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6), phi=torch.randn(4),
                  gate=npn.Binary(), granularity="in", seed=0, offset=0)  # fmt: skip
    kwargs.update(change)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        npn.ops.gated_conv2d(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_gathered_and_dense_paths_agree(backend, granularity, monkeypatch):
    """The same call with compaction forced on (every open fraction gathers) and off."""
    x, weight, bias, phi = _inputs(3, 12, 10, (5, 6), granularity, torch.float64, closed=0.5)
    results = []
    for threshold in (1.01, 0.0):
        monkeypatch.setattr(gated_conv2d_function, "COMPACT_BELOW", threshold)
        args = [t.clone().requires_grad_(True) for t in (x, weight, bias, phi)]
        with npn.backends.use(backend):
            y = npn.ops.gated_conv2d(*args, npn.HardConcrete(), granularity, 1, 1, seed=5, offset=2)
            y.backward(torch.ones_like(y))
        results.append([y.detach()] + [a.grad for a in args])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
