"""`npn::gated_conv2d`: the gated conv2d layer as a custom op with a fake implementation and autograd.

Written once over the gate kernels of the selected backend (`npn_kernels.ops.gates.apply.LayerGates`) and
the vendor convolution (F.conv2d and aten.convolution_backward: oneDNN on the CPU, cuDNN on
CUDA); the oracle it is tested against is reference.py under autograd. Nothing here stores noise:
the backward regenerates the gates from (seed, offset).

- weight gates: one gate pass writes W ⊙ z, then the vendor conv. The backward takes the gradient
  of the gated weight from the vendor, then one gate pass writes dW = G ⊙ z, d phi and (for dx)
  W ⊙ z again, and the vendor gives dx from that.
- channel gates, batch noise: z [C]; with few units open only the open channels are convolved
  (gathered weight rows ("out") or input channels ("in")), closed ones are exact zeros.
- channel gates, example noise: one gate pass over x [B, C_in, H·W] ("in") or over the conv's
  output [B, C_out, H·W] ("out").

Paired mode (ARM, DESIGN 4.3): x is the doubled batch [x; x]; the first half sees z, the second
ARM's antithetic z' = 1[u > 1 − pi] from the same u, and gets no gradient and no backward work.
y and dx follow x's layout: channels-last for a channels-last x, else contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from npn_kernels.gates import BINARY, check_gate
from npn_kernels.ops import eager
from npn_kernels.ops.gated_conv2d import reference
from npn_kernels.ops.gates.apply import LayerGates, check_tensor, halves, register_layer_autograd
from npn_kernels.ops.gates.function import check_finite, check_flag
from npn_kernels.ops.rng import rng_tensors

# Structured binary gates gather the open channels into a smaller conv when fewer than this
# fraction is open. Measured on 2 cores, fwd+bwd of 32×64×32×32 → 128, 3×3, "out" and "in" alike
# (glibc keeping freed memory, see bench/cases/gated_conv2d.py; noisy to ±20%): 10% open, gathered
# 0.35× ("in": 0.7×) dense nn.Conv2d against 1.15–1.25× ungathered; 50% open, both ≈ 1.1×; 80–90%
# open, gathering is slower (oneDNN's time falls less than linearly with the channel count, and
# the gather copies and the zero-filled scatter no longer pay).
COMPACT_BELOW = 0.5

ConvArgs = tuple  # (stride [2], padding [2], dilation [2], groups), as F.conv2d takes them


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout of y and dx: channels-last for a channels-last x (that is not also contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _out_size(x_shape, weight_shape, cp: ConvArgs) -> list:
    """[B, C_out, H_out, W_out] of conv(x, weight) with F.conv2d's arithmetic."""
    stride, padding, dilation, _ = cp
    hw = [(n + 2 * p - d * (k - 1) - 1) // s + 1
          for n, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation)]  # fmt: skip
    return [x_shape[0], weight_shape[0], *hw]


def _conv(x: Tensor, w: Tensor, b: Tensor | None, cp: ConvArgs) -> Tensor:
    """F.conv2d, also when gathering found no open channel (F.conv2d rejects 0 output channels and
    returns a wrongly shaped result for 0 input channels)."""
    if w.shape[0] and w.shape[1]:
        return F.conv2d(x, w, b, *cp)
    y = x.new_zeros(_out_size(x.shape, w.shape, cp))
    return y if b is None else y + b.view(1, -1, 1, 1)


def _conv_backward(dy: Tensor, x: Tensor, w: Tensor, cp: ConvArgs, need_x: bool, need_w: bool):
    """(dx, dW) of conv(x, w) for the output gradient dy (None where not needed), one vendor call.
    dx reads only x's shape, dW only w's shape."""
    if not (w.shape[0] and w.shape[1]):  # no open channel gathered
        return x.new_zeros(x.shape) if need_x else None, w.new_zeros(w.shape) if need_w else None
    stride, padding, dilation, groups = cp
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, w, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
    )
    return dx, dw


