"""`npn::gated_linear` with one gate per weight in Triton: GEMMs that sample the gates in registers.

Forward: y = x (W ⊙ z)ᵀ + b, each W tile's gates drawn from phi and the noise stream inside the
K loop. Weight gradient: G = dyᵀ x tile by tile, whose epilogue regenerates the tile's gates and
writes dW = G ⊙ z, d phi = G ⊙ W ⊙ dz/dphi and, for dx, W ⊙ z. Neither noise, a mask nor G
reaches memory. The gate of W[n, k] is noise element n·K + k through gate_value
(gates/triton_math.py): the gates of `npn.ops.sample_gates` and of the gate_mul kernel.

dx = dy (W ⊙ z) is the vendor GEMM on the W ⊙ z that the weight-gradient epilogue writes while
it has the gates in registers anyway: a fused dx kernel would regenerate every gate once more
(~0.4 SM-cycles per weight, see FUSE_MAX_ROWS) to save writing and reading W ⊙ z (4 bytes per
bf16 weight, ~0.29 SM-cycles).

function.py calls these launchers (Triton backend, granularity "weight") where :func:`fuses`
says so; elsewhere it writes W ⊙ z once with gate_mul and calls the vendor GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from npn_kernels.gates import BINARY, HARD_CONCRETE
from npn_kernels.ops.aot import AotSpec
from npn_kernels.ops.gates.reference import check_antithetic
from npn_kernels.ops.gates.triton_math import acc_dtype, gate_scalars, gate_value, mul_dtype, scalar
from npn_kernels.ops.uniforms.triton import uniform_at, uniform_rows

# Batches of at most this many rows run the fused kernels; larger ones write W ⊙ z once (gate_mul)
# and call cuBLAS. The fused forward regenerates a W tile's gates once per BLOCK_M rows of x.
# H100 SXM (132 SMs at 1.83 GHz, 3.35 TB/s, ~4096 bf16 tensor-core FLOP per SM-cycle): a
# hard-concrete training gate is ~50 instructions (Philox4x32-10 ~22 per gate at 4 words per
# call; 2 logs, 1 exp, 2 divides) at 128 issued per SM-cycle ≈ 0.4 SM-cycles, the tensor-core
# work of ~800 rows of x (2 FLOP per row and weight). Fusing saves writing W ⊙ z and reading it
# back instead of W: 4 bytes per bf16 weight ≈ 0.29 SM-cycles, and one launch. So fused wins
# with one block of rows (saves 0.29 per weight) and loses with two (0.4 more gate work): the
# threshold is the largest BLOCK_M, 128 (ptxas, sm_90, bf16 hard-concrete: 239 registers, no
# spills, with the 64×16 W tile below; at 256 it spills 356 bytes). The weight-gradient kernel
# generates each gate once at any M, but the G round trip it saves (4 bytes ≈ 0.29 SM-cycles)
# is the tensor-core work of M ≈ 600 rows, beyond which cuBLAS's faster GEMM matters more: it
# takes the same threshold. bench/cases/gated_linear.py (gated_linear_weight) times both paths
# on the GPU.
_MAX_BLOCK_M = 128
FUSE_MAX_ROWS = _MAX_BLOCK_M
# Forward W tile 64×16: 8 gates per thread of 4 warps. At 64×32, ptxas needs 255 registers and
# spills (bf16 hard-concrete, BLOCK_M 64); the weight gradient's 64×32 epilogue needs 196.
_BLOCK_N = 64
_BLOCK_K = 16
_BLOCK_K_GRAD = 32
_BLOCK_M_GRAD = 64  # the weight gradient's reduction step over the rows
# Split-K: the forward's grid has only N / 64 tiles at M <= 128 (16 for N = 1024, against 132
# SMs), so each tile's K range is split into partial sums. A split of K_s columns writes and
# reads 8·M / K_s bytes per weight (float32 partials), so it keeps >= 512 columns: <= 2 bytes at
# M = 128, and for N = K = 4096 the 16 MB of partials stay in the 50 MB L2.
_MIN_SPLIT_COLUMNS = 512
_PROGRAMS_PER_SM = 2


def fuses(x: Tensor) -> bool:
    """Whether the fused kernels run for x [M, K] (else W ⊙ z once and the vendor GEMM)."""
    return x.shape[0] <= FUSE_MAX_ROWS


@triton.jit
def _weight_gates(
    phi_ptr, seed, offset, n, k0, n_rows, n_cols, p0, p1, p2,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ANTITHETIC: tl.constexpr,
    ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(z, dz/dphi, k, mask) of the gates of W[n, k0 : k0 + BLOCK_K]: a [BLOCK_N, BLOCK_K] tile.

    ALIGNED (K % 4 == 0): each row's run n·K + k0 ... starts on a Philox counter, one call per
    4 gates (uniform_rows); otherwise one call per gate (uniform_at).
    """
    k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    idx = n[:, None] * n_cols + k[None, :]
    mask = (n < n_rows)[:, None] & (k < n_cols)[None, :]
    x = tl.load(phi_ptr + idx, mask=mask, other=0).to(ACC)
    u = 0.0
    if TRAINING:
        if ALIGNED:
            u = uniform_rows(seed, offset, n * n_cols + k0, BLOCK_K)
        else:
            u = uniform_at(seed, offset, idx)
    z, dz = gate_value(x, u, p0, p1, p2, FAMILY, TRAINING, K_INF, ANTITHETIC)
    return z, dz, k, mask


