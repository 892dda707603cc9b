"""The fused Triton kernels of npn.ops.gated_linear with per-weight gates (ops/gated_linear/triton.py).

The launchers are called directly (small blocks, forced K splits, poisoned outputs) and through the
op (counting launcher calls, so a pass through the unfused path cannot hide a broken kernel); both
against the composition x (W ⊙ z)ᵀ + b in float64 under autograd. Binary gates are exactly those
the Triton gate kernels draw for the same (seed, offset), hard-concrete ones the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import npn_kernels as npn
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import LAYER_FACTOR, TOL, poisoned

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

GATES = {"binary": npn.Binary(5.0), "binary_inf": npn.Binary(float("inf")), "hc": npn.HardConcrete()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, N, columns per K split or None, bias): odd sizes around the 16-blocks below, K % 4 == 0
# (noise from whole Philox counters) and not, the forward's split into partial sums
SHAPES = [(1, 37, 29, None, True), (7, 36, 29, 16, False), (33, 37, 29, 32, True)]
SHAPE_IDS = ["m1", "m7_split16_nobias", "m33_split32"]
BLOCKS = {"block_m": 16, "block_n": 16, "block_k": 16}


@pytest.fixture
def fused():
    from npn_kernels.ops.gated_linear import triton as fused

    return fused


def _rng():
    seed, offset = int(torch.randint(0, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())
    return rng_tensors(seed, offset, torch.get_default_device())  # CUDA in the GPU run (tests/conftest.py)


def _inputs(m, k, n, dtype, bias=True):
    """x [M, K] and W [N, K] not contiguous; phi float32 with a third of the gates firmly closed."""
    x = torch.randn(k, m, dtype=dtype).t()
    weight = (torch.randn(k, n) / k**0.5).to(dtype).t()
    b = torch.randn(n, dtype=dtype) if bias else None
    phi = torch.randn(n, k) * 2
    phi = torch.where(torch.rand(n, k) < 0.3, torch.full_like(phi, -12.0), phi)
    return x, weight, b, phi


def _binary_gates(phi, gate, seed, offset, training, antithetic):
    """z [N, K] float32 bit for bit as the Triton gate kernels draw it (sample_gates; gate_mul's
    ARM z' when antithetic)."""
    from npn_kernels.ops.gates import triton as gates_triton

    params, z = list(gate.params), torch.empty_like(phi)
    if antithetic:
        ones = torch.ones(1, phi.numel(), 1)
        gates_triton.gate_mul(ones, phi.reshape(-1), seed, offset, gate.family, params, training, False, True,
                              z.view(1, -1, 1))  # fmt: skip
    else:
        gates_triton.sample_gates(phi, seed, offset, gate.family, params, training, z)
    return z


def _oracle(x, weight, bias, phi, gate, seed, offset, training, dy, antithetic=False):
    """(y, dx, dW, db, dphi) in float64 from the composition under autograd (dphi: zeros for binary)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias, phi)]
    x64, w64, b64, phi64 = leaves
    if isinstance(gate, npn.Binary):
        z = _binary_gates(phi, gate, seed, offset, training, antithetic).double()
    else:
        u = uniforms_reference.uniforms(phi.numel(), seed, offset).view(phi.shape) if training else None
        z = gates_reference.gates(phi64, gate, u, training)
    y = F.linear(x64, w64 * z, b64)
    y.backward(dy.double())
    grads = [None if t is None else (torch.zeros_like(t) if t.grad is None else t.grad) for t in leaves]
    return (y.detach(), *grads)


def _close(actual, expected, dtype, name):
    """The table's tolerance for a layer's outputs and gradients (LAYER_FACTOR: each is a sum over
    K or M rows; float32 dW over 33 rows once missed the elementwise atol by 25%)."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol * LAYER_FACTOR, atol=atol * LAYER_FACTOR,
                               msg=lambda s: f"{name}: {s}")  # fmt: skip


@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_launchers_match_composition(fused, gate_name, training, dtype, shape):
    m, k, n, k_per_split, has_bias = shape
    gate = GATES[gate_name]
    x, weight, bias, phi = _inputs(m, k, n, dtype, has_bias)
    seed, offset = _rng()
    dy = torch.randn(n, m, dtype=dtype).t()
    y_ref, dx_ref, dw_ref, _, dphi_ref = _oracle(x, weight, bias, phi, gate, seed, offset, training, dy)
    args = (seed, offset, gate.family, list(gate.params), training)

    y = poisoned((m, n), dtype)
    fused.gated_linear(x, weight, bias, phi.view(-1), *args, False, y, k_per_split=k_per_split, **BLOCKS)
    _close(y, y_ref, dtype, "y")

    dx, dw, dphi = poisoned((m, k), dtype), poisoned((n, k), dtype), poisoned((n * k,))
    fused.gated_linear_backward(dy, x, weight, phi.view(-1), *args, dx, dw, dphi, **BLOCKS)
    _close(dx, dx_ref, dtype, "dx")
    _close(dw, dw_ref, dtype, "dW")
    _close(dphi.view(n, k), dphi_ref, dtype, "dphi")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [36, 37])
def test_antithetic_forward(fused, dtype, k):
    """ARM's second half: z' = 1[u > 1 − pi], exactly gate_mul's."""
    gate = npn.Binary(3.0)
    x, weight, bias, phi = _inputs(5, k, 19, dtype)
    seed, offset = _rng()
    y_ref = _oracle(x, weight, bias, phi, gate, seed, offset, True, torch.zeros(5, 19), antithetic=True)[0]
    y = poisoned((5, 19), dtype)
    fused.gated_linear(x, weight, bias, phi.view(-1), seed, offset, gate.family, [3.0], True, True, y, **BLOCKS)
    _close(y, y_ref, dtype, "y")


