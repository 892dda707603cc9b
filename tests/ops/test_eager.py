"""npn_kernels/ops/eager.py: eager calls run the ops' implementations through one
torch.autograd.Function, or the C++ layer's own autograd node (cpu backend, csrc/cpu/gated_linear.cpp);
everything that traces goes through the registered custom ops. Both paths must give the same bits:
forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import npn_kernels as npn
from npn_kernels.ops.rng import rng_tensors
from tests.helpers import backend_params

HC = [2 / 3, -0.1, 1.1]


def _layer_case(granularity, family, paired, penalty=()):
    x = torch.randn(6 if paired else 5, 9)
    if paired:
        x = torch.cat([x[:3], x[:3]])
    weight, bias = torch.randn(4, 9), torch.randn(4)
    phi = torch.randn({"weight": (4, 9), "in": (9,), "out": (4,)}[granularity])
    params = HC if family == 1 else [3.0]
    return (x, weight, bias, phi), (family, params, granularity, True, False, paired, list(penalty))


CASES = {
    "hc_weight": lambda: _layer_case("weight", 1, False),
    "hc_out": lambda: _layer_case("out", 1, False),
    "binary_in_paired": lambda: _layer_case("in", 0, True),
    "binary_weight": lambda: _layer_case("weight", 0, False),
    # the layer's penalty from the same op (npn.objective): its gradient joins dW, d phi and db
    "hc_weight_penalty": lambda: _layer_case("weight", 1, False, (1.0, 0.3, 0.2)),
    "hc_out_penalty": lambda: _layer_case("out", 1, False, (9.0, 0.3, 0.2)),
    "binary_in_paired_penalty": lambda: _layer_case("in", 0, True, (4.0, 0.3, 0.2)),
    "binary_weight_penalty": lambda: _layer_case("weight", 0, False, (1.0, 0.3, 0.2)),
}


def _grads(call, leaves, *rest):
    """[output, d leaves...] of sum(y) (+ the penalty output, when the call returns one)."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = call(*leaves, *rest)
    y = out[0] if isinstance(out, tuple) else out
    total = y.sum() + (out[2] if isinstance(out, tuple) and len(out) > 2 and out[2].dim() == 0 else 0)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [y.detach(), total.detach(), *grads], y.grad_fn


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_layer_eager_path_equals_custom_op(case, backend):
    from npn_kernels.ops.gated_linear.function import gated_linear_op, keeps_sample

    leaves, (family, params, granularity, training, example, paired, penalty) = CASES[case]()
    seed, offset = rng_tensors(3, 17, "cpu")
    with npn.backends.use(backend):
        keep = keeps_sample(leaves[0].device, family, granularity, training)
        static = (seed, offset, family, params, granularity, training, example, paired, keep, penalty)
        eager, eager_fn = _grads(gated_linear_op, leaves, *static)
        op, op_fn = _grads(torch.ops.npn.gated_linear.default, leaves, *static)
    if backend == "cpu" and not case.startswith("binary_weight"):  # the C++ layer (Binary weight gates stay in Python)
        assert "GatedLinearFunction" in eager_fn.name()
    else:
        assert type(eager_fn).__name__.startswith("EagerBackwardFor_npn_gated_linear")
    assert type(op_fn).__name__.startswith("GeneratedBackwardFor_npn_gated_linear")
    for a, b in zip(eager, op):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gate_ops_eager_path_equals_custom_op(backend):
    from npn_kernels.ops.gates.function import l0_penalty_op, sample_gates_op

    phi, weight, grouped = torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 15, 2)  # grouped: [A, P, B]
    seed, offset = rng_tensors(8, 2, "cpu")
    with npn.backends.use(backend):
        for eager_op, name, args, leaves in (
            (sample_gates_op, "sample_gates", (seed, offset, 1, HC, True, 2), [phi]),
            (l0_penalty_op, "l0_penalty", (1, HC, 1.0, 0.3, 0.2, False), [phi, weight]),
            (l0_penalty_op, "l0_penalty", (0, [2.0], 8.0, 0.3, 0.2, False), [phi, grouped]),
        ):
            eager, _ = _grads(eager_op, leaves, *args)
            op, _ = _grads(getattr(torch.ops.npn, name).default, leaves, *args)
            for a, b in zip(eager, op):
                assert torch.equal(a, b), name


def test_traced_calls_take_the_custom_op():
    """Under a dispatch mode (fake tensors here; proxy tensors in make_fx and AOTAutograd) the
    implementation, which calls compiled kernels, must not run: the op's fake does."""
    from npn_kernels.ops.gated_linear.function import gated_linear_op

    leaves, static = CASES["hc_out"]()
    seed, offset = rng_tensors(3, 17, "cpu")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (*leaves, seed, offset)]
        y, aux, p = gated_linear_op(*fake, *static[:-1], False, static[-1])
    assert y.shape == (5, 4) and aux.shape == (5, 4) and p.shape == (0,)


def test_no_grad_needed_runs_the_implementation():
    from npn_kernels.ops.gated_linear.function import gated_linear_op

    leaves, static = CASES["hc_out"]()
    y, _, _ = gated_linear_op(*leaves, *rng_tensors(3, 17, "cpu"), *static[:-1], False, static[-1])
    assert y.grad_fn is None and not y.requires_grad
