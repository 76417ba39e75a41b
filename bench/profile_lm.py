"""Where a Levenberg-Marquardt step's time goes, fastopt and torch-levenberg-marquardt side by side.

    python bench/profile_lm.py                       # the three problems, 4 steps each
    python bench/profile_lm.py --problems sinc61 --steps 20

Problems (CPU, fp32, the configuration users run):

* ``sinc61``: tlm's sinc example network (1-20-1 tanh, 61 parameters), a batch of 1000, MSE, qr;
* ``cnn1026``: tlm's MNIST example network (five convolutions + ELU + linear, 1026 parameters) on
  5000 drawn 28 x 28 digits, cross-entropy (square-root residuals), cholesky, learning rate 0.05;
* ``mlp4353``: 1-64-64-1 tanh (4353 parameters), 8000 samples, MSE, cholesky.

Each package's ``training_step`` runs under cProfile after two warm-up steps; the time of each
step is split by the calls that do the work: the Jacobian (fastopt: ``ResidualJacobian.__call__``;
tlm: its ``_compute_jacobian``), the Gauss-Newton products (fastopt's ``jacobian_products`` op;
tlm's matmuls), the factorisations and triangular solves (LAPACK calls, per attempt), the trial
forward passes (the module's ``forward`` outside the Jacobian) and the rest (Python, dispatch,
allocation, the accept/reject comparisons). On a CPU there is no host sync to count (eager CPU ops
run synchronously); the reads of a loss for the accept/reject decision are in ``rest``. cProfile
adds a cost per Python call, so the ``rest`` of Python-heavy steps is inflated; the wall time per
step without the profiler is printed beside it. Writes bench/results/lm_profile_<device>.md.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from typing import Callable, Dict, Tuple

import torch

import fastopt.lm as flm
from fastopt import benchmarking
from fastopt.lm.package_examples import conv_classifier
from fastopt.lm.testing import digits, sinc_data, tanh_mlp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Each category is the time of the calls named in split(); none of them nests in another.
LAPACK = (
    "geqrf",  # fastopt's qr: Householder QR, Q applied by ormqr, never formed
    "ormqr",
    "lu_factor",
    "lu_solve",
    "linalg_cholesky",
    "linalg_cholesky_ex",
    "cholesky_solve",
    "linalg_qr",
    "linalg_solve",
    "linalg_solve_ex",
    "linalg_solve_triangular",
    "solve_triangular",
    "lm_small_solve",  # fastopt's qr of up to 96 columns: the damped system factored and solved in one C++ op
)
CATEGORIES = ("jacobian", "products", "factorise+solve", "trial forward")


def _sum(stats: pstats.Stats, test: Callable[[str, str], bool], field: int = 3) -> float:
    """Seconds of the entries ``test`` selects: cumulative (field 3) or own time (field 2)."""
    raw = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    return sum(entry[field] for (file, _, name), entry in raw.items() if test(file, name))


JACOBIAN_CALLERS = ("_compute_jacobian", "__call__")


def _outside(stats: pstats.Stats, test: Callable[[str, str], bool], callers: Tuple[str, ...]) -> float:
    """Cumulative seconds of the selected entries, without their calls from functions named in
    ``callers`` (the Jacobian's own forward passes)."""
    raw = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (file, _, name), entry in raw.items():
        if test(file, name):
            total += sum(edge[3] for (_, _, caller), edge in entry[4].items() if caller not in callers)
    return total


def split(stats: pstats.Stats, steps: int, package: str) -> Dict[str, float]:
    """Milliseconds per step of each category."""
    lapack = _sum(stats, lambda f, n: any(k in n for k in LAPACK))
    if package == "fastopt":
        jac = _sum(stats, lambda f, n: n == "__call__" and f.endswith(os.path.join("_engine", "jacobian.py")))
        products = _sum(stats, lambda f, n: n.startswith("jacobian_products"))
    else:
        jac = _sum(stats, lambda f, n: n == "_compute_jacobian")
        # tlm forms J^T J and J^T r inline (`J.t() @ J`): C calls cProfile books as training_step's
        # own time, together with the step's other inline tensor arithmetic.
        products = _sum(stats, lambda f, n: n == "training_step" and "torch_levenberg_marquardt" in f, field=2)
    forward = _outside(stats, lambda f, n: n == "forward" and f.endswith("training.py"), JACOBIAN_CALLERS)
    return {c: v * 1e3 / steps for c, v in zip(CATEGORIES, [jac, products, lapack, forward])}


def problems() -> Dict[str, Callable[[], Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]]]:
    def sinc61():
        x, y = sinc_data(1000)
        return tanh_mlp((1, 20, 1)), x, y, dict(loss="mse", solve_method="qr")

    def cnn1026():
        x, y = digits(5000, seed=0, size=28)
        torch.manual_seed(0)
        return conv_classifier(), x, y, dict(loss="ce", solve_method="cholesky", learning_rate=0.05)

    def mlp4353():
        x, y = sinc_data(8000)
        return tanh_mlp((1, 64, 64, 1)), x, y, dict(loss="mse", solve_method="cholesky")

    return {"sinc61": sinc61, "cnn1026": cnn1026, "mlp4353": mlp4353}


def module_for(package, model: torch.nn.Module, config: dict):
    loss = package.loss.MSELoss() if config["loss"] == "mse" else package.loss.CrossEntropyLoss()
    return package.training.LevenbergMarquardtModule(
        model, loss_fn=loss, solve_method=config["solve_method"], learning_rate=config.get("learning_rate", 1.0)
    )


def profile(package, make, steps: int) -> Tuple[float, float, Dict[str, float]]:
    model, x, y, config = make()
    module = module_for(package, model, config)
    for _ in range(2):
        module.training_step(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        module.training_step(x, y)
    wall = (time.perf_counter() - start) * 1e3 / steps
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    for _ in range(steps):
        module.training_step(x, y)
    profiled = (time.perf_counter() - start) * 1e3 / steps
    profiler.disable()
    return wall, profiled, split(pstats.Stats(profiler), steps, "fastopt" if package is flm else "tlm")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(problems()), choices=list(problems()))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_levenberg_marquardt as tlm

    env = benchmarking.environment(torch.device("cpu"))
    head = ["problem", "package", "ms/step", "ms/step profiled", *CATEGORIES, "rest"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in args.problems:
        make = problems()[name]
        for label, package in (("tlm", tlm), ("fastopt", flm)):
            wall, profiled, parts = profile(package, make, args.steps)
            rest = profiled - sum(parts.values())
            cells = [f"{v:.1f} ({100 * v / profiled:.0f}%)" for v in [*parts.values(), rest]]
            lines.append(f"| {name} | {label} | {wall:.1f} | {profiled:.1f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "lm_profile_cpu.md"), "a") as f:
        f.write(
            f"\n## {env['device']}, torch {env['torch']}, commit {env['commit']}, "
            f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n\n"
            f"`python bench/profile_lm.py {' '.join(argv or sys.argv[1:])}` ({args.steps} steps each, after 2 warm-up "
            f"steps)\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
