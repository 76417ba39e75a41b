"""Fixed against noise-adaptive learning rates on noisy landscapes, over many seeds.

    python -m fastopt.noise.demo                     # 40 seeds, about 10 s on one CPU core
    python -m fastopt.noise.demo --seeds 400 --steps 600 --out-dir results/

Each seed draws a :class:`~fastopt.noise.NoisyLandscape` (a quadratic bowl with ripples that
create many noise-induced local minima) and a start on a circle of radius ``--radius`` outside
the rugged region. Three runs per seed descend with the same stochastic gradients (the mean of
``--batch-size`` per-sample gradients, :meth:`NoisyLandscape.sample_gradients`):

* ``fixed base_lr``: a small fixed rate, stable inside the ripples' wells;
* ``fixed max_lr``: a large fixed rate, unstable in the wells but stable in the true bowl;
* ``noise-adaptive``: :class:`~fastopt.noise.NoiseAdaptiveLR` from ``base_lr`` within
  ``[base_lr / 10, max_lr]``, fed the per-sample gradients and the batch loss.

A run *escaped* the noise-induced minima when its last iterate lies in the basin of the
landscape's global minimum (:meth:`NoisyLandscape.in_global_basin`). The demo prints, per run,
how many seeds escaped, the median excess loss ``L(x_T) - L(x*)`` and whether the noise-adaptive
rate escaped more often than each fixed rate (with the exact two-sided sign test on the seeds
where exactly one of the two escaped), and writes two PNGs: seed 0's trajectories on its
landscape and its loss and lr curves.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .core import NoiseAdaptiveLR
from .utils import create_noisy_landscape, plot_training_curves, visualize_landscape

FIXED_BASE, FIXED_MAX, ADAPTIVE = "fixed base_lr", "fixed max_lr", "noise-adaptive"
RUNS = (FIXED_BASE, FIXED_MAX, ADAPTIVE)


@dataclass
class DemoResult:
    """Per run name: whether each seed escaped, and its excess loss; seed 0's histories."""

    escaped: Dict[str, List[bool]] = field(default_factory=lambda: {r: [] for r in RUNS})
    excess_loss: Dict[str, List[float]] = field(default_factory=lambda: {r: [] for r in RUNS})
    curves: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    trajectories: Dict[str, object] = field(default_factory=dict)
    local_minima: List[int] = field(default_factory=list)

    def count(self, run: str) -> int:
        return sum(self.escaped[run])

    def sign_test(self, run: str, other: str) -> tuple:
        """(seeds where only ``run`` escaped, seeds where only ``other`` escaped, two-sided p)."""
        wins = sum(a and not b for a, b in zip(self.escaped[run], self.escaped[other]))
        losses = sum(b and not a for a, b in zip(self.escaped[run], self.escaped[other]))
        n, k = wins + losses, min(wins, losses)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        return wins, losses, p


def run_demo(
    seeds: int = 40,
    steps: int = 300,
    dim: int = 2,
    noise_scale: float = 0.5,
    frequency: float = 8.0,
    batch_size: int = 16,
    base_lr: float = 0.02,
    max_lr: float = 0.2,
    radius: float = 6.0,
    first_seed: int = 0,
) -> DemoResult:
    """Run the three learning-rate rules on ``seeds`` landscapes; see the module docstring."""
    import numpy as np

    result = DemoResult()
    for seed in range(first_seed, first_seed + seeds):
        landscape = create_noisy_landscape(dim, noise_scale, frequency=frequency, seed=seed)
        result.local_minima.append(landscape.count_local_minima())
        start_rng = np.random.default_rng([seed, 1])
        direction = start_rng.standard_normal(dim)
        start = radius * direction / np.linalg.norm(direction)
        _, best_loss = landscape.global_minimum()
        policy = NoiseAdaptiveLR(base_lr, max_lr=max_lr)
        rules = {
            FIXED_BASE: lambda grads, loss: base_lr,
            FIXED_MAX: lambda grads, loss: max_lr,
            ADAPTIVE: policy.get_adapted_lr,
        }
        for name, rule in rules.items():
            rng = np.random.default_rng([seed, 2])  # the same sampling noise for every rule
            x = start.copy()
            path, losses, lrs = [x.copy()], [], []
            for _ in range(steps):
                sample_losses, grads = landscape.sample_gradients(x, batch_size, rng)
                lr = rule(grads, sample_losses.mean())
                x = x - lr * grads.mean(axis=0)
                path.append(x.copy())
                losses.append(landscape.compute_loss_and_grad(x)[0])
                lrs.append(lr)
            result.escaped[name].append(landscape.in_global_basin(x))
            result.excess_loss[name].append(losses[-1] - best_loss)
            if seed == first_seed:
                result.curves[name] = {"loss": losses, "lr": lrs}
                result.trajectories[name] = np.array(path)
    return result


def report(result: DemoResult, seeds: int) -> str:
    import numpy as np

    lines = [f"{'run':<16} {'escaped':>9} {'median L(x_T) - L*':>20}"]
    for run in RUNS:
        lines.append(f"{run:<16} {result.count(run):>4}/{seeds:<4} {float(np.median(result.excess_loss[run])):>20.4f}")
    for other in (FIXED_BASE, FIXED_MAX):
        wins, losses, p = result.sign_test(ADAPTIVE, other)
        verdict = "yes" if result.count(ADAPTIVE) > result.count(other) else "no"
        lines.append(
            f"noise-adaptive escaped more often than {other}: {verdict} "
            f"({result.count(ADAPTIVE)} vs {result.count(other)} of {seeds}; only adaptive {wins}, "
            f"only {other} {losses}, sign test p = {p:.3g})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=40, help="landscapes (and starts) to average over")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--noise-scale", type=float, default=0.5, help="ripple amplitude")
    parser.add_argument("--frequency", type=float, default=8.0, help="ripple angular frequency")
    parser.add_argument("--batch-size", type=int, default=16, help="per-sample gradients per step")
    parser.add_argument("--base-lr", type=float, default=0.02)
    parser.add_argument("--max-lr", type=float, default=0.2)
    parser.add_argument("--radius", type=float, default=6.0, help="distance of the start from the origin")
    parser.add_argument("--out-dir", default=".", help="where the PNGs go")
    parser.add_argument("--no-plot", action="store_true", help="print only (no matplotlib needed)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    t0 = time.perf_counter()
    result = run_demo(
        args.seeds,
        args.steps,
        args.dim,
        args.noise_scale,
        args.frequency,
        args.batch_size,
        args.base_lr,
        args.max_lr,
        args.radius,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"noisy landscapes: dim {args.dim}, noise_scale {args.noise_scale}, frequency {args.frequency} "
        f"(median {int(sorted(result.local_minima)[len(result.local_minima) // 2])} local minima), start radius "
        f"{args.radius}, {args.steps} steps, batch {args.batch_size}, base_lr {args.base_lr}, max_lr "
        f"{args.max_lr}, {args.seeds} seeds ({elapsed:.1f} s)"
    )
    print(report(result, args.seeds))
    if not args.no_plot:
        landscape = create_noisy_landscape(args.dim, args.noise_scale, frequency=args.frequency, seed=0)
        paths = [
            visualize_landscape(
                landscape,
                os.path.join(args.out_dir, "noise_demo_landscape.png"),
                trajectories=result.trajectories,
                title="seed 0: fixed and noise-adaptive learning rates",
            ),
            plot_training_curves(
                result.curves,
                os.path.join(args.out_dir, "noise_demo_curves.png"),
                title="seed 0: loss L(x_t) and learning rate",
            ),
        ]
        print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
