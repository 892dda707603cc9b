"""Ahead-of-time compilation of every Triton kernel for a real GPU target, without a GPU.

Each `triton.py` lists its kernels in a module-level ``AOT`` of :class:`AotSpec`. The
interpreter (TRITON_INTERPRET=1) checks what kernels compute; compiling them for Hopper checks
what it cannot: that they lower to PTX and a cubin at all, and that `tl.dot` becomes wgmma.
Run as ``python -m npn_kernels.ops.aot`` with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any

# Every module that defines Triton kernels; the AOT check and its test walk this list.
KERNEL_MODULES: tuple[str, ...] = (
    "npn_kernels.ops.uniforms.triton",
    "npn_kernels.ops.gates.triton",
    "npn_kernels.ops.gated_linear.triton",
)


@dataclass(frozen=True)
class AotSpec:
    """One compilation of ``fn``: argument types (Triton signature strings) and constexprs."""

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    expect_in_ptx: tuple[str, ...] = ()  # e.g. ("wgmma",) for a bf16 tl.dot on sm_90


def compile_spec(spec: AotSpec, arch: int = 90) -> dict[str, Any]:
    """Compile for ``sm_<arch>``; return name, PTX size, cubin size; raise if PTX lacks a marker."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    src = ASTSource(spec.fn, signature, spec.constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    ptx = kernel.asm["ptx"]
    missing = [marker for marker in spec.expect_in_ptx if marker not in ptx]
    if missing:
        raise AssertionError(f"{spec.fn.__name__}: PTX for sm_{arch} lacks {missing}")
    return {"kernel": spec.fn.__name__, "ptx_bytes": len(ptx), "cubin_bytes": len(kernel.asm["cubin"])}


def all_specs() -> list[AotSpec]:
    return [spec for name in KERNEL_MODULES for spec in importlib.import_module(name).AOT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    args = parser.parse_args(argv)
    from npn_kernels import _env

    if _env.triton_interpret():
        parser.error("TRITON_INTERPRET is set: kernels are interpreted and cannot be compiled; unset it")
    for spec in all_specs():
        result = compile_spec(spec, args.arch)
        print(f"sm_{args.arch} {result['kernel']}: ptx {result['ptx_bytes']} B, cubin {result['cubin_bytes']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
