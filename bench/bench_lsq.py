"""Batched curve fitting: fastopt.lm.curve_fit against scipy.optimize.curve_fit looped over the
problems, timed in this one process, and the final costs compared problem by problem.

    python bench/bench_lsq.py                      # 10,000 peaks, then 2e3, 1e5, 1e6
    python bench/bench_lsq.py --scaling 2000 --no-compile --threads 1
    python bench/bench_lsq.py --device cuda        # where a GPU is lent

Workload (fastopt.lm.workloads.gaussian_peaks): B noisy Gaussian peaks, 4 parameters
(height, centre, width, offset), 64 points each, a data-driven initial guess; each problem is
fitted from the same p0 by both. scipy runs its default for unbounded fits (method="lm", MINPACK
with forward-difference Jacobians) in float64 on the CPU.

fastopt providers: curve_fit in float64 and float32, eager (the default: Jacobians by forward
lanes, fastopt.lm.forward_lanes) and with compile=True (torch.compile'd evaluation). For compiled
providers the first call, which compiles, is timed apart ("cold"); the timed calls reuse the compiled
code with fresh data of the
same shape ("warm"). Every timed call before it warms up on a small batch, so that torch's one-time
lazy imports (about 5 s here, on the first use of torch.func) are not counted; that one-time cost is
reported in its own row.

scipy's loop runs over every problem up to --scipy-max problems; for larger batches over the first
--scipy-sample problems of the batch, and its time per problem is extrapolated to the batch
(rows say so); final costs are then compared on that subsample.

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
import statistics
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
    start, cpu_start = time.perf_counter(), time.process_time()
    for b in range(yn.shape[0]):
        try:
            popt[b] = scipy_curve_fit(g, tn, yn[b], p0=pn[b])[0]
        except RuntimeError:  # "Optimal parameters not found"
            failures += 1
    return (time.perf_counter() - start, time.process_time() - cpu_start), torch.from_numpy(popt), failures


def costs64(t, y, popt):
    """0.5 * sum of squared residuals per problem, in float64 at the given parameters."""
    return 0.5 * ((model(t.double(), popt.double()) - y.double()) ** 2).sum(-1)


def fastopt_fit(t, y, p0, compile_: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch members that hit max_nfev are counted below
        popt, _, info, _, ier = curve_fit(model, t, y, p0, compile=compile_, full_output=True)
    return popt, ier, info["nfev"]


def timed(fn, repeat: int):
    """((best wall seconds, CPU seconds of that call), the last result)."""
    best, out = (math.inf, math.inf), None
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu_start))
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
        run_id=time.strftime("%Y-%m-%dT%H:%M:%S"),
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
    sizes = [args.batch] + [b for b in args.scaling if b != args.batch]
    for batch in sizes:
        t, y, p0, _ = gaussian_peaks(batch, torch.float64, seed=0)
        sample = batch if batch <= args.scipy_max else min(args.scipy_sample, batch)
        (seconds, cpu), popt, failures = scipy_loop(t, y[:sample], p0[:sample])
        scipy_per_problem, scipy_cpu_per_problem = seconds / sample, cpu / sample
        scipy_cost = costs64(t, y[:sample], popt).masked_fill(torch.isnan(popt).any(-1), math.nan)
        name = "scipy.optimize.curve_fit loop"
        if sample < batch:
            name += f" (first {sample} problems, time extrapolated)"
        row(
            batch,
            "float64",
            name,
            scipy_per_problem * batch,
            cpu_seconds=scipy_cpu_per_problem * batch,
            speedup_vs_scipy=1.0,
            cpu_speedup_vs_scipy=1.0,
            failures=failures,
        )
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
                repeat = args.repeat if batch <= args.scipy_max else 1
                (seconds, cpu), (popt, ier, nfev) = timed(lambda: fastopt_fit(td, yd, pd, compile_), repeat)
                frac, worse = compare(costs64(t, y[:sample], popt[:sample].cpu()), scipy_cost, dtype_name)
                row(
                    batch,
                    dtype_name,
                    name + (" (warm)" if compile_ else ""),
                    seconds,
                    cpu_seconds=cpu,
                    speedup_vs_scipy=scipy_per_problem * batch / seconds,
                    cpu_speedup_vs_scipy=scipy_cpu_per_problem * batch / cpu,
                    cost_equal_or_better=frac,
                    cost_worse_1e3=worse,
                    nfev_mean=float(nfev.float().mean()),
                    nfev_max=int(nfev.max()),
                    not_converged=int((ier <= 0).sum()),
                )
    return rows


FIELDS = [
    "run_id",
    "workload",
    "batch",
    "dtype",
    "provider",
    "seconds",
    "us_per_problem",
    "speedup_vs_scipy",
    "cpu_seconds",
    "cpu_speedup_vs_scipy",
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
    "load_avg_end",
]


def write(rows: List[Dict], device: str, runs: int) -> None:
    """Append this run to bench/results/lsq_<device>.csv (rewritten under the current header if an
    older one differs) and write lsq_<device>.md from the last ``runs`` runs in it."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"lsq_{device}.csv")
    old: List[Dict] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            rewrite = reader.fieldnames != FIELDS
    else:
        rewrite = True
    with open(path, "w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if rewrite:
            writer.writeheader()
            writer.writerows(old)
        writer.writerows(rows)
    with open(path, newline="") as f:
        every = list(csv.DictReader(f))
    run_ids = list(dict.fromkeys(r["run_id"] for r in every if r.get("run_id")))[-runs:]
    md = os.path.join(RESULTS, f"lsq_{device}.md")
    with open(md, "w") as f:
        f.write(summary([r for r in every if r.get("run_id") in run_ids], run_ids))
    print(f"wrote {path} and {md}")


def summary(rows: List[Dict], run_ids: List[str]) -> str:
    """Markdown: per batch, dtype and provider the median over runs of seconds and of the speedup,
    with the speedup's range (the spread between runs)."""
    meta = rows[-1]
    loads = sorted({(r["run_id"], r["load_avg"], r.get("load_avg_end", "")) for r in rows})
    lines = [
        f"# bench_lsq: {meta['device']}",
        "",
        f"torch {meta['torch']}, scipy {meta['scipy']}, triton {meta['triton']}, fastopt {meta['fastopt']}, "
        f"commit {meta['commit']}, torch threads {meta['threads']}, python {meta['python']}. "
        f"{len(run_ids)} runs of `python bench/bench_lsq.py` (each under `flock /tmp/fastopt_timing.lock`); "
        "1-minute load average at start/end of each: "
        + ", ".join(f"{start}/{end or '-'}" for _, start, end in loads)
        + ". The machine is shared: scipy and fastopt run in the same process, one after the other, so "
        "ratios are comparable within a run; the table gives the median over runs and the range of the "
        "speedup. Large batches: scipy looped over a subsample, its time per problem extrapolated (rows say so).",
        "",
        "Speedups are given twice: from wall time, and from CPU time (time.process_time: both sides run on "
        "one thread, so CPU time is the work done and is less disturbed by other processes taking the cores).",
        "",
        "| batch | dtype | provider | seconds (median) | us/problem | x vs scipy loop, wall: median (range) | "
        "x vs scipy loop, CPU time: median (range) | cost <= scipy | worse >1e-3 | nfev mean/max | not converged |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((int(r["batch"]), r["dtype"], r["provider"]), []).append(r)

    def num(r, key):
        v = r.get(key, "")
        return float(v) if v not in ("", None) else None

    for (batch, dtype, provider), rs in groups.items():
        seconds = statistics.median(float(r["seconds"]) for r in rs)
        speed = [num(r, "speedup_vs_scipy") for r in rs if num(r, "speedup_vs_scipy") is not None]
        cpu_speed = [num(r, "cpu_speedup_vs_scipy") for r in rs if num(r, "cpu_speedup_vs_scipy") is not None]
        frac = [num(r, "cost_equal_or_better") for r in rs if num(r, "cost_equal_or_better") is not None]
        worse = [int(float(r["cost_worse_1e3"])) for r in rs if r.get("cost_worse_1e3") not in ("", None)]
        last = rs[-1]
        per_problem = "-" if "one-time" in provider else f"{seconds / batch * 1e6:.1f}"
        sp = "-" if not speed else f"{statistics.median(speed):.1f} ({min(speed):.1f}-{max(speed):.1f})"
        cs = "-" if not cpu_speed else f"{statistics.median(cpu_speed):.1f} ({min(cpu_speed):.1f}-{max(cpu_speed):.1f})"
        nfev = "-/-" if not last.get("nfev_mean") else f"{float(last['nfev_mean']):.1f}/{last['nfev_max']}"
        conv = last.get("not_converged") or last.get("failures") or "-"
        lines.append(
            f"| {batch} | {dtype} | {provider} | {seconds:.3f} | {per_problem} | {sp} | {cs} | "
            + (f"{100 * min(frac):.2f}% (worst run)" if frac else "-")
            + f" | {max(worse) if worse else '-'} | {nfev} | {conv} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=10_000, help="the headline batch size (default 10000)")
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="*",
        default=[2_000, 100_000, 1_000_000],
        help="further batch sizes (default 2000 100000 1000000)",
    )
    parser.add_argument("--scipy-max", type=int, default=10_000, help="largest batch scipy's loop runs in full")
    parser.add_argument(
        "--scipy-sample", type=int, default=5_000, help="problems scipy's loop runs on for larger batches"
    )
    parser.add_argument("--eager-max", type=int, default=10**9, help="largest batch the eager providers run")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per provider (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True providers")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="runs of the CSV summarised in the markdown")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if not args.no_write:
        load_end = "%.1f" % os.getloadavg()[0]
        for r in rows:
            r["load_avg_end"] = load_end
        write(rows, torch.device(args.device).type, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
