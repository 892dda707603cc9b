"""The compiled extension: built with OpenMP, parallel_for really parallel, CUDA sources compile."""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from npn_kernels import _ext

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ext
def test_openmp_and_threads():
    info = _ext.build_info()
    assert info["openmp"] != "no", "npn_kernels._C was compiled without -fopenmp"
    threads = torch.get_num_threads()
    # Without -fopenmp at link time at::parallel_for silently runs every task on one thread.
    assert _ext.ops.parallel_threads(8 * threads) == threads


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))), ids=lambda p: Path(p).name)
def test_cuda_source_compiles_for_hopper(source, tmp_path):
    cmd = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", source, "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
