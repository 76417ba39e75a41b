"""What a Levenberg-Marquardt step of the 61-parameter sinc network cannot skip, op by op, beside
the steps of torch-levenberg-marquardt and fastopt.lm on the same problem, in one process.

    python bench/lm_sinc_floor.py                  # 2 threads (torch's default here), 3 rounds
    python bench/lm_sinc_floor.py --threads 1

The problem is bench/profile_lm.py's ``sinc61`` (1-20-1 tanh, 1000 samples, MSE, qr). The floor
ops are the step's arithmetic written by hand with no framework around it: the Jacobian (one
forward, the chain rule, [J | r] written), J^T J and J^T r as one product of [J | r], and per
attempt a QR solve of the 61 x 61 damped system (LAPACK's, and fastopt's lm_small_solve op: the
faster of the two counts) and a trial forward with its loss. ``floor`` is
jacobian + products + attempts x (solve + trial forward), with tlm's mean attempts per step on
this problem: no implementation that takes tlm's steps does less, so ``tlm / floor`` bounds any
speed-up here. torch.tanh is timed alone as well (it runs three times a step). Rounds alternate
the measurements, so load from other processes hits them alike; the table gives each median and
its min-max over the rounds. Appends to bench/results/lm_sinc_floor_<device>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fastopt.lm as flm
from fastopt import backends, benchmarking
from fastopt.lm.testing import sinc_data, tanh_mlp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def floor_ops(x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """The step's unavoidable arithmetic on the sinc network, hand-written."""
    model = tanh_mlp((1, 20, 1))
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    jr = torch.empty(x.shape[0], 62)
    gram = torch.empty(62, 62)
    damped = torch.eye(61) * 61 + torch.randn(61, 61).mul(0.01).tril()
    damped = damped + damped.mT
    rhs = torch.randn(61, 1)

    def jacobian():
        h = torch.tanh(F.linear(x, w1, b1))
        r = F.linear(h, w2, b2) - y
        d1 = torch.ops.aten.tanh_backward(w2.expand(x.shape[0], 20), h)
        jr[:, 0:20] = d1 * x
        jr[:, 20:40] = d1
        jr[:, 40:60] = h
        jr[:, 60] = 1
        jr[:, 61:62] = r

    def products():
        torch.mm(jr.mT, jr, out=gram)

    def solve():
        a, tau = torch.geqrf(damped)
        return torch.linalg.solve_triangular(a, torch.ormqr(a, tau, rhs, left=True, transpose=True), upper=True)

    small_solve = backends.select("lm_small_solve", "cpu", torch.float32, "auto")
    diagonal, rhs_vector = damped.diagonal().clone(), rhs[:, 0].clone()

    def trial_forward():
        return (F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2) - y).square().mean()

    h = torch.randn(x.shape[0], 20)
    return {
        "jacobian": jacobian,
        "products": products,
        "solve (per attempt)": solve,
        # The same QR solve, the damped matrix built from its lower triangle, by the op fastopt.lm
        # uses for up to 96 columns (fastopt._C; the torch reference where the build lacks it).
        "solve by lm_small_solve (per attempt)": lambda: small_solve(damped, diagonal, rhs_vector, shift=1e-3),
        "trial forward + loss (per attempt)": trial_forward,
        "torch.tanh on 1000 x 20": lambda: torch.tanh(h),
    }


def step_of(package, x, y) -> Callable[[], object]:
    module = package.training.LevenbergMarquardtModule(
        tanh_mlp((1, 20, 1)), loss_fn=package.loss.MSELoss(), solve_method="qr"
    )
    for _ in range(5):
        module.training_step(x, y)
    return lambda: module.training_step(x, y)


def mean_attempts(package, x, y, steps: int = 200) -> float:
    module = package.training.LevenbergMarquardtModule(
        tanh_mlp((1, 20, 1)), loss_fn=package.loss.MSELoss(), solve_method="qr"
    )
    return sum(module.training_step(x, y)[3]["attempts"] for _ in range(steps)) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_levenberg_marquardt as tlm

    x, y = sinc_data(1000)
    attempts = mean_attempts(tlm, x, y)
    cases = {**floor_ops(x, y), "tlm training_step": step_of(tlm, x, y), "fastopt training_step": step_of(flm, x, y)}
    times: Dict[str, List[float]] = {name: [] for name in cases}
    floors: List[float] = []
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median * 1e6)
        t = {name: v[-1] for name, v in times.items()}
        solve_time = min(t["solve (per attempt)"], t["solve by lm_small_solve (per attempt)"])
        per_attempt = solve_time + t["trial forward + loss (per attempt)"]
        floors.append(t["jacobian"] + t["products"] + attempts * per_attempt)
    times[f"floor (jacobian + products + {attempts:.2f} x (solve + trial))"] = floors

    def cell(values: List[float]) -> str:
        values = sorted(values)
        return f"{values[len(values) // 2]:.0f} ({values[0]:.0f}-{values[-1]:.0f})"

    tlm_step = sorted(times["tlm training_step"])[args.rounds // 2]
    lines = ["| what | us (min-max over rounds) | tlm step / this |", "| --- | --- | --- |"]
    for name, values in times.items():
        lines.append(f"| {name} | {cell(values)} | {tlm_step / sorted(values)[len(values) // 2]:.2f} |")
    table = "\n".join(lines)
    print(table)
    env = benchmarking.environment(torch.device("cpu"))
    with open(os.path.join(RESULTS, "lm_sinc_floor_cpu.md"), "a") as f:
        f.write(
            f"\n## {env['device']}, torch {env['torch']}, commit {env['commit']}, "
            f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}\n\n"
            f"`python bench/lm_sinc_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({args.rounds} rounds)\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
