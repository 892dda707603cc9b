"""npn.ops.gated_linear: every backend against the oracle composition with the stream's gates
(float32 here; the other dtypes are in tests/test_dtypes.py)."""

from __future__ import annotations

import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels.ops.gated_linear import function as gated_linear_function
from npn_kernels.ops.gated_linear import reference
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import TOL, backend_params, poisoned

# example noise (one gate per example and unit) exists for "in"/"out" gates only
GRANULARITY_NOISE = [(g, n) for g in reference.GRANULARITIES for n in ("batch", "example") if (g, n) != ("weight", "example")]
BACKENDS = backend_params("reference", "cpu", "triton")
GATES = {"binary": npn.Binary(5.0), "binary_inf": npn.Binary(float("inf")), "hc": npn.HardConcrete()}
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _rng():
    return int(torch.randint(0, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())


def _oracle(x, weight, bias, phi, gate, granularity, seed, offset, training, noise, paired):
    """y and the gradients (first half when paired) from the composition and autograd."""
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
    y1 = reference.gated_linear(xl[:m], wl, bl, z, granularity)
    y = y1
    if paired:
        z2 = gates_reference.gates(pl, gate, u, training, batch, antithetic=True)
        y = torch.cat([y1, reference.gated_linear(xl[m:], wl, bl, z2, granularity)])
    return y.detach(), y1, leaves


def _inputs(m, k, n, granularity, dtype, closed=0.3, bias=True):
    x = torch.randn(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    b = torch.randn(n, dtype=dtype) if bias else None
    phi = torch.randn(reference.phi_shape(granularity, n, k), dtype=dtype)
    # a fraction of units firmly closed for every family (binary pi ~ 0, hard-concrete z = 0)
    phi = torch.where(torch.rand(phi.shape) < closed, torch.full_like(phi, -12.0), phi)
    return x, weight, b, phi


def _check(backend, x, weight, bias, phi, gate, granularity, *, training=True, noise="batch", paired=False):
    seed, offset = _rng()
    y_ref, y1, leaves = _oracle(x, weight, bias, phi, gate, granularity, seed, offset, training, noise, paired)
    args = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, phi)]
    with npn.backends.use(backend):
        y = npn.ops.gated_linear(*args, gate, granularity, seed=seed, offset=offset, training=training, noise=noise, paired=paired)
        rtol, atol = TOL[x.dtype]
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
        torch.testing.assert_close(got.grad, expected, rtol=rtol * 10, atol=atol * 10, msg=lambda s, name=name: f"d{name}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("m", [1, 7, 129])
def test_matches_oracle(backend, gate_name, granularity, training, m):
    x, weight, bias, phi = _inputs(m, 19, 13, granularity, torch.float32)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, training=training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_bias(backend, gate_name, granularity, training):
    x, weight, bias, phi = _inputs(7, 19, 13, granularity, torch.float32, bias=False)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, training=training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", ["binary", "hc"])
@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_example_noise(backend, gate_name, granularity, training):
    x, weight, bias, phi = _inputs(6, 21, 11, granularity, torch.float32)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity, training=training, noise="example")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity, noise", GRANULARITY_NOISE)
