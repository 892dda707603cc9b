"""Rows C2, C3 and L0: the gated linear layer forward + backward against dense and peer baselines;
and, on a GPU, the fused Triton weight-gate kernels against W ⊙ z + cuBLAS (their threshold)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import npn_kernels as npn
from bench.registry import Case, Target, grads, npn_variants, register

HC = npn.HardConcrete()


def _dense(m, k, n):
    x = torch.randn(m, k, requires_grad=True)
    layer = torch.nn.Linear(k, n)
    g = torch.randn(m, n)
    return x, layer, g


# ---- C2: hard-concrete weight gates ---------------------------------------------------------


def _c2_shape(small):
    return (16, 64, 48) if small else (128, 1024, 1024)


def _c2(small):
    m, k, n = _c2_shape(small)
    x, layer, g = _dense(m, k, n)
    w, b = layer.weight, layer.bias
    phi = torch.full((n, k), 2.0).add_(torch.randn(n, k) * 0.01).requires_grad_()  # Louizos' init: mostly open
    inputs = (x, w, b, phi)

    def composition():
        """torch.rand + the formula of DESIGN 2.2 op by op + F.linear on W ⊙ z."""
        u = torch.rand(n, k).clamp_(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + phi) / HC.beta)
        z = torch.clamp(s * (HC.zeta - HC.gamma) + HC.gamma, 0, 1)
        return grads(F.linear(x, w * z, b), inputs, g)

    def gated():
        return grads(npn.ops.gated_linear(x, w, b, phi, HC, "weight", seed=7, offset=0), inputs, g)

    variants = {"dense nn.Linear": lambda: grads(layer(x), (x, w, b), g), "torch composition": composition}
    return npn_variants(variants, gated)


register(
    Case(
        name="gated_linear",
        row="C2",
        description="HardConcrete weight gates fwd+bwd, M=128, 1024->1024, vs dense and the torch composition",
        baseline="dense nn.Linear",
        make=_c2,
        targets=(Target("cpu", "<=", 1.3), Target("cpu", "<=", 1 / 1.3, versus="torch composition")),
    )
)


# ---- the fused weight-gate kernels against W ⊙ z + cuBLAS, around FUSE_MAX_ROWS (GPU) -------


@contextlib.contextmanager
def _fuse_max_rows(limit):
    """Forces ops/gated_linear/triton.py's choice: fused kernels for M <= limit."""
    from npn_kernels.ops.gated_linear import triton as fused

    saved, fused.FUSE_MAX_ROWS = fused.FUSE_MAX_ROWS, limit
    try:
        yield
    finally:
        fused.FUSE_MAX_ROWS = saved


def _weight_paths(small):
    """fwd+bwd at M = 16 ... 1024 rows, bf16 4096→4096: dense, and on a GPU both Triton paths
    (on a CPU only dense, at the small shapes: there is nothing to compare).

    FUSE_MAX_ROWS (128) predicts: fused faster up to M = 128 (one block of rows), W ⊙ z +
    cuBLAS faster from M = 256 on.
    """
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    small = small or not cuda
    k = n = 256 if small else 4096
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype).requires_grad_()
    b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    phi = torch.full((n, k), 2.0, device=device, dtype=dtype).requires_grad_()
    fused = cuda and npn.backends.available()["triton"]
    variants = {}
    for m in (16, 128) if small else (16, 128, 256, 1024):
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(m, n, device=device, dtype=dtype)
        variants[f"dense M={m}"] = lambda x=x, g=g: grads(F.linear(x, w, b), (x, w, b), g)
        for path, limit in (("fused", m), ("W*z+cuBLAS", 0)) if fused else ():

            def run(x=x, g=g, limit=limit):
                with npn.backends.use("triton"), _fuse_max_rows(limit):
                    return grads(npn.ops.gated_linear(x, w, b, phi, HC, "weight", seed=7, offset=0), (x, w, b, phi), g)

            variants[f"{path} M={m}"] = run
    return variants


register(
    Case(
        name="gated_linear_weight",
        row="",
        description="HardConcrete weight gates fwd+bwd, bf16 4096->4096, M=16..1024: fused Triton vs W*z+cuBLAS (GPU)",
        baseline="dense M=128",
        make=_weight_paths,
    )
)


# ---- C3: binary "in" gates, 90% closed ------------------------------------------------------


