"""pytest-benchmark suite over the registered cases: `pytest bench --benchmark-enable`.

With benchmarking disabled (the default in pyproject.toml) every variant runs once at small
shapes: the test suite checks that each case still runs. Ratios come from `npn bench`.
"""

from __future__ import annotations

import pytest

from bench.registry import load_all

PAIRS = [(case, variant) for case in load_all().values() for variant in case.make(True)]


@pytest.mark.parametrize("case, variant", PAIRS, ids=[f"{c.name}-{v}" for c, v in PAIRS])
def test_case(benchmark, case, variant):
    fn = case.make(benchmark.disabled)[variant]
    benchmark.group = case.name
    benchmark(fn)