@pytest.mark.parametrize("halves", ["same", "different"])
@pytest.mark.parametrize("closed", [0.3, 0.9])
def test_paired_matches_two_reference_passes(backend, granularity, noise, halves, closed):
    """The first gated layer of an ARM pass sees [x; x] (the second half is computed as a correction
    of the first), deeper layers see two different halves; 90% closed units gather."""
    x, weight, bias, phi = _inputs(5, 17, 9, granularity, torch.float32, closed=closed)
    x = torch.cat([x, x if halves == "same" else torch.randn_like(x)])  # the doubled batch of the ARM objective
    _check(backend, x, weight, bias, phi, npn.Binary(3.0), granularity, noise=noise, paired=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phi_value", [1.0, 0.0], ids=["correction", "own_gemm"])
def test_paired_same_halves_takes_either_route(backend, phi_value):
    """[x; x] with "in" gates: at pi = 0.95 z' ≠ z on ~10% of the units (~6 of 67) and the second
    half is the first plus a correction over them; at pi = 0.5 z' = 1 − z, every unit changes, and
    the second half runs its own GEMM over its ~half open units instead."""
    x, weight, bias, _ = _inputs(7, 67, 9, "in", torch.float32)
    phi = torch.full((67,), phi_value)
    _check(backend, torch.cat([x, x]), weight, bias, phi, npn.Binary(3.0), "in", paired=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("halves", ["same", "different"])
def test_paired_loops_split_across_threads(backend, halves):
    """Shapes large enough that the C++ layer's loops run in several tasks: the correction's
    gathers of x1 and W (71 + 41 rows, 32 per task: one task holds rows of both), the halves'
    scaling (142x301, ~27 rows per task) and the backward's x ⊙ z (71x301)."""
    x, weight, bias, _ = _inputs(71, 301, 41, "in", torch.float32)
    phi = torch.full((301,), 1.0)  # pi = 0.95 at k = 3: the correction route for equal halves
    x = torch.cat([x, x if halves == "same" else torch.randn_like(x)])
    _check(backend, x, weight, bias, phi, npn.Binary(3.0), "in", paired=True)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("halves", ["same", "different"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_paired_dtypes(backend, granularity, halves, dtype):
    """Paired batches in every dtype the CPU layer takes (its loop scales each half by its gates)."""
    x, weight, bias, phi = _inputs(6, 67, 9, granularity, dtype)
    x = torch.cat([x, x if halves == "same" else torch.randn_like(x)])
    _check(backend, x, weight, bias, phi, npn.Binary(3.0), granularity, paired=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_name", ["binary", "hc"])
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_mostly_closed_units_are_skipped_exactly(backend, gate_name, granularity):
    """90% closed: the gathered (compacted) GEMM path, with exact zero gradients of closed units."""
    x, weight, bias, phi = _inputs(33, 40, 30, granularity, torch.float32, closed=0.9)
    _check(backend, x, weight, bias, phi, GATES[gate_name], granularity)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
def test_three_dim_and_non_contiguous_x(backend, granularity):
    seed, offset = _rng()
    weight = torch.randn(10, 15)
    phi = torch.randn(reference.phi_shape(granularity, 10, 15))
    x3 = torch.randn(15, 4, 3).permute(1, 2, 0)  # [4, 3, 15], not contiguous
    with npn.backends.use(backend):
        y = npn.ops.gated_linear(x3, weight, None, phi, npn.HardConcrete(), granularity, seed=seed, offset=offset)
        y2 = npn.ops.gated_linear(x3.reshape(12, 15), weight, None, phi, npn.HardConcrete(), granularity, seed=seed, offset=offset)
    assert y.shape == (4, 3, 10)
    torch.testing.assert_close(y.reshape(12, 10), y2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_empty_batch(backend):
    x, weight, _, phi = _inputs(0, 9, 5, "in", torch.float32)
    x.requires_grad_(True)
    with npn.backends.use(backend):
        y = npn.ops.gated_linear(x, weight, None, phi, npn.Binary(), "in", seed=1, offset=0)
        assert y.shape == (0, 5)
        y.sum().backward()
    assert x.grad.shape == (0, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_gates_as_sample_gates(backend):
    """weight gates: y equals x (W ⊙ sample_gates(phi))ᵀ for the same (seed, offset)."""
    x, weight, bias, phi = _inputs(4, 12, 6, "weight", torch.float64)
    seed, offset = _rng()
    with npn.backends.use(backend):
        z = npn.ops.sample_gates(phi, npn.HardConcrete(), seed=seed, offset=offset)
        y = npn.ops.gated_linear(x, weight, bias, phi, npn.HardConcrete(), "weight", seed=seed, offset=offset)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight * z, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("halves", ["same", "different"])
def test_paired_op_returns_its_noise(backend, granularity, halves):
    """A paired call with batch noise returns the noise u [P] of its gates as aux (ARM's
    surrogate reads it instead of drawing it again): the stream's bits at (seed, offset)."""
    x, weight, bias, phi = _inputs(6, 9, 5, granularity, torch.float32)
    x = torch.cat([x[:3], x[:3]]) if halves == "same" else x
    seed, offset = _rng()
    seed_t, offset_t = rng_tensors(seed, offset, "cpu")
    with npn.backends.use(backend):
        _, aux, _ = gated_linear_function.gated_linear_op(x, weight, bias, phi, seed_t, offset_t, 0, [3.0], granularity,
                                                          True, False, True, False, [])  # fmt: skip
    assert aux.dtype == torch.float32 and aux.shape == (phi.numel(),)
    assert torch.equal(aux, uniforms_reference.uniforms(phi.numel(), seed_t, offset_t))


def test_opcheck():
    x, weight, bias, phi = _inputs(4, 7, 5, "out", torch.float32)
    seed, offset = rng_tensors(3, 9, "cpu")
    for family, params in ((0, [2.0]), (1, [2 / 3, -0.1, 1.1])):
        for penalty in ([], [7.0, 0.3, 0.2]):  # with the layer's penalty as a third output
            args = (x.requires_grad_(), weight.requires_grad_(), bias, phi.requires_grad_(), seed, offset, family, params,
                    "out", True, False, False, False, penalty)  # fmt: skip
            torch.library.opcheck(torch.ops.npn.gated_linear.default, args)
    # paired (ARM): aux is the noise u [P] in float32
    x2 = torch.cat([x, x.flip(0)]).detach().requires_grad_()
    for penalty in ([], [7.0, 0.3, 0.2]):
        args = (x2, weight, bias, phi, seed, offset, 0, [2.0], "out", True, False, True, False, penalty)
        torch.library.opcheck(torch.ops.npn.gated_linear.default, args)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
def test_opcheck_kept_sample():
    """hard-concrete weight gates keeping their sample (CPU kernels): aux is s [N, K] in float32."""
    x, weight, bias, phi = _inputs(4, 7, 5, "weight", torch.bfloat16)
    seed, offset = rng_tensors(3, 9, "cpu")
    args = (x.requires_grad_(), weight.requires_grad_(), bias, phi.float().requires_grad_(), seed, offset, 1,
            [2 / 3, -0.1, 1.1], "weight", True, False, False, True, [])  # fmt: skip
    with npn.backends.use("cpu"):
        torch.library.opcheck(torch.ops.npn.gated_linear.default, args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(3, 8)}, ValueError, r"x: expected shape \[\.\.\., 7\]"),
        ({"phi": torch.randn(6)}, ValueError, r"phi: expected shape \(7,\) for granularity 'in'"),
        ({"weight": torch.randn(5, 7, dtype=torch.float64)}, TypeError, "weight: expected dtype torch.float32"),
        ({"bias": torch.randn(4)}, ValueError, r"bias: expected shape \(5,\)"),
        ({"x": torch.ones(3, 7, dtype=torch.int64)}, TypeError, "x: expected a float16"),
        ({"granularity": "rows"}, ValueError, "granularity: expected one of weight, in, out"),
        ({"noise": "sample"}, ValueError, "noise: expected 'batch' or 'example'"),
        ({"gate": 7.0}, TypeError, "gate: expected npn.Binary"),
        ({"paired": True, "x": torch.randn(3, 7)}, ValueError, "paired: needs Binary gates in training and an even"),
    ],
)
def test_bad_input(change, error, match):
    kwargs = {"x": torch.randn(3, 7), "weight": torch.randn(5, 7), "bias": torch.randn(5), "phi": torch.randn(7),
              "gate": npn.Binary(), "granularity": "in", "seed": 0, "offset": 0}
    kwargs.update(change)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        npn.ops.gated_linear(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_gathered_and_dense_paths_agree(backend, granularity, monkeypatch):
    """The same call with compaction forced on (every open fraction gathers) and off."""
    x, weight, bias, phi = _inputs(9, 24, 17, granularity, torch.float64, closed=0.5)
    results = []
    for threshold in (1.01, 0.0):
        monkeypatch.setattr(gated_linear_function, "COMPACT_BELOW", threshold)
        args = [t.clone().requires_grad_(True) for t in (x, weight, bias, phi)]
        with npn.backends.use(backend):
            y = npn.ops.gated_linear(*args, npn.HardConcrete(), granularity, seed=5, offset=2)
            y.backward(torch.ones_like(y))
        results.append([y.detach()] + [a.grad for a in args])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.ext
def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """A forward inside `use("reference")` and its backward outside it: the backward stays on reference."""
    from npn_kernels.ops.gates import function as gates_function

    calls = []
    original = gates_function._Reference.sample_gates_backward
    monkeypatch.setattr(gates_function._Reference, "sample_gates_backward",
                        staticmethod(lambda *args: calls.append(1) or original(*args)))  # fmt: skip
    x, weight, bias, phi = _inputs(4, 9, 5, "in", torch.float32, closed=0.0)
    phi.requires_grad_(True)
    with npn.backends.use("reference"):
        y = npn.ops.gated_linear(x, weight, bias, phi, npn.HardConcrete(), "in", seed=1, offset=0)
    assert npn.backends.select("cpu") == "cpu"
    y.sum().backward()
    assert calls and phi.grad is not None


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (7, 131, 9)), (torch.bfloat16, (7, 131, 9)),
                                          (torch.float64, (7, 131, 9)), (torch.float64, (2, 1025, 2048))])  # fmt: skip
def test_kept_sample_matches_regenerated(dtype, shape):
    """The CPU kernels' hard-concrete weight gates keep s for the backward (csrc/cpu/hc_gate_mul.cpp);
    forward and all four gradients must equal, bit for bit, the path that regenerates the noise.
    131·9 gates: not a multiple of 64; 1025×2048 float64 (16.8 MB): W ⊙ z past the C++ layer's
    16 MB workspace, in a tensor of its own."""
    x, weight, bias, phi = _inputs(*shape, "weight", dtype)
    phi = phi.to(torch.float64 if dtype == torch.float64 else torch.float32)
    seed, offset = rng_tensors(5, 2**33 + 3, "cpu")
    results = []
    for keep in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, phi)]
        with npn.backends.use("cpu"):
            y, _, _ = torch.ops.npn.gated_linear(*leaves, seed, offset, 1, [2 / 3, -0.1, 1.1], "weight", True, False, False, keep,
                                                 [])
            grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        results.append((y, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("n", [1, 63, 64, 1000])
def test_kept_sample_launchers_overwrite_every_element(n):
    """hc_gate_mul / hc_gate_mul_backward write every element (NaN-poisoned outputs) and agree with
    gate_mul / gate_mul_backward bit for bit; a bad s is refused by name."""
    from npn_kernels import _ext

    a, phi, grad = torch.randn(n), torch.randn(n) * 3, torch.randn(n)
    seed, offset = rng_tensors(9, 77, "cpu")
    params = [2 / 3, -0.1, 1.1]
    out, s = poisoned((n,)), poisoned((n,))
    _ext.ops.hc_gate_mul(a, phi, seed, offset, params, out, s)
    expected = poisoned((1, n, 1))
    _ext.ops.gate_mul(a.view(1, n, 1), phi, seed, offset, 1, params, True, False, False, expected)
    assert torch.equal(out, expected.view(n)) and not s.isnan().any()
    grads = [poisoned((n,)) for _ in range(3)]
    _ext.ops.hc_gate_mul_backward(grad, a, s, phi, params, *grads)
    want = [poisoned((1, n, 1)), poisoned((n,)), poisoned((1, n, 1))]
    _ext.ops.gate_mul_backward(grad.view(1, n, 1), a.view(1, n, 1), phi, seed, offset, 1, params, True, False, *want)
    for got, w in zip(grads, want):
        assert torch.equal(got, w.view(n))
    with pytest.raises(RuntimeError, match=r"s: expected a contiguous \[\d+\] CPU tensor of dtype Float"):
        _ext.ops.hc_gate_mul_backward(grad, a, s.double(), phi, params, None, None, None)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("phi_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_sample_reused_for_dphi(phi_dtype):
    """gated_linear_backward (csrc/cpu/gated_linear.cpp) writes d phi over the kept sample s when
    nothing else holds it: the C++ layer's autograd node (csrc/cpu/autograd.cpp) once it took s
    out of its saved_data. Whether the caller dropped its aux, kept it, or a second backward
    (retain_graph) has to draw s again, the gradients are the same bits as the custom op's (whose
    saved aux is always held elsewhere, also across two backwards), and an aux the caller kept is
    left as it was."""
    from npn_kernels import _ext

    x, weight, bias, phi = _inputs(6, 131, 9, "weight", torch.float32)
    phi = phi.to(phi_dtype)
    seed, offset = rng_tensors(5, 11, "cpu")
    gate = (seed, offset, 1, [2 / 3, -0.1, 1.1], "weight", True)
    # the custom op: (example, paired, keep_sample, penalty); the C++ layer: (paired, keep_sample,
    # compact_below, penalty)
    flags = {torch.ops.npn.gated_linear: (False, False, True, []), _ext.ops.gated_linear: (False, True, 0.5, [])}
    grad_y = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))

    def run(op, hold_aux=False, twice=False):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, phi)]
        y, aux, _ = op(*leaves, *gate, *flags[op])
        kept = (aux, aux.clone()) if hold_aux else None
        del aux
        grads = [torch.autograd.grad(y, leaves, grad_y, retain_graph=twice) for _ in range(2 if twice else 1)]
        return grads, kept

    with npn.backends.use("cpu"):
        (want, want_again), _ = run(torch.ops.npn.gated_linear, twice=True)
        (dropped,), _ = run(_ext.ops.gated_linear)
        (held,), (aux, aux_before) = run(_ext.ops.gated_linear, hold_aux=True)
        (first, second), _ = run(_ext.ops.gated_linear, twice=True)
    assert torch.equal(aux, aux_before)
    for got in (want_again, dropped, held, first, second):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
