"""`npn::gated_linear`: the gated linear layer as a custom op with a fake implementation and autograd.

The forward and backward are written here over the gate kernels of the selected backend
(`npn_kernels.ops.gates.apply.LayerGates`; pure PyTorch for the reference backend) and the
vendor GEMM (torch.mm → MKL/oneDNN on the CPU, cuBLAS on CUDA); the oracle they are tested
against is reference.py under autograd. On the cpu backend, structured batch-noise gates and
hard-concrete weight gates run in the C++ layer instead (csrc/cpu/gated_linear.cpp, the same
structure): eager calls reach its C++ autograd node directly, traced calls through these ops.
Nothing stores noise: the backward regenerates the gates from (seed, offset), except that the
C++ layer's hard-concrete weight gates keep their sample s [N, K] from the forward
(keeps_sample: the backward is then one streaming pass).

Paired mode (ARM, DESIGN 4.3): x is the doubled batch [x; x]; the first half sees z, the second
half ARM's antithetic z' = 1[u > 1 − pi] from the same u. The backward gives gradients of the
first half only and spends no work on the second (its rows of dx are zero).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from npn_kernels import _ext, backends
from npn_kernels.ops import eager
from npn_kernels.gates import BINARY, check_gate, compute_dtype
from npn_kernels.ops.gated_linear import reference
from npn_kernels.ops.gates.apply import LayerGates, check_tensor, halves, register_layer_autograd
from npn_kernels.ops.gates.function import check_finite, check_flag, l0_penalty_backward_op, l0_penalty_op
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms.function import uniforms_op

# Structured binary gates skip closed units by gathering the open ones into a smaller GEMM when
# fewer than this fraction is open. The gather copies the open columns of x and W (M·k + N·k
# elements) and the result must be scattered back; measured on 2 cores at M=512, 2048→2048 the
# gathered GEMM wins from about 80% open down (see bench/NOTES.md, row C3).
COMPACT_BELOW = 0.8


# ---- forward and backward over the gate kernels and the vendor GEMM ---------------------------


def _open_units(z: Tensor) -> Tensor | None:
    """Indices of the nonzero gates when few enough are open to gather them, else None.

    nonzero() sizes its result on the host: one device-to-host sync per call (~10 µs on a GPU).
    """
    idx = z.nonzero().view(-1)
    return idx if _gathers(idx.numel(), z.numel()) else None


def _gathers(open_units: int, units: int) -> bool:
    """Whether a structured layer gathers its open units into a smaller GEMM (COMPACT_BELOW)."""
    return open_units < COMPACT_BELOW * units


def _fused(x: Tensor):
    """The fused weight-gate GEMMs of triton.py when the backend is Triton and x [M, K] is small
    enough for them (see its FUSE_MAX_ROWS), else None."""
    if backends.select(x.device) != "triton":
        return None
    from npn_kernels.ops.gated_linear import triton as fused

    return fused if fused.fuses(x) else None


def _kernel_forward_half(g: LayerGates, x, weight, bias, granularity, hard_concrete, antithetic):
    """(y [M, N], aux or None) for one half; aux: y before the gates for hard-concrete "out" gates."""
    m, n = x.shape[0], weight.shape[0]
    if granularity == "weight" and (fused := _fused(x)) is not None:
        y = x.new_empty(m, n)
        fused.gated_linear(x, weight, bias, g.phi, *g.args, antithetic, y)
        return y, None
    if granularity == "weight":
        return torch.nn.functional.linear(x, g.mul(weight.contiguous().view(1, -1, 1), antithetic).view_as(weight), bias), None
    if g.example:
        if granularity == "in":
            xz = g.mul(x.contiguous().view(m, x.shape[1], 1), antithetic).view_as(x)
            return torch.nn.functional.linear(xz, weight, bias), None
        y_pre = torch.nn.functional.linear(x, weight, bias)
        return g.mul(y_pre.view(m, n, 1), antithetic).view(m, n), y_pre if hard_concrete else None
    z = g.vector(antithetic).to(x.dtype)
    if granularity == "in":
        return _in_forward(x, weight, bias, z), None
    y_pre = _out_pre(x, weight, bias, _open_units(z))
    return y_pre * z, y_pre if hard_concrete else None


def _same_halves(x: Tensor) -> bool:
    """Whether both halves of a paired batch are equal: the first gated layer of an ARM pass sees
    [x; x] itself. Read on the CPU only (one pass over x: ~40 µs at 256×784, 2 cores); on a GPU
    the answer would cost a host sync per call."""
    m = x.shape[0] // 2
    return x.device.type == "cpu" and torch.equal(x[:m], x[m:])


def _paired_same_input(g: LayerGates, x1, weight, bias, granularity, z):
    """y [2m, N] of a paired batch whose halves are both x1 [m, K], z [2, P]: the second half is the
    first plus a correction. "in": y' = y + (x1 ⊙ (z' − z)) Wᵀ over the units where z' ≠ z only
    (about 2·min(pi, 1 − pi) of them: 10% at pi = 0.95, so the 784→300 layer of row C4 runs one
    128×78×300 GEMM instead of 128×784×300), unless the second half's own GEMM takes fewer
    columns (near pi = 0.5, z' ≈ 1 − z). "out": y' = (x1 Wᵀ + b) ⊙ z', one GEMM for both."""
    m = x1.shape[0]
    if granularity == "out":
        idx = _open_units(z[0] + z[1])  # rows open in either half
        y_pre = _out_pre(x1, weight, bias, idx)
        return (y_pre.unsqueeze(0) * z.unsqueeze(1)).view(2 * m, -1)
    y = x1.new_empty(2 * m, weight.shape[0])
    _in_forward(x1, weight, bias, z[0], out=y[:m])
    d = z[1] - z[0]
    changed = d.nonzero().view(-1)
    units, opened = z.shape[1], int(z[1].count_nonzero())
    if changed.numel() < (opened if _gathers(opened, units) else units):
        torch.addmm(y[:m], x1.index_select(1, changed) * d[changed], weight.index_select(1, changed).t(), out=y[m:])
    else:
        _in_forward(x1, weight, bias, z[1], out=y[m:])
    return y


def _in_forward(x, weight, bias, z, out=None):
    """(x ⊙ z) Wᵀ + b for "in" gates z [K], gathering the open units when few are open."""
    idx = _open_units(z)
    if idx is not None:
        x, weight, z = x.index_select(1, idx), weight.index_select(1, idx), z[idx]
    xz = x * z
    if out is None:
        return torch.nn.functional.linear(xz, weight, bias)
    return torch.mm(xz, weight.t(), out=out) if bias is None else torch.addmm(bias, xz, weight.t(), out=out)


def _out_pre(x, weight, bias, idx):
    """x Wᵀ + b [M, N] for "out" gates; only the rows idx of W (the others are zero) when given."""
    if idx is None:
        return torch.nn.functional.linear(x, weight, bias)
    y_pre = x.new_zeros(x.shape[0], weight.shape[0])
    y_pre[:, idx] = torch.nn.functional.linear(x, weight.index_select(0, idx), None if bias is None else bias[idx])
    return y_pre


def _paired_structured(g: LayerGates, x, weight, bias, granularity):
    """y of a whole paired batch for structured batch-noise gates, or None (then each half runs
    alone). Halves that are equal share the work (_paired_same_input); otherwise one GEMM over
    x ⊙ [z; z'] or (x Wᵀ + b) ⊙ [z; z'] (one 256-row GEMM instead of two of 128 and a cat: ~0.1 ms
    per layer at 784→300), unless either half is sparse enough to compact."""
    z = torch.stack([g.vector(False), g.vector(True)]).to(x.dtype)  # [2, P]
    m = x.shape[0] // 2
    if _same_halves(x):
        return _paired_same_input(g, x[:m], weight, bias, granularity, z)
    if any(_open_units(half) is not None for half in z):
        return None
    if granularity == "in":
        return torch.nn.functional.linear((x.view(2, m, -1) * z.unsqueeze(1)).view_as(x), weight, bias)
    y = torch.nn.functional.linear(x, weight, bias)
    return y.view(2, m, -1).mul_(z.unsqueeze(1)).view_as(y)


def _kernel_forward(x, weight, bias, phi, seed, offset, family, params, granularity, training, example, paired):
    g = LayerGates(phi, seed, offset, family, params, training, example)
    hard_concrete = family != BINARY
    if paired and not example and granularity != "weight":
        y = _paired_structured(g, x, weight, bias, granularity)
        if y is not None:
            return y, None  # paired gates are Binary: no aux
    parts = [_kernel_forward_half(g, xh, weight, bias, granularity, hard_concrete, anti) for xh, anti in halves(x, paired)]
    y = torch.cat([p[0] for p in parts]) if paired else parts[0][0]
    aux = parts[0][1]  # the second half of a paired batch gets no gradient: its y_pre is not needed
    return y, aux


def _kernel_backward(grad_y, x, weight, bias, phi, seed, offset, aux, family, params, granularity, training, example, paired,
                     needs):  # fmt: skip
    """(dx, dW, db, dphi) of the first half (the whole batch unless paired); None where not needed."""
    need_x, need_w, need_b, want_phi = needs
    need_phi = want_phi and family != BINARY  # binary gates: no pathwise gradient, a zero d phi
    m_all = x.shape[0]
    m = m_all // 2 if paired else m_all
    dy, x1 = grad_y[:m], x[:m]
    g = LayerGates(phi, seed, offset, family, params, training, example)
    dx = dw = dphi = None
    dy_bias = dy  # the gradient the bias sees: dy, or that of y before the gates (dy ⊙ z) for "out" gates
    if granularity == "weight" and (fused := _fused(x1)) is not None:
        dx, dw, dphi = (torch.empty(t.shape, dtype=t.dtype, device=t.device) if need else None
                        for t, need in ((x1, need_x), (weight, need_w), (g.phi, need_phi)))  # fmt: skip
        fused.gated_linear_backward(dy, x1, weight, g.phi, *g.args, dx, dw, dphi)
    elif granularity == "weight":
        w = weight.contiguous().view(1, -1, 1)
        gw = (dy.t() @ x1).view(1, -1, 1) if (need_w or need_phi) else torch.zeros_like(w)
        dw, dphi, wz = g.mul_backward(gw, w, need_w, need_phi, need_x)
        dw = None if dw is None else dw.view_as(weight)
        dx = None if wz is None else dy @ wz.view_as(weight)
    elif example:
        if granularity == "in":
            dxz = dy @ weight
            k = x1.shape[1]  # explicit sizes: a view of 0 rows as [0, -1, 1] is ambiguous
            dx, dphi, xz = g.mul_backward(dxz.view(m, k, 1), x1.contiguous().view(m, k, 1), need_x, need_phi, need_w)
            dx = None if dx is None else dx.view_as(x1)
            dw = None if xz is None else dy.t() @ xz.view_as(x1)
        else:
            a = aux if aux is not None else dy  # binary: y_pre is not needed (no d phi)
            n = dy.shape[1]
            dy_pre, dphi, _ = g.mul_backward(dy.contiguous().view(m, n, 1), a.contiguous().view(m, n, 1), True, need_phi,
                                             False)  # fmt: skip
            dy_pre = dy_bias = dy_pre.view_as(dy)
            dx = dy_pre @ weight if need_x else None
            dw = dy_pre.t() @ x1 if need_w else None
    else:
        z = g.vector(False).to(x.dtype)
        idx = _open_units(z)
        if granularity == "in":
            if idx is None:
                dxz = dy @ weight if (need_x or need_phi) else None  # a first layer needs neither
                dx = dxz * z if need_x else None
                dw = dy.t() @ (x1 * z) if need_w else None
                dphi = g.vector_backward((dxz * x1).sum(0)) if need_phi else None
            else:
                zo, xo = z[idx], x1.index_select(1, idx)
                dxz = dy @ weight.index_select(1, idx) if (need_x or need_phi) else None  # [M, open]
                if need_x:
                    dx = x1.new_zeros(x1.shape)
                    dx[:, idx] = dxz * zo
                if need_w:
                    dw = weight.new_zeros(weight.shape)
                    dw[:, idx] = dy.t() @ (xo * zo)
                if need_phi:
                    dphi = g.vector_backward(z.new_zeros(z.shape).index_put_((idx,), (dxz * xo).sum(0)))
        else:
            dy_pre = dy_bias = dy * z
            if idx is None:
                dx = dy_pre @ weight if need_x else None
                dw = dy_pre.t() @ x1 if need_w else None
            else:
                dyo = dy_pre.index_select(1, idx)
                dx = dyo @ weight.index_select(0, idx) if need_x else None
                if need_w:
                    dw = weight.new_zeros(weight.shape)
                    dw[idx] = dyo.t() @ x1
            dphi = g.vector_backward((dy * aux).sum(0)) if need_phi else None
    db = dy_bias.sum(0) if need_b and bias is not None else None
    if dx is not None and paired:
        dx = torch.cat([dx, dx.new_zeros(m_all - m, dx.shape[1])])
    if want_phi:
        dphi = torch.zeros_like(phi) if dphi is None else dphi.view_as(phi)
    return dx, dw, db, dphi


# ---- the custom ops ---------------------------------------------------------------------------


def _aux_shape(x: Tensor, weight: Tensor, phi: Tensor, family: int, granularity: str, keep_sample: bool,
               paired_batch: bool) -> tuple[int, ...]:  # fmt: skip
    """The op's second output: y before the gates for hard-concrete "out" gates (d phi needs
    it), the sample s [N, K] with keep_sample, the noise u [P] of a paired call with batch noise
    (ARM's surrogate reads it: npn.objective need not draw it again), else nothing."""
    if keep_sample:
        return tuple(weight.shape)
    if paired_batch:
        return (phi.numel(),)
    return (x.shape[0], weight.shape[0]) if granularity == "out" and family != BINARY else (0,)


def _aux_dtype(x: Tensor, phi: Tensor, keep_sample: bool, paired_batch: bool) -> torch.dtype:
    """s is kept in phi's math type (float64 for float64 phi, else float32) so the backward's z
    is the forward's; u is the stream's float32."""
    if paired_batch:
        return torch.float32
    return compute_dtype(phi.dtype) if keep_sample else x.dtype


def keeps_sample(device: torch.device, family: int, granularity: str, training: bool, backend: str | None = None) -> bool:
    """Whether a call keeps the hard-concrete weight-gate sample for its backward (CPU kernels,
    csrc/cpu/hc_gate_mul.cpp): the backward then reads s back, 0.3 ms per 1M gates on 2 cores
    where regenerating it took 2.7 ms; s costs 4 bytes per weight until the backward.
    ``backend``: backends.select(device) when the caller has it."""
    backend = backend or backends.select(device)
    return granularity == "weight" and family != BINARY and training and backend == "cpu"


def _in_cpp(device: torch.device, granularity: str, example: bool, keep_sample: bool, backend: str | None = None) -> bool:
    """Whether the C++ layer of the cpu backend (csrc/cpu/gated_linear.cpp) runs the call:
    structured gates with batch noise, or hard-concrete weight gates that keep their sample."""
    backend = backend or backends.select(device)
    return backend == "cpu" and (keep_sample or (granularity != "weight" and not example))


def cpp_layer(x, weight, bias, phi, seed, offset, family, params, granularity, training, paired, keep_sample, penalty):
    """(y, aux, penalty) from the C++ layer; with its autograd node when an input needs a gradient (eager)."""
    return _ext.ops.gated_linear(x, weight, bias, phi, seed, offset, family, params, granularity, training, paired,
                                 keep_sample, COMPACT_BELOW, penalty)  # fmt: skip


# ---- the layer's penalty, for the composition (the C++ layer has its own) ---------------------


def _penalty_weight(weight: Tensor, granularity: str, weight_decay: float) -> Tensor | None:
    """W as l0_penalty takes it for the layer's gates: phi-shaped ("weight") or grouped [A, P, B]
    ("in": [N, K, 1], "out": [1, N, K]); None without weight decay (W is then not in the penalty)."""
    if weight_decay == 0:
        return None
    n, k = weight.shape
    return weight if granularity == "weight" else weight.reshape((n, k, 1) if granularity == "in" else (1, n, k))


def _penalty(weight, bias, phi, family, params, granularity, penalty: list[float]) -> Tensor:
    """The layer's penalty (GatedModule.penalty: l0_penalty + weight_decay/2·||b||²), 0-dim."""
    group_size, l0, weight_decay = penalty
    w = _penalty_weight(weight, granularity, weight_decay)
    p = l0_penalty_op.impl(phi, w, family, params, group_size, l0, weight_decay, False)
    if bias is not None and weight_decay:
        p = p + bias.to(p.dtype).square().sum() * (weight_decay / 2)
    return p


def _penalty_backward(grad, weight, bias, phi, family, params, granularity, penalty: list[float], grads):
    """grads (dx, dW, db, dphi) with the penalty's gradient added to those that are wanted (not None)."""
    group_size, l0, weight_decay = penalty
    dx, dw, db, dphi = grads
    w = _penalty_weight(weight, granularity, weight_decay)
    pen_dphi, pen_dw = l0_penalty_backward_op.impl(grad, phi, w, family, params, group_size, l0, weight_decay, False)
    if dw is not None and w is not None:
        dw = dw + pen_dw.view_as(weight)
    if db is not None and weight_decay:
        db = db + (bias.to(grad.dtype) * (grad * weight_decay)).to(bias.dtype)
    if dphi is not None:
        dphi = dphi + pen_dphi.view_as(phi)
    return dx, dw, db, dphi


@eager.custom_op("npn::gated_linear")
def gated_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    seed: Tensor,
    offset: Tensor,
    family: int,
    params: list[float],
    granularity: str,
    training: bool,
    example: bool,
    paired: bool,
    keep_sample: bool,
    penalty: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N], aux, p) for x [M, K], weight [N, K], bias [N] or None; aux: see _aux_shape; p:
    the layer's penalty (0-dim) when penalty = [group_size, l0, weight_decay], else empty [0]."""
    if _in_cpp(x.device, granularity, example, keep_sample):
        return cpp_layer(x, weight, bias, phi, seed, offset, family, params, granularity, training, paired, keep_sample,
                          penalty)  # fmt: skip
    if keep_sample:
        raise ValueError("keep_sample: only the cpu backend's C++ layer keeps the hard-concrete sample")
    y, aux = _kernel_forward(x, weight, bias, phi, seed, offset, family, params, granularity, training, example, paired)
    if paired and not example:
        aux = uniforms_op.impl(phi.numel(), seed, offset)
    elif aux is None:
        aux = y.new_empty(_aux_shape(x, weight, phi, family, granularity, keep_sample, False))
    p = _penalty(weight, bias, phi, family, params, granularity, penalty) if penalty else phi.new_empty(0)
    return y, aux, p


