"""One optimizer step of the LAdam family: fastopt on every available backend against
torch.optim.Adam(fused=True) and ladam, every LAdam mode, all timed in this one process.

    python bench/bench_ladam.py                       # CPU defaults: every mode, 4x2048x2048 and convnet200
    python bench/bench_ladam.py --modes variance_lap --workloads 4x2048x2048 --rounds 40
    python bench/bench_ladam.py --device cuda --workloads 4x4096x4096 resnet50 1000x1K-64K
    python bench/bench_ladam.py --family ladagrad     # the siblings: providers timed one after another

LAdam (the default family) is timed with the providers stepping in turn: every round steps each
provider once (and runs a copy of the step's bytes), in an order rotated from round to round, so
that a change in the machine's load (other processes, frequency) reaches every provider alike; the
ratios come from the medians of the same rounds. Rows: ``torch.Adam(fused)``, ``ladam.LAdamW`` in
the mode, ``fastopt.LAdam[<backend>]`` in the mode for each available backend (``--reference``
adds the eager torch backend, slow), and for variance_lap ``fastopt.LAdam[cpu] c2=0`` (every tensor
takes the elementwise loop: the fused pass without the stencil, what the stencil costs is the
difference). GB/s: the bytes an optimal fused step moves (read p, g and each state tensor, write p
and the state), beside a copy of the same bytes (``copy``) timed in the same rounds.

Below the table, for every workload and mode: ladam's time over fused Adam's in the same rounds, the
speed-up over ladam of a step that moves Adam's bytes at fused Adam's speed, so the most a goal
"N x faster than ladam" can reach here, beside fastopt's best.

Prints the table and appends CSV rows (device, versions, commit in every row) to
bench/results/<family>_<device>.csv, plus a Markdown copy of the table beside it. Run timed
benchmarks under ``flock /tmp/fastopt_timing.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastopt import backends, benchmarking, optim

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("variance_lap", "update_lap", "weight_lap", "wave_variance")
MODE_OPS = dict(zip(MODES, ("ladam_step", "ladam_update_lap_step", "ladam_weight_lap_step", "ladam_wave_step")))
DEFAULTS = {
    "cuda": [
        ("4x4096x4096", "float32"),
        ("4x4096x4096", "bfloat16"),
        ("resnet50", "float32"),
        ("1000x1K-64K", "float32"),
    ],
    "cpu": [("4x2048x2048", "float32"), ("convnet200", "float32")],
}
LR = 1e-4  # small, so that parameters stay finite over the timed steps


def _providers(mode: str, device: torch.device, dtype: torch.dtype, reference: bool) -> Dict[str, Callable]:
    out: Dict[str, Callable] = {}
    if benchmarking._fused_adam_supported(device, dtype):
        out["torch.Adam(fused)"] = partial(torch.optim.Adam, lr=LR, fused=True)
    try:
        import ladam

        out[f"ladam.LAdamW {mode}"] = partial(ladam.LAdamW, lr=LR, mode=mode)
    except ImportError:
        pass
    for backend in backends.BACKENDS:
        if backend == "torch" and not reference:
            continue
        if backends.available(backend, MODE_OPS[mode], device, dtype):
            out[f"fastopt.LAdam[{backend}] {mode}"] = partial(optim.LAdam, lr=LR, mode=mode, backend=backend)
    if mode == "variance_lap" and backends.available("cpu", "ladam_step", device, dtype):
        out["fastopt.LAdam[cpu] c2=0"] = partial(optim.LAdam, lr=LR, c2=0.0, backend="cpu")
    return out


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    benchmarking._sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench_interleaved(
    workload: str, mode: str, device: torch.device, dtype: torch.dtype, rounds: int, reference: bool
) -> List[benchmarking.Row]:
    """Every provider (and the copy) stepped once per round, ``rounds`` rounds, order rotated."""
    shapes = benchmarking.WORKLOADS[workload]()
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    elem = torch.empty((), dtype=dtype).element_size()
    states = 3 if mode == "wave_variance" else 2  # m, v (and v_prev)
    moved = n_params * elem * (3 + 2 * states)  # p, g read; p written; state read and written
    src = torch.empty(moved // 2 // elem, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    steps: Dict[str, Callable[[], object]] = {"copy": lambda: dst.copy_(src)}
    keep = []
    for name, ctor in _providers(mode, device, dtype, reference).items():
        params = benchmarking._make_params(shapes, device, dtype)
        opt = ctor(params)
        keep.append((opt, params))
        steps[name] = opt.step
    names = list(steps)
    for name in names:  # warm up: state created, caches and the thread pool primed
        for _ in range(3):
            steps[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(_timed(steps[name], device))
    copy_ms = statistics.median(times["copy"])
    meta = benchmarking.environment(device)
    rows = []
    for name in names[1:]:
        q = statistics.quantiles(times[name], n=10, method="inclusive")
        p50 = statistics.median(times[name])
        rows.append(
            benchmarking.Row(
                "ladam",
                workload,
                len(shapes),
                n_params,
                str(dtype).replace("torch.", ""),
                name,
                p50,
                q[1],
                q[7],
                rounds,
                GBps=moved / p50 / 1e6,
                copy_GBps=moved / copy_ms / 1e6,
                meta=meta,
            )
        )
    fused = next((r.ms_p50 for r in rows if r.provider == "torch.Adam(fused)"), None)
    ladam_ms = next((r.ms_p50 for r in rows if r.provider.startswith("ladam.")), None)
    for row in rows:
        row.time_vs_fused_adam = row.ms_p50 / fused if fused else None
        row.speedup_vs_ladam = ladam_ms / row.ms_p50 if ladam_ms else None
    return rows


def ladam_floor(rows: List[benchmarking.Row], workload: str, mode: str) -> Optional[str]:
    """One line: ladam's time / fused Adam's time in these rounds (the speed-up over ladam of a step at
    fused Adam's time, the ceiling of any goal relative to ladam), and fastopt's best speed-up in the
    mode (its c2=0 row left out); None without both peers."""
    fused = next((r for r in rows if r.provider == "torch.Adam(fused)"), None)
    ladam = next((r for r in rows if r.provider.startswith("ladam.")), None)
    if fused is None or ladam is None:
        return None
    ours = [r.speedup_vs_ladam for r in rows if r.provider.endswith(f"] {mode}") and r.speedup_vs_ladam]
    best = f"{max(ours):.1f}x" if ours else "-"
    return (
        f"{workload} {mode}: ladam / torch.Adam(fused) = {ladam.ms_p50 / fused.ms_p50:.1f}x "
        f"(a step at fused Adam's time is that much faster than ladam); fastopt's best: {best}"
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", default="ladam", choices=sorted(benchmarking.FAMILY))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="LAdam modes (family ladam)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(benchmarking.WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the providers stepping in turn (ladam)")
    parser.add_argument("--reference", action="store_true", help="also time fastopt's eager torch backend (slow)")
    parser.add_argument("--only", nargs="+", default=None, help="substrings of the provider names (other families)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per provider (other families)")
    parser.add_argument("--out", default=None, help="CSV to append to (default bench/results/<family>_<device>.csv)")
    args = parser.parse_args(argv)
    load_before = _load()
    device = torch.device(args.device)
    if args.workloads:
        cases: List[Tuple[str, str]] = [(w, d) for w in args.workloads for d in (args.dtypes or ["float32"])]
    else:
        cases = [(w, d) for w, d in DEFAULTS[device.type] if not args.dtypes or d in args.dtypes]
    rows = []
    floors = []
    for workload, dtype in cases:
        if args.family == "ladam":
            for mode in args.modes:
                got = bench_interleaved(workload, mode, device, getattr(torch, dtype), args.rounds, args.reference)
                rows += got
                floors.append(ladam_floor(got, f"{workload} {dtype}", mode))
        else:
            rows += benchmarking.bench_workload(
                args.family, workload, device, getattr(torch, dtype), args.min_time, only=args.only
            )
    table = benchmarking.format_table(rows)
    env = benchmarking.environment(device)
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    how = "providers stepping in turn" if args.family == "ladam" else "providers one after another"
    footer = f"{how}; load average (1, 5, 15 min) before: {load_before}, after: {_load()}"
    floor_text = "\n".join(f"- {line}" for line in floors if line)
    print(header)
    print(table)
    print(footer)
    if floor_text:
        print(floor_text)
    out = args.out or os.path.join(RESULTS, f"{args.family}_{device.type}.csv")
    benchmarking.write_csv(rows, out)
    with open(os.path.splitext(out)[0] + ".md", "a") as f:
        f.write(f"\n## {header}\n\n{footer}\n\n```\n{table}\n```\n")
        if floor_text:
            f.write(f"\n{floor_text}\n")
    print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
