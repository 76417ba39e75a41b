"""Where one batched curve_fit call spends its time: phases, operations per iteration, iterations,
host synchronisations and allocations, for each Jacobian mode.

    python bench/profile_lsq.py                          # 2,000 peaks, float64, lanes and jacfwd
    python bench/profile_lsq.py --batch 10000 --dtype float32 --jac lanes

Workload: bench/bench_lsq.py's (fastopt.lm.workloads.gaussian_peaks: 4 parameters, 64 points,
a data-driven p0), one eager ``fastopt.lm.curve_fit`` call. Phases, timed by wrapping the solver's
methods (perf_counter, median over --repeat calls after a warm-up call):

* evaluate: residuals, Jacobian and the normal equations J^T J, J^T f (``Evaluator.terms``);
* step: the damped solve, trial point, accept/reject and stopping tests (``_Solver._iterate``
  without its evaluation);
* loop checks: the rest of ``_Solver.run`` (the per-iteration host check and compaction);
* after the loop: the residuals and Jacobian at the solution (``fun``, ``return_jac``);
* covariance: ``covariance_from_normal_equations`` (and the Jacobians it asks for, if any);
* other: argument checks, transforms, the first evaluation's shape check, result assembly.

One more call runs under torch.profiler (``profile_memory``) with the phases marked by
``record_function``: per phase the number of top-level operations (aten's and fastopt's own,
``fastopt::lsq_update`` and the like) and their self time, host
synchronisations (``aten::_local_scalar_dense``: ``int()``/``bool()``/``.item()`` of a tensor; on a
CPU they cost no device wait, only the dispatch), and allocations (operations that allocate, bytes
allocated). The profiler adds a cost per operation, so its times are above the wall times.
Writes bench/results/lsq_profile_<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import fastopt.lm.batched_jacobian as batched_jacobian
import fastopt.lm.curve_fitting as curve_fitting
import fastopt.lm.nonlinear_lsq as nonlinear_lsq
from fastopt import benchmarking
from fastopt.lm import curve_fit
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PHASES = ("evaluate", "step", "loop checks", "after the loop", "covariance", "other")


class Recorder:
    """Wraps the solver's methods to time phases (exclusive of the wrapped calls nested in them)
    and count iterations; ``close`` restores them."""

    # (owner, method, phase, only when called outside every other phase)
    WRAPPED = (
        (batched_jacobian.Evaluator, "terms", "evaluate", False),
        (nonlinear_lsq._Solver, "_iterate", "step", False),
        (nonlinear_lsq._Solver, "run", "loop checks", False),
        (batched_jacobian.Evaluator, "residuals_and_jacobian", "after the loop", True),
        (batched_jacobian.Evaluator, "raw", "after the loop", True),
        (curve_fitting, "covariance_from_normal_equations", "covariance", False),
    )

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.iterations = 0
        self.active: List[int] = []
        self._stack: List[List[float]] = []  # per open phase: [nested seconds]
        self._saved = [(owner, name, getattr(owner, name)) for owner, name, _, _ in self.WRAPPED]
        for (owner, name, phase, outside), (_, _, original) in zip(self.WRAPPED, self._saved):
            setattr(owner, name, self._wrapper(original, phase, outside))

    def _wrapper(self, original, phase: str, outside: bool):
        def wrapped(*args, **kwargs):
            if outside and self._stack:  # e.g. raw() inside an evaluation: part of that phase
                return original(*args, **kwargs)
            if phase == "step":
                self.iterations += 1
                self.active.append(int(args[1]["x"].shape[0]))
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                with record_function(phase):
                    return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._stack.pop()[0]
                self.seconds[phase] += elapsed - nested
                if self._stack:
                    self._stack[-1][0] += elapsed

        return wrapped

    def split(self, total: float) -> Dict[str, float]:
        out = {k: self.seconds.get(k, 0.0) for k in PHASES[:-1]}
        out["other"] = total - sum(out.values())
        return out

    def close(self) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)


def model(t, p):
    return gaussian_peak(t, p)


def one_call(t, y, p0, jac):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curve_fit(model, t, y, p0, jac=jac, full_output=True)


def measure(batch: int, dtype: torch.dtype, jac: str, repeat: int) -> Dict:
    t, y, p0, _ = gaussian_peaks(batch, dtype)
    one_call(t, y[:64], p0[:64], jac)  # one-time imports and warm-up
    one_call(t, y, p0, jac)
    splits, totals, iterations, active = [], [], 0, []
    for _ in range(repeat):
        rec = Recorder()
        start = time.perf_counter()
        out = one_call(t, y, p0, jac)
        total = time.perf_counter() - start
        rec.close()
        splits.append(rec.split(total))
        totals.append(total)
        iterations, active = rec.iterations, rec.active
    nfev = out[2]["nfev"].double()
    median = {k: statistics.median(sp[k] for sp in splits) for k in PHASES}

    rec = Recorder()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_call(t, y, p0, jac)
    rec.close()
    return dict(
        total=statistics.median(totals),
        total_min=min(totals),
        total_max=max(totals),
        phases=median,
        iterations=iterations,
        active=active,
        nfev_mean=float(nfev.mean()),
        nfev_max=int(nfev.max()),
        ops=_operations(prof),
    )


def _operations(prof) -> Dict[str, Dict]:
    """Per phase: top-level aten and fastopt ops (count, self-and-children microseconds), host syncs, ops that
    allocate and bytes allocated, and the costliest op names."""
    out: Dict[str, Dict] = {}
    for evt in prof.events():
        if not evt.name.startswith(("aten::", "fastopt::")):
            continue
        phase, parent, top = "other", evt.cpu_parent, evt.cpu_parent is None
        while parent is not None:
            if parent.name in PHASES:
                phase = parent.name
                top = top or evt.cpu_parent is parent
                break
            parent = parent.cpu_parent
        d = out.setdefault(phase, dict(ops=0, us=0.0, syncs=0, allocating=0, bytes=0, names=defaultdict(float)))
        if evt.name == "aten::_local_scalar_dense":
            d["syncs"] += 1
        if evt.cpu_memory_usage > 0:
            d["allocating"] += 1
            d["bytes"] += evt.cpu_memory_usage
        if top:
            d["ops"] += 1
            d["us"] += evt.cpu_time_total
            d["names"][evt.name] += evt.cpu_time_total
    return out


def report(results: Dict[str, Dict], args, meta: Dict[str, str]) -> str:
    lines = [
        f"# curve_fit profile: {args.batch} Gaussian peaks, 4 parameters, 64 points, {args.dtype}, eager",
        "",
        f"{meta['device']}; torch {meta['torch']}, fastopt {meta['fastopt']}, commit {meta['commit']}; "
        f"1-minute load average at the start {os.getloadavg()[0]:.1f}. Produced by "
        f"`python bench/profile_lsq.py --batch {args.batch} --dtype {args.dtype}"
        + (f" --threads {args.threads}" if args.threads else "")
        + f"` (medians of {args.repeat} calls; "
        "the machine is shared, so times move by tens of percent between runs: compare modes within this file).",
        "",
        "## Wall time by phase (ms)",
        "",
        "| jac | total (min-max) | " + " | ".join(PHASES) + " | iterations | nfev mean/max |",
        "| --- | ---: | " + " | ".join("---:" for _ in PHASES) + " | ---: | --- |",
    ]
    for jac, r in results.items():
        lines.append(
            f"| {jac} | {1e3 * r['total']:.1f} ({1e3 * r['total_min']:.1f}-{1e3 * r['total_max']:.1f}) | "
            + " | ".join(f"{1e3 * r['phases'][k]:.1f}" for k in PHASES)
            + f" | {r['iterations']} | {r['nfev_mean']:.2f}/{r['nfev_max']} |"
        )
    lines += [
        "",
        "Problems still in the working set at each iteration (finished ones are compacted out once at most "
        "half still run):",
        "",
    ]
    for jac, r in results.items():
        lines.append(f"* {jac}: {r['active']}")
    for jac, r in results.items():
        it = max(r["iterations"], 1)
        lines += [
            "",
            f"## Operations under torch.profiler, jac={jac} ({r['iterations']} iterations)",
            "",
            "| phase | ops | per iteration | profiled ms | host syncs | allocating ops | MB allocated | "
            "costliest ops (ms) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for phase in PHASES:
            d = r["ops"].get(phase)
            if d is None:
                continue
            names = sorted(d["names"].items(), key=lambda kv: -kv[1])[:4]
            per = f"{d['ops'] / it:.0f}" if phase in ("evaluate", "step", "loop checks") else "-"
            lines.append(
                f"| {phase} | {d['ops']} | {per} | {d['us'] / 1e3:.1f} | {d['syncs']} | {d['allocating']} | "
                f"{d['bytes'] / 2**20:.1f} | "
                + ", ".join(f"{n.replace('aten::', '')} {us / 1e3:.1f}" for n, us in names)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--jac", nargs="+", default=["lanes", "jacfwd"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="markdown path (default bench/results/lsq_profile_cpu.md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = benchmarking.environment(torch.device("cpu"))
    results = {jac: measure(args.batch, getattr(torch, args.dtype), jac, args.repeat) for jac in args.jac}
    text = report(results, args, meta)
    path = args.out or os.path.join(RESULTS, "lsq_profile_cpu.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
