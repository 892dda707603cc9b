"""Gate sampling, gate application and the L0 penalty in Triton: kernels and launchers writing
caller-given outputs.

The launchers take the arguments of the C++ ops `npn_ext::sample_gates`, `sample_gates_backward`,
`gate_mul`, `gate_mul_backward`, `l0_penalty` and `l0_penalty_backward`, so function.py
dispatches to either the same way. The gate formulas and the packing of their parameters live
in triton_math.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from npn_kernels.gates import BINARY, HARD_CONCRETE
from npn_kernels.ops.aot import AotSpec
from npn_kernels.ops.gates.reference import check_antithetic
from npn_kernels.ops.gates.triton_math import (
    acc_dtype, gate_scalars, gate_value, mul_dtype, penalty_scalars, penalty_terms, scalar,
)  # fmt: skip
from npn_kernels.ops.uniforms.triton import uniform_at, uniform_block


@triton.jit
def _sample_gates_kernel(
    phi_ptr, out_ptr, n_phi, n_out, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, BATCHED: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[n_out] = gates of phi[n_phi] (out element i gates phi[i % n_phi] with noise element i)."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n_out
    j = idx % n_phi if BATCHED else idx
    x = tl.load(phi_ptr + j, mask=mask, other=0).to(ACC)
    u = 0.0
    if TRAINING:
        u = uniform_block(tl.load(seed_ptr), tl.load(offset_ptr), pid * BLOCK, BLOCK)
    p0 = scalar(p0_hi, p0_lo, ACC)
    p1 = scalar(p1_hi, p1_lo, ACC)
    p2 = scalar(p2_hi, p2_lo, ACC)
    z, _ = gate_value(x, u, p0, p1, p2, FAMILY, TRAINING, K_INF, False)
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_gates_backward_kernel(
    grad_z_ptr, phi_ptr, grad_phi_ptr, n_phi, n_batch, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, ALIGNED: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad_phi[j] = sum_b grad_z[b, j]·dz[b, j]/dphi[j]; binary gates write zeros.

    ALIGNED (n_phi % 4 == 0 or one batch row): every row starts on a Philox counter, so a block
    of noise costs BLOCK / 4 Philox calls instead of BLOCK.
    """
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n_phi
    acc = tl.zeros((BLOCK,), dtype=ACC)
    if FAMILY == 1:
        x = tl.load(phi_ptr + j, mask=mask, other=0).to(ACC)
        p0 = scalar(p0_hi, p0_lo, ACC)
        p1 = scalar(p1_hi, p1_lo, ACC)
        p2 = scalar(p2_hi, p2_lo, ACC)
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        for b in range(n_batch):
            idx = b * n_phi + j
            u = 0.0
            if TRAINING:
                if ALIGNED:
                    u = uniform_block(seed, offset, b * n_phi + pid * BLOCK, BLOCK)
                else:
                    u = uniform_at(seed, offset, idx)
            _, dz = gate_value(x, u, p0, p1, p2, FAMILY, TRAINING, False, False)
            acc += tl.load(grad_z_ptr + idx, mask=mask, other=0).to(ACC) * dz
    tl.store(grad_phi_ptr + j, acc.to(grad_phi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_mul_prologue(phi_ptr, seed_ptr, offset_ptr, n_rows, n_units, rows_per_program,
                       p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo, ACC: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """What a gate_mul program needs: its units p, their mask and phi, its rows, seed, offset, p0..p2."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = p < n_units
    x = tl.load(phi_ptr + p, mask=p_mask, other=0).to(ACC)
    r_start = tl.program_id(1).to(tl.int64) * rows_per_program
    r_end = tl.minimum(r_start + rows_per_program, n_rows)
    p0 = scalar(p0_hi, p0_lo, ACC)
    p1 = scalar(p1_hi, p1_lo, ACC)
    p2 = scalar(p2_hi, p2_lo, ACC)
    return p, p_mask, x, r_start, r_end, tl.load(seed_ptr), tl.load(offset_ptr), p0, p1, p2


@triton.jit
def _gate_mul_noise(
    seed, offset, r, p, n_units, ROW_NOISE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_P: tl.constexpr
):
    """u of the gates (r, p): noise element r·P + p (ROW_NOISE: example noise) or p.

    Runs that start on a Philox counter take 4 words per counter (uniform_block); the others
    run one Philox call per element (uniform_at).
    """
    if ROW_NOISE:
        if ALIGNED:  # P % 4 == 0 or one row: the program's run r·P + p starts on a counter
            u = uniform_block(seed, offset, r * n_units + tl.program_id(0).to(tl.int64) * BLOCK_P, BLOCK_P)
        else:
            u = uniform_at(seed, offset, r * n_units + p)
    else:
        u = uniform_block(seed, offset, tl.program_id(0).to(tl.int64) * BLOCK_P, BLOCK_P)
    return u


@triton.jit
def _gate_mul_kernel(
    a_ptr, phi_ptr, out_ptr, n_rows, n_units, n_cols, rows_per_program, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ANTITHETIC: tl.constexpr,
    ROW_NOISE: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr, MUL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[r, p, c] = a[r, p, c]·z(r, p) for BLOCK_P units (axis 0) and a range of rows (axis 1).

    ROW_NOISE (example noise in training): one gate per (r, p); otherwise gates are shared by
    all rows and computed once per program. ALIGNED: see :func:`_gate_mul_noise`.
    """
    p, p_mask, x, r_start, r_end, seed, offset, p0, p1, p2 = _gate_mul_prologue(
        phi_ptr, seed_ptr, offset_ptr, n_rows, n_units, rows_per_program, p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
        ACC, BLOCK_P)  # fmt: skip
    u = 0.0
    if TRAINING and not ROW_NOISE:
        u = _gate_mul_noise(seed, offset, 0, p, n_units, False, ALIGNED, BLOCK_P)
    z_unit, _ = gate_value(x, u, p0, p1, p2, FAMILY, TRAINING, K_INF, ANTITHETIC)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for r in range(r_start, r_end):
        z = z_unit
        if ROW_NOISE:
            u_row = _gate_mul_noise(seed, offset, r, p, n_units, True, ALIGNED, BLOCK_P)
            z, _ = gate_value(x, u_row, p0, p1, p2, FAMILY, TRAINING, K_INF, ANTITHETIC)
        base = (r * n_units + p) * n_cols
        for c0 in range(0, n_cols, BLOCK_C):
            offs = base[:, None] + (c0 + cols)[None, :]
            mask = p_mask[:, None] & (c0 + cols < n_cols)[None, :]
            a = tl.load(a_ptr + offs, mask=mask, other=0).to(MUL)
            tl.store(out_ptr + offs, (a * z.to(MUL)[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_mul_backward_kernel(
    grad_ptr, a_ptr, phi_ptr, grad_a_ptr, partial_ptr, a_gated_ptr,
    n_rows, n_units, n_cols, rows_per_program, seed_ptr, offset_ptr,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
    FAMILY: tl.constexpr, TRAINING: tl.constexpr, K_INF: tl.constexpr, ROW_NOISE: tl.constexpr,
    ALIGNED: tl.constexpr, HAS_GRAD_A: tl.constexpr, HAS_GRAD_PHI: tl.constexpr, HAS_A_GATED: tl.constexpr,
    ACC: tl.constexpr, MUL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_a = grad·z, a_gated = a·z, and partial[axis 1 program, p] = its rows' sum of grad·a·dz/dphi.

    Layout as :func:`_gate_mul_kernel`. With gates shared by all rows, sum grad·a over the rows
    first and multiply by dz/dphi once.
    """
    p, p_mask, x, r_start, r_end, seed, offset, p0, p1, p2 = _gate_mul_prologue(
        phi_ptr, seed_ptr, offset_ptr, n_rows, n_units, rows_per_program, p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo,
        ACC, BLOCK_P)  # fmt: skip
    u = 0.0
    if TRAINING and not ROW_NOISE:
        u = _gate_mul_noise(seed, offset, 0, p, n_units, False, ALIGNED, BLOCK_P)
    z_unit, dz_unit = gate_value(x, u, p0, p1, p2, FAMILY, TRAINING, K_INF, False)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    acc = tl.zeros((BLOCK_P,), dtype=MUL)
    for r in range(r_start, r_end):
        z = z_unit
        dz = dz_unit
        if ROW_NOISE:
            u_row = _gate_mul_noise(seed, offset, r, p, n_units, True, ALIGNED, BLOCK_P)
            z, dz = gate_value(x, u_row, p0, p1, p2, FAMILY, TRAINING, K_INF, False)
        zm = z.to(MUL)[:, None]
        base = (r * n_units + p) * n_cols
        row = tl.zeros((BLOCK_P,), dtype=MUL)
        for c0 in range(0, n_cols, BLOCK_C):
            offs = base[:, None] + (c0 + cols)[None, :]
            mask = p_mask[:, None] & (c0 + cols < n_cols)[None, :]
            if HAS_GRAD_A or HAS_GRAD_PHI:
                g = tl.load(grad_ptr + offs, mask=mask, other=0).to(MUL)
            if HAS_GRAD_PHI or HAS_A_GATED:
                a = tl.load(a_ptr + offs, mask=mask, other=0).to(MUL)
            if HAS_GRAD_A:
                tl.store(grad_a_ptr + offs, (g * zm).to(grad_a_ptr.dtype.element_ty), mask=mask)
            if HAS_A_GATED:
                tl.store(a_gated_ptr + offs, (a * zm).to(a_gated_ptr.dtype.element_ty), mask=mask)
            if HAS_GRAD_PHI:
                row += tl.sum(g * a, 1)
        if ROW_NOISE:
            acc += (row.to(ACC) * dz).to(MUL)
        else:
            acc += row
    if HAS_GRAD_PHI:
        if not ROW_NOISE:
            acc = (acc.to(ACC) * dz_unit).to(MUL)
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * n_units + p, acc, mask=p_mask)


@triton.jit
def _l0_penalty_kernel(
    phi_ptr, w_ptr, partial_ptr, n,
    a_hi, a_lo, coef_hi, coef_lo, half_wd_hi, half_wd_lo,
    FAMILY: tl.constexpr, K_INF: tl.constexpr, HAS_WEIGHT: tl.constexpr, SUMSQ: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """partial[program] = sum over its BLOCK elements of the penalty terms (coef = l0·|g|)."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    x = tl.load(phi_ptr + idx, mask=mask, other=0).to(ACC)
    w = x
    if HAS_WEIGHT:
        w = tl.load(w_ptr + idx, mask=mask, other=0).to(ACC)
    p, _, sq = penalty_terms(x, w, scalar(a_hi, a_lo, ACC), FAMILY, K_INF, HAS_WEIGHT, SUMSQ)
    term = p * (scalar(coef_hi, coef_lo, ACC) + scalar(half_wd_hi, half_wd_lo, ACC) * sq)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, term, 0.0), 0))


@triton.jit
def _l0_penalty_backward_kernel(
    grad_ptr, phi_ptr, w_ptr, grad_phi_ptr, grad_w_ptr, n,
    a_hi, a_lo, coef_hi, coef_lo, half_wd_hi, half_wd_lo,
    FAMILY: tl.constexpr, K_INF: tl.constexpr, HAS_WEIGHT: tl.constexpr, SUMSQ: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad_phi = grad·d penalty/d phi; grad_w = grad·d penalty/dW (or /d sumsq when SUMSQ)."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    g = tl.load(grad_ptr).to(ACC)
    x = tl.load(phi_ptr + idx, mask=mask, other=0).to(ACC)
    w = x
    if HAS_WEIGHT:
        w = tl.load(w_ptr + idx, mask=mask, other=0).to(ACC)
    a = scalar(a_hi, a_lo, ACC)
    coef = scalar(coef_hi, coef_lo, ACC)
    half_wd = scalar(half_wd_hi, half_wd_lo, ACC)
    p, q, sq = penalty_terms(x, w, a, FAMILY, K_INF, HAS_WEIGHT, SUMSQ)
    if FAMILY == 0:
        # binary: the L2 term holds sg(pi), so only l0·|g|·pi depends on phi; k = inf: a step, 0
        if K_INF:
            grad_phi = tl.zeros_like(x)
        else:
            grad_phi = g * (coef * a) * p * q
    else:
        grad_phi = g * p * q * (coef + half_wd * sq)
    tl.store(grad_phi_ptr + idx, grad_phi.to(grad_phi_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        dsq = g * half_wd * p
        if SUMSQ:
            grad_w = dsq
        else:
            grad_w = dsq * 2 * w
        tl.store(grad_w_ptr + idx, grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024
_PROGRAMS = 1024  # gate_mul: enough programs to fill a GPU's SMs several times over
_SCALARS = {f"{name}_{part}": "fp32" for name in ("p0", "p1", "p2") for part in ("hi", "lo")}
_PENALTY_SCALARS = {f"{name}_{part}": "fp32" for name in ("a", "coef", "half_wd") for part in ("hi", "lo")}


def sample_gates(
    phi: Tensor, seed: Tensor, offset: Tensor, family: int, params, training: bool, out: Tensor
) -> None:
    """Fill ``out`` (phi's dtype, contiguous, [*S] or [B, *S]) with the gates of ``phi`` [*S].

    phi contiguous; seed, offset int64 scalars; noise element i is out's flat element i.
    """
    n_phi, n_out = phi.numel(), out.numel()
    if n_out == 0:
        return
    scalars, k_inf = gate_scalars(family, params)
    _sample_gates_kernel[(triton.cdiv(n_out, _BLOCK),)](
        phi, out, n_phi, n_out, seed, offset, *scalars,
        FAMILY=family, TRAINING=training, K_INF=k_inf, BATCHED=n_out != n_phi,
        ACC=acc_dtype(phi.dtype), BLOCK=_BLOCK,
    )  # fmt: skip


def sample_gates_backward(
    grad_z: Tensor, phi: Tensor, seed: Tensor, offset: Tensor, family: int, params, training: bool, grad_phi: Tensor
) -> None:
    """Fill ``grad_phi`` (phi-shaped, contiguous) from ``grad_z`` (out's shape, contiguous)."""
    n_phi = phi.numel()
    if n_phi == 0:
        return
    n_batch = grad_z.numel() // n_phi
    scalars, _ = gate_scalars(family, params)
    _sample_gates_backward_kernel[(triton.cdiv(n_phi, _BLOCK),)](
        grad_z, phi, grad_phi, n_phi, n_batch, seed, offset, *scalars,
        FAMILY=family, TRAINING=training, ALIGNED=n_phi % 4 == 0 or n_batch == 1,
        ACC=acc_dtype(phi.dtype), BLOCK=_BLOCK,
    )  # fmt: skip


def l0_penalty(
    phi: Tensor, weight: Tensor | None, family: int, params, group_size: float, l0: float,
    weight_decay: float, sumsq: bool,
) -> Tensor:  # fmt: skip
    """The penalty of contiguous ``phi`` and phi-shaped ``weight`` (or None): a 0-dim tensor,
    float64 for float64 phi, else float32. sumsq: weight holds per-group sums of squares."""
    result_dtype = torch.float64 if phi.dtype == torch.float64 else torch.float32
    n = phi.numel()
    if n == 0:
        return torch.zeros((), dtype=result_dtype, device=phi.device)
    scalars, k_inf = penalty_scalars(family, params, group_size, l0, weight_decay)
    grid = triton.cdiv(n, _BLOCK)
    partial = torch.empty(grid, dtype=result_dtype, device=phi.device)
    _l0_penalty_kernel[(grid,)](
        phi, phi if weight is None else weight, partial, n, *scalars,
        FAMILY=family, K_INF=k_inf, HAS_WEIGHT=weight is not None, SUMSQ=sumsq,
        ACC=acc_dtype(phi.dtype), BLOCK=_BLOCK,
    )  # fmt: skip
    return partial.sum()


def l0_penalty_backward(
    grad: Tensor, phi: Tensor, weight: Tensor | None, family: int, params, group_size: float, l0: float,
    weight_decay: float, sumsq: bool, grad_phi: Tensor, grad_weight: Tensor | None,
) -> None:  # fmt: skip
    """Fill ``grad_phi`` (phi-shaped) and ``grad_weight`` (phi-shaped, with weight) from the
    0-dim ``grad``; all contiguous."""
    n = phi.numel()
    if n == 0:
        return
    scalars, k_inf = penalty_scalars(family, params, group_size, l0, weight_decay)
    _l0_penalty_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        grad, phi, phi if weight is None else weight, grad_phi, grad_phi if grad_weight is None else grad_weight,
        n, *scalars,
        FAMILY=family, K_INF=k_inf, HAS_WEIGHT=weight is not None, SUMSQ=sumsq,
        ACC=acc_dtype(phi.dtype), BLOCK=_BLOCK,
    )  # fmt: skip


def _gate_mul_layout(a: Tensor) -> tuple[tuple[int, int], int, dict]:
    """(grid, rows_per_program, constexprs) of the gate_mul kernels for a [R, P, C]: tiles of
    BLOCK_P units by BLOCK_C columns, the rows split so that about _PROGRAMS programs share them."""
    rows, units, cols = a.shape
    block_c = min(triton.next_power_of_2(cols), 64)
    block_p = max(4, min(triton.next_power_of_2(units), _BLOCK // block_c))  # uniform_block needs 4 | BLOCK_P
    p_programs = triton.cdiv(units, block_p)
    rows_per_program = triton.cdiv(rows, max(1, min(rows, _PROGRAMS // p_programs)))
    grid = (p_programs, triton.cdiv(rows, rows_per_program))
    return grid, rows_per_program, {"ALIGNED": units % 4 == 0 or rows == 1, "BLOCK_P": block_p, "BLOCK_C": block_c}


def gate_mul(
    a: Tensor, phi: Tensor, seed: Tensor, offset: Tensor, family: int, params, training: bool, example: bool,
    antithetic: bool, out: Tensor,
) -> None:  # fmt: skip
    """Fill ``out`` ([R, P, C], a's dtype; may be ``a``) with a ⊙ z for a [R, P, C] and phi [P].

    All contiguous; seed, offset int64 scalars. The gate of (r, p) uses noise element r·P + p
    (example) or p; antithetic (binary training only): ARM's z' = 1[u > 1 − pi].
    """
    check_antithetic(family, training, antithetic)
    if a.numel() == 0:
        return
    scalars, k_inf = gate_scalars(family, params)
    grid, rows_per_program, blocks = _gate_mul_layout(a)
    _gate_mul_kernel[grid](
        a, phi, out, *a.shape, rows_per_program, seed, offset, *scalars,
        FAMILY=family, TRAINING=training, K_INF=k_inf, ANTITHETIC=antithetic, ROW_NOISE=training and example,
        ACC=acc_dtype(phi.dtype), MUL=mul_dtype(a, phi), **blocks,
    )  # fmt: skip


def gate_mul_backward(
    grad: Tensor, a: Tensor, phi: Tensor, seed: Tensor, offset: Tensor, family: int, params, training: bool,
    example: bool, grad_a: Tensor | None, grad_phi: Tensor | None, a_gated: Tensor | None,
) -> None:  # fmt: skip
    """Fill the outputs that are not None: grad_a = grad ⊙ z and a_gated = a ⊙ z ([R, P, C], a's
    dtype), grad_phi [P] (phi's dtype) = sum over r, c of grad·a·dz/dphi (zeros for binary gates).

    grad, a: [R, P, C]; all contiguous; gates as :func:`gate_mul` (never antithetic).
    """
    has_grad_phi = grad_phi is not None and family != BINARY and a.numel() > 0
    if grad_phi is not None and not has_grad_phi:
        grad_phi.zero_()  # binary gates carry no pathwise gradient; or a sum over no rows or columns
    if a.numel() == 0 or (grad_a is None and a_gated is None and not has_grad_phi):
        return
    scalars, k_inf = gate_scalars(family, params)
    grid, rows_per_program, blocks = _gate_mul_layout(a)
    mul = mul_dtype(a, phi)
    # per-program partial sums over rows, summed here: deterministic, unlike atomics
    partial = torch.empty(grid[1], a.shape[1], dtype=torch.float64 if mul == tl.float64 else torch.float32,
                          device=a.device) if has_grad_phi else a  # fmt: skip
    _gate_mul_backward_kernel[grid](
        grad, a, phi, a if grad_a is None else grad_a, partial, a if a_gated is None else a_gated,
        *a.shape, rows_per_program, seed, offset, *scalars,
        FAMILY=family, TRAINING=training, K_INF=k_inf, ROW_NOISE=training and example,
        HAS_GRAD_A=grad_a is not None, HAS_GRAD_PHI=has_grad_phi, HAS_A_GATED=a_gated is not None,
        ACC=acc_dtype(phi.dtype), MUL=mul, **blocks,
    )  # fmt: skip
    if has_grad_phi:
        grad_phi.copy_(partial.sum(0))


def _sample_spec(dtype: str, family: int, training: bool, batched: bool = False, k_inf: bool = False) -> AotSpec:
    acc = tl.float64 if dtype == "fp64" else tl.float32
    signature = {"phi_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n_phi": "i64", "n_out": "i64",
                 "seed_ptr": "*i64", "offset_ptr": "*i64", **_SCALARS}  # fmt: skip
    constexprs = {"FAMILY": family, "TRAINING": training, "K_INF": k_inf, "BATCHED": batched, "ACC": acc, "BLOCK": _BLOCK}
    return AotSpec(_sample_gates_kernel, signature, constexprs)


def _backward_spec(dtype: str, training: bool, aligned: bool) -> AotSpec:
    acc = tl.float64 if dtype == "fp64" else tl.float32
    signature = {"grad_z_ptr": f"*{dtype}", "phi_ptr": f"*{dtype}", "grad_phi_ptr": f"*{dtype}", "n_phi": "i64",
                 "n_batch": "i64", "seed_ptr": "*i64", "offset_ptr": "*i64", **_SCALARS}  # fmt: skip
    constexprs = {"FAMILY": HARD_CONCRETE, "TRAINING": training, "ALIGNED": aligned, "ACC": acc, "BLOCK": _BLOCK}
    return AotSpec(_sample_gates_backward_kernel, signature, constexprs)


def _penalty_spec(fn, dtype: str, family: int, has_weight: bool, sumsq: bool) -> AotSpec:
    acc = tl.float64 if dtype == "fp64" else tl.float32
    acc_name = "fp64" if dtype == "fp64" else "fp32"
    signature = {"phi_ptr": f"*{dtype}", "w_ptr": f"*{dtype}"}
    if fn is _l0_penalty_kernel:
        signature["partial_ptr"] = f"*{acc_name}"
    else:
        signature = {"grad_ptr": f"*{acc_name}", **signature, "grad_phi_ptr": f"*{dtype}", "grad_w_ptr": f"*{dtype}"}
    signature.update({"n": "i64", **_PENALTY_SCALARS})
    constexprs = {"FAMILY": family, "K_INF": False, "HAS_WEIGHT": has_weight, "SUMSQ": sumsq, "ACC": acc, "BLOCK": _BLOCK}
    return AotSpec(fn, signature, constexprs)


def _gate_mul_spec(a: str, phi: str, family: int, training: bool, row_noise: bool, aligned: bool = True,
                   antithetic: bool = False, backward: bool = False) -> AotSpec:  # fmt: skip
    acc = tl.float64 if phi == "fp64" else tl.float32
    mul = tl.float64 if "fp64" in (a, phi) else tl.float32
    sizes = {"n_rows": "i64", "n_units": "i64", "n_cols": "i64", "rows_per_program": "i64",
             "seed_ptr": "*i64", "offset_ptr": "*i64", **_SCALARS}  # fmt: skip
    constexprs = {"FAMILY": family, "TRAINING": training, "K_INF": False, "ROW_NOISE": row_noise, "ALIGNED": aligned,
                  "ACC": acc, "MUL": mul, "BLOCK_P": 64, "BLOCK_C": 16}  # fmt: skip
    if not backward:
        signature = {"a_ptr": f"*{a}", "phi_ptr": f"*{phi}", "out_ptr": f"*{a}", **sizes}
        return AotSpec(_gate_mul_kernel, signature, {**constexprs, "ANTITHETIC": antithetic})
    partial = "fp64" if mul == tl.float64 else "fp32"
    signature = {"grad_ptr": f"*{a}", "a_ptr": f"*{a}", "phi_ptr": f"*{phi}", "grad_a_ptr": f"*{a}",
                 "partial_ptr": f"*{partial}", "a_gated_ptr": f"*{a}", **sizes}  # fmt: skip
    has = {"HAS_GRAD_A": True, "HAS_GRAD_PHI": family == HARD_CONCRETE, "HAS_A_GATED": True}
    return AotSpec(_gate_mul_backward_kernel, signature, {**constexprs, **has})


AOT = [
    _sample_spec("fp32", HARD_CONCRETE, training=True),
    _sample_spec("fp32", BINARY, training=True),
    _sample_spec("bf16", HARD_CONCRETE, training=False, batched=True),
    _sample_spec("fp64", BINARY, training=False, k_inf=True),
    _backward_spec("fp32", training=True, aligned=True),
    _backward_spec("fp16", training=True, aligned=False),
    _backward_spec("fp64", training=False, aligned=True),
    _penalty_spec(_l0_penalty_kernel, "fp32", HARD_CONCRETE, has_weight=True, sumsq=False),
    _penalty_spec(_l0_penalty_kernel, "bf16", BINARY, has_weight=True, sumsq=True),
    _penalty_spec(_l0_penalty_kernel, "fp64", HARD_CONCRETE, has_weight=False, sumsq=False),
    _penalty_spec(_l0_penalty_backward_kernel, "fp32", HARD_CONCRETE, has_weight=True, sumsq=False),
    _penalty_spec(_l0_penalty_backward_kernel, "fp16", BINARY, has_weight=True, sumsq=True),
    _gate_mul_spec("bf16", "fp32", HARD_CONCRETE, training=True, row_noise=True),
    _gate_mul_spec("fp16", "fp16", HARD_CONCRETE, training=True, row_noise=True, aligned=False),
    _gate_mul_spec("fp32", "fp32", BINARY, training=True, row_noise=False, antithetic=True),
    _gate_mul_spec("fp64", "fp64", BINARY, training=False, row_noise=False),
    _gate_mul_spec("bf16", "fp32", HARD_CONCRETE, training=True, row_noise=True, backward=True),
    _gate_mul_spec("fp32", "fp32", HARD_CONCRETE, training=True, row_noise=False, backward=True),
    _gate_mul_spec("fp16", "fp32", HARD_CONCRETE, training=True, row_noise=True, aligned=False, backward=True),
    _gate_mul_spec("fp64", "fp64", BINARY, training=True, row_noise=True, backward=True),
]
