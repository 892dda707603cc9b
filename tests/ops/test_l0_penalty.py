"""npn.ops.l0_penalty (DESIGN 2.1, 2.2): every backend against a float64 oracle that groups W itself."""

from __future__ import annotations

import pytest
import torch

import npn_kernels as npn
from npn_kernels import _ext
from npn_kernels.ops.gates import reference
from tests.helpers import assert_close, backend_params, poisoned

BACKENDS = backend_params("reference", "cpu", "triton")
INF = float("inf")
GATES = [npn.Binary(7.0), npn.Binary(0.0), npn.Binary(INF), npn.HardConcrete(), npn.HardConcrete(0.5, -0.2, 1.05)]
GATE_IDS = ["binary7", "binary0", "binary_inf", "hc", "hc_other"]
# (phi's shape, W's shape or None): sizes 1, 3, 1000, 4097 and every granularity
LAYOUTS = {
    "n1": ((1,), None),
    "n3_weight": ((3,), (3,)),
    "n1000_weight": ((1000,), (1000,)),
    "n4097": ((4097,), None),
    "linear_weight": ((40, 25), (40, 25)),
    "linear_in": ((1, 25), (40, 25)),
    "linear_in_1d": ((25,), (40, 25)),
    "linear_out": ((40, 1), (40, 25)),
    "conv_out": ((8, 1, 1, 1), (8, 3, 3, 3)),
    "conv_in": ((1, 3, 1, 1), (8, 3, 3, 3)),
    # phi's dims of size > 1 not one block of the weight's: the groups are gathered, not viewed
    "conv_out_kh": ((8, 1, 3, 1), (8, 3, 3, 3)),
}
L0, WD = 0.3, 0.7
# The interpreter's numpy exp overflows to inf on sigmoid(-7e4); the result, 0, is what we want.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _oracle(phi, gate, weight, l0, weight_decay):
    """The penalty in float64, grouping W by index_add over phi's broadcast index (no sumsq path)."""
    x = phi.double()
    p = gate.probs(x)
    group_size = 1.0 if weight is None else weight.numel() / phi.numel()
    if weight is None:
        sq = torch.zeros_like(x)
    else:
        index = torch.arange(phi.numel()).view(phi.shape).expand(weight.shape).reshape(-1)
        sq = torch.zeros(phi.numel(), dtype=torch.float64).index_add(0, index, weight.double().square().reshape(-1))
        sq = sq.view(phi.shape)
    if isinstance(gate, npn.Binary):
        return l0 * group_size * p.sum() + weight_decay / 2 * (p.detach() * sq).sum()
    return (p * (l0 * group_size + weight_decay / 2 * sq)).sum()


def _penalty(backend, phi, gate, weight, l0=L0, weight_decay=WD):
    group_size = 1 if weight is None else weight.numel() // max(phi.numel(), 1)
    with npn.backends.use(backend):
        return npn.ops.l0_penalty(phi, gate, group_size=group_size, weight=weight, l0=l0, weight_decay=weight_decay)


