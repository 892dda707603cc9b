"""The `npn` console script and the bench runner, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import npn_kernels as npn
from bench import runner
from npn_kernels import cli


def test_info_lists_backends_versions_and_reasons(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"npn_kernels {npn.__version__}" in out
    assert "torch " in out and "triton " in out and "numpy " in out and "python " in out
    for name, ok in npn.backends.available().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert ("yes" in line) == ok
        if not ok:
            assert npn.backends.reasons()[name] in line


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "npn_kernels.cli", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout


def test_bench_runner_writes_ratios(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NPN_BENCH_RESULTS", str(tmp_path))
    assert cli.main(["bench", "-k", "uniforms", "--small", "--rounds", "2", "--min-seconds", "0.001", "--undated"]) == 0
    (out,) = tmp_path.iterdir()
    assert out.name == runner.results_name(runner.machine()["device"], None, True)
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert rows["torch.rand"]["ratio"] == 1.0 and rows["reference"]["median_ms"] > 0
    assert "ratio" in capsys.readouterr().out


def test_bench_results_name():
    results_name = runner.results_name
    assert results_name("cpu", "2026-11-24", False) == "cpu-2026-11-24.json"  # the default, as before --undated
    assert results_name("cpu", None, True) == "cpu-small.json"
    assert results_name("NVIDIA H100 80GB HBM3", None, False) == "NVIDIA_H100_80GB_HBM3.json"
    assert results_name("GPU (a/b)", None, False) == "GPU_a_b_.json"


def test_bench_rounds_put_each_target_next_to_its_comparison():
    """A target's two variants run back to back, every other round in reverse order (calls 4-7:
    the one call each that sizes a sample)."""
    from bench.registry import Case, Target

    calls: list[str] = []

    def make(small):
        return {name: (lambda name=name: calls.append(name)) for name in ("base", "other", "slow", "fast")}

    case = Case(name="order", row="", description="", baseline="base", make=make,
                targets=(Target("fast", "<=", 1e9), Target("fast", "<=", 1e9, versus="slow")))  # fmt: skip
    rows = runner.time_case(case, small=True, rounds=2, min_seconds=0.0)
    assert calls[:4] == ["base", "other", "slow", "fast"]  # warm-up, in the case's order
    assert calls[8:] == ["base", "fast", "slow", "other", "other", "slow", "fast", "base"]
    assert all(r["ratio"] > 0 for r in rows) and all(c["ok"] for r in rows for c in r["targets"])
