"""Times registered cases: variants interleaved in one process, medians, ratios, JSON.

Interleaving (v1, v2, v1, v2, ...) rather than timing one variant after another keeps slow
drifts of the machine (turbo, other load) out of the ratios. A ratio is the median over rounds
of the two variants' samples in the same round, not the ratio of their medians: this VM switches
between a fast and a slow mode about once a second (every op ~65% slower in the slow one,
2026-11-25), so medians taken over different rounds could each come from a different mode. Row
C4 (`-k C4`) read 1.40-2.13x dense as a ratio of medians in earlier runs; as same-round ratios,
with the order of time_case, three runs gave 1.534, 1.542, 1.548 (2026-11-25).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.registry import Case, load_all

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# glibc returns freed blocks above 128 KB to the OS, so every new multi-MB tensor is page-faulted
# in again: on the CI VM under load an 8 MB clone took 8 ms against 0.1 ms for a copy into an
# existing tensor. `--allocator keep` keeps freed memory in the heap, as a caching allocator
# (tcmalloc/jemalloc, which oneDNN recommends) would; the default measures what a plain PyTorch
# process gets. It shifts ratios both ways (row L0: 0.81 default, 0.92 keep, since the baseline
# allocates a 4 MB mask per call), so the JSON records which one ran.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap on 64-bit: larger blocks are always mmapped


def keep_freed_memory() -> str:
    """Tune glibc malloc to keep freed memory; returns a description (or why not)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError) as exc:
        return f"default allocator ({exc})"
    return "glibc mallopt: mmap threshold 32 MB, no trim" if ok else "default allocator (mallopt refused)"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _calls_per_sample(fn, min_seconds: float) -> int:
    """How many calls make one sample last >= min_seconds (timer resolution and call overhead)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_seconds / once))


def time_case(case: Case, *, small: bool, rounds: int, min_seconds: float) -> list[dict]:
    variants = case.make(small)
    for fn in variants.values():  # warm-up: lazy imports, allocator, caches
        fn()
    calls = {name: _calls_per_sample(fn, min_seconds) for name, fn in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    # the baseline, then the variants of each target next to what they are compared with: the
    # two samples of a ratio are taken back to back (row C4's reference variant, 6x the others'
    # time, sat between "npn cpu" and its baseline)
    named = [case.baseline] + [n for t in case.targets for n in (t.variant, t.versus) if n]
    order = list(dict.fromkeys([n for n in named if n in variants] + list(variants)))
    for r in range(rounds):
        # every other round backwards: no variant always runs right after the same other one
        for name in order if r % 2 == 0 else order[::-1]:
            fn = variants[name]
            _sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    medians = {name: statistics.median(values) for name, values in samples.items()}

    def ratio(name: str, versus: str) -> float:
        """Median over rounds of time(name) / time(versus) in the same round."""
        return statistics.median(a / b for a, b in zip(samples[name], samples[versus]))

    nbytes = case.bytes_moved(small) if case.bytes_moved else None
    rows = []
    for name, median in medians.items():
        checks = []
        for target in (t for t in case.targets if t.variant == name and (t.versus or case.baseline) in medians):
            value = ratio(name, target.versus or case.baseline)
            checks.append({"target": target.describe(case.baseline), "ratio": value, "ok": target.met(value)})
        rows.append(
            {
                "case": case.name,
                "row": case.row,
                "variant": name,
                "median_ms": median * 1e3,
                "ratio": ratio(name, case.baseline),
                "targets": checks,
                "ok": None if not checks else all(c["ok"] for c in checks),
                "gb_per_s": None if nbytes is None else nbytes / median / 1e9,
            }
        )
    return rows


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def results_name(device: str, date: str | None, small: bool) -> str:
    """The JSON file name: the device (characters other than letters, digits, '.', '-' and '_'
    become '_', so a GPU's name is a safe file name), the date unless None, "-small" for a smoke run."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", device)
    return f"{stem}{'' if date is None else '-' + date}{'-small' if small else ''}.json"


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<22}{'row':<5}{'variant':<28}{'median ms':>11}{'ratio':>8}{'GB/s':>8}  targets"
    lines = [header, "-" * len(header)]
    for r in rows:
        gbs = "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}"
        target = "; ".join(
            f"{c['ratio']:.3f} {c['target']} {'ok' if c['ok'] else 'MISS'}" for c in r["targets"]
        )
        lines.append(
            f"{r['case']:<22}{r['row']:<5}{r['variant']:<28}{r['median_ms']:>11.3f}{r['ratio']:>8.3f}{gbs:>8}  {target}"
        )
    return "\n".join(lines)


def _case_in_subprocess(case: Case, args: argparse.Namespace) -> list[dict]:
    """Time one case in a fresh interpreter: a case's allocations (the heap glibc grew and kept,
    oneDNN's caches) changed the next case's timings by up to 7x when all ran in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "bench", "--case", case.name, "--rounds", str(args.rounds),
               "--min-seconds", str(args.min_seconds), "--allocator", args.allocator, "--out", str(out)]
        subprocess.run(cmd + (["--small"] if args.small else []), check=False, stdout=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parent.parent)
        if not out.exists():
            raise RuntimeError(f"bench case {case.name!r} failed: rerun it alone with `python -m bench --case {case.name}`")
        return json.loads(out.read_text())["results"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npn bench", description="Run the kernel benchmarks (ratios, medians).")
    parser.add_argument("-k", "--filter", default="", help="run only cases whose name or row contains this")
    parser.add_argument("--case", default=None, help="run exactly this case, in this process")
    parser.add_argument("--small", action="store_true", help="small shapes: a smoke run, not a measurement")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved samples per variant (median taken)")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="minimum duration of one sample")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/<device>-<date>.json)")
    parser.add_argument("--undated", action="store_true",
                        help="name the default JSON <device>.json: one file per device, replaced by its next run")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--allocator", choices=("default", "keep"), default="default",
                        help="keep: glibc keeps freed memory (see keep_freed_memory); default: as the process starts")
    args = parser.parse_args(argv)

    from npn_kernels import _env

    allocator = keep_freed_memory() if args.allocator == "keep" else "default allocator"
    cases = load_all()
    if args.list:
        for c in cases.values():
            print(f"{c.name:<22}{c.row:<5}{c.description}")
        return 0
    if args.case is not None:
        if args.case not in cases:
            parser.error(f"--case {args.case!r} is not a case; see --list")
        rows = time_case(cases[args.case], small=args.small, rounds=args.rounds, min_seconds=args.min_seconds)
    else:
        selected = [c for c in cases.values() if args.filter in c.name or (c.row and args.filter in c.row)]
        if not selected:
            parser.error(f"--filter {args.filter!r} matches no case; see --list")
        rows = [row for case in selected for row in _case_in_subprocess(case, args)]
    print(format_table(rows))
    info = machine()
    info["allocator"] = allocator
    date = None if args.undated else info["date"][:10]
    out = Path(args.out) if args.out else Path(_env.bench_results() or RESULTS_DIR) / results_name(info["device"], date, args.small)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "small": args.small, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["ok"] is not False for r in rows) or args.small else 1
