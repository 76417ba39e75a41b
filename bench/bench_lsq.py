"""Batched curve fitting: fastopt.lm.curve_fit against scipy.optimize.curve_fit looped over the
problems, timed in this one process, and the final costs compared problem by problem.

    python bench/bench_lsq.py                                   # 10,000 peaks, then 1e3..1e5
    python bench/bench_lsq.py --scaling 1000 10000 100000 1000000 --threads 1
    python bench/bench_lsq.py --device cuda                     # where a GPU is lent

Workload (fastopt.lm.workloads.gaussian_peaks): B noisy Gaussian peaks, 4 parameters
(height, centre, width, offset), 64 points each, a data-driven initial guess; each problem is
fitted from the same p0 by both. scipy runs its default for unbounded fits (method="lm", MINPACK
with forward-difference Jacobians) in float64 on the CPU.

fastopt providers: curve_fit in float64 and float32, eager (torch.func Jacobians, the default)
and with compile=True (torch.compile'd evaluation). For compiled providers the first call, which
compiles, is timed apart ("cold"); the timed calls reuse the compiled code with fresh data of the
same shape ("warm"). Every timed call before it warms up on a small batch, so that torch's one-time
lazy imports (about 5 s here, on the first use of torch.func) are not counted; that one-time cost is
reported in its own row.

Reported per provider: seconds for the batch (best of --repeat), time per problem, the speedup
over scipy's loop (scipy seconds / seconds, same batch, same run), and the final-cost comparison:
the fraction of problems whose cost (0.5 * sum of squared residuals, evaluated in float64 at the
returned parameters) is at most scipy's times (1 + rtol) (rtol 1e-9 for float64, 1e-6 for float32,
whose solutions carry float32 rounding), and how many are worse by more than 1e-3 relative (a
different local minimum). Results: bench/results/lsq_<device>.csv (appended) and .md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

from fastopt import benchmarking
from fastopt.lm import curve_fit
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COST_RTOL = {"float64": 1e-9, "float32": 1e-6}


def model(t, p):
    return gaussian_peak(t, p)


def scipy_loop(t: torch.Tensor, y: torch.Tensor, p0: torch.Tensor):
    """(seconds, popt (B, 4) float64 with NaN rows where scipy raised, failures)."""
    from scipy.optimize import curve_fit as scipy_curve_fit

    def g(x, a, mu, s, c):
        return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c

    tn, yn, pn = t.double().numpy(), y.double().numpy(), p0.double().numpy()
    popt = np.full(pn.shape, np.nan)
    failures = 0
    start = time.perf_counter()
    for b in range(yn.shape[0]):
        try:
            popt[b] = scipy_curve_fit(g, tn, yn[b], p0=pn[b])[0]
        except RuntimeError:  # "Optimal parameters not found"
            failures += 1
    return time.perf_counter() - start, torch.from_numpy(popt), failures


def costs64(t, y, popt):
    """0.5 * sum of squared residuals per problem, in float64 at the given parameters."""
    return 0.5 * ((model(t.double(), popt.double()) - y.double()) ** 2).sum(-1)


def fastopt_fit(t, y, p0, compile_: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch members that hit max_nfev are counted below
        popt, _, info, _, ier = curve_fit(model, t, y, p0, compile=compile_, full_output=True)
    return popt, ier, info["nfev"]


def timed(fn, repeat: int):
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(cost, ref_cost, dtype_name):
    ok = torch.isfinite(ref_cost)
    rtol = COST_RTOL[dtype_name]
    equal_or_better = (cost <= ref_cost * (1 + rtol)) & ok
    worse = (cost > ref_cost * (1 + 1e-3)) & ok
    return float(equal_or_better.sum()) / max(int(ok.sum()), 1), int(worse.sum())


def run(args) -> List[Dict]:
    device = torch.device(args.device)
    meta = benchmarking.environment(device)
    import scipy

    meta.update(
        scipy=scipy.__version__,
        threads=str(torch.get_num_threads()),
        python=platform.python_version(),
        load_avg="%.1f" % os.getloadavg()[0],
    )
    rows: List[Dict] = []

    def row(batch, dtype, provider, seconds, **extra):
        r = dict(
            workload="gaussian_peaks_64pts_4params",
            batch=batch,
            dtype=dtype,
            provider=provider,
            seconds=seconds,
            us_per_problem=seconds / batch * 1e6,
            **extra,
        )
        r.update(meta)
        rows.append(r)
        print(
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in meta),
            flush=True,
        )

    # One-time lazy imports of torch.func's first use, timed once and kept out of every other row.
    t, y, p0, _ = gaussian_peaks(8, torch.float64)
    start = time.perf_counter()
    fastopt_fit(t.to(device), y.to(device), p0.to(device), False)
    row(8, "float64", "fastopt first call in the process (one-time setup)", time.perf_counter() - start)

    compiled = set()
    scipy_seconds: Dict[int, float] = {}
    scipy_costs: Dict[int, torch.Tensor] = {}
    sizes = [args.batch] + [b for b in args.scaling if b != args.batch]
    for batch in sizes:
        t, y, p0, _ = gaussian_peaks(batch, torch.float64, seed=0)
        if batch <= args.scipy_max:
            seconds, popt, failures = scipy_loop(t, y, p0)
            scipy_seconds[batch] = seconds
            scipy_costs[batch] = costs64(t, y, popt).masked_fill(torch.isnan(popt).any(-1), math.nan)
            row(batch, "float64", "scipy.optimize.curve_fit loop", seconds, speedup_vs_scipy=1.0, failures=failures)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            td, yd, pd = (a.to(device=device, dtype=dtype) for a in (t, y, p0))
            for compile_ in [False, True] if not args.no_compile else [False]:
                if batch > args.eager_max and not compile_:
                    continue
                name = "fastopt.curve_fit" + (" compile=True" if compile_ else "")
                if compile_ and dtype_name not in compiled:
                    # cold: compiles for this dtype and chunk shape, reused by the larger batches
                    compiled.add(dtype_name)
                    _, y2, p02, _ = gaussian_peaks(batch, dtype, seed=1)
                    start = time.perf_counter()
                    fastopt_fit(td, y2.to(device), p02.to(device), True)
                    cold = time.perf_counter() - start
                    row(batch, dtype_name, name + " (cold: first call, includes compilation)", cold)
                elif not compile_:
                    fastopt_fit(td, yd[:64], pd[:64], False)  # warm-up on a small batch
                repeat = args.repeat if batch <= args.batch else 1
                seconds, (popt, ier, nfev) = timed(lambda: fastopt_fit(td, yd, pd, compile_), repeat)
                extra = dict(
                    nfev_mean=float(nfev.float().mean()), nfev_max=int(nfev.max()), not_converged=int((ier <= 0).sum())
                )
                if batch in scipy_seconds:
                    frac, worse = compare(costs64(t, y, popt.cpu()), scipy_costs[batch], dtype_name)
                    extra.update(
                        speedup_vs_scipy=scipy_seconds[batch] / seconds, cost_equal_or_better=frac, cost_worse_1e3=worse
                    )
                row(batch, dtype_name, name + (" (warm)" if compile_ else ""), seconds, **extra)
    return rows


def write(rows: List[Dict], device: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"lsq_{device}.csv")
    fields = [
        "workload",
        "batch",
        "dtype",
        "provider",
        "seconds",
        "us_per_problem",
        "speedup_vs_scipy",
        "cost_equal_or_better",
        "cost_worse_1e3",
        "nfev_mean",
        "nfev_max",
        "not_converged",
        "failures",
        "device",
        "torch",
        "triton",
        "scipy",
        "fastopt",
        "commit",
        "threads",
        "python",
        "load_avg",
    ]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    md = os.path.join(RESULTS, f"lsq_{device}.md")
    meta = rows[0]
    lines = [
        f"# bench_lsq: {meta['device']}",
        "",
        f"torch {meta['torch']}, scipy {meta['scipy']}, triton {meta['triton']}, fastopt {meta['fastopt']}, "
        f"commit {meta['commit']}, torch threads {meta['threads']}, python {meta['python']}, "
        f"1-minute load average at the start {meta['load_avg']} (the machine is shared: scipy and fastopt "
        "run in the same process, one after the other, so ratios are comparable within a run)",
        "",
        "| batch | dtype | provider | seconds | us/problem | x vs scipy loop | cost <= scipy | worse >1e-3 | "
        "nfev mean/max | not converged |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]

    def fmt(v, spec):
        return "-" if v is None or v == "" else format(v, spec)

    for r in rows:
        frac = r.get("cost_equal_or_better")
        per_problem = "-" if "one-time" in r["provider"] else f"{r['us_per_problem']:.1f}"
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['provider']} | {r['seconds']:.3f} | {per_problem} | "
            f"{fmt(r.get('speedup_vs_scipy'), '.1f')} | {fmt(None if frac is None else 100 * frac, '.2f')}"
            f"{'%' if frac is not None else ''} | {fmt(r.get('cost_worse_1e3'), 'd')} | "
            f"{fmt(r.get('nfev_mean'), '.1f')}/{fmt(r.get('nfev_max'), 'd')} | "
            f"{fmt(r.get('not_converged', r.get('failures')), 'd')} |"
        )
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path} and {md}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=10_000, help="the headline batch size (default 10000)")
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="*",
        default=[1_000, 100_000],
        help="further batch sizes for fastopt (default 1000 100000)",
    )
    parser.add_argument("--scipy-max", type=int, default=10_000, help="largest batch scipy's loop is timed on")
    parser.add_argument("--eager-max", type=int, default=10**9, help="largest batch the eager providers run")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per provider (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True providers")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if not args.no_write:
        write(rows, torch.device(args.device).type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