def _open_units(z: Tensor, groups: int) -> Tensor | None:
    """Indices of the nonzero channel gates when few enough are open to gather them, else None.

    Gathering needs groups == 1 (a grouped conv needs the same channel count in every group).
    nonzero() sizes its result on the host: one device-to-host sync per call (~10 µs on a GPU,
    against ~1 ms for the C5 conv), and none on the CPU.
    """
    if groups != 1:
        return None
    idx = z.nonzero().view(-1)
    return idx if idx.numel() < COMPACT_BELOW * z.numel() else None


def _scatter(shape, dim: int, idx: Tensor, values: Tensor) -> Tensor:
    """Zeros of ``shape`` with ``values`` at ``idx`` along ``dim``: the gradients of closed units."""
    return values.new_zeros(shape).index_copy_(dim, idx, values.contiguous())


# ---- forward and backward over the gate kernels and the vendor conv ---------------------------


def _forward_half(g: LayerGates, x, weight, bias, cp, granularity, hard_concrete, antithetic, fmt):
    """(y, y before the gates for hard-concrete "out" gates or None) for one half of the batch."""
    b, c_in = x.shape[:2]
    if granularity == "weight":
        wz = g.mul(weight.contiguous().view(1, -1, 1), antithetic).view(weight.shape)
        return F.conv2d(x, wz, bias, *cp), None
    if g.example:
        if granularity == "in":
            xz = g.mul(x.contiguous().view(b, c_in, x.shape[2] * x.shape[3]), antithetic).view(x.shape)
            return F.conv2d(xz, weight, bias, *cp), None
        y_pre = F.conv2d(x, weight, bias, *cp)
        flat = y_pre.contiguous().view(b, y_pre.shape[1], y_pre.shape[2] * y_pre.shape[3])  # explicit: b may be 0
        y = g.mul(flat, antithetic).view(y_pre.shape)
        return y, y_pre if hard_concrete else None
    z = g.vector(antithetic).to(x.dtype)
    zc = z.view(1, -1, 1, 1)
    idx = _open_units(z, cp[3])
    if granularity == "in":
        if idx is None:
            return F.conv2d(x * zc, weight, bias, *cp), None
        return _conv(x.index_select(1, idx) * zc[:, idx], weight.index_select(1, idx), bias, cp), None
    if idx is None:
        y_pre = F.conv2d(x, weight, bias, *cp)
        return y_pre * zc, y_pre if hard_concrete else None
    y_open = _conv(x, weight.index_select(0, idx), None if bias is None else bias[idx], cp)
    shape = _out_size(x.shape, weight.shape, cp)

    def scatter(values):
        zeros = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        return zeros.index_copy_(1, idx, values)

    # closed channels' y before the gates is left at 0: their d phi is 0 anyway (z clamped at 0)
    y_pre = scatter(y_open) if hard_concrete else None
    return scatter(y_open.mul_(zc[:, idx])), y_pre


def _kernel_forward(x, weight, bias, phi, seed, offset, cp, family, params, granularity, training, example, paired):
    g = LayerGates(phi, seed, offset, family, params, training, example)
    fmt = _memory_format(x)
    hard_concrete = family != BINARY
    parts = [_forward_half(g, xh, weight, bias, cp, granularity, hard_concrete, anti, fmt)
             for xh, anti in halves(x, paired)]  # fmt: skip
    y = torch.cat([p[0] for p in parts]) if paired else parts[0][0]
    aux = parts[0][1]  # the second half of a paired batch gets no gradient: its y_pre is not needed
    return y.contiguous(memory_format=fmt), None if aux is None else aux.contiguous(memory_format=fmt)


