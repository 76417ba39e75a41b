"""The seed's Experiment 1: a quadratic loss with known curvature, HomotopyLR against constant-LR SGD and Adam.

    python bench/experiment_quadratic.py                # appends to bench/results/curvature_experiment1.md
    python bench/experiment_quadratic.py --method exact # the same with the exact-Hessian kappa

Problem: least squares L(theta) = ||X theta - y||^2 / (2N), N = 200, dim 50, Hessian X^T X / N with
eigenvalues log-spaced from mu = 1 to L = 100 (condition number 100), y = X theta* (minimum 0);
theta starts at theta* + a random unit-variance offset (3 seeds). Full batch and mini-batch (32),
500 steps. Every method gets a grid of its hyperparameters and is reported at its best (median final
loss over the seeds), so no method loses for want of tuning:

- SGD, constant rate eta in {0.5, 1, 1.5, 1.9} / L;
- SGD + HomotopyLR: base rate as SGD's, curvature_target in {1e-2, 1, 1e2, 1e4, 1e6} x kappa_0
  (kappa at the start), estimation_freq in ``--freqs`` (default 1 and 10), alpha 1, smoothing 0.9, kappa by ``--method``
  (default: CurvatureEstimator's default; 'hutchinson' uses 10 probes, 'exact' the dense Hessian);
- Adam, rate in {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1}.

The seed's success metric: HomotopyLR matches or beats Adam. The script states whether it did.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import append_text  # noqa: E402

from fastopt import benchmarking  # noqa: E402
from fastopt.schedulers import CurvatureEstimator, HomotopyLR  # noqa: E402
from fastopt.schedulers.curvature import DEFAULT_METHOD, METHODS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DIM, N, CONDITION, STEPS, SEEDS = 50, 200, 100.0, 500, (0, 1, 2)


class LeastSquares(nn.Module):
    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, x):
        return x @ self.theta


def half_mse(pred, y):
    return 0.5 * ((pred - y) ** 2).mean()


def problem():
    g = torch.Generator().manual_seed(1234)
    u, _ = torch.linalg.qr(torch.randn(N, DIM, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(CONDITION)).item(), DIM, dtype=torch.float64)
    x = u @ torch.diag(torch.sqrt(eig * N)) @ w.T
    theta_star = torch.randn(DIM, generator=g, dtype=torch.float64)
    return x, x @ theta_star, theta_star, float(eig.max())


def run(method, params, seed, batch, x, y, theta_star, estimator_method=DEFAULT_METHOD):
    g = torch.Generator().manual_seed(100 + seed)
    model = LeastSquares(theta_star + torch.randn(DIM, generator=g, dtype=torch.float64))
    if method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=params["lr"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=params["lr"])
    sched = None
    if method == "SGD+HomotopyLR":
        est = CurvatureEstimator(model, half_mse, estimator_method, n_samples=10, seed=seed)
        kappa0 = CurvatureEstimator(model, half_mse, estimator_method, n_samples=10, seed=seed).estimate(x, y)
        sched = HomotopyLR(
            opt,
            model,
            half_mse,
            base_lr=params["lr"],
            curvature_target=params["target"] * kappa0,
            estimation_freq=params["freq"],
            estimator=est,
        )
    batches = torch.Generator().manual_seed(200 + seed)
    first_hit = None
    l0 = float(half_mse(model(x), y).detach())
    for step in range(STEPS):
        if batch is None:
            xb, yb = x, y
        else:
            idx = torch.randint(0, N, (batch,), generator=batches)
            xb, yb = x[idx], y[idx]
        opt.zero_grad()
        half_mse(model(xb), yb).backward()
        if sched is not None:
            sched.update_curvature(xb, yb)
        opt.step()
        if sched is not None:
            sched.step()
        if first_hit is None and float(half_mse(model(x), y).detach()) <= 1e-6 * l0:
            first_hit = step + 1
    final = float(half_mse(model(x), y).detach())
    extra = {}
    if sched is not None:
        extra = {
            "kappa_first": sched.curvature_history[0],
            "kappa_last": sched.curvature_history[-1],
            "lr_last": sched.get_last_lr()[0],
        }
    return final / l0, first_hit, extra


def grid(lam, freqs=(1, 10)):
    sgd = [{"lr": f / lam} for f in (0.5, 1.0, 1.5, 1.9)]
    yield from (("SGD", p) for p in sgd)
    for p, target, freq in itertools.product(sgd, (1e-2, 1.0, 1e2, 1e4, 1e6), freqs):
        yield "SGD+HomotopyLR", {**p, "target": target, "freq": freq}
    yield from (("Adam", {"lr": lr}) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1))


def fmt_params(method, p, lam):
    if method == "Adam":
        return f"lr={p['lr']:g}"
    s = f"lr={p['lr'] * lam:g}/L"
    if method == "SGD+HomotopyLR":
        s += f", target={p['target']:g} x kappa_0, freq={p['freq']}"
    return s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "curvature_experiment1.md"))
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="HomotopyLR's estimator")
    parser.add_argument("--freqs", type=int, nargs="+", default=[1, 10], help="HomotopyLR estimation_freq grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, y, theta_star, lam = problem()
    t0 = time.time()
    lines = []
    verdicts = []
    for label, batch in (("full batch", None), ("mini-batch 32", 32)):
        results = {}
        for method, p in grid(lam, args.freqs):
            runs = [run(method, p, s, batch, x, y, theta_star, args.method) for s in SEEDS]
            results[(method, tuple(sorted(p.items())))] = (method, p, runs)
        best = {}
        for method, p, runs in results.values():
            med = statistics.median(r[0] for r in runs)
            if method not in best or med < best[method][0]:
                best[method] = (med, p, runs)
        # HomotopyLR with the target at the starting curvature: the rule active from step 1.
        active = min(
            (
                (statistics.median(r[0] for r in runs), p, runs)
                for m, p, runs in results.values()
                if m == "SGD+HomotopyLR" and p["target"] == 1.0
            ),
            key=lambda t: t[0],
        )
        lines.append(f"\n### {label}\n")
        lines.append(
            "| method | best hyperparameters | final loss / initial (median of 3 seeds) | steps to 1e-6 x initial "
            "| kappa first -> last | last lr |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- |")
        rows = [(m, *best[m]) for m in ("SGD", "SGD+HomotopyLR", "Adam")]
        rows.append(("SGD+HomotopyLR, target = kappa_0", *active))
        for name, med, p, runs in rows:
            method = "SGD+HomotopyLR" if name.startswith("SGD+HomotopyLR") else name
            hits = [r[1] for r in runs]
            hit = "never" if all(h is None for h in hits) else "/".join("-" if h is None else str(h) for h in hits)
            extra = runs[0][2]
            kappa = f"{extra['kappa_first']:.3g} -> {extra['kappa_last']:.3g}" if extra else "-"
            lr = f"{extra['lr_last']:.3g}" if extra else "-"
            lines.append(f"| {name} | {fmt_params(method, p, lam)} | {med:.3e} | {hit} | {kappa} | {lr} |")
        homotopy, adam = best["SGD+HomotopyLR"][0], best["Adam"][0]
        verdicts.append(
            f"- {label}: best HomotopyLR {homotopy:.3e} vs best Adam {adam:.3e}: "
            f"{'matches or beats' if homotopy <= adam * 1.05 else 'does NOT match'} Adam (seed's metric); "
            f"HomotopyLR with its target at kappa_0 reaches {active[0]:.3e}, constant-LR SGD {best['SGD'][0]:.3e}."
        )
    env = benchmarking.environment(torch.device("cpu"))
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    text = (
        f"\n## Experiment 1 (quadratic, condition number {CONDITION:g}, dim {DIM}, {STEPS} steps), "
        f"kappa by method={args.method!r}, estimation_freq in {args.freqs} -- {header}\n\n"
        + "\n".join(verdicts)
        + "\n"
        + "\n".join(lines)
        + f"\n\n(run time {time.time() - t0:.0f} s)\n"
    )
    append_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