def _c3(small):
    m, k, n = (32, 128, 96) if small else (512, 2048, 2048)
    x, layer, g = _dense(m, k, n)
    w, b = layer.weight, layer.bias
    open_ = torch.rand(k) < 0.1
    phi = torch.where(open_, 40 / 7, -40 / 7).requires_grad_()  # pi = sigmoid(±40): 10% open
    inputs = (x, w, b, phi)

    def gated():
        return grads(npn.ops.gated_linear(x, w, b, phi, npn.Binary(7.0), "in", seed=7, offset=0), inputs, g)

    return npn_variants({"dense nn.Linear": lambda: grads(layer(x), (x, w, b), g)}, gated)


register(
    Case(
        name="gated_linear_in",
        row="C3",
        description="Binary 'in' gates, 90% closed, fwd+bwd, M=512, 2048->2048, vs dense",
        baseline="dense nn.Linear",
        make=_c3,
        targets=(Target("cpu", "<=", 0.35),),
    )
)


# ---- L0: hard-concrete "in" gates + penalty against Louizos et al.'s L0Dense -------------------


class L0DenseBaseline(torch.nn.Module):
    """The computation of Louizos et al.'s `L0Dense` in training (local_rep=False: one gate per
    input feature per forward, applied to the weight's rows), re-written here as a baseline."""

    def __init__(self, k, n, temperature=2 / 3, prior_prec=1.0, lamba=0.1):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.randn(k, n) / math.sqrt(k))  # [in, out], as theirs
        self.bias = torch.nn.Parameter(torch.zeros(n))
        self.qz_loga = torch.nn.Parameter(torch.randn(k) * 1e-2)
        self.temperature, self.prior_prec, self.lamba = temperature, prior_prec, lamba

    def forward(self, x):
        eps = torch.empty(self.qz_loga.shape).uniform_(1e-6, 1 - 1e-6)
        y = torch.sigmoid((torch.log(eps) - torch.log(1 - eps) + self.qz_loga) / self.temperature)
        mask = F.hardtanh(y * (HC.zeta - HC.gamma) + HC.gamma, min_val=0, max_val=1)
        return x.mm(mask.view(-1, 1) * self.weights).add(self.bias)

    def regularization(self):
        xn = (0 - HC.gamma) / (HC.zeta - HC.gamma)
        logits = math.log(xn) - math.log(1 - xn)
        cdf = torch.sigmoid(logits * self.temperature - self.qz_loga).clamp(1e-6, 1 - 1e-6)
        logpw_col = torch.sum(-(0.5 * self.prior_prec * self.weights.pow(2)) - self.lamba, 1)
        return torch.sum((1 - cdf) * logpw_col) - torch.sum(0.5 * self.prior_prec * self.bias.pow(2))


def _l0(small):
    m, k, n = (16, 64, 48) if small else (128, 1024, 1024)
    g = torch.randn(m, n)
    x = torch.randn(m, k, requires_grad=True)
    louizos = L0DenseBaseline(k, n)
    louizos_inputs = (x, louizos.weights, louizos.bias, louizos.qz_loga)
    one = torch.ones(())
    w = louizos.weights.detach().t().contiguous().requires_grad_()  # [out, in], as nn.Linear
    b = louizos.bias.detach().clone().requires_grad_()
    phi = louizos.qz_loga.detach().clone().requires_grad_()
    inputs = (x, w, b, phi)

    def louizos_step():
        return grads((louizos(x), -louizos.regularization()), louizos_inputs, (g, one))

    def gated():
        y = npn.ops.gated_linear(x, w, b, phi, HC, "in", seed=7, offset=0)
        penalty = npn.ops.l0_penalty(phi.view(1, k), HC, group_size=n, weight=w, l0=0.1, weight_decay=1.0)
        return grads((y, penalty + 0.5 * b.square().sum()), inputs, (g, one))

    return npn_variants({"Louizos L0Dense": louizos_step}, gated)


register(
    Case(
        name="gated_linear_l0",
        row="L0",
        description="HardConcrete 'in' gates + penalty fwd+bwd, M=128, 1024->1024, vs Louizos' L0Dense",
        baseline="Louizos L0Dense",
        make=_l0,
        targets=(Target("cpu", "<=", 1 / 1.2),),
    )
)