def _kernel_backward(grad_y, x, weight, bias, phi, seed, offset, aux, cp, family, params, granularity, training,
                     example, paired, needs):  # fmt: skip
    """(dx, dW, db, dphi) of the first half (the whole batch unless paired); None where not needed."""
    need_x, need_w, need_b, want_phi = needs
    need_b = need_b and bias is not None
    need_phi = want_phi and family != BINARY  # binary gates: no pathwise gradient, a zero d phi
    m_all, c_in = x.shape[:2]
    m = m_all // 2 if paired else m_all
    dy, x1 = grad_y[:m], x[:m]
    c_out = dy.shape[1]
    g = LayerGates(phi, seed, offset, family, params, training, example)
    dx = dw = db = dphi = None
    dy_pre = dy  # the gradient at the conv's output (before "out" gates), for db
    if granularity == "weight":
        w = weight.contiguous().view(1, -1, 1)
        if need_w or need_phi:
            gw = _conv_backward(dy, x1, weight, cp, False, True)[1]
            dw, dphi, wz = g.mul_backward(gw.contiguous().view(1, -1, 1), w, need_w, need_phi, need_x)
        else:
            wz = g.mul(w, False) if need_x else None
        dx = _conv_backward(dy, x1, wz.view(weight.shape), cp, True, False)[0] if need_x else None
    elif example:
        if granularity == "in":
            xa = x1.contiguous().view(m, c_in, x1.shape[2] * x1.shape[3])  # explicit: B may be 0
            if need_x or need_phi:
                dxz = _conv_backward(dy, x1, weight, cp, True, False)[0]
                dx, dphi, xz = g.mul_backward(dxz.contiguous().view(xa.shape), xa, need_x, need_phi, need_w)
                dx = None if dx is None else dx.view(x1.shape)
            elif need_w:
                xz = g.mul(xa, False)
            dw = _conv_backward(dy, xz.view(x1.shape), weight, cp, False, True)[1] if need_w else None
        else:
            a = aux if aux is not None else dy  # binary: y_pre is not needed (no d phi)
            hw = dy.shape[2] * dy.shape[3]
            dy_pre, dphi, _ = g.mul_backward(dy.contiguous().view(m, c_out, hw), a.contiguous().view(m, c_out, hw),
                                             True, need_phi, False)  # fmt: skip
            dy_pre = dy_pre.view(dy.shape)
            dx, dw = _conv_backward(dy_pre, x1, weight, cp, need_x, need_w)
    else:
        z = g.vector(False).to(x.dtype)
        zc = z.view(1, -1, 1, 1)
        idx = _open_units(z, cp[3])
        if granularity == "in":
            xo, wo, zo = x1, weight, zc
            if idx is not None:
                xo, wo, zo = x1.index_select(1, idx), weight.index_select(1, idx), zc[:, idx]
            dxz, dw = _conv_backward(dy, xo * zo if need_w else xo, wo, cp, need_x or need_phi, need_w)
            dx = dxz * zo if need_x else None
            grad_z = (dxz * xo).sum((0, 2, 3)) if need_phi else None
            if idx is not None:
                dx = None if dx is None else _scatter(x1.shape, 1, idx, dx)
                dw = None if dw is None else _scatter(weight.shape, 1, idx, dw)
                grad_z = None if grad_z is None else _scatter(z.shape, 0, idx, grad_z)
            dphi = None if grad_z is None else g.vector_backward(grad_z)
        else:
            if idx is None:
                dy_pre = dy * zc
                dx, dw = _conv_backward(dy_pre, x1, weight, cp, need_x, need_w)
            else:
                dy_open = dy.index_select(1, idx).mul_(zc[:, idx])
                dx, dw = _conv_backward(dy_open, x1, weight.index_select(0, idx), cp, need_x, need_w)
                dw = None if dw is None else _scatter(weight.shape, 0, idx, dw)
                db = _scatter((c_out,), 0, idx, dy_open.sum((0, 2, 3))) if need_b else None
            dphi = g.vector_backward((dy * aux).sum((0, 2, 3))) if need_phi else None
    if need_b and db is None:
        db = dy_pre.sum((0, 2, 3))
    if dx is not None and paired:
        dx = torch.cat([dx, dx.new_zeros(m_all - m, *dx.shape[1:])])
    if dx is not None:
        dx = dx.contiguous(memory_format=_memory_format(x))
    if want_phi:
        dphi = torch.zeros_like(phi) if dphi is None else dphi.view_as(phi)
    return dx, None if dw is None else dw.contiguous().view(weight.shape), db, dphi