@gated_linear_op.register_fake
def _(x, weight, bias, phi, seed, offset, family, params, granularity, training, example, paired, keep_sample, penalty):
    paired_batch = paired and not example
    aux = x.new_empty(_aux_shape(x, weight, phi, family, granularity, keep_sample, paired_batch),
                      dtype=_aux_dtype(x, phi, keep_sample, paired_batch))  # fmt: skip
    p = phi.new_empty((), dtype=compute_dtype(phi.dtype)) if penalty else phi.new_empty(0)
    return x.new_empty(x.shape[0], weight.shape[0]), aux, p


@eager.custom_op("npn::gated_linear_backward")
def gated_linear_backward_op(
    grad_y: Tensor,
    grad_penalty: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    seed: Tensor,
    offset: Tensor,
    aux: Tensor,
    family: int,
    params: list[float],
    granularity: str,
    training: bool,
    example: bool,
    paired: bool,
    keep_sample: bool,
    penalty: list[float],
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, dphi) of the output's and (grad_penalty) the penalty's gradient; an input that
    needs no gradient gets an empty [0] tensor."""
    if _in_cpp(x.device, granularity, example, keep_sample):
        return _ext.ops.gated_linear_backward(grad_y, grad_penalty, x, weight, bias, phi, seed, offset, aux, family,
                                              params, granularity, training, paired, keep_sample, COMPACT_BELOW,
                                              penalty, needs)  # fmt: skip
    grads = _kernel_backward(grad_y.contiguous(), x, weight, bias, phi, seed, offset, aux if aux.dim() == 2 else None,
                             family, params, granularity, training, example, paired, needs)  # fmt: skip
    if grad_penalty is not None and penalty:
        grads = _penalty_backward(grad_penalty, weight, bias, phi, family, params, granularity, penalty, grads)
    return tuple(t.new_empty(0) if g is None else g for t, g in zip((x, weight, x, phi), grads))


@gated_linear_backward_op.register_fake
def _(grad_y, grad_penalty, x, weight, bias, phi, seed, offset, aux, family, params, granularity, training, example,
      paired, keep_sample, penalty, needs):  # fmt: skip
    shapes = (x.shape, weight.shape, (weight.shape[0],) if bias is not None else (0,), phi.shape)
    # dphi in phi's dtype, which may differ from x's (float32 phi, bfloat16 activations)
    return tuple(t.new_empty(shape if need else (0,)) for t, shape, need in zip((x, x, x, phi), shapes, needs))


register_layer_autograd(gated_linear_op, gated_linear_backward_op, penalty=True)


def _native(x, weight, bias, phi, seed, offset, family, params, granularity, training, example, paired, keep_sample,
            penalty):  # fmt: skip
    """An eager call the C++ layer runs, forward and backward (its autograd node is C++); else None."""
    if not _in_cpp(x.device, granularity, example, keep_sample):
        return None
    return cpp_layer(x, weight, bias, phi, seed, offset, family, params, granularity, training, paired, keep_sample,
                      penalty)  # fmt: skip


gated_linear_op.register_native(_native)


# ---- public function --------------------------------------------------------------------------


def gated_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    phi: Tensor,
    gate,
    granularity: str,
    *,
    seed,
    offset,
    training: bool = True,
    noise: str = "batch",
    paired: bool = False,
) -> Tensor:
    """A linear layer whose weights, inputs or outputs are gated (DESIGN 2): y [..., N].

    x [..., K]; weight [N, K]; bias [N] or None; phi: [N, K] ("weight"), [K] ("in") or [N]
    ("out"), any float dtype. The gates are exactly those `npn.ops.sample_gates` draws for the
    same (seed, offset): batch noise draws phi.numel() noise elements, example noise ("in"/"out"
    only) one per row of x and unit, row-major [rows, units]. paired (Binary gates in training):
    x's rows are a doubled batch [x; x]; the second half uses ARM's antithetic gates from the same
    noise and gets no gradient. Gradients flow to x, weight, bias and (hard-concrete) phi.
    """
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight, x.dtype, x.device)
    if bias is not None:
        bias = check_tensor("bias", bias, x.dtype, x.device)
    phi = check_tensor("phi", phi, device=x.device)
    gate = check_gate(gate)
    training, paired = check_flag("training", training), check_flag("paired", paired)
    if granularity not in reference.GRANULARITIES:
        raise ValueError(f"granularity: expected one of {', '.join(reference.GRANULARITIES)}, got {granularity!r}")
    if noise not in ("batch", "example"):
        raise ValueError(f"noise: expected 'batch' or 'example', got {noise!r}")
    if noise == "example" and granularity == "weight":
        raise ValueError("noise: 'example' needs granularity 'in' or 'out' (one gate per example and unit)")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape [..., {k}] (in_features of weight), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    expected = reference.phi_shape(granularity, n, k)
    if tuple(phi.shape) != expected:
        raise ValueError(f"phi: expected shape {expected} for granularity {granularity!r}, got {tuple(phi.shape)}")
    if paired and (gate.family != BINARY or not training or x.reshape(-1, k).shape[0] % 2):
        raise ValueError("paired: needs Binary gates in training and an even number of rows (the doubled batch)")
    seed_t, offset_t = rng_tensors(seed, offset, x.device)
    return layer_forward(x, weight, bias, phi, gate, granularity, seed_t, offset_t, training, noise, paired)[0]


def layer_forward(x, weight, bias, phi, gate, granularity, seed, offset, training, noise, paired, penalty=None):
    """(y [..., N], p, u): gated_linear on arguments already checked (a gated module's own,
    checked when it was built; x's dtype and device by the module); with ``penalty`` =
    (group_size, l0, weight_decay) the layer's penalty p computed in the same op (0-dim; else
    None): its gradient is added into the layer's own dW and d phi; u: the noise [P] (float32)
    a paired call with batch noise drew its gates from, else None. seed and offset: int64
    tensors on x's device. Checked here: x's last dim, and phi's values where the C++ layer does
    not check them.
    """
    k, shape = weight.shape[1], x.shape
    if len(shape) < 1 or shape[-1] != k:
        raise ValueError(f"x: expected shape [..., {k}] (in_features of weight), got {tuple(shape)}")
    example, family, params, device = noise == "example", gate.family, list(gate.params), x.device
    backend = backends.select(device)
    keep = keeps_sample(device, family, granularity, training, backend)
    in_cpp = _in_cpp(device, granularity, example, keep, backend)
    coef = [] if penalty is None else list(map(float, penalty))
    rows = x if len(shape) == 2 else x.reshape(-1, k)
    # every module call: straight to the C++ layer where gated_linear_op would send it. Each
    # Python step here costs ~1-2 us on the CI machine; this function was ~20 us per call over
    # the op itself (2026-11-25), for ~25 us of op at the sizes where that matters (row C4).
    if in_cpp and not eager.traced((x, weight, bias, phi, seed, offset)):
        y, aux, p = cpp_layer(rows, weight, bias, phi, seed, offset, family, params, granularity, training, paired,
                               keep, coef)  # fmt: skip
    else:
        if not in_cpp:
            check_finite("phi", phi)  # the C++ layer checks phi itself
        y, aux, p = gated_linear_op(rows, weight, bias, phi, seed, offset, family, params, granularity, training, example,
                                    paired, keep, coef)  # fmt: skip
    # a view of an output that needs a gradient records a view node (~5 us): only for [..., K] x
    y = y if len(shape) == 2 else y.view(*shape[:-1], weight.shape[0])
    return y, (p if penalty is not None else None), (aux if paired and not example else None)
