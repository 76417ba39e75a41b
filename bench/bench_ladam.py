"""One optimizer step of the LAdam family: fastopt on every available backend against
torch.optim.Adam(fused=True), Adam(foreach=True) and ladam, all timed in this one process.

    python bench/bench_ladam.py                       # defaults for the device at hand
    python bench/bench_ladam.py --device cuda --workloads 4x4096x4096 resnet50 1000x1K-64K

Prints the table and appends CSV rows (device, versions, commit in every row) to
bench/results/<family>_<device>.csv, plus a Markdown copy of the table beside it.
Default workloads: CUDA (a) 4x4096x4096 fp32 and bf16, (b) resnet50 (161 tensors),
(c) 1000 tensors of 1K-64K elements; CPU 4x2048x2048 and convnet200 (about 200 small tensors).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fastopt import benchmarking

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULTS = {
    "cuda": [
        ("4x4096x4096", "float32"),
        ("4x4096x4096", "bfloat16"),
        ("resnet50", "float32"),
        ("1000x1K-64K", "float32"),
    ],
    "cpu": [("4x2048x2048", "float32"), ("convnet200", "float32")],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", default="ladam", choices=sorted(benchmarking.FAMILY))
    parser.add_argument("--workloads", nargs="+", choices=sorted(benchmarking.WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--only", nargs="+", default=None, help="substrings of the provider names to run")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per provider")
    parser.add_argument("--out", default=None, help="CSV to append to (default bench/results/<family>_<device>.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.workloads:
        cases = [(w, d) for w in args.workloads for d in (args.dtypes or ["float32"])]
    else:
        cases = [(w, d) for w, d in DEFAULTS[device.type] if not args.dtypes or d in args.dtypes]
    rows = []
    for workload, dtype in cases:
        rows += benchmarking.bench_workload(
            args.family, workload, device, getattr(torch, dtype), args.min_time, only=args.only
        )
    table = benchmarking.format_table(rows)
    env = benchmarking.environment(device)
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    print(header)
    print(table)
    out = args.out or os.path.join(RESULTS, f"{args.family}_{device.type}.csv")
    benchmarking.write_csv(rows, out)
    with open(os.path.splitext(out)[0] + ".md", "a") as f:
        f.write(f"\n## {header}\n\n```\n{table}\n```\n")
    print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