# ---- the custom ops ---------------------------------------------------------------------------


def _aux_shape(x: Tensor, weight: Tensor, cp: ConvArgs, family: int, granularity: str) -> list:
    """y before the gates is kept for hard-concrete "out" gates (d phi needs it), else nothing."""
    return _out_size(x.shape, weight.shape, cp) if granularity == "out" and family != BINARY else [0]


@eager.custom_op("npn::gated_conv2d")
def gated_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    seed: Tensor,
    offset: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    family: int,
    params: list[float],
    granularity: str,
    training: bool,
    example: bool,
    paired: bool,
) -> tuple[Tensor, Tensor]:
    """(y [B, C_out, H_out, W_out], aux) for x [B, C_in, H, W], weight [C_out, C_in/groups, kh, kw],
    bias [C_out] or None; aux: see _aux_shape. y and aux in x's layout (_memory_format)."""
    cp = (stride, padding, dilation, groups)
    y, aux = _kernel_forward(x, weight, bias, phi, seed, offset, cp, family, params, granularity, training, example, paired)
    return y, y.new_empty(_aux_shape(x, weight, cp, family, granularity)) if aux is None else aux


@gated_conv2d_op.register_fake
def _(x, weight, bias, phi, seed, offset, stride, padding, dilation, groups, family, params, granularity, training,
      example, paired):  # fmt: skip
    cp = (stride, padding, dilation, groups)
    y = torch.empty(_out_size(x.shape, weight.shape, cp), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    aux_shape = _aux_shape(x, weight, cp, family, granularity)
    return y, torch.empty_like(y) if len(aux_shape) == 4 else x.new_empty(aux_shape)


@eager.custom_op("npn::gated_conv2d_backward")
def gated_conv2d_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    seed: Tensor,
    offset: Tensor,
    aux: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    family: int,
    params: list[float],
    granularity: str,
    training: bool,
    example: bool,
    paired: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx in x's layout, dW, db, dphi contiguous); an input that needs no gradient gets an empty [0]."""
    cp = (stride, padding, dilation, groups)
    grads = _kernel_backward(grad_y, x, weight, bias, phi, seed, offset, aux if aux.dim() == 4 else None, cp,
                             family, params, granularity, training, example, paired, needs)  # fmt: skip
    return tuple(t.new_empty(0) if g is None else g for t, g in zip((x, weight, x, phi), grads))


@gated_conv2d_backward_op.register_fake
def _(grad_y, x, weight, bias, phi, seed, offset, aux, stride, padding, dilation, groups, family, params, granularity,
      training, example, paired, needs):  # fmt: skip
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)) if needs[0] else None
    shapes = (None, weight.shape, (weight.shape[0],) if bias is not None else (0,), phi.shape)
    # dphi in phi's dtype, which may differ from x's (float32 phi, bfloat16 activations)
    return (x.new_empty(0) if dx is None else dx,) + tuple(
        t.new_empty(shape if need else (0,)) for t, shape, need in zip((x, x, phi), shapes[1:], needs[1:])
    )


register_layer_autograd(gated_conv2d_op, gated_conv2d_backward_op)


# ---- public function --------------------------------------------------------------------------


def _pair(name: str, value, minimum: int) -> list[int]:
    values = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                                                  for v in values):  # fmt: skip
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return values