def test_doubled_batch_vouches_for_its_halves_only_while_unmodified():
    """npn_ext.doubled builds [x; x] and records it, so that a paired C++ layer on that very batch
    takes its halves as equal without comparing them. Once the batch is written in place (its
    version moved), the layer compares them again and computes the halves it now holds."""
    from npn_kernels import _ext

    x, weight, bias, phi = _inputs(6, 29, 7, "in", torch.float32)
    seed, offset = _rng()
    gate = npn.Binary(3.0)

    def layer(batch):
        with npn.backends.use("cpu"):
            return npn.ops.gated_linear(batch, weight, bias, phi, gate, "in", seed=seed, offset=offset, paired=True)

    def oracle(batch):
        return _oracle(batch, weight, bias, phi, gate, "in", seed, offset, True, "batch", True)[0]

    rtol, atol = TOL[torch.float32]
    xx = _ext.ops.doubled(x)
    assert torch.equal(xx, torch.cat([x, x]))
    torch.testing.assert_close(layer(xx), oracle(xx.clone()), rtol=rtol * 10, atol=atol * 10)
    xx[6:].mul_(2)  # the second half changes in place: the record no longer vouches for it
    torch.testing.assert_close(layer(xx), oracle(xx.clone()), rtol=rtol * 10, atol=atol * 10)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("closed", [0.3, 0.9], ids=["most open", "gathered"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "non-contiguous x"])
