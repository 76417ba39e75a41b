"""python -m fastopt: check every available backend against the reference on this machine, then
time one optimizer step against torch.optim.Adam (fused and foreach) and ladam.

Exit status 1 if any backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import __version__, backends, benchmarking, testing


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to check and time on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=None,
        choices=sorted(benchmarking.WORKLOADS),
        help="workloads to time (default: 4x1024x1024 and convnet200 on CPU, 4x4096x4096 and resnet50 on CUDA)",
    )
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per provider")
    parser.add_argument("--no-bench", action="store_true", help="only check the backends")
    parser.add_argument("--csv", default=None, help="also append the timings to this CSV file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    env = benchmarking.environment(device)
    print(f"fastopt {__version__} | torch {env['torch']} | triton {env['triton']} | {env['device']}")
    print("\nBackends on this device (float32, LAdam):")
    for name in backends.BACKENDS:
        reason = backends.why_not(name, "ladam_step", device, torch.float32)
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")

    print("\nParity with the reference (shape zoo of 17 tensors, 5 steps; every op and dtype the backend claims):")
    failed = 0
    for name in backends.BACKENDS:
        if backends.why_not(name, device=device):
            continue
        results = testing.check_backend(name, device)
        for r in results:
            if r.passed is None:
                continue
            failed += not r.passed
            print(
                f"  {name:<7} {r.check:<27} {_dtype_name(r.dtype):<9} max|diff| {r.max_abs_diff:9.2e}  "
                f"{'PASS' if r.passed else 'FAIL'}  ({r.note})"
            )
        skipped = sorted({f"{r.check} {_dtype_name(r.dtype)}" for r in results if r.passed is None})
        if skipped:
            notes = sorted({r.note for r in results if r.passed is None})
            print(f"  {name:<7} not compared: {len(skipped)} op/dtype pairs ({'; '.join(notes)})")

    if not args.no_bench:
        workloads = args.workloads or (
            ["4x4096x4096", "resnet50"] if device.type == "cuda" else ["4x1024x1024", "convnet200"]
        )
        print("\nOne optimizer step (ms; ratios from this run: time / Adam(fused) time, ladam time / time):")
        rows = []
        for workload in workloads:
            rows += benchmarking.bench_workload("ladam", workload, device, torch.float32, args.min_time)
        print(benchmarking.format_table(rows))
        if args.csv:
            benchmarking.write_csv(rows, args.csv)
            print(f"\nwrote {args.csv}")
    print(f"\n{'FAILED: ' + str(failed) + ' parity check(s)' if failed else 'All parity checks passed.'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
