"""The noise stream: our Philox against torch.rand of the same size (supporting row)."""

from __future__ import annotations

import torch

import npn_kernels as npn
from bench.registry import Case, register


def _n(small: bool) -> int:
    return 1 << 12 if small else 1 << 22


def _make(small: bool):
    n = _n(small)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = {"torch.rand": lambda: torch.rand(n, device=device)}
    for name, ok in npn.backends.available().items():
        if ok and npn.backends.runs_on(name, torch.device(device)) and not (name == "triton" and device == "cpu"):

            def run(name=name):
                with npn.backends.use(name):
                    return npn.ops.uniforms(n, seed=1, offset=0, device=device)

            variants[name] = run
    return variants


register(
    Case(
        name="uniforms",
        row="",
        description="4M float32 uniforms from (seed, offset) vs torch.rand",
        baseline="torch.rand",
        make=_make,
        bytes_moved=lambda small: 4 * _n(small),
    )
)
