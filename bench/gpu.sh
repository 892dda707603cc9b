#!/usr/bin/env bash
# The GPU run (DESIGN section 5), for a Linux machine with a CUDA GPU and the CUDA toolkit (nvcc):
# installs torch with CUDA and triton, builds npn_kernels._C with its CUDA sources, prints
# `npn info`, runs the GPU tests (markers gpu and triton: Triton compiled for the GPU, not the
# interpreter) and the benchmarks, which write bench/results/<GPU name>.json.
#
#   bash bench/gpu.sh
#
# Python environment: the active virtual environment, else .venv/ at the repository root (the
# Quick start's), created if missing. NPN_GPU_TORCH replaces the pip arguments for torch (default
# torch==2.13.0: PyPI's Linux wheels are CUDA builds), e.g.
#   NPN_GPU_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# Setup and build stop the script at the first error; the tests and the benchmarks both run even
# if one fails, and the exit status is 1 if either failed (the benchmarks also fail when a case
# misses its DESIGN target: the table marks it MISS).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091  # created above
  . .venv/bin/activate
fi

# an array, so the variable may carry pip options (--index-url ...) without unquoted expansion
read -r -a torch_spec <<<"${NPN_GPU_TORCH:-torch==2.13.0}"
echo "+ pip install ${torch_spec[*]} triton==3.8.0"
python -m pip install "${torch_spec[@]}" triton==3.8.0 "numpy==2.4.*" setuptools wheel ninja

# A CPU build of torch already in the environment satisfies torch==2.13.0 (pip ignores the +cpu
# label) and would silently give a CPU-only build: check before building.
python - <<'EOF'
import sys

import torch
from torch.utils.cpp_extension import CUDA_HOME

if torch.version.cuda is None:
    sys.exit(f"gpu.sh: torch {torch.__version__} is a CPU build: reinstall a CUDA one, e.g. "
             "NPN_GPU_TORCH='--force-reinstall torch==2.13.0' bash bench/gpu.sh")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")
if CUDA_HOME is None:
    sys.exit(f"gpu.sh: no CUDA toolkit found (nvcc): install CUDA {torch.version.cuda} and set CUDA_HOME")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda} ({CUDA_HOME}), {torch.cuda.get_device_name()}")
EOF

# NPN_FORCE_CUDA: a build that cannot compile the CUDA sources fails here rather than quietly
# producing a CPU-only extension
echo "+ NPN_FORCE_CUDA=1 pip install --no-build-isolation -e .[test]"
NPN_FORCE_CUDA=1 python -m pip install --no-build-isolation -e ".[test]"

npn info
python - <<'EOF'
import sys

import npn_kernels as npn

missing = npn.backends.reasons()  # only missing backends are listed
if missing:
    sys.exit(f"gpu.sh: backends missing after the build: {missing}")
EOF

# tests/conftest.py sets TRITON_INTERPRET=1 only where there is no GPU; an inherited 1 would run
# the Triton kernels in the interpreter instead of on the GPU
unset TRITON_INTERPRET
failed=()
echo "+ python -m pytest -m 'gpu or triton'"
python -m pytest -m "gpu or triton" || failed+=(tests)
echo "+ python -m bench --undated"
python -m bench --undated || failed+=(benchmarks)

if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu.sh: done"
