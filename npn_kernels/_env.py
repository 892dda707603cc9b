"""Every environment variable npn_kernels reads, read here and nowhere else.

This module imports nothing from the package (and not torch), so setup.py can load it by path.
"""

from __future__ import annotations

import os

# name -> what it does; tests/test_env.py checks that the README table lists every name.
ENV_VARS: dict[str, str] = {
    "NPN_BACKEND": "Backend for every op: `reference`, `cpu`, `cuda` or `triton`. "
    "Unset: chosen per device (CUDA: triton, else cuda, else reference; CPU: cpu, else reference).",
    "NPN_SKIP_EXT": "`1`: `setup.py` builds no C++ extension (only the reference and Triton backends).",
    "NPN_FORCE_CUDA": "`1`: `setup.py` builds the CUDA sources even where no GPU is visible "
    "(needs a CUDA build of torch and nvcc).",
    "NPN_CPU_ARCH": "`baseline`: `setup.py` compiles the C++ kernels for any x86-64 CPU; default `native`: "
    "with AVX-512 or AVX2+FMA when the building CPU has them (about 4x faster gate kernels, but the "
    "build then runs only on such CPUs).",
    "NPN_BENCH_RESULTS": "Folder where `npn bench` writes its JSON (default `bench/results/`).",
    "NPN_TEST_SEED": "Base seed of the test suite (default: random, printed in the pytest header).",
    "NPN_FUZZ_EXAMPLES": "Examples per property of `tests/test_fuzz.py`. Unset: a fixed (derandomized) "
    "sample sized for CI; a number, e.g. `2000`: that many fresh random examples (a longer fuzz).",
    "TRITON_INTERPRET": "Triton's own switch, read when the kernels are imported: `1` runs the "
    "Triton kernels on CPU tensors (the test suite sets it).",
}


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def backend() -> str | None:
    """NPN_BACKEND, or None when unset or empty."""
    value = os.environ.get("NPN_BACKEND", "").strip().lower()
    return value or None


def skip_ext() -> bool:
    return _flag("NPN_SKIP_EXT")


def force_cuda() -> bool:
    return _flag("NPN_FORCE_CUDA")


def cpu_arch() -> str:
    """NPN_CPU_ARCH: "native" (default) or "baseline"."""
    value = os.environ.get("NPN_CPU_ARCH", "").strip().lower() or "native"
    if value not in ("native", "baseline"):
        raise ValueError(f"NPN_CPU_ARCH: expected 'native' or 'baseline', got {value!r}")
    return value


def bench_results() -> str | None:
    return os.environ.get("NPN_BENCH_RESULTS") or None


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")


def test_seed() -> int:
    """NPN_TEST_SEED, or a fresh random seed when unset."""
    value = os.environ.get("NPN_TEST_SEED", "").strip()
    return int(value) if value else int.from_bytes(os.urandom(4), "little")


def fuzz_examples() -> int | None:
    """NPN_FUZZ_EXAMPLES, or None when unset or empty."""
    value = os.environ.get("NPN_FUZZ_EXAMPLES", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"NPN_FUZZ_EXAMPLES: expected an int >= 1, got {value!r}")
    return int(value)


def set_variables() -> dict[str, str]:
    """The variables of ENV_VARS that are set, with their values (for `npn info`)."""
    return {name: os.environ[name] for name in ENV_VARS if name in os.environ}
