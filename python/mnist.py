"""NPN on MNIST: LeNet-300-100 and LeNet-5-Caffe, sparsified from full width or expanded from 3-3-3.

    python python/mnist.py --arch lenet300 --mode sparsify --epochs 60
    python python/mnist.py --arch lenet5 --mode expand --epochs 30 --resume

Three stages (npn.PlasticitySchedule): k = inf (train the initially active units), k (7 to
sparsify, 1 to expand: units open and close), k = inf (hardening, learning rate / 10). Expand
mode calls npn.Expander after every plasticity epoch with the validation loss. Writes
python/results/<arch>_<mode>.json, <arch>_<mode>_*.png, and a checkpoint after every epoch.
Public API only (plus the IDX reader of npn_kernels.demo.data).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import npn_kernels as npn
from npn_kernels.demo.data import load_mnist

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
VAL_SIZE = 5000  # the last 5,000 training images: the Expander's validation loss and model selection
INIT_UNITS = 3  # expand mode: active units per gated layer at the start (the 3-3-3)
K = {"sparsify": 7.0, "expand": 1.0}  # NPN's defaults (DESIGN 2.3)
# expand mode wakes this fraction of a layer's width per improving epoch (>= 1 unit): one unit per
# epoch (the paper's rule) would need ~300 epochs to grow a 784-input layer to a useful size
WAKE_FRACTION = 1 / 25
# a woken unit gets phi = 3/7, the phi of the initially active units (init_k = 7): pi = 0.6 at k = 1;
# fill = 0 would put it at pi = 0.5, where the first penalty step closes it (and stops expansion)
WAKE_PHI = 3 / 7
PARAMS_TOTAL = {"lenet300": 784 * 300 + 300 * 100 + 100 * 10, "lenet5": 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10}


def centre_out_order() -> torch.Tensor:
    """Permutation [784] of the pixels by distance from the image centre (row-major among ties).

    LeNet-300-100's input gates wake in index order when expanding; row-major order would wake
    the blank top rows first (the first ~100 pixels are 0 in nearly every image), which the L0
    penalty closes at once, and a layer with a closed allocated unit stops expanding. Feeding the
    pixels centre-out makes index order grow the receptive field from the middle.
    """
    r, c = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    d = ((r - 13.5) ** 2 + (c - 13.5) ** 2).flatten()
    return torch.sort(d * 1000 + torch.arange(784.0)).indices  # stable: row-major among equal distances


class LeNet300(nn.Module):
    """784-300-100-10 MLP with "in" gates on all three layers (Louizos's and NPN's dense layers).

    forward: images [N, 1, 28, 28] -> logits [N, 10]. Architecture = active inputs of fc1-fc2-fc3.
    ``l0`` is lambda per weight; each layer's gate is charged for every weight its closing removes
    (see ``removed``), so a hidden unit's gate, whose own group is a column of the next layer
    (|g| = 100 for a hidden-1 unit), also pays for its incoming row (784 weights).
    """

    # weights a closed gate removes: its column here + its row in the layer before
    removed: ClassVar[dict[str, int]] = {"fc1": 300, "fc2": 100 + 784, "fc3": 10 + 300}

    def __init__(self, l0: float, fc1_l0_scale: float = 1.0, **gate_kwargs):
        super().__init__()
        self.register_buffer("order", centre_out_order(), persistent=False)
        for name, (n_in, n_out) in {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}.items():
            setattr(self, name, npn.GatedLinear(n_in, n_out, granularity="in", l0=l0 * self.removed[name] / n_out
                                                * (fc1_l0_scale if name == "fc1" else 1.0),
                                                **gate_kwargs))  # fmt: skip

    def forward(self, x):
        x = x.flatten(1)[:, self.order]
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def architecture(self) -> list[int]:
        return [self.fc1.num_active(), self.fc2.num_active(), self.fc3.num_active()]

    @staticmethod
    def weights(arch: list[int]) -> int:
        """Weights a plain model of this architecture keeps (a closed input of layer l+1 kills that output of layer l)."""
        a0, a1, a2 = arch
        return a0 * a1 + a1 * a2 + a2 * 10


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20 5×5, maxpool 2, conv 50 5×5, maxpool 2, fc 500, fc 10.

    "out" gates on conv1, conv2 (channels) and fc1 (units); fc2 is a plain nn.Linear (its 10
    outputs are the classes). forward: [N, 1, 28, 28] -> [N, 10]. Architecture = c1-c2-fc1.
    ``l0`` is lambda per weight, charged per gate for its own filter/row and what it feeds.
    """

    # weights a closed gate removes: its filter / row + its inputs to the next layer (16 = 4×4 positions)
    removed: ClassVar[dict[str, int]] = {"conv1": 25 + 50 * 25, "conv2": 20 * 25 + 500 * 16, "fc1": 800 + 10}

    def __init__(self, l0: float, fc1_l0_scale: float = 1.0, **gate_kwargs):
        super().__init__()
        group = {"conv1": 25, "conv2": 20 * 25, "fc1": 800}
        l0s = {name: l0 * self.removed[name] / group[name] for name in group}
        l0s["fc1"] *= fc1_l0_scale
        self.conv1 = npn.GatedConv2d(1, 20, 5, granularity="out", l0=l0s["conv1"], **gate_kwargs)
        self.conv2 = npn.GatedConv2d(20, 50, 5, granularity="out", l0=l0s["conv2"], **gate_kwargs)
        self.fc1 = npn.GatedLinear(800, 500, granularity="out", l0=l0s["fc1"], **gate_kwargs)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def architecture(self) -> list[int]:
        return [self.conv1.num_active(), self.conv2.num_active(), self.fc1.num_active()]

    @staticmethod
    def weights(arch: list[int]) -> int:
        c1, c2, f = arch
        return c1 * 25 + c2 * c1 * 25 + f * c2 * 16 + f * 10  # 16 = 4×4 positions per channel after two pools