@triton.jit
def _gated_linear_kernel(
    x_ptr, w_ptr, phi_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ANTITHETIC: tl.constexpr,
    ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, MUL: tl.constexpr, DOT: tl.constexpr,
    DOT_ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[s, m, n] = sum over k of split s (k_per_split columns) of x[m, k]·W[n, k]·z[n, k] (+ b[n]).

    Axis 0: (M block, N block); axis 1: the split. The product is yᵀ = (W ⊙ z) xᵀ: W ⊙ z is the
    dot's A operand straight from registers and N its 64-row side, as wgmma needs, at any M.
    """
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    n = (tl.program_id(0) % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    seed = tl.load(seed_ptr)
    offset = tl.load(offset_ptr)
    p0 = scalar(p0_hi, p0_lo, ACC)
    p1 = scalar(p1_hi, p1_lo, ACC)
    p2 = scalar(p2_hi, p2_lo, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=DOT_ACC)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        z, _, k, mask = _weight_gates(phi_ptr, seed, offset, n, k0, N, K, p0, p1, p2,
                                      FAMILY, TRAINING, K_INF, ANTITHETIC, ALIGNED, ACC, BLOCK_K)  # fmt: skip
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask, other=0)
        wz = (w.to(MUL) * z.to(MUL)).to(x_ptr.dtype.element_ty).to(DOT)  # rounded as gate_mul's W ⊙ z
        x_mask = (k < K)[:, None] & (m < M)[None, :]
        xt = tl.load(x_ptr + k[:, None] * stride_xk + m[None, :] * stride_xm, mask=x_mask, other=0).to(DOT)
        acc = tl.dot(wz, xt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0).to(DOT_ACC)[:, None]
    offs = split * stride_os + m[None, :] * stride_om + n[:, None] * stride_on
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=(n < N)[:, None] & (m < M)[None, :])


@triton.jit
def _gated_linear_backward_kernel(
    dy_ptr, x_ptr, w_ptr, phi_ptr, grad_w_ptr, grad_phi_ptr, w_gated_ptr, M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_GRAD_W: tl.constexpr, HAS_GRAD_PHI: tl.constexpr, HAS_W_GATED: tl.constexpr,
    ACC: tl.constexpr, MUL: tl.constexpr, DOT: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For one [BLOCK_N, BLOCK_K] tile of G = dyᵀ x (all M rows): grad_w = G ⊙ z,
    grad_phi = G ⊙ W ⊙ dz/dphi, w_gated = W ⊙ z (outputs contiguous [N, K])."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    n = (tl.program_id(0) // k_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k0 = (tl.program_id(0) % k_blocks).to(tl.int64) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=DOT_ACC)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + rows
        dyt = tl.load(dy_ptr + n[:, None] * stride_dyn + m[None, :] * stride_dym,
                      mask=(n < N)[:, None] & (m < M)[None, :], other=0).to(DOT)  # fmt: skip
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(m < M)[:, None] & (k < K)[None, :], other=0).to(DOT)  # fmt: skip
        acc = tl.dot(dyt, x, acc, input_precision=PRECISION)
    p0 = scalar(p0_hi, p0_lo, ACC)
    p1 = scalar(p1_hi, p1_lo, ACC)
    p2 = scalar(p2_hi, p2_lo, ACC)
    z, dz, _, mask = _weight_gates(phi_ptr, tl.load(seed_ptr), tl.load(offset_ptr), n, k0, N, K, p0, p1, p2,
                                   FAMILY, TRAINING, K_INF, False, ALIGNED, ACC, BLOCK_K)  # fmt: skip
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask, other=0).to(MUL)
    g = acc.to(MUL)
    zm = z.to(MUL)
    offs = n[:, None] * K + k[None, :]
    if HAS_GRAD_W:
        tl.store(grad_w_ptr + offs, (g * zm).to(grad_w_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD_PHI:
        tl.store(grad_phi_ptr + offs, ((g * w).to(ACC) * dz).to(grad_phi_ptr.dtype.element_ty), mask=mask)
    if HAS_W_GATED:
        tl.store(w_gated_ptr + offs, (w * zm).to(w_gated_ptr.dtype.element_ty), mask=mask)


def _dot_types(x: Tensor) -> dict:
    """The dot's operand and accumulator dtypes and its input precision, for x's dtype and device.

    float32 follows torch.backends.cuda.matmul.allow_tf32 as cuBLAS does (default off: "ieee").
    On CPU tensors (the interpreter) bfloat16 operands go in as float32, exactly: triton 3.8's
    interpreter multiplies bfloat16 as their raw uint16 bits.
    """
    dot = getattr(tl, str(x.dtype)[len("torch.") :])
    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        dot = tl.float32
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT": dot, "DOT_ACC": tl.float64 if x.dtype == torch.float64 else tl.float32,
            "PRECISION": "tf32" if tf32 else "ieee"}  # fmt: skip


def _split_k(k: int, tiles: int, block_k: int, device: torch.device) -> int:
    """Columns per split of the forward's K loop (a multiple of block_k; k itself for no split)."""
    if device.type != "cuda" or k == 0:
        return max(k, 1)  # one split: the interpreter runs programs one after another
    programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    splits = min(triton.cdiv(programs, tiles), triton.cdiv(k, _MIN_SPLIT_COLUMNS))
    return triton.cdiv(triton.cdiv(k, max(splits, 1)), block_k) * block_k


def gated_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, phi: Tensor, seed: Tensor, offset: Tensor, family: int, params,
    training: bool, antithetic: bool, out: Tensor, *, block_m: int | None = None, block_n: int = _BLOCK_N,
    block_k: int = _BLOCK_K, k_per_split: int | None = None,
) -> None:  # fmt: skip
    """Fill ``out`` [M, N] (x's dtype, contiguous) with x (W ⊙ z)ᵀ + b.

    x [M, K], weight [N, K] (any strides), bias [N] or None, phi [N·K] contiguous, seed and
    offset int64 scalars. antithetic (binary training only): ARM's z' = 1[u > 1 − pi]. Blocks
    and the split (a multiple of block_k) default to the GPU's; tests pass small ones.
    """
    check_antithetic(family, training, antithetic)
    (m, k), n = x.shape, weight.shape[0]
    if out.numel() == 0:
        return
    block_m = block_m or min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))  # tl.dot needs >= 16
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_per_split = k_per_split or _split_k(k, tiles, block_k, x.device)
    splits = max(1, triton.cdiv(k, k_per_split))
    dot = _dot_types(x)
    # one split writes out directly; more write partial sums, added up here (deterministic)
    partial_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    target = out.view(1, m, n) if splits == 1 else torch.empty(splits, m, n, dtype=partial_dtype, device=x.device)
    scalars, k_inf = gate_scalars(family, params)
    _gated_linear_kernel[(tiles, splits)](
        x, weight, phi, x if bias is None else bias, target, m, n, k, k_per_split,
        *x.stride(), *weight.stride(), *target.stride(), seed, offset, *scalars,
        FAMILY=family, TRAINING=training, K_INF=k_inf, ANTITHETIC=antithetic, ALIGNED=k % 4 == 0,
        HAS_BIAS=bias is not None and splits == 1, ACC=acc_dtype(phi.dtype), MUL=mul_dtype(weight, phi),
        **dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    if splits > 1:
        total = target.sum(0)
        out.copy_(total if bias is None else total.add_(bias))


def gated_linear_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, phi: Tensor, seed: Tensor, offset: Tensor, family: int, params,
    training: bool, grad_x: Tensor | None, grad_weight: Tensor | None, grad_phi: Tensor | None, *,
    block_m: int = _BLOCK_M_GRAD, block_n: int = _BLOCK_N, block_k: int = _BLOCK_K_GRAD,
) -> None:  # fmt: skip
    """Fill the outputs that are not None: grad_x [M, K] = dy (W ⊙ z), grad_weight [N, K] =
    (dyᵀ x) ⊙ z, grad_phi [N·K] = (dyᵀ x) ⊙ W ⊙ dz/dphi (zeros for binary gates).

    grad_y [M, N], x [M, K], weight [N, K] (any strides); outputs contiguous; never antithetic.
    """
    (m, k), n = x.shape, weight.shape[0]
    has_grad_phi = grad_phi is not None and family != BINARY
    if grad_phi is not None and not has_grad_phi:
        grad_phi.zero_()  # binary gates carry no pathwise gradient
    w_gated = torch.empty(n, k, dtype=x.dtype, device=x.device) if grad_x is not None else None
    if n * k > 0 and (grad_weight is not None or has_grad_phi or w_gated is not None):
        scalars, k_inf = gate_scalars(family, params)
        _gated_linear_backward_kernel[(triton.cdiv(n, block_n) * triton.cdiv(k, block_k),)](
            grad_y, x, weight, phi, x if grad_weight is None else grad_weight, phi if grad_phi is None else grad_phi,
            x if w_gated is None else w_gated, m, n, k, *grad_y.stride(), *x.stride(), *weight.stride(),
            seed, offset, *scalars,
            FAMILY=family, TRAINING=training, K_INF=k_inf, ALIGNED=k % 4 == 0, HAS_GRAD_W=grad_weight is not None,
            HAS_GRAD_PHI=has_grad_phi, HAS_W_GATED=w_gated is not None, ACC=acc_dtype(phi.dtype),
            MUL=mul_dtype(weight, phi), **_dot_types(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    if grad_x is not None:
        torch.mm(grad_y, w_gated, out=grad_x)


# ---- ahead-of-time compilation for sm_90 (npn_kernels.ops.aot) --------------------------------

_SCALARS = {f"{name}_{part}": "fp32" for name in ("p0", "p1", "p2") for part in ("hi", "lo")}
_TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}


def _spec_types(x: str, phi: str, tf32: bool) -> dict:
    """The dtype constexprs the launchers pass for x's and phi's dtypes on a GPU."""
    return {"ACC": tl.float64 if phi == "fp64" else tl.float32, "MUL": tl.float64 if "fp64" in (x, phi) else tl.float32,
            "DOT": _TL[x], "DOT_ACC": tl.float64 if x == "fp64" else tl.float32,
            "PRECISION": "tf32" if tf32 else "ieee"}  # fmt: skip


def _forward_spec(x: str, phi: str, family: int, training: bool, aligned: bool = True, antithetic: bool = False,
                  tf32: bool = False, block_m: int = _MAX_BLOCK_M, wgmma: bool = True) -> AotSpec:  # fmt: skip
    sizes = ("M", "N", "K", "k_per_split", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_os",
             "stride_om", "stride_on")  # fmt: skip
    signature = {"x_ptr": f"*{x}", "w_ptr": f"*{x}", "phi_ptr": f"*{phi}", "bias_ptr": f"*{x}", "out_ptr": f"*{x}",
                 **{name: "i64" for name in sizes}, "seed_ptr": "*i64", "offset_ptr": "*i64", **_SCALARS}  # fmt: skip
    constexprs = {"FAMILY": family, "TRAINING": training, "K_INF": False, "ANTITHETIC": antithetic, "ALIGNED": aligned,
                  "HAS_BIAS": True, **_spec_types(x, phi, tf32), "BLOCK_M": block_m, "BLOCK_N": _BLOCK_N,
                  "BLOCK_K": _BLOCK_K}  # fmt: skip
    return AotSpec(_gated_linear_kernel, signature, constexprs, ("wgmma",) if wgmma else ())


def _backward_spec(x: str, phi: str, family: int, training: bool, aligned: bool = True, tf32: bool = False,
                   wgmma: bool = True) -> AotSpec:  # fmt: skip
    sizes = ("M", "N", "K", "stride_dym", "stride_dyn", "stride_xm", "stride_xk", "stride_wn", "stride_wk")
    signature = {"dy_ptr": f"*{x}", "x_ptr": f"*{x}", "w_ptr": f"*{x}", "phi_ptr": f"*{phi}", "grad_w_ptr": f"*{x}",
                 "grad_phi_ptr": f"*{phi}", "w_gated_ptr": f"*{x}", **{name: "i64" for name in sizes},
                 "seed_ptr": "*i64", "offset_ptr": "*i64", **_SCALARS}  # fmt: skip
    constexprs = {"FAMILY": family, "TRAINING": training, "K_INF": False, "ALIGNED": aligned, "HAS_GRAD_W": True,
                  "HAS_GRAD_PHI": family == HARD_CONCRETE, "HAS_W_GATED": True, **_spec_types(x, phi, tf32),
                  "BLOCK_M": _BLOCK_M_GRAD, "BLOCK_N": _BLOCK_N, "BLOCK_K": _BLOCK_K_GRAD}  # fmt: skip
    return AotSpec(_gated_linear_backward_kernel, signature, constexprs, ("wgmma",) if wgmma else ())


# "ieee" float32 and float64 dots run on FMA units, not wgmma (as cuBLAS without TF32)
AOT = [
    _forward_spec("bf16", "bf16", HARD_CONCRETE, training=True),
    _forward_spec("bf16", "fp32", BINARY, training=True, antithetic=True, block_m=16),
    _forward_spec("fp16", "fp16", HARD_CONCRETE, training=True, aligned=False),
    _forward_spec("fp32", "fp32", HARD_CONCRETE, training=False, tf32=True),
    _forward_spec("fp32", "fp32", BINARY, training=True, wgmma=False),
    _forward_spec("fp64", "fp64", HARD_CONCRETE, training=True, wgmma=False),
    _backward_spec("bf16", "bf16", HARD_CONCRETE, training=True),
    _backward_spec("fp16", "fp32", BINARY, training=True, aligned=False),
    _backward_spec("fp32", "fp32", HARD_CONCRETE, training=True, tf32=True),
    _backward_spec("fp32", "fp32", HARD_CONCRETE, training=False, wgmma=False),
    _backward_spec("fp64", "fp64", HARD_CONCRETE, training=True, wgmma=False),
]
