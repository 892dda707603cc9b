"""Every Triton kernel compiles ahead of time for Hopper (sm_90) without a GPU.

The interpreter (used by the other tests) checks what kernels compute; this checks that they
lower to PTX and a cubin. It runs in a subprocess because kernels imported with
TRITON_INTERPRET=1 are interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "npn_kernels.ops.aot", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    from npn_kernels.ops.aot import KERNEL_MODULES

    assert result.stdout.count("sm_90 ") >= len(KERNEL_MODULES)
