"""The batched_gram op (J_b^T J_b and J_b^T r_b of many small least-squares problems, what
fastopt.lm.least_squares / curve_fit compute every iteration) on each backend that runs it here,
against the torch reference (``torch.bmm``), in one process.

    python bench/bench_gram.py                       # CPU: backends "cpu" (fastopt._C) and "torch"
    python bench/bench_gram.py --device cuda         # where a GPU is lent: triton, cuda, torch

Shapes (B problems, N residuals, P parameters), in the layouts torch.func returns: contiguous
(B, N, P), and "p-major" (a (B, N, P) view of (P, B, N) storage, as jacfwd gives). Per row: the
median time of a call (benchmarking.measure) and ``time_over_torch`` (lower = faster than the
reference). Rows are appended to bench/results/gram_<device>.csv with device, versions, commit.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from fastopt import backends, benchmarking

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(10000, 64, 4), (30000, 16, 5), (2000, 100, 20), (200, 500, 64), (20, 2000, 200)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per case")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = benchmarking.environment(device)
    env["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes):
        names = [b for b in backends.BACKENDS if backends.available(b, "batched_gram", device, dtype)]
        for batch, n, p in SHAPES:
            gen = torch.Generator().manual_seed(0)
            layouts = {
                "contiguous": torch.randn(batch, n, p, generator=gen, dtype=dtype).to(device),
                "p-major": torch.randn(p, batch, n, generator=gen, dtype=dtype).to(device).permute(1, 2, 0),
            }
            res = torch.randn(batch, n, generator=gen, dtype=dtype).to(device)
            for layout, jac in layouts.items():
                times = {
                    name: benchmarking.measure(
                        lambda f=backends.implementation("batched_gram", name): f(jac, res),  # noqa: B008
                        device,
                        min_time_s=args.min_time,
                    )[0]
                    for name in names
                }
                for name, ms in times.items():
                    row = dict(
                        batch=batch,
                        n=n,
                        p=p,
                        layout=layout,
                        dtype=str(dtype).replace("torch.", ""),
                        backend=name,
                        ms_p50=ms,
                        time_over_torch=ms / times["torch"],
                    )
                    print(
                        "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                        flush=True,
                    )
                    rows.append(row)
    path = args.out or os.path.join(RESULTS, f"gram_{device.type}.csv")
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
