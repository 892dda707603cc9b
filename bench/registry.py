"""The benchmark cases: each one a set of variants of the same work, timed side by side.

A case's ``make(small)`` builds its inputs and returns {variant name: zero-argument callable};
``baseline`` names the variant the others are divided by. ``targets`` holds DESIGN section 6's
figures as {variant: (op, ratio)} with ratio = time(variant) / time(baseline), op "<=" or ">=".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Variants = dict[str, Callable[[], object]]


@dataclass(frozen=True)
class Case:
    name: str  # the op's name, as in its kernel, op, module and test
    row: str  # DESIGN section 6 row id ("C1"...), or "" for a supporting measurement
    description: str
    baseline: str
    make: Callable[[bool], Variants]
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    bytes_moved: Callable[[bool], int] | None = None  # for GB/s, per call of a variant


CASES: dict[str, Case] = {}


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
