"""The benchmark cases: each one a set of variants of the same work, timed side by side.

A case's ``make(small)`` builds its inputs and returns {variant name: zero-argument callable};
``baseline`` names the variant the others are divided by. ``targets`` holds DESIGN section 6's
figures as :class:`Target`: time(variant) / time(versus) must satisfy ``op value``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import npn_kernels as npn

Variants = dict[str, Callable[[], object]]


@dataclass(frozen=True)
class Target:
    variant: str
    op: str  # "<=" or ">="
    value: float
    versus: str | None = None  # default: the case's baseline

    def met(self, ratio: float) -> bool:
        """Whether time(variant) / time(versus) = ratio meets the target."""
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def describe(self, baseline: str) -> str:
        return f"{self.op} {self.value:.3g}x {self.versus or baseline}"


@dataclass(frozen=True)
class Case:
    name: str  # the op's name, as in its kernel, op, module and test
    row: str  # DESIGN section 6 row id ("C1"...), or "" for a supporting measurement
    description: str
    baseline: str
    make: Callable[[bool], Variants]
    targets: tuple[Target, ...] = ()
    bytes_moved: Callable[[bool], int] | None = None  # for GB/s, per call of a variant


CASES: dict[str, Case] = {}


def grads(outputs, inputs, grad_outputs):
    """The forward + backward of a variant: torch.autograd.grad with given upstream gradients."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def npn_variants(variants: Variants, fn) -> Variants:
    """Adds the npn variants of a case: ``fn`` on the reference backend, and on cpu where built."""
    for backend in ("reference", "cpu"):
        if npn.backends.available()[backend]:

            def run(backend=backend):
                with npn.backends.use(backend):
                    return fn()

            variants[backend] = run
    return variants


def register(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"bench case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


def load_all() -> dict[str, Case]:
    """Import every module of bench/cases (each registers its cases) and return the registry."""
    import importlib
    import pkgutil

    from bench import cases

    for info in pkgutil.iter_modules(cases.__path__):
        importlib.import_module(f"bench.cases.{info.name}")
    return CASES
