"""Host time of one triton-backend step outside the kernel: what the launcher does in Python per
step once its table is cached (key, grads' addresses and strides, stash, the launch call), for
the benchmark workloads' tensor counts. The kernel itself is not run (its launch call returns at
once), so this runs anywhere; on CUDA add one small host-to-device copy (8 bytes per tensor).

    python bench/launch_overhead.py [--out bench/results/triton_launch_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter's kernel objects

import torch  # noqa: E402

from fastopt import benchmarking  # noqa: E402
from fastopt.kernels import ladam_step, ladam_step_triton  # noqa: E402

WORKLOADS = ["4x4096x4096", "resnet50", "1000x1K-64K"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Markdown file to append the table to")
    args = parser.parse_args(argv)
    lines = []
    kernel_type = type(ladam_step._ladam_step_kernel)
    run = kernel_type.run
    kernel_type.run = lambda self, *args, **kwargs: None  # host work only
    try:
        lines.append(f"{'workload':<13} {'tensors':>7} {'us/step p50':>11} {'p20-p80':>13} {'us/tensor':>9}")
        for w in WORKLOADS:
            n = len(benchmarking.WORKLOADS[w]())
            params = [torch.zeros(4, 5) for _ in range(n)]  # shapes do not matter for the host work
            state = [[torch.zeros(4, 5) for _ in range(n)] for _ in range(2)]
            steps = [torch.ones(()) for _ in range(n)]
            hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, c2=1e-4, stencil="9point")
            grads = [[torch.zeros(4, 5) for _ in range(n)] for _ in range(2)]
            times = []
            for i in range(200):
                g = grads[i % 2]
                t0 = time.perf_counter()
                ladam_step_triton(params, g, *state, steps, [True] * n, **hyper)
                times.append((time.perf_counter() - t0) * 1e6)
            times = times[20:]
            q = statistics.quantiles(times, n=10)
            p50 = statistics.median(times)
            lines.append(f"{w:<13} {n:>7} {p50:>11.0f} {q[1]:>6.0f}-{q[7]:<6.0f} {p50 / n:>9.2f}")
    finally:
        kernel_type.run = run
    env = benchmarking.environment(torch.device("cpu"))
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    title = "LAdam (triton) launcher host time per step, kernel not run, new grads each step"
    print(f"{title}\n{header}\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## {title}\n{header}\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
