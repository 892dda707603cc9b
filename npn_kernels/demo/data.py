"""Data for the demo and the experiment scripts: embedded two moons (generated) and MNIST (IDX files).

Nothing here downloads: the moons are generated from a seed, MNIST is read from a folder that
holds the four standard gzipped IDX files.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# NPN's synthetic task: the 2-D moons embedded in 100 dimensions (here by a fixed random projection)
MOONS_DIM = 100
MOONS_NOISE = 0.1  # std of the Gaussian noise added to the 2-D moon coordinates (sklearn's make_moons(noise=0.1))

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: 0x0000 08 0d (unsigned byte, d dimensions)
IDX_UBYTE = 0x08
MNIST_SIZES = {"train": 60000, "test": 10000}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # over the training images, the usual normalization


def two_moons(n: int, *, seed: int, noise: float = MOONS_NOISE) -> tuple[Tensor, Tensor]:
    """n points of the two moons (sklearn's make_moons layout): (points [n, 2] float32, labels [n] int64).

    Class 0 is the upper moon (cos t, sin t), class 1 the lower one (1 − cos t, 1/2 − sin t),
    t ~ U(0, π); both get N(0, noise²) added per coordinate. Half the points (rounded down) are class 0.
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) >= n // 2).long()
    t = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    points = points + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    return points[perm].float(), labels[perm]


def projection(seed: int, dim: int = MOONS_DIM) -> Tensor:
    """The fixed random linear map R^2 -> R^dim: [2, dim], N(0, 1/2) entries (each input ~ unit scale)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, dim, generator=g) / math.sqrt(2)


def embed(points: Tensor, *, seed: int, dim: int = MOONS_DIM) -> Tensor:
    """2-D points [n, 2] -> [n, dim] by the fixed random projection of ``seed``.

    The 100 inputs are correlated mixtures of the two moon coordinates (rank 2); a grid of 2-D
    points embedded with the same seed shows what the network learnt on the moons' plane.
    """
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points: expected shape [n, 2], got {tuple(points.shape)}")
    return points @ projection(seed, dim).to(points.dtype)


def moons_splits(sizes: dict[str, int], *, seed: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{split: (embedded inputs [n, 100], labels [n], 2-D points [n, 2])}: points drawn per split, one projection (``seed``)."""
    out = {}
    for i, (name, n) in enumerate(sizes.items()):
        points, labels = two_moons(n, seed=seed * 1000 + i + 1)
        out[name] = (embed(points, seed=seed), labels, points)
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped when its name ends in .gz) as a uint8 array of its stated shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}, expected 000008dd)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise ValueError(f"{path}: IDX data holds {len(raw) - header} bytes, the header's shape {shape} needs {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """MNIST ``split`` ("train" or "test") from the gzipped IDX files in ``data_dir``.

    Returns (images [n, 1, 28, 28] float32, normalized with MNIST_MEAN/STD, labels [n] int64).
    """
    data_dir = Path(data_dir)
    if split not in MNIST_FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    paths = [data_dir / name for name in MNIST_FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNIST {split} files missing: {', '.join(missing)} (pass --data-dir: a folder "
                                f"with {', '.join(n for names in MNIST_FILES.values() for n in names)})")  # fmt: skip
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    n = MNIST_SIZES[split]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(f"{data_dir}: MNIST {split} expected images ({n}, 28, 28) and labels ({n},), "
                         f"got {images.shape} and {labels.shape}")  # fmt: skip
    if labels.max() > 9:
        raise ValueError(f"{paths[1]}: labels must be 0..9, found {int(labels.max())}")
    x = (torch.from_numpy(images.astype(np.float32)) / 255 - MNIST_MEAN) / MNIST_STD
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
