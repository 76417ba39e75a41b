"""How closely each CurvatureEstimator method follows the exact-Hessian kappa along training.

    python bench/experiment_curvature_accuracy.py      # appends to bench/results/curvature_accuracy.md
    python bench/experiment_curvature_accuracy.py --every 20 --methods amortized_power secant

kappa = ||H|| / (||g||^2 + eps), the seed's definition, with ||H|| the spectral norm |lambda|_max of
the dense Hessian of the loss on the current batch (method='exact': n Hessian-vector products and
eigvalsh; the test suite checks it against torch.autograd.functional.hessian). Small models whose
Hessian is computable train for 300 steps; every 10 steps (``--every``), after loss.backward() and before
optimizer.step() (where HomotopyLR.update_curvature runs), every method estimates kappa on that
batch the way a scheduler calls it (the secant methods get the training gradient from .grad, as
the schedulers pass it). Per method: the Pearson correlation of log kappa with the exact log kappa,
the same for ||H|| alone (kappa's variation is mostly ||g||^2's, common to all methods), and the
ratio estimate / exact (median, 10th-90th percentile). Hutchinson estimates |tr H|, so its ratio
is also given against the exact |tr H|.

Workloads (float64, CPU, one thread; full batch and mini-batch 32 of 512 samples):
- quadratic: the seed's Experiment 1 least squares (dim 50, condition number 100), SGD lr 1/L;
- mlp-ce: MLP 8-24-24-4 tanh, cross-entropy on a random teacher's labels, SGD lr 0.5, momentum 0.9;
- mlp-mse: MLP 8-24-24-2 tanh, MSE regression on a random teacher, Adam lr 1e-2.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import append_text  # noqa: E402
from experiment_quadratic import LeastSquares, half_mse  # noqa: E402
from experiment_quadratic import problem as quadratic_problem  # noqa: E402

from fastopt import benchmarking  # noqa: E402
from fastopt.schedulers import CurvatureEstimator  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("secant", "secant_same_batch", "amortized_power", "hutchinson", "power")
STEPS, EVERY, N, BATCH = 300, 10, 512, 32


def _teacher_data(outputs: int, classify: bool, g: torch.Generator):
    x = torch.randn(N, 8, generator=g, dtype=torch.float64)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, outputs)).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        out = teacher(x)
    return x, (out.argmax(1) if classify else out)


def workload(name: str):
    """(model, optimizer, loss_fn, x, y)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "quadratic":
        x, y, theta_star, lam = quadratic_problem()
        model = LeastSquares(theta_star + torch.randn(theta_star.shape, generator=g, dtype=torch.float64))
        return model, torch.optim.SGD(model.parameters(), lr=1.0 / lam), half_mse, x, y
    classify = name == "mlp-ce"
    x, y = _teacher_data(4 if classify else 2, classify, g)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4 if classify else 2)
    )
    model = model.double()
    if classify:
        return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), F.cross_entropy, x, y
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), half_mse, x, y


def trajectory(name: str, batch: int, every: int = EVERY, methods=METHODS) -> Dict[str, List[Dict[str, float]]]:
    model, opt, loss_fn, x, y = workload(name)
    exact = CurvatureEstimator(model, loss_fn, "exact")
    estimators = {m: CurvatureEstimator(model, loss_fn, m, seed=1) for m in methods}
    rows: Dict[str, List[Dict[str, float]]] = {m: [] for m in ("exact", *methods)}
    order = torch.Generator().manual_seed(2)
    for step in range(STEPS + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=order) if batch < x.shape[0] else slice(None)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        if step % every == 0:
            e = exact.measure(xb, yb)
            rows["exact"].append({"kappa": e.curvature, "norm": e.hessian_norm, "trace": abs(e.trace)})
            grads = [p.grad for p in model.parameters()]
            for m, est in estimators.items():
                r = est.measure(xb, yb, grads=grads if est.wants_grad else None)
                rows[m].append({"kappa": r.curvature, "norm": r.hessian_norm, "gap": r.grad_norm_sq / e.grad_norm_sq})
        opt.step()
    return rows


def _pearson(a: List[float], b: List[float]) -> float:
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


def _spread(values: List[float]) -> str:
    q = statistics.quantiles(values, n=10, method="inclusive")
    return f"{statistics.median(values):.3g} [{q[0]:.3g}, {q[8]:.3g}]"


def summarise(rows, methods=METHODS) -> List[str]:
    ex = rows["exact"]
    log_k = [math.log(r["kappa"]) for r in ex]
    log_n = [math.log(r["norm"]) for r in ex]
    out = []
    for m in methods:
        est = rows[m]
        finite = [i for i, r in enumerate(est) if math.isfinite(r["kappa"]) and r["kappa"] > 0]
        lk = [math.log(est[i]["kappa"]) for i in finite]
        ln = [math.log(est[i]["norm"]) for i in finite]
        ratio = [est[i]["kappa"] / ex[i]["kappa"] for i in finite]
        vs_trace = ""
        if m == "hutchinson":
            vs_trace = _spread([est[i]["norm"] / ex[i]["trace"] for i in finite])
        out.append(
            f"| {m} | {len(finite)}/{len(est)} | {_pearson(lk, [log_k[i] for i in finite]):.3f} "
            f"| {_pearson(ln, [log_n[i] for i in finite]):.3f} | {_spread(ratio)} | {vs_trace or '-'} |"
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "curvature_accuracy.md"))
    parser.add_argument("--workloads", nargs="+", default=["quadratic", "mlp-ce", "mlp-mse"])
    parser.add_argument("--every", type=int, default=EVERY, help="estimate every this many steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = benchmarking.environment(torch.device("cpu"))
    text = [
        f"\n## kappa estimates against the exact-Hessian kappa along training ({STEPS} steps, every {args.every}) -- "
        + " | ".join(f"{k} {v}" for k, v in env.items())
        + "\n"
    ]
    for name in args.workloads:
        for label, batch in (("full batch", N), (f"mini-batch {BATCH}", BATCH)):
            rows = trajectory(name, batch, args.every, args.methods)
            ex = rows["exact"]
            text.append(
                f"\n### {name}, {label}: exact kappa {ex[0]['kappa']:.3g} -> {ex[-1]['kappa']:.3g} "
                f"(range {min(r['kappa'] for r in ex):.3g}-{max(r['kappa'] for r in ex):.3g}), "
                f"||H||_2 {min(r['norm'] for r in ex):.3g}-{max(r['norm'] for r in ex):.3g}\n"
            )
            text.append(
                "| method | finite estimates | corr(log kappa, exact) | corr(log ||H||, exact) "
                "| kappa / exact: median [p10, p90] | hutchinson |tr H| / exact |tr H| |"
            )
            text.append("| --- | --- | --- | --- | --- | --- |")
            text += summarise(rows, args.methods)
    append_text(args.out, "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
