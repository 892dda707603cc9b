"""`npn demo`: NPN sparsifies a 100-80 MLP and expands a 3-3 one on embedded two moons, then plots both."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

import npn_kernels as npn
from npn_kernels.demo import plots
from npn_kernels.demo.data import moons_splits
from npn_kernels.demo.train import RunResult, active_weights, fmt_arch, stages, train

SPLITS = {"train": 2000, "val": 500, "test": 1000}  # points per split
DEFAULT_EPOCHS = 60
DEFAULT_OUT = Path("npn-demo")


def table(runs: list[RunResult], backend: str) -> str:
    """The final table: one row per run."""
    head = ("mode", "hidden units", "active weights", "test acc", "wall time", "backend")
    rows = [head]
    for r in runs:
        rows.append((r.mode, f"{fmt_arch(r.initial)} -> {fmt_arch(r.final)}",
                     f"{active_weights(r.initial)} -> {active_weights(r.final)}", f"{100 * r.test_accuracy:.1f}%",
                     f"{r.seconds:.1f} s", backend))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _train_both(epochs: int, seed: int, backend: str | None) -> tuple[list[RunResult], str, dict]:
    with npn.backends.use(backend) if backend else contextlib.nullcontext():
        used = npn.backends.select(torch.device("cpu"))
        splits = moons_splits(SPLITS, seed=seed)
        print(f"npn demo: two moons (noise 0.1) embedded in 100 inputs by a fixed random projection; "
              f"{SPLITS['train']} train, {SPLITS['val']} val, {SPLITS['test']} test points; {epochs} epochs "
              f"(stages end at epochs {', '.join(map(str, stages(epochs)))}, {epochs}); backend {used}")  # fmt: skip
        runs = [train(mode, splits, epochs=epochs, seed=seed) for mode in ("sparsify", "expand")]
    return runs, used, splits


def run(out: Path = DEFAULT_OUT, epochs: int = DEFAULT_EPOCHS, seed: int = 0, backend: str | None = None) -> dict:
    """Both runs, the table (printed) and the PNGs in ``out``; returns {"runs", "table", "files", "backend", "seconds"}."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 3:
        raise ValueError(f"epochs: expected an int >= 3 (one per stage), got {epochs!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: a batch of 100 × 100 features is too small to split across cores, and on a busy
    # 2-core box a second OpenMP thread only waits for the first
    torch.set_num_threads(1)
    try:
        runs, used, splits = _train_both(epochs, seed, backend)
    finally:
        torch.set_num_threads(threads)
    points, labels = splits["test"][2], splits["test"][1]
    files = [plots.decision_boundaries(runs, points, labels, seed, out / "decision_boundaries.png"),
             plots.active_units(runs, stages(epochs), out / "active_units.png")]  # fmt: skip
    text = table(runs, used)
    print(text)
    print("wrote " + ", ".join(str(f) for f in files))
    return {"runs": runs, "table": text, "files": files, "backend": used, "seconds": time.perf_counter() - t0}