def _padding(x: Tensor, weight: Tensor, padding, stride: list[int], dilation: list[int]) -> tuple[Tensor, list[int]]:
    """(x, symmetric padding [2]): "valid" is 0; "same" pads d·(k − 1) in all, the odd one on the
    right/bottom as F.conv2d does (by padding x here, outside the op)."""
    if padding == "valid":
        return x, [0, 0]
    if padding != "same":
        return x, _pair("padding", padding, 0)
    if stride != [1, 1]:
        raise ValueError(f"padding: 'same' needs stride 1 (as F.conv2d), got stride {tuple(stride)}")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    extra = [t % 2 for t in total]
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, [t // 2 for t in total]


def gated_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    phi: Tensor,
    gate,
    granularity: str,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    seed,
    offset,
    training: bool = True,
    noise: str = "batch",
    paired: bool = False,
) -> Tensor:
    """A conv2d whose weights, input channels or output channels are gated (DESIGN 2).

    x [B, C_in, H, W] (any layout; channels-last stays channels-last); weight [C_out, C_in/groups,
    kh, kw]; bias [C_out] or None; stride, dilation: int or pair; padding: int, pair, "valid" or
    "same" (stride 1). phi: weight's shape ("weight"), [C_in] ("in": gates x's channels, also
    with groups) or [C_out] ("out": multiplies the output after the bias), any float dtype.
    Returns y [B, C_out, H_out, W_out]. The gates are exactly those `npn.ops.sample_gates` draws
    for the same (seed, offset): batch noise draws phi.numel() noise elements, example noise
    ("in"/"out" only) one per example and channel, row-major [B, C]. paired (Binary gates in
    training): x is a doubled batch [x; x]; the second half uses ARM's antithetic gates from the
    same noise and gets no gradient. Gradients flow to x, weight, bias and (hard-concrete) phi.
    """
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight, x.dtype, x.device)
    if bias is not None:
        bias = check_tensor("bias", bias, x.dtype, x.device)
    phi = check_finite("phi", check_tensor("phi", phi, device=x.device))
    gate = check_gate(gate)
    training, paired = check_flag("training", training), check_flag("paired", paired)
    if granularity not in reference.GRANULARITIES:
        raise ValueError(f"granularity: expected one of {', '.join(reference.GRANULARITIES)}, got {granularity!r}")
    if noise not in ("batch", "example"):
        raise ValueError(f"noise: expected 'batch' or 'example', got {noise!r}")
    if noise == "example" and granularity == "weight":
        raise ValueError("noise: 'example' needs granularity 'in' or 'out' (one gate per example and channel)")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D tensor [C_out, C_in/groups, kh, kw], got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups: expected an int >= 1 dividing weight's {weight.shape[0]} output channels, got {groups!r}")
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    if x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(f"x: expected shape [B, {c_in}, H, W] (weight.shape[1] = {weight.shape[1]} times groups = "
                         f"{groups} channels), got {tuple(x.shape)}")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    expected = reference.phi_shape(granularity, weight.shape, groups)
    if tuple(phi.shape) != expected:
        raise ValueError(f"phi: expected shape {expected} for granularity {granularity!r}, got {tuple(phi.shape)}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    x, padding = _padding(x, weight, padding, stride, dilation)
    cp = (stride, padding, dilation, groups)
    if min(_out_size(x.shape, weight.shape, cp)[2:]) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} (padded by {tuple(padding)}) is smaller than the "
                         f"dilated kernel of weight {tuple(weight.shape)} (dilation {tuple(dilation)})")  # fmt: skip
    if paired and (gate.family != BINARY or not training or x.shape[0] % 2):
        raise ValueError("paired: needs Binary gates in training and an even batch (the doubled batch)")
    seed_t, offset_t = rng_tensors(seed, offset, x.device)
    example = noise == "example"
    y, _ = gated_conv2d_op(x, weight, bias, phi, seed_t, offset_t, *cp, gate.family, list(gate.params), granularity,
                           training, example, paired)  # fmt: skip
    return y
