"""The `npn` console script: `npn info`, `npn demo` and `npn bench`."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path

import torch

from npn_kernels import __version__, _env, _ext, backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    build = _ext.build_info()
    threads = f"torch {torch.get_num_threads()}"
    if _ext.loaded():
        threads += f", at::parallel_for in npn_kernels._C uses {_ext.ops.parallel_threads(4 * torch.get_num_threads())}"
    lines = [
        f"npn_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
        f"numpy {_version('numpy')}",
        f"extension: {'compiled with ' + build['compiler'] + ', openmp ' + build['openmp'] + ', simd ' + build['simd'] + ', cuda ' + build['cuda'] if build else 'not loaded'}",
        f"threads: {threads}",
        "backends:",
    ]
    why = backends.reasons()
    for name, ok in backends.available().items():
        lines.append(f"  {name:<10} {'yes' if ok else 'no   ' + why[name]}")
    try:
        chosen = backends.current() or "automatic (per device)"
    except ValueError as exc:  # a bad NPN_BACKEND: info is where a user looks for why
        chosen = f"none: {exc}"
    lines.append(f"selected: {chosen}")
    set_vars = [f"{name}={value}" for name, value in _env.set_variables().items()]
    lines.append(f"environment: {', '.join(set_vars) or 'no NPN_* variable set'}")
    return lines


def _bench(argv: list[str]) -> int:
    # bench/ lives beside the package in a source checkout (installed editable); it is not installed.
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "runner.py").exists():
        print("npn bench: needs the source checkout (bench/ beside npn_kernels/); clone the repository "
              "and install it with pip install --no-build-isolation -e .", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.runner import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npn", description="npn_kernels: NPN and L0 gates for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends (and why one is missing), threads")
    demo = sub.add_parser("demo", help="NPN sparsifies a 100-80 MLP and expands a 3-3 one on two moons; plots (PNG)")
    demo.add_argument("--out", type=Path, default=Path("npn-demo"), help="folder for the PNGs (default ./npn-demo)")
    demo.add_argument("--epochs", type=int, default=60, help="epochs per run, all three stages (default 60)")
    demo.add_argument("--seed", type=int, default=0, help="data, weights and gate noise (default 0)")
    demo.add_argument("--backend", choices=backends.NAMES, default=None, help="npn backend (default automatic)")
    sub.add_parser("bench", help="kernel benchmarks: ratios side by side (see npn bench --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        if args.epochs < 3:
            parser.error(f"demo --epochs: expected an int >= 3 (one per stage), got {args.epochs}")
        if args.backend and not backends.available()[args.backend]:
            parser.error(f"demo --backend: {args.backend!r} is not available here: {backends.reasons()[args.backend]}")
        from npn_kernels.demo import run  # imports matplotlib: only when asked

        run(out=args.out, epochs=args.epochs, seed=args.seed, backend=args.backend)
        return 0
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