def test_paired_from_one_batch_is_the_doubled_batch(granularity, closed, strided):
    """paired = 2 (csrc/cpu/npn_cpu.h's Pairing): x [m, K] stands for [x; x], y has 2m rows. The
    output, penalty and gradients are the bits of paired = 1 on torch.cat([x, x]) (within the
    float32 tolerance for a non-contiguous x, whose GEMM may sum in another order), dx being the
    first half's (the second half of a paired batch gets none), and the penalty those of a plain
    call; other values are refused."""
    from npn_kernels import _ext

    x, weight, bias, phi = _inputs(5, 37, 11, granularity, torch.float32, closed=closed)
    if strided:
        x = x.t().contiguous().t()  # the same values, column-major
        assert not x.is_contiguous()
    seed, offset = rng_tensors(3, 7, "cpu")
    coef = [float(11 if granularity == "in" else 37), 1e-3, 0.05]
    grad_y = torch.randn(10, 11, generator=torch.Generator().manual_seed(6))
    results = []
    for paired, batch in ((2, x), (1, torch.cat([x, x]))):
        leaves = [t.clone().requires_grad_() for t in (batch, weight, bias, phi)]
        y, u, p = _ext.ops.gated_linear(*leaves, seed, offset, 0, [5.0], granularity, True, paired, False, 0.5, coef)
        grads = torch.autograd.grad((y, p), leaves, (grad_y, torch.tensor(1.7)))
        results.append([y, u, p, grads[0][:5], *grads[1:]])
    rtol, atol = TOL[torch.float32]
    for a, b in zip(*results):
        if strided:  # a column-major x may take another GEMM path (another summation order)
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        else:
            assert torch.equal(a, b)
    # the penalty does not depend on the batch: the plain call's bits
    plain = _ext.ops.gated_linear(x, weight, bias, phi, seed, offset, 0, [5.0], granularity, True, 0, False, 0.5, coef)
    assert torch.equal(results[0][2], plain[2])
    with pytest.raises(RuntimeError, match="paired: expected 0 .plain., 1 .a paired batch. or 2"):
        _ext.ops.gated_linear(x, weight, bias, phi, seed, offset, 0, [5.0], granularity, True, 3, False, 0.5, [])


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
def test_kept_x_z_is_bounded():
    """The autograd node keeps x ⊙ z for dW only while x is within the workspace's 16 MB: the saved
    tensors of a small "in" layer hold x and x ⊙ z, those of a 1024x4100 float32 batch (16.8 MB)
    x alone (the backward writes x ⊙ z again), and a call without grad saves nothing."""
    from npn_kernels import _ext

    def saved_shapes(m, k, grad=True):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        x, phi = torch.randn(m, k), torch.full((k,), 0.4, requires_grad=True)
        weight = torch.randn(3, k, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(grad):
            seed, offset = rng_tensors(1, 0, "cpu")
            _ext.ops.gated_linear(x, weight, None, phi, seed, offset, 0, [7.0], "in", True, 0, False, 0.8, [])
        return shapes

    assert saved_shapes(8, 37).count((8, 37)) == 2
    assert saved_shapes(1024, 4100).count((1024, 4100)) == 1
    assert saved_shapes(8, 37, grad=False) == []


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("batch", ["plain", "paired", "paired equal halves"])
@pytest.mark.parametrize("closed", [0.3, 0.9], ids=["most open", "gathered"])
def test_backward_from_what_the_forward_kept(granularity, batch, closed):
    """The C++ layer's autograd node keeps its penalty's q = ||W_g||² per unit and, for "in" gates,
    the first half's x ⊙ z from the forward for the backward (csrc/cpu/gated_linear.cpp,
    gated_linear_keeping): the gradients are the bits of gated_linear_backward, which computes
    both again. Plain and paired batches, equal halves (the first layer's route), and gates
    closed enough that the layer gathers its open units (nothing to keep)."""
    from npn_kernels import _ext

    x, weight, bias, phi = _inputs(8, 37, 11, granularity, torch.float32, closed=closed)
    if batch == "paired equal halves":
        x = torch.cat([x[:4], x[:4]])
    seed, offset = rng_tensors(3, 7, "cpu")
    coef = [float(11 if granularity == "in" else 37), 1e-3, 0.05]  # group size, l0, weight decay
    paired = batch != "plain"
    args = (seed, offset, 0, [5.0], granularity, True, paired, False, 0.5, coef)
    gen = torch.Generator().manual_seed(6)
    grad_y, grad_p = torch.randn(8, 11, generator=gen), torch.tensor(1.7)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, phi)]
    y, _, p = _ext.ops.gated_linear(*leaves, *args)
    got = torch.autograd.grad((y, p), leaves, (grad_y, grad_p))
    _, aux, _ = _ext.ops.gated_linear(x, weight, bias, phi, *args)
    want = _ext.ops.gated_linear_backward(grad_y, grad_p, x, weight, bias, phi, seed, offset, aux, 0, [5.0],
                                          granularity, True, paired, False, 0.5, coef, [True] * 4)  # fmt: skip
    for name, a, b in zip(("x", "weight", "bias", "phi"), got, want):
        assert torch.equal(a, b), f"d{name}"


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
def test_kept_wz_reused_only_while_the_workspace_holds_it():
    """The backward of a HardConcrete weight layer multiplies dy by the W ⊙ z its forward left in
    the thread's workspace (csrc/cpu/gated_linear.cpp, Workspace::holds) only while it is still
    there: after a second layer of the same shape wrote its own W ⊙ z there, or an "in" layer its
    x ⊙ z, each backward writes W ⊙ z again. Every gradient equals, bit for bit, that of a
    forward followed at once by its backward."""
    from npn_kernels import _ext

    seed, offset = rng_tensors(5, 11, "cpu")
    hc = (seed, offset, 1, [2 / 3, -0.1, 1.1])
    gen = torch.Generator().manual_seed(4)
    layers = [_inputs(6, 40, 24, "weight", torch.float32) for _ in range(2)]
    x_in, w_in, b_in, phi_in = _inputs(24, 40, 10, "in", torch.float32, closed=0.0)
    grad_y = torch.randn(6, 24, generator=gen)

    def forward(inputs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = _ext.ops.gated_linear(*leaves, *hc, "weight", True, False, True, 0.5, [])[0]
        return y, leaves

    def alone(inputs):
        y, leaves = forward(inputs)
        return torch.autograd.grad(y, leaves, grad_y)

    with npn.backends.use("cpu"):
        want = [alone(inputs) for inputs in layers]
        # the second layer's forward takes the workspace before the first layer's backward
        (y0, l0), (y1, l1) = forward(layers[0]), forward(layers[1])
        got = [torch.autograd.grad(y0, l0, grad_y), torch.autograd.grad(y1, l1, grad_y)]
        # an "in" layer's x ⊙ z [24, 40] over the same bytes as W ⊙ z [24, 40]
        y0, l0 = forward(layers[0])
        _ext.ops.gated_linear(x_in, w_in, b_in, phi_in, *hc[:2], 0, [7.0], "in", True, False, False, 0.5, [])
        got.append(torch.autograd.grad(y0, l0, grad_y))
    for g, w in zip(got, [*want, want[0]]):
        for a, b in zip(g, w):
            assert torch.equal(a, b)
