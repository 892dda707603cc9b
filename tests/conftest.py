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

import npn_kernels as npn  # noqa: E402
from npn_kernels import _env  # noqa: E402

_SESSION_SEED = _env.test_seed()


def pytest_report_header(config):
    avail = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in npn.backends.available().items())
    return [f"npn_kernels backends: {avail}", f"npn test seed: {_SESSION_SEED} (set NPN_TEST_SEED to replay)"]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the session seed and the test's id."""
    seed = (_SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    yield seed


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
