"""Which backends can run here, and which one an op uses.

Backends: ``reference`` (pure PyTorch, always), ``cpu`` (the C++ extension on CPU tensors),
``cuda`` (the CUDA extension on CUDA tensors), ``triton`` (Triton kernels on CUDA tensors, or on
CPU tensors under ``TRITON_INTERPRET=1``). An explicit choice comes from :func:`use` or the
``NPN_BACKEND`` environment variable; otherwise :func:`select` picks per device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch

from npn_kernels import _env, _ext

NAMES: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")

_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("npn_backend", default=None)


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'npn_kernels[triton]'"
    return None


def reasons() -> dict[str, str]:
    """For each backend that cannot run here, why not (backends that can are absent)."""
    why: dict[str, str] = {}
    if not _ext.loaded():
        why["cpu"] = f"{_ext.LOAD_ERROR}; reinstall with pip install --no-build-isolation -e ."
    if not torch.cuda.is_available():
        why["cuda"] = "torch sees no CUDA device"
    elif not _ext.loaded():
        why["cuda"] = str(_ext.LOAD_ERROR)
    elif _ext.build_info().get("cuda") != "yes":
        why["cuda"] = "npn_kernels._C was built without CUDA sources (set NPN_FORCE_CUDA=1 to build them)"
    triton_error = _triton_import_error()
    if triton_error is not None:
        why["triton"] = triton_error
    elif not torch.cuda.is_available() and not _env.triton_interpret():
        why["triton"] = "no CUDA device, and TRITON_INTERPRET=1 is not set (the CPU interpreter)"
    return why


def available() -> dict[str, bool]:
    """{backend name: whether it can run here}, for all of NAMES."""
    why = reasons()
    return {name: name not in why for name in NAMES}


def _check_name(name: str, source: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{source}: expected one of {', '.join(NAMES)}, got {name!r}")
    why = reasons().get(name)
    if why is not None:
        raise ValueError(f"{source}: backend {name!r} is not available here: {why}")
    return name


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """Run every op inside the block on backend ``name`` (overrides NPN_BACKEND)."""
    token = _choice.set(_check_name(name, "backend"))
    try:
        yield name
    finally:
        _choice.reset(token)


def current() -> str | None:
    """The explicitly chosen backend (use() first, then NPN_BACKEND), or None for automatic."""
    name = _choice.get()
    if name is not None:
        return name
    env = _env.backend()
    return None if env is None else _check_name(env, "NPN_BACKEND")


def runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and _env.triton_interpret())


@torch.compiler.assume_constant_result
def select(device: torch.device | str) -> str:
    """The backend that runs an op on tensors of ``device``.

    Under torch.compile the answer is read when the graph is traced and kept in it (dynamo cannot
    trace the ContextVar behind `use`): a graph runs on the backend it was compiled under."""
    device = torch.device(device)
    name = current()
    if name is not None:
        if not runs_on(name, device):
            raise ValueError(
                f"backend {name!r} cannot run on {device.type} tensors; choose another with "
                f"npn.backends.use(...) or NPN_BACKEND"
            )
        return name
    if device.type != "cuda":  # every op call selects: the CPU answer skips reasons() (~15 us)
        return "cpu" if _ext.loaded() else "reference"
    ok = available()
    return next((n for n in ("triton", "cuda") if ok[n]), "reference")