ARCHS = {"lenet300": LeNet300, "lenet5": LeNet5}


def gated_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (npn.GatedLinear, npn.GatedConv2d))]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, error in percent) of ``model`` in eval mode on x [n, 1, 28, 28], y [n]."""
    was_training = model.training
    model.eval()
    loss = wrong = 0.0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        wrong += float((out.argmax(1) != y[i : i + batch]).sum())
    model.train(was_training)
    return loss / len(y), 100.0 * wrong / len(y)


def learning_rate(args, epoch: int, stage2: int) -> float:
    """Adam's rate for ``epoch``: ``--lr`` until plasticity ends; then hardening fine-tunes a fixed
    architecture from lr/10 down a half cosine (with 20 hardening epochs the last runs at 0.6% of lr/10)."""
    if epoch < stage2:
        return args.lr
    t = (epoch - stage2) / max(1, args.epochs - stage2)
    return args.lr / 10 * 0.5 * (1 + math.cos(math.pi * t))


def stages(epochs: int) -> tuple[int, int]:
    """(stage1, stage2) end epochs: 10% k = inf, 70% plasticity, the last 20% hardening."""
    stage1 = max(1, round(0.1 * epochs))
    return stage1, max(stage1, round(0.8 * epochs))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(history: list[dict], arch: str, mode: str, stage1: int, stage2: int, out: Path) -> list[str]:
    """Architecture over epochs, and test error / active weights over epochs: two PNGs in ``out`` (their names)."""
    epochs = [h["epoch"] for h in history]
    names = {"lenet300": ["fc1 inputs", "fc2 inputs", "fc3 inputs"], "lenet5": ["conv1 ch", "conv2 ch", "fc1 units"]}[arch]
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(names):
        ax.plot(epochs, [h["architecture"][i] for h in history], label=name)
    for e in (stage1, stage2):
        ax.axvline(e - 0.5, color="grey", ls=":")
    ax.set(xlabel="epoch", ylabel="active units", yscale="log", title=f"{arch} {mode}: architecture (stages dotted)")
    ax.legend()
    files.append(out / f"{arch}_{mode}_architecture.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    err = ax.plot(epochs, [h["test_error"] for h in history], color="C3", label="test error (%)")
    ax.set(xlabel="epoch", ylabel="test error (%)", yscale="log", title=f"{arch} {mode}: accuracy and size")
    ax2 = ax.twinx()
    size = ax2.plot(epochs, [100 * h["params_active"] / PARAMS_TOTAL[arch] for h in history], color="C0",
                    label="active weights (% of full)")  # fmt: skip
    ax2.set(ylabel="active weights (% of full)", yscale="log")
    ax.legend(handles=err + size, loc="upper center")
    files.append(out / f"{arch}_{mode}_curves.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return [f.name for f in files]


def export_and_evaluate(model, xt, yt) -> tuple[float, int]:
    """(test error % of the exported plain model, its weight count). If export fails, the last
    checkpoint holds the trained model: fix and rerun with --resume (no training repeats)."""
    model.eval()  # export folds the evaluation-time gates
    plain = npn.export(model)
    weights = sum(p.numel() for name, p in plain.named_parameters() if name.endswith("weight"))
    return evaluate(plain, xt, yt)[1], weights


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--mode", choices=sorted(K), required=True)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (weights and phi)")
    p.add_argument("--l0", type=float, default=None,
                   help="lambda: L0 cost per weight (Louizos's 0.1/N = 1.7e-6 at N = 60,000); default per arch")
    p.add_argument("--fc1-l0-scale", type=float, default=1.0,
                   help="multiplies lambda on the fc1 gates (LeNet-5-Caffe's 500 fc1 units: a weak L0 signal each)")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay inside the gated penalty (expected L2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="npn backend (reference, cpu, ...); default automatic")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<arch>_<mode>.ckpt")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    return p.parse_args(argv)


DEFAULT_L0 = {"lenet300": 5e-6, "lenet5": 5e-6}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    l0 = DEFAULT_L0[args.arch] if args.l0 is None else args.l0
    x, y = load_mnist(args.data_dir, "train")
    xt, yt = load_mnist(args.data_dir, "test")
    xv, yv, x, y = x[-VAL_SIZE:], y[-VAL_SIZE:], x[:-VAL_SIZE], y[:-VAL_SIZE]
    if args.limit:
        x, y, xt, yt, xv, yv = x[: args.limit], y[: args.limit], xt[: args.limit], yt[: args.limit], xv[:1000], yv[:1000]
    k = K[args.mode]
    torch.manual_seed(args.seed)  # weights, and every gated layer's noise seed
    model = ARCHS[args.arch](gate=npn.Binary(k), l0=l0, fc1_l0_scale=args.fc1_l0_scale, weight_decay=args.wd,
                             init_active=INIT_UNITS if args.mode == "expand" else None)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    stage1, stage2 = stages(args.epochs)
    schedule = npn.PlasticitySchedule(model, stage1=stage1, stage2=stage2, k=k)
    # one Expander per layer: each wakes its own share of units (WAKE_FRACTION of its width)
    expanders = [npn.Expander(m, fill=k * WAKE_PHI, optimizer=optimizer, units_per_step=max(1, round(m.phi.numel() * WAKE_FRACTION)))
                 for m in gated_layers(model)] if args.mode == "expand" else []  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.arch}_{args.mode}"
    ckpt_path = args.out / f"{name}.ckpt"
    start, history, seconds = 0, [], 0.0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for e, state in zip(expanders, ckpt["expanders"]):
            e.load_state_dict(state)
        start, history, seconds = ckpt["epoch"], ckpt["history"], ckpt["seconds"]
        print(f"resumed {ckpt_path} at epoch {start}")
    initial = model.architecture() if not history else history[0]["initial_architecture"]
    bar = tqdm(range(start, args.epochs), desc=name, initial=start, total=args.epochs, unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        kk = schedule.step(epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch, stage2)
        model.train()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        total = 0.0
        for i in tqdm(range(0, len(y), args.batch_size), desc=f"epoch {epoch} k={kk:g}", leave=False, mininterval=5):
            idx = perm[i : i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = npn.objective(model, F.cross_entropy, x[idx], y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        val_loss, val_error = evaluate(model, xv, yv)
        woken = 0
        if expanders and stage1 <= epoch < stage2:
            woken = sum(len(units) for e in expanders for units in e.step(val_loss).values())
        _, test_error = evaluate(model, xt, yt)
        arch = model.architecture()
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch, "k": kk, "train_objective": total / len(y), "val_loss": val_loss,
                        "val_error": val_error, "test_error": test_error, "architecture": arch,
                        "params_active": ARCHS[args.arch].weights(arch), "woken": woken,
                        "seconds": seconds, "initial_architecture": initial})  # fmt: skip
        bar.set_postfix(arch="-".join(map(str, arch)), test_err=f"{test_error:.2f}%", val_loss=f"{val_loss:.4f}")
        tqdm.write(f"epoch {epoch:3d} k={kk:g} arch {'-'.join(map(str, arch))} weights {history[-1]['params_active']} "
                   f"val {val_loss:.4f}/{val_error:.2f}% test {test_error:.2f}% ({seconds:.0f} s)")  # fmt: skip
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "expanders": [e.state_dict() for e in expanders], "epoch": epoch + 1, "history": history,
                    "seconds": seconds}, ckpt_path)  # fmt: skip
    schedule.step(args.epochs - 1)  # the last epoch's k (inf after hardening), also when a resume trained nothing
    test_error, params_active = export_and_evaluate(model, xt, yt)
    arch = model.architecture()
    print(npn.summary(model))
    result = {
        "dataset": "mnist", "arch": args.arch, "mode": args.mode, "test_error": test_error,
        "evaluated": "exported plain model (npn.export), 10,000 test images",
        "params_active": params_active, "params_total": PARAMS_TOTAL[args.arch],
        "params_note": "weights of the exported model (biases excluded), as the papers report",
        "architecture": arch, "initial_architecture": initial, "epochs": args.epochs,
        "stages": {"stage1": stage1, "stage2": stage2, "k": K[args.mode]}, "seconds": seconds,
        "backend": npn.backends.current() or npn.backends.select("cpu"), "commit": commit(),
        "hyperparameters": {"batch_size": args.batch_size, "lr": args.lr, "lr_hardening": "cosine lr/10 -> 0",
                            "l0": l0, "fc1_l0_scale": args.fc1_l0_scale, "weight_decay": args.wd,
                            "seed": args.seed, "train_images": len(y), "val_images": len(yv)},
    }  # fmt: skip
    result["params_fraction"] = result["params_active"] / result["params_total"]
    result["plots"] = plot(history, args.arch, args.mode, stage1, stage2, args.out)
    result["history"] = history
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: {'-'.join(map(str, initial))} -> {'-'.join(map(str, arch))}, weights {result['params_active']} / "
          f"{result['params_total']} ({100 * result['params_fraction']:.2f}%), test error {test_error:.2f}% "
          f"(exported model), {seconds:.1f} s on backend {result['backend']}")  # fmt: skip
    return result


def main(argv=None) -> int:
    args = parse(argv)
    try:
        load_mnist(args.data_dir, "test")  # fail before any work, naming the missing path
    except (FileNotFoundError, ValueError) as exc:
        print(f"mnist.py: {exc}", file=sys.stderr)
        return 2
    if args.backend:
        with npn.backends.use(args.backend):
            run(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
