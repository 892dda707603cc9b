"""npn.objective: ARM in one paired pass (or two with BatchNorm), hard-concrete, k = 0 and k = inf."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn
from npn_kernels.ops.gated_linear import reference as linear_reference
from npn_kernels.ops.gates import reference as gates_reference
from tests.helpers import assert_close, backend_params

INF = float("inf")


def _loss(out, target):
    return (torch.tanh(out) - target).square().mean()


def _tiny(k, noise="batch"):
    """GatedLinear 3 -> 1 with "in" gates and fixed weights."""
    m = npn.GatedLinear(3, 1, gate=npn.Binary(k), noise=noise)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.5, -2.0, 0.7]]))
        m.bias.fill_(0.3)
        m.phi.copy_(torch.tensor([0.2, -0.15, 0.05]))
    return m


def _exact_grad(m, x, target, rows_gated):
    """d E[f(z)] / d phi by enumerating every gate vector (one per row when rows_gated)."""
    phi = m.phi.detach().clone().requires_grad_()
    pi = torch.sigmoid(m.gate.k * phi)
    n = x.shape[0] if rows_gated else 1
    expectation = 0
    for bits in itertools.product([0.0, 1.0], repeat=3 * n):
        z = torch.tensor(bits).view(n, 3)
        prob = torch.where(z > 0, pi, 1 - pi).prod()
        y = F.linear(x * z, m.weight.detach(), m.bias.detach())
        expectation = expectation + prob * _loss(y, target)
    return torch.autograd.grad(expectation, phi)[0]


# (the two-pass path computes the same estimator: test_value_weights_and_arm_gradient checks it exactly)
@pytest.mark.parametrize("noise, rows, steps", [("batch", 2, 1000), ("example", 2, 800)], ids=["batch", "example"])
def test_arm_is_unbiased(noise, rows, steps):
    m = _tiny(2.0, noise)
    x = torch.tensor([[1.0, 0.5, -1.0], [0.3, -0.8, 2.0]])[:rows]
    target = torch.tensor([[0.2], [-0.4]])[:rows]
    exact = _exact_grad(m, x, target, noise == "example")
    grads = torch.empty(steps, 3)
    for i in range(steps):
        m.phi.grad = None
        npn.objective(m, _loss, x, target).backward()
        grads[i] = m.phi.grad
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(steps)
    assert ((mean - exact).abs() <= 5 * se + 1e-6).all(), (mean, exact, se)
    assert int(m.offset) == steps * npn.ops.counters_for(3 * (rows if noise == "example" else 1))


K7 = npn.Binary(7.0)


def _mlp(gate=K7, l0=0.05, batchnorm=False):
    layers = [npn.GatedLinear(6, 5, gate=gate, l0=l0, weight_decay=0.01)]
    layers += [nn.BatchNorm1d(5)] if batchnorm else []
    layers += [nn.ReLU(), npn.GatedLinear(5, 3, gate=gate, granularity="out", l0=l0)]
    return nn.Sequential(*layers)


def _manual_arm(model, x, target):
    """(f(z), f(z'), [u per gated layer]) of the next step, from the stream and the composition."""
    gated = [m for m in model if isinstance(m, npn.nn.GatedModule)]
    us = [npn.ops.uniforms(m.phi.numel(), seed=m.seed, offset=m.offset).view(m.phi.shape) for m in gated]

    def run(antithetic):
        h = x
        for layer in model:
            if isinstance(layer, npn.nn.GatedModule):
                u = us[gated.index(layer)]
                pi = torch.sigmoid(layer.gate.k * layer.phi.detach())
                z = (u > 1 - pi) if antithetic else (u < pi)
                h = linear_reference.gated_linear(h, layer.weight.detach(), layer.bias.detach(), z.float(), layer.granularity)
            else:
                h = layer(h)
        return F.cross_entropy(h, target)

    with torch.no_grad():
        return run(False), run(True), us


@pytest.mark.parametrize("batchnorm", [False, True], ids=["paired", "batchnorm"])
def test_value_weights_and_arm_gradient(batchnorm):
    model = _mlp(batchnorm=batchnorm)
    plain = copy.deepcopy(model)
    x, target = torch.randn(8, 6), torch.randint(0, 3, (8,))
    f, f2, us = _manual_arm(copy.deepcopy(model), x, target)

    loss = npn.objective(model, F.cross_entropy, x, target)
    reference_loss = F.cross_entropy(plain(x), target) + npn.penalty(plain)
    assert_close(loss.detach(), reference_loss.detach())
    assert_close(loss.detach(), f + npn.penalty(plain).detach())
    loss.backward()
    reference_loss.backward()
    # the weights get the first half's (a plain forward's) gradient; the state advances as a plain forward's
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if not name.endswith("phi"):
            assert_close(p.grad, q.grad)
    for a, b in zip(model.buffers(), plain.buffers()):
        assert torch.equal(a, b)
    # phi: ARM's k·(f(z') − f(z))·(u − 1/2) plus the penalty's gradient
    gated = [(m, p) for m, p in zip(model, plain) if isinstance(m, npn.nn.GatedModule)]
    for (m, p), u in zip(gated, us):
        assert_close(m.phi.grad, 7.0 * (f2 - f) * (u - 0.5) + p.phi.grad)


def test_average_gives_mean_of_both_passes():
    model = _mlp(l0=0.0)
    x, target = torch.randn(8, 6), torch.randint(0, 3, (8,))
    f, f2, _ = _manual_arm(copy.deepcopy(model), x, target)
    loss = npn.objective(model, F.cross_entropy, x, target, average=True)
    assert_close(loss.detach(), (f + f2) / 2 + npn.penalty(model).detach())


@pytest.mark.parametrize("granularity", ["weight", "in", "out"])
def test_hard_concrete_pathwise_gradients(granularity):
    gate = npn.HardConcrete()
    m = npn.GatedLinear(6, 4, gate=gate, granularity=granularity, l0=0.1, weight_decay=0.01)
    with torch.no_grad():
        m.phi.normal_(0.0, 1.0)
    x, target = torch.randn(5, 6), torch.randn(5, 4)
    leaves = [t.detach().clone().requires_grad_() for t in (m.weight, m.bias, m.phi)]
    w, b, phi = leaves
    u = npn.ops.uniforms(phi.numel(), seed=m.seed, offset=0).view(phi.shape)
    z = gates_reference.gates(phi, gate, u, True)
    expected = _loss(linear_reference.gated_linear(x, w, b, z, granularity), target)
    view = phi.view({"weight": (4, 6), "in": (1, 6), "out": (4, 1)}[granularity])
    expected = expected + npn.ops.l0_penalty(view, gate, group_size=24 / phi.numel(), weight=w, l0=0.1, weight_decay=0.01)
    expected = expected + 0.005 * b.square().sum()
    expected.backward()
    loss = npn.objective(m, _loss, x, target)
    loss.backward()
    assert_close(loss.detach(), expected.detach())
    for p, leaf in zip((m.weight, m.bias, m.phi), leaves):
        assert_close(p.grad, leaf.grad)


def test_k_zero_is_dropout_and_leaves_phi_alone():
    m = npn.GatedLinear(8, 4, gate=npn.Binary(0.0), l0=0.3)
    x, target = torch.randn(16, 8), torch.randn(16, 4)
    u = npn.ops.uniforms(8, seed=m.seed, offset=0)
    expected = _loss(F.linear(x * (u < 0.5).float(), m.weight, m.bias), target) + 0.3 * 4 * 8 * 0.5
    loss = npn.objective(m, _loss, x, target)
    assert_close(loss.detach(), expected.detach())
    loss.backward()
    assert torch.equal(m.phi.grad, torch.zeros(8))


def test_k_inf_is_deterministic_without_nan():
    m = _mlp(gate=npn.Binary(INF))
    with torch.no_grad():
        m[0].phi.copy_(torch.tensor([1e4, -1e4, 0.0, 1e-3, -1e-3, 3 / 7]))
    x, target = torch.randn(8, 6), torch.randint(0, 3, (8,))
    values = []
    for _ in range(3):
        m.zero_grad()
        loss = npn.objective(m, F.cross_entropy, x, target)
        loss.backward()
        values.append(loss.detach())
        for p in m.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert torch.equal(m[0].phi.grad, torch.zeros(6))
    assert values[0] == values[1] == values[2] and torch.isfinite(values[0])


def _train(model, optimizer, batches, budget=None):
    for x, target in batches:
        optimizer.zero_grad()
        loss = npn.objective(model, F.cross_entropy, x, target)
        (loss if budget is None else loss + budget.loss()).backward()
        optimizer.step()
        if budget is not None:
            budget.step()


def _resumable():
    """Both gate families, both layer kinds, batch and example noise, hibernating units to wake."""
    return nn.Sequential(
        npn.GatedConv2d(2, 4, 3, padding=1, noise="example", init_active=2, l0=0.01),  # Binary, "out" gates
        nn.ReLU(),
        nn.Flatten(),
        npn.GatedLinear(36, 5, gate=npn.HardConcrete(), granularity="weight", l0=0.01, weight_decay=0.01),
        nn.ReLU(),
        npn.GatedLinear(5, 3, gate=K7, l0=0.05),
    )


def _epochs(parts, batches, val, epochs):
    """NPN's loop: per epoch the schedule's k, two steps, and in stage 2 the expansion rule."""
    model, optimizer, budget, schedule, expander = parts
    woken = []
    for epoch in epochs:
        schedule.step(epoch)
        model.train()
        _train(model, optimizer, batches[2 * epoch : 2 * epoch + 2], budget)
        if schedule.stage1 <= epoch < schedule.stage2:
            model.eval()
            with torch.no_grad():
                woken.append(expander.step(F.cross_entropy(model(val[0]), val[1])))
    return woken


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_resume_from_checkpoint_is_bit_exact(backend):
    """Stopped after epoch 1 (mid stage 2, k = 1) and resumed into fresh objects from a
    weights_only checkpoint, training ends bit for bit where the uninterrupted run does."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 2, 3, 3), torch.randint(0, 3, (8,))) for _ in range(8)]
    val = torch.randn(8, 2, 3, 3), torch.randint(0, 3, (8,))

    def fresh():
        model = _resumable()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        budget = npn.BudgetController(model, 0.5, lr=0.05)
        # the schedule has no state: step(epoch) sets k from the epoch alone
        schedule = npn.PlasticitySchedule(model, stage1=1, stage2=3, k=1.0)
        return model, optimizer, budget, schedule, npn.Expander(model, optimizer=optimizer)

    with npn.backends.use(backend):
        torch.manual_seed(1)
        whole = fresh()
        start = copy.deepcopy(whole[0].state_dict())
        woken = _epochs(whole, batches, val, range(4))

        torch.manual_seed(1)
        first = fresh()
        woken_first = _epochs(first, batches, val, range(2))
        model, optimizer, budget, _, expander = first
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "budget": budget.state_dict(),
                    "expander": expander.state_dict()}, buf)  # fmt: skip
        buf.seek(0)
        torch.manual_seed(2)  # a different seed: everything must come from the checkpoint
        resumed = fresh()
        checkpoint = torch.load(buf, weights_only=True)
        resumed_model, resumed_optimizer, resumed_budget, _, resumed_expander = resumed
        resumed_model.load_state_dict(checkpoint["model"])
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
        resumed_budget.load_state_dict(checkpoint["budget"])
        resumed_expander.load_state_dict(checkpoint["expander"])
        assert resumed_expander.best == expander.best < INF
        woken_resumed = _epochs(resumed, batches, val, range(2, 4))

    assert woken_first[0] == {"0": [2]}  # the expansion (and its optimizer-state reset) ran before the stop
    assert woken == woken_first + woken_resumed
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, whole[0].state_dict()[name]), name
    assert torch.equal(resumed_budget.lambdas, whole[2].lambdas)
    for name in ("0.phi", "5.phi"):  # the Binary gates learned: ARM's gradients reached phi
        assert not torch.equal(start[name], whole[0].state_dict()[name]), name


def test_bad_loss():
    with pytest.raises(ValueError, match="loss_fn"):
        npn.objective(_mlp(), lambda out, t: out, torch.randn(4, 6), None)


def _net(kind, granularity, noise):
    if kind == "linear":
        return nn.Sequential(npn.GatedLinear(6, 5, granularity=granularity, noise=noise), nn.Tanh(), nn.Linear(5, 3))
    return nn.Sequential(
        npn.GatedConv2d(2, 4, 3, padding=1, groups=2, granularity=granularity, noise=noise),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("granularity, noise", [("weight", "batch"), ("in", "batch"), ("out", "batch"), ("in", "example"), ("out", "example")])
def test_replayed_antithetic_pass_matches_paired_op(kind, granularity, noise):
    """The two-pass path rebuilds z' by the torch composition; the paired op draws it in the kernel:
    both must give the same f(z'), hence the same ARM gradient."""
    paired = _net(kind, granularity, noise)
    two_pass = copy.deepcopy(paired)
    x = torch.randn(4, 6) if kind == "linear" else torch.randn(4, 2, 4, 4)
    target = torch.randint(0, 3, (4,))
    npn.objective(paired, F.cross_entropy, x, target).backward()
    npn.objective(two_pass, F.cross_entropy, x, target, average=True).backward()
    assert_close(two_pass[0].phi.grad, paired[0].phi.grad)
    assert torch.equal(two_pass[0].offset, paired[0].offset)


def test_paired_pass_error_says_the_batch_was_doubled():
    """A layer rejecting x inside ARM's paired pass names 2·B rows: a note says why."""
    model = nn.Sequential(npn.GatedLinear(5, 3))
    offset = model[0].offset.clone()
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 5\].*\(8, 6\)") as info:
        npn.objective(model, F.cross_entropy, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    assert any("paired pass" in note and "8 rows for a batch of 4" in note for note in info.value.__notes__)
    assert torch.equal(model[0].offset, offset)


class _Wrapped(nn.Module):
    """``inner`` behind a forward of its own: not an nn.Sequential, so npn.objective hands it
    [inputs; inputs]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _reused_first():
    first = npn.GatedLinear(6, 6, gate=K7, l0=0.05, weight_decay=0.01)
    return nn.Sequential(first, nn.ReLU(), first, nn.Tanh(), npn.GatedLinear(6, 3, gate=K7, l0=0.05))


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("case", ["mlp", "first layer called again", "first layer in evaluation", "inputs need grad"])
def test_sequential_first_layer_doubles_the_batch(backend, case):
    """In ARM's paired pass the first gated layer of an nn.Sequential takes the batch itself and
    its output doubles it (PAIRED_FROM_ONE: the C++ layer never writes [x; x]). The loss, every
    gradient (the inputs' too) and the counters are the bits of the same step of the same layers
    behind a forward of their own, which get [inputs; inputs]; a first layer that the model calls
    again gets the paired rows the second time, and one in evaluation mode doubles its output."""
    torch.manual_seed(5)
    base = _reused_first() if case == "first layer called again" else _mlp()
    if case == "first layer in evaluation":
        base[0].eval()
    x, target = torch.randn(7, 6), torch.randint(0, 3, (7,))
    results, rows_seen = [], []
    for model in (copy.deepcopy(base), _Wrapped(copy.deepcopy(base))):
        seq = model if isinstance(model, nn.Sequential) else model.inner
        seen = []
        seq[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        xs = x.clone().requires_grad_(case == "inputs need grad")
        with npn.backends.use(backend):
            for _ in range(2):
                loss = npn.objective(model, F.cross_entropy, xs, target)
                loss.backward()
        grads = [p.grad for p in seq.parameters()] + ([xs.grad] if xs.requires_grad else [])
        results.append([loss.detach(), *grads, *(m.offset for m in seq if isinstance(m, npn.nn.GatedModule))])
        rows_seen.append(seen)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    calls = 2 if case == "first layer called again" else 1
    assert rows_seen[0] == [7, 14][:calls] * 2  # the Sequential's first layer got the batch itself
    assert rows_seen[1] == [14] * calls * 2


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
def test_paired_batch_from_doubled_matches_cat(monkeypatch):
    """On the cpu backend the paired batch of a model that is not an nn.Sequential comes from
    npn_ext.doubled, whose halves the first layer takes as equal without comparing them: the loss
    and every gradient are the bits of the same step on torch.cat's batch (compared)."""
    import importlib

    objective_module = importlib.import_module("npn_kernels.training.objective")
    x, target = torch.randn(6, 6), torch.randint(0, 3, (6,))
    results = []
    for doubled in (objective_module._doubled, lambda inputs: torch.cat([inputs, inputs])):
        monkeypatch.setattr(objective_module, "_doubled", doubled)
        torch.manual_seed(3)
        model = _Wrapped(_mlp())
        with npn.backends.use("cpu"):
            loss = npn.objective(model, F.cross_entropy, x, target)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_arm_surrogate_nodes_agree(monkeypatch):
    """ARM's surrogate has a C++ node (eager calls on the cpu backend) and a Python Function (other
    backends, torch.compile): the same phi gradients bit for bit, in phi's dtype, for several
    layers with different k, summed draws (halves) and an upstream gradient other than 1; the
    value is the sum of the penalties as torch adds them, each of which gets the upstream gradient
    in its dtype; and npn.objective takes the C++ node on the cpu backend."""
    import importlib

    from npn_kernels import _ext

    objective_module = importlib.import_module("npn_kernels.training.objective")
    gen = torch.Generator().manual_seed(4)
    shapes, dtypes = [(5,), (3, 4), (7,)], [torch.float32, torch.float64, torch.bfloat16]
    us = [torch.rand(s, generator=gen) for s in shapes]
    ks, halves, diff = [7.0, 3.5, 0.25], [0.5, 1.5, 0.5], torch.tensor(-0.37)
    grads = []
    for node in ("cpp", "python"):
        phis = [torch.zeros(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)]
        penalties = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
                     torch.tensor(1e-8, requires_grad=True)]  # fmt: skip
        if node == "cpp":
            out = _ext.ops.arm_surrogate(diff, ks, halves, phis, us, penalties)
        else:
            out = objective_module._ArmSurrogate.apply(diff, tuple(ks), tuple(halves), *phis, *us, *penalties)
        expected = penalties[0] + penalties[1] + penalties[2]
        assert out.dtype == torch.float64 and torch.equal(out, expected) and out.data_ptr() != expected.data_ptr()
        grads.append(torch.autograd.grad(out, phis + penalties, torch.tensor(2.5, dtype=torch.float64)))
        assert [g.dtype for g in grads[-1][3:]] == [p.dtype for p in penalties]
        assert all(g.item() == 2.5 for g in grads[-1][3:])
        assert objective_module._arm(diff, ks, halves, phis, us, []).item() == 0
    for a, b, d, u, k, h in zip(*grads, dtypes, us, ks, halves):
        assert a.dtype == d and torch.equal(a, b)
        assert_close(a.float(), (k * 2.5 * float(diff) * (u - h)).to(d).float())
    # float32 terms only (the objective's usual ones, which the C++ node sums itself): torch's
    # adds in order, whose rounding here depends on the order
    terms = [torch.tensor(v) for v in (2.3, 1e8, -1e8, 1e-8)]
    expected = terms[0] + terms[1] + terms[2] + terms[3]
    cpp, python = _ext.ops.arm_surrogate(diff, [], [], [], [], terms), objective_module._ArmSurrogate.apply(diff, (), (), *terms)
    for out in (cpp, python):
        assert out.dtype == torch.float32 and torch.equal(out, expected)

    calls = []
    original = objective_module._ArmSurrogate.apply
    monkeypatch.setattr(objective_module._ArmSurrogate, "apply", lambda *args: calls.append(args) or original(*args))
    model = _mlp()
    with npn.backends.use("cpu"):
        npn.objective(model, F.cross_entropy, torch.randn(4, 6), torch.randint(0, 3, (4,))).backward()
    assert not calls and model[0].phi.grad is not None
    with npn.backends.use("reference"):
        npn.objective(model, F.cross_entropy, torch.randn(4, 6), torch.randint(0, 3, (4,))).backward()
    assert len(calls) == 1