def _check_against_oracle(backend, phi, gate, weight, l0=L0, weight_decay=WD):
    phi = phi.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    penalty = _penalty(backend, phi, gate, weight, l0, weight_decay)
    acc = torch.float64 if phi.dtype == torch.float64 else torch.float32
    assert penalty.shape == () and penalty.dtype == acc
    expected = _oracle(phi, gate, weight, l0, weight_decay)
    assert_close(penalty.double(), expected, dtype=phi.dtype)
    inputs = [phi] if weight is None else [phi, weight]
    with npn.backends.use(backend):  # the backward op dispatches when it runs
        grads = torch.autograd.grad(penalty, inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    for name, got, want, t in zip(("phi", "weight"), grads, expected_grads, inputs):
        assert got.shape == t.shape and got.dtype == t.dtype, name
        assert torch.isfinite(got).all(), name
        assert_close(got.double(), want.double(), dtype=t.dtype, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_matches_oracle(backend, gate, layout):
    phi_shape, w_shape = LAYOUTS[layout]
    phi = torch.randn(phi_shape) * 2
    weight = None if w_shape is None else torch.randn(w_shape)
    _check_against_oracle(backend, phi, gate, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["linear_weight", "linear_in", "n4097"])
def test_dtypes(backend, gate, dtype, layout):
    phi_shape, w_shape = LAYOUTS[layout]
    phi = (torch.randn(phi_shape) * 2).to(dtype)
    weight = None if w_shape is None else torch.randn(w_shape).to(dtype)
    _check_against_oracle(backend, phi, gate, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["in", "out"])
def test_group_sums_of_squares_past_float16_range(backend, gate, dtype, layout):
    """Structured gates over 300 weights near 20: ||W_g||² ~ 120000 > 65504, float16's largest
    value. The sums stay in float32 (not inf in float16, not rounded to 8 bits in bfloat16)."""
    weight = (20 + torch.rand(300, 25)).to(dtype)
    phi = (torch.randn(1, 25) if layout == "in" else torch.randn(25, 1)).to(dtype)
    weight = weight if layout == "in" else weight.t()
    assert weight.float().square().sum().item() / 25 > torch.finfo(torch.float16).max
    _check_against_oracle(backend, phi, gate, weight)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("gate", [npn.HardConcrete(), npn.HardConcrete(0.3, -0.5, 1.5), npn.Binary(2.0)])
@pytest.mark.parametrize("layout", ["linear_weight", "linear_out", "conv_in"])
def test_gradcheck(backend, gate, layout):
    phi_shape, w_shape = [(3, 4), (3, 4)] if layout == "linear_weight" else [(3, 1), (3, 4)]
    if layout == "conv_in":
        phi_shape, w_shape = (1, 2, 1, 1), (3, 2, 2, 2)
    phi = torch.randn(phi_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    group_size = weight.numel() // phi.numel()
    with npn.backends.use(backend):
        if isinstance(gate, npn.Binary):
            # sg(pi): the L2 term's phi-dependence is cut on purpose, so numerical d/dphi disagrees
            # unless weight_decay = 0; d/dW is checked with phi held fixed.
            fn_phi = lambda p: npn.ops.l0_penalty(p, gate, group_size=group_size, weight=weight.detach(), l0=L0)  # noqa: E731
            assert torch.autograd.gradcheck(fn_phi, (phi,))
            fn_w = lambda w: npn.ops.l0_penalty(  # noqa: E731
                phi.detach(), gate, group_size=group_size, weight=w, l0=L0, weight_decay=WD
            )
            assert torch.autograd.gradcheck(fn_w, (weight,))
        else:
            fn = lambda p, w: npn.ops.l0_penalty(p, gate, group_size=group_size, weight=w, l0=L0, weight_decay=WD)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (phi, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
def test_non_contiguous(backend, gate):
    phi = (torch.randn(25, 40) * 2).t()
    weight = torch.randn(25, 40).t()
    assert not phi.is_contiguous() and not weight.is_contiguous()
    _check_against_oracle(backend, phi, gate, weight)
    _check_against_oracle(backend, phi[:, ::2], gate, weight[:, ::2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
def test_extreme_phi_stays_finite(backend, gate):
    phi = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4])
    weight = torch.randn(5)
    _check_against_oracle(backend, phi, gate, weight)


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("gate", [npn.Binary(), npn.Binary(INF), npn.HardConcrete()], ids=["binary", "binary_inf", "hc"])
@pytest.mark.parametrize("weight_kind", ["none", "weight", "sumsq"])
@pytest.mark.parametrize("n", [3, 1025])
def test_launchers_overwrite_every_element(backend, gate, weight_kind, n):
    if backend == "cpu":
        kernels = _ext.ops
    else:
        from npn_kernels.ops.gates import triton as kernels
    phi = torch.randn(n) * 2
    weight = {"none": None, "weight": torch.randn(n), "sumsq": torch.rand(n) * 5}[weight_kind]
    args = (gate.family, list(gate.params), 4.0, L0, WD, weight_kind == "sumsq")
    penalty = kernels.l0_penalty(phi, weight, *args)
    expected = reference.l0_penalty(phi, gate, 4.0, weight, L0, WD, weight_kind == "sumsq")
    assert penalty.shape == () and penalty.dtype == torch.float32
    assert_close(penalty, expected)
    grad = torch.tensor(1.7)
    grad_phi = poisoned((n,))
    grad_weight = None if weight is None else poisoned((n,))
    kernels.l0_penalty_backward(grad, phi, weight, *args, grad_phi, grad_weight)
    want_phi, want_weight = reference.l0_penalty_backward(grad, phi, gate, 4.0, weight, L0, WD, weight_kind == "sumsq")
    assert_close(grad_phi, want_phi)
    if weight is not None:
        assert_close(grad_weight, want_weight)


@pytest.mark.ext
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_launchers_take_grouped_weights(gate, dtype):
    """The C++ launchers with W [A, P, B]: the penalty of q_p = sum_ab W[a, p, b]² and
    dL/dW = 2 W dL/dq_p, written over every element (poisoned outputs)."""
    phi, weight = torch.randn(67, dtype=dtype) * 2, torch.randn(3, 67, 5, dtype=dtype)
    args = (gate.family, list(gate.params), 15.0, L0, WD)
    q = weight.double().square().sum(dim=(0, 2))
    penalty = _ext.ops.l0_penalty(phi, weight, *args, False)
    expected = reference.l0_penalty(phi.double(), gate, 15.0, q, L0, WD, True)
    assert_close(penalty.double(), expected, dtype)
    grad_phi, grad_weight = poisoned((67,), dtype), poisoned((3, 67, 5), dtype)
    grad = torch.tensor(1.7, dtype=torch.float64)
    _ext.ops.l0_penalty_backward(grad, phi, weight, *args, False, grad_phi, grad_weight)
    want_phi, want_q = reference.l0_penalty_backward(grad, phi.double(), gate, 15.0, q, L0, WD, True)
    assert_close(grad_phi.double(), want_phi, dtype)
    assert_close(grad_weight.double(), 2 * weight.double() * want_q.view(1, -1, 1), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("weight_kind", ["none", "weight", "sumsq", "grouped"])
def test_opcheck(backend, gate, weight_kind):
    phi = torch.randn(4, 5, requires_grad=True)
    # grouped: W [A, P, B] with P = phi.numel(), the op sums each group's squares itself
    weight = {"none": None, "weight": torch.randn(4, 5), "sumsq": torch.rand(4, 5) * 3,
              "grouped": torch.randn(3, 20, 2)}[weight_kind]  # fmt: skip
    if weight is not None:
        weight.requires_grad_()
    args = (phi, weight, gate.family, list(gate.params), 2.0, L0, WD, weight_kind == "sumsq")
    with npn.backends.use(backend):
        torch.library.opcheck(torch.ops.npn.l0_penalty.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    phi = torch.empty(0, 4, requires_grad=True)
    with npn.backends.use(backend):
        penalty = npn.ops.l0_penalty(phi, npn.HardConcrete(), group_size=1, weight=torch.empty(0, 4), l0=L0)
    assert penalty.item() == 0.0
    with npn.backends.use(backend):
        penalty.backward()
    assert phi.grad.shape == (0, 4)


def test_no_weight_means_l0_term_only():
    phi = torch.randn(6)
    gate = npn.HardConcrete()
    got = npn.ops.l0_penalty(phi, gate, group_size=3, l0=0.5, weight_decay=10.0)
    assert_close(got, 0.5 * 3 * gate.probs(phi).sum())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"phi": torch.arange(6).view(2, 3)}, TypeError, "phi: expected a float16, bfloat16, float32 or float64"),
        ({"gate": 7.0}, TypeError, r"gate: expected npn.Binary\(...\) or npn.HardConcrete"),
        ({"group_size": 2}, ValueError, r"group_size: expected weight.numel\(\) / phi.numel\(\) = 1"),
        ({"group_size": 0}, ValueError, "group_size: expected a finite number > 0"),
        ({"group_size": True}, ValueError, "group_size: expected a finite number > 0"),
        ({"l0": -1.0}, ValueError, "l0: expected a finite number >= 0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay: expected a finite number >= 0"),
        ({"weight": torch.randn(2, 3, dtype=torch.float64)}, TypeError, "weight: expected phi's dtype and device"),
        ({"weight": torch.randn(3, 2)}, ValueError, r"phi: expected a shape that broadcasts to weight's \(3, 2\)"),
        ({"weight": [1.0]}, TypeError, "weight: expected None or a tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"phi": torch.randn(2, 3), "gate": npn.Binary(), "group_size": 1, "weight": torch.randn(2, 3)}
    args.update({"l0": 0.1, "weight_decay": 0.1})
    args.update(kwargs)
    with pytest.raises(error, match=match):
        npn.ops.l0_penalty(args.pop("phi"), args.pop("gate"), **args)
