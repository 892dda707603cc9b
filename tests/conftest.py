"""Test setup: the Triton interpreter on CPU-only machines, per-test seeding, capability markers."""

from __future__ import annotations

import os
import zlib

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is first
# imported; npn_kernels imports kernel modules lazily, so setting it here is early enough.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import npn_kernels as npn  # noqa: E402
from npn_kernels import _env  # noqa: E402

_SESSION_SEED = _env.test_seed()

# Hypothesis profiles of tests/test_fuzz.py. "ci" (the default): a fixed, derandomized sample, the
# same examples on every run, sized to keep the file near 30 s on 2 cores. "long": chosen by
# NPN_FUZZ_EXAMPLES=<n>, n fresh random examples per property, e.g.
#   NPN_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py
# A failure prints the falsifying example and a @reproduce_failure blob to replay it.
# Each example draws its own torch seed, so the function-scoped _seed fixture changes nothing in it.
_FUZZ_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=30, derandomize=True, **_FUZZ_COMMON)
settings.register_profile("long", max_examples=_env.fuzz_examples() or 1, print_blob=True, **_FUZZ_COMMON)
settings.load_profile("long" if _env.fuzz_examples() else "ci")


def pytest_report_header(config):
    avail = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in npn.backends.available().items())
    return [f"npn_kernels backends: {avail}", f"npn test seed: {_SESSION_SEED} (set NPN_TEST_SEED to replay)"]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the session seed and the test's id."""
    seed = (_SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(autouse=True)
def _gpu_backend_device(request):
    """Tests of the GPU backends on the GPU. Where CUDA is available, a test that runs the cuda or
    triton backend (marked gpu or triton: tests/helpers.py backend_params puts those marks on the
    "cuda" and "triton" parameters, and tests calling the Triton launchers directly carry the
    triton mark) runs inside ``torch.device("cuda")``: torch's default device is CUDA for the test
    and the previous default comes back after it. Tensors made without ``device=`` (torch.randn,
    torch.tensor, ...) then land on the GPU; tests pass ``torch.get_default_device()`` where a
    device must be named (rng_tensors), and helpers.poisoned follows the default device.
    Without CUDA nothing changes: the triton tests run on CPU tensors under TRITON_INTERPRET=1."""
    gpu_test = any(request.node.get_closest_marker(name) is not None for name in ("gpu", "triton"))
    if not (gpu_test and torch.cuda.is_available()):
        yield
        return
    with torch.device("cuda"):
        yield


_MARKER_NEEDS = {
    "ext": lambda: (npn.backends.available()["cpu"], npn.backends.reasons().get("cpu")),
    "triton": lambda: (npn.backends.available()["triton"], npn.backends.reasons().get("triton")),
    "gpu": lambda: (torch.cuda.is_available(), "no CUDA device"),
}


def pytest_runtest_setup(item):
    for name, probe in _MARKER_NEEDS.items():
        if item.get_closest_marker(name) is not None:
            ok, why = probe()
            if not ok:
                pytest.skip(f"needs {name}: {why}")