@pytest.mark.parametrize("need", [(1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=["x", "w", "phi"])
@pytest.mark.parametrize("gate_name", ["binary", "hc"])
def test_backward_writes_only_what_is_asked(fused, need, gate_name):
    gate = GATES[gate_name]
    m, k, n = 6, 20, 17
    x, weight, _, phi = _inputs(m, k, n, torch.float32)
    seed, offset = _rng()
    dy = torch.randn(m, n)
    _, *expected = _oracle(x, weight, None, phi, gate, seed, offset, True, dy)
    expected = [expected[0], expected[1], expected[3].reshape(-1)]
    outs = [poisoned(t.shape) if wanted else None for t, wanted in zip(expected, need)]
    args = (seed, offset, gate.family, list(gate.params), True)
    fused.gated_linear_backward(dy, x, weight, phi.view(-1), *args, *outs, **BLOCKS)
    for name, out, want in zip(("dx", "dW", "dphi"), outs, expected):
        if out is not None:
            _close(out, want, torch.float32, name)


def _count_calls(monkeypatch, fused):
    """{launcher name: calls}, counted from now on."""
    calls = {"gated_linear": 0, "gated_linear_backward": 0}

    def counting(name, launcher):
        def counted(*args, **kwargs):
            calls[name] += 1
            return launcher(*args, **kwargs)

        return counted

    for name in calls:
        monkeypatch.setattr(fused, name, counting(name, getattr(fused, name)))
    return calls


NAMES = ("y", "dx", "dW", "db", "dphi")


def _run_op(x, weight, bias, phi, gate, seed, offset, training, dy, paired=False):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, phi)]
    with npn.backends.use("triton"):
        y = npn.ops.gated_linear(*leaves, gate, "weight", seed=seed, offset=offset, training=training, paired=paired)
        y.backward(dy)
    return (y.detach(), *(None if t is None else t.grad for t in leaves))


@pytest.mark.parametrize("gate_name", ["binary", "hc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_op_runs_the_fused_kernels(fused, monkeypatch, gate_name, training, m):
    gate, (k, n) = GATES[gate_name], (37, 29)
    x, weight, bias, phi = _inputs(m, k, n, torch.float32)
    seed, offset = _rng()
    dy = torch.randn(m, n)
    calls = _count_calls(monkeypatch, fused)
    got = _run_op(x, weight, bias, phi, gate, seed, offset, training, dy)
    assert calls == {"gated_linear": 1, "gated_linear_backward": 1}
    expected = _oracle(x, weight, bias, phi, gate, seed, offset, training, dy)
    for name, actual, want in zip(NAMES, got, expected):
        _close(actual, want, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_op_half_precision_phi(fused, monkeypatch, dtype):
    """phi in x's dtype (a model cast to half precision as a whole)."""
    x, weight, bias, phi = _inputs(7, 37, 29, dtype)
    phi = phi.to(dtype)
    seed, offset = _rng()
    dy = torch.randn(7, 29, dtype=dtype)
    calls = _count_calls(monkeypatch, fused)
    got = _run_op(x, weight, bias, phi, npn.HardConcrete(), seed, offset, True, dy)
    assert calls == {"gated_linear": 1, "gated_linear_backward": 1}
    expected = _oracle(x, weight, bias, phi, npn.HardConcrete(), seed, offset, True, dy)
    for name, actual, want in zip(NAMES, got, expected):
        _close(actual, want, dtype, name)


def test_op_paired(fused, monkeypatch):
    """The doubled ARM batch: two fused forwards (z, then z'), one backward of the first half."""
    gate, (m, k, n) = npn.Binary(3.0), (5, 24, 11)
    x, weight, bias, phi = _inputs(m, k, n, torch.float32)
    x2 = torch.cat([x, x])
    seed, offset = _rng()
    dy = torch.randn(2 * m, n)
    calls = _count_calls(monkeypatch, fused)
    y, dx, dw, db, dphi = _run_op(x2, weight, bias, phi, gate, seed, offset, True, dy, paired=True)
    assert calls == {"gated_linear": 2, "gated_linear_backward": 1}
    y1, dx1, dw1, db1, _ = _oracle(x, weight, bias, phi, gate, seed, offset, True, dy[:m])
    y2 = _oracle(x, weight, bias, phi, gate, seed, offset, True, dy[m:], antithetic=True)[0]
    _close(y, torch.cat([y1, y2]), torch.float32, "y")
    _close(dx, torch.cat([dx1, torch.zeros_like(dx1)]), torch.float32, "dx")
    _close(dw, dw1, torch.float32, "dW")
    _close(db, db1, torch.float32, "db")
    assert torch.count_nonzero(dphi) == 0


def test_op_takes_the_vendor_path_above_the_threshold(fused, monkeypatch):
    """More rows than FUSE_MAX_ROWS: W ⊙ z once and torch.mm, with the same results."""
    monkeypatch.setattr(fused, "FUSE_MAX_ROWS", 4)
    x, weight, bias, phi = _inputs(5, 13, 6, torch.float32)
    seed, offset = _rng()
    dy = torch.randn(5, 6)
    calls = _count_calls(monkeypatch, fused)
    unfused = _run_op(x, weight, bias, phi, npn.HardConcrete(), seed, offset, True, dy)
    assert calls == {"gated_linear": 0, "gated_linear_backward": 0}
    monkeypatch.setattr(fused, "FUSE_MAX_ROWS", 5)
    fused_results = _run_op(x, weight, bias, phi, npn.HardConcrete(), seed, offset, True, dy)
    for name, a, b in zip(NAMES, fused_results, unfused):
        torch.testing.assert_close(a, b, msg=lambda s, name=name: f"{name}: {s}")
    assert calls == {"gated_linear": 1, "gated_linear_backward": 1}
