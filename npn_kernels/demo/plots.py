"""The demo's figures (matplotlib, Agg backend): decision boundaries and active units over epochs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter, ScalarFormatter

from npn_kernels.demo.data import embed
from npn_kernels.demo.train import HIDDEN, RunResult, fmt_arch

GRID = 200  # points per axis of the decision-boundary grid
BOX = (-1.6, 2.6, -1.1, 1.6)  # x0, x1, y0, y1: the moons with noise 0.1 lie inside


@torch.no_grad()
def _probabilities(model, xs: torch.Tensor, ys: torch.Tensor, seed: int) -> torch.Tensor:
    """P(class 1) on the grid [GRID, GRID]: grid points embedded like the data (projection of ``seed``)."""
    points = torch.stack([xs.flatten(), ys.flatten()], 1)
    model.eval()
    p = torch.softmax(model(embed(points, seed=seed)), 1)[:, 1]
    model.train()
    return p.view(xs.shape)


def decision_boundaries(runs: list[RunResult], points: torch.Tensor, labels: torch.Tensor, seed: int, path: Path) -> Path:
    """One panel per run: P(class 1) over the 2-D moons plane, the 0.5 contour, test points [n, 2] / labels [n]."""
    xs, ys = torch.meshgrid(torch.linspace(BOX[0], BOX[1], GRID), torch.linspace(BOX[2], BOX[3], GRID), indexing="xy")
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        p = _probabilities(run.model, xs, ys, seed)
        ax.contourf(xs, ys, p, levels=20, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
        ax.contour(xs, ys, p, levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="RdBu_r", s=6, edgecolors="none")
        ax.set(xlim=BOX[:2], ylim=BOX[2:], xlabel="moon x", ylabel="moon y",
               title=f"{run.mode}: {fmt_arch(run.initial)} → {fmt_arch(run.final)}, test acc "
                     f"{100 * run.test_accuracy:.1f}%")  # fmt: skip
    fig.suptitle("NPN decision boundaries (hidden units per layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def active_units(runs: list[RunResult], stages: tuple[int, int], path: Path) -> Path:
    """One panel per run: active units of each hidden layer over epochs, the stage boundaries dotted."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    names = ("hidden layer 1", "hidden layer 2")
    for ax, run in zip(axes[0], runs):
        epochs = [h["epoch"] + 1 for h in run.history]
        for i, name in enumerate(names):
            ax.plot([0, *epochs], [run.initial[i], *(h["architecture"][i] for h in run.history)], label=name)
        for e in stages:
            ax.axvline(e, color="grey", ls=":")
        ax.set(xlabel="epoch", ylabel="active units (log scale)", yscale="log",
               title=f"{run.mode}: {fmt_arch(run.initial)} → {fmt_arch(run.final)} (stage ends dotted)")  # fmt: skip
        ax.set_yticks([t for t in (1, 2, 3, 5, 10, 20, 50, 100) if t <= max(HIDDEN)])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
