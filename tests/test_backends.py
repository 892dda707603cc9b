"""Backend discovery and selection: available(), reasons(), use(), NPN_BACKEND, select()."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import npn_kernels as npn


def test_available_lists_every_backend():
    avail = npn.backends.available()
    assert set(avail) == set(npn.backends.NAMES)
    assert avail["reference"] is True
    assert set(npn.backends.reasons()) == {name for name, ok in avail.items() if not ok}


def test_triton_on_cpu_only_under_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with a GPU triton is available without the interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not npn.backends.available()["triton"]
    assert "TRITON_INTERPRET" in npn.backends.reasons()["triton"]


def test_use_overrides_and_restores(monkeypatch):
    monkeypatch.setenv("NPN_BACKEND", "reference")
    assert npn.backends.select("cpu") == "reference"
    if npn.backends.available()["cpu"]:
        with npn.backends.use("cpu"):
            assert npn.backends.select("cpu") == "cpu"
    assert npn.backends.current() == "reference"


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("NPN_BACKEND", raising=False)
    expected = "cpu" if npn.backends.available()["cpu"] else "reference"
    assert npn.backends.select("cpu") == expected


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="backend: expected one of reference, cpu, cuda, triton, got 'fast'"):
        with npn.backends.use("fast"):
            pass
    monkeypatch.setenv("NPN_BACKEND", "fast")
    with pytest.raises(ValueError, match="NPN_BACKEND: expected one of"):
        npn.backends.select("cpu")


def test_unavailable_backend_says_why():
    if npn.backends.available()["cuda"]:
        pytest.skip("cuda is available here")
    with pytest.raises(ValueError, match="backend 'cuda' is not available here: "):
        with npn.backends.use("cuda"):
            pass


def test_backend_for_the_wrong_device():
    with npn.backends.use("reference"):
        assert npn.backends.select("cpu") == "reference"
    if npn.backends.available()["cpu"]:
        with npn.backends.use("cpu"), pytest.raises(ValueError, match="cannot run on cuda tensors"):
            npn.backends.select("cuda")


def test_import_without_extension_or_triton():
    """Hide npn_kernels._C and triton: importing still works, and the reasons say what is missing."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'npn_kernels._C' or name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('hidden by the test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import npn_kernels as npn\n"
        "print(npn.backends.available())\n"
        "print(npn.backends.reasons())\n"
        "print(npn.ops.uniforms(5, seed=1, offset=2).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'reference': True, 'cpu': False" in out
    assert "npn_kernels._C did not load" in out and "triton is not installed" in out
    assert out.splitlines()[2] == str(npn.ops.uniforms(5, seed=1, offset=2).tolist())
