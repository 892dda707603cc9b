"""`npn demo` end to end at 3 epochs, the two-moons generator and the MNIST IDX reader."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

import npn_kernels as npn
from npn_kernels import cli
from npn_kernels.demo import run
from npn_kernels.demo.data import embed, load_mnist, moons_splits, read_idx, two_moons


def test_two_moons_layout_and_seed():
    points, labels = two_moons(400, seed=3, noise=0.0)
    assert points.shape == (400, 2) and points.dtype == torch.float32 and labels.shape == (400,)
    assert int(labels.sum()) == 200
    upper, lower = points[labels == 0], points[labels == 1]
    # noise 0: the upper moon lies on the unit circle around (0, 0), the lower one on the one around (1, 0.5)
    assert torch.allclose(upper.norm(dim=1), torch.ones(200), atol=1e-5) and (upper[:, 1] >= -1e-6).all()
    assert torch.allclose((lower - torch.tensor([1.0, 0.5])).norm(dim=1), torch.ones(200), atol=1e-5)
    again, same = two_moons(400, seed=3, noise=0.0)
    assert torch.equal(points, again) and torch.equal(labels, same)
    assert not torch.equal(two_moons(400, seed=4)[0], two_moons(400, seed=3)[0])


def test_embedding_is_a_fixed_rank_two_projection():
    splits = moons_splits({"train": 50, "test": 30}, seed=1)
    x, y, p = splits["train"]
    assert x.shape == (50, 100) and y.shape == (50,) and p.shape == (50, 2)
    assert torch.allclose(x, embed(p, seed=1)) and torch.linalg.matrix_rank(x) == 2
    assert torch.allclose(splits["test"][0], embed(splits["test"][2], seed=1))  # one projection for every split
    with pytest.raises(ValueError, match="points"):
        embed(torch.zeros(4, 3), seed=0)


def _idx(path, array: np.ndarray, magic_type: int = 0x08):
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_gzipped(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _idx(tmp_path / "img.gz", images)
    out = read_idx(tmp_path / "img.gz")
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8 and np.array_equal(out, images)
    _idx(tmp_path / "lab.gz", np.array([1, 7, 9]))
    assert read_idx(tmp_path / "lab.gz").tolist() == [1, 7, 9]
    _idx(tmp_path / "float.gz", images, magic_type=0x0D)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "float.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:  # the header promises 60 bytes, 10 follow
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 4, 5) + bytes(10))
    with pytest.raises(ValueError, match="needs 60"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_load_mnist_names_missing_files_and_checks_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "t10k-images-idx3-ubyte.gz")):
        load_mnist(tmp_path, "test")
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(ValueError, match="10000"):
        load_mnist(tmp_path, "test")


def test_demo_smoke(tmp_path, capsys):
    result = run(out=tmp_path, epochs=3, seed=0, backend="reference")
    assert [r.mode for r in result["runs"]] == ["sparsify", "expand"]
    sparsify, expand = result["runs"]
    assert sparsify.initial == [100, 80] and expand.initial == [3, 3]
    assert len(sparsify.history) == 3 and [h["k"] for h in sparsify.history] == [float("inf"), 7.0, float("inf")]
    for f in result["files"]:
        assert f.stat().st_size > 10_000 and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "sparsify  100-80 ->" in out and "expand    3-3 ->" in out and "reference" in out


def test_demo_cli(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--epochs", "3", "--seed", "1", "--backend", "reference"]) == 0
    assert (tmp_path / "d" / "decision_boundaries.png").exists() and (tmp_path / "d" / "active_units.png").exists()
    assert "test acc" in capsys.readouterr().out


def test_demo_cli_rejects_bad_options(tmp_path, capsys):
    for argv in (["--epochs", "2"], ["--backend", "cuda"] if not npn.backends.available()["cuda"] else ["--epochs", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2
    assert "demo --" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
