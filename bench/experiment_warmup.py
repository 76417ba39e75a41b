"""Does warmup emerge on a real model? kappa = ||H|| / ||g||^2 along the first steps of training.

    python bench/experiment_warmup.py            # appends to bench/results/curvature_warmup.md
    python bench/experiment_warmup.py --methods secant hutchinson

The seed's claim: at initialisation kappa is high, so HomotopyLR's rate starts low and rises as
kappa decays ("warmup emerges"). Here a small transformer LM (bench_curvature.SmallTransformerLM,
2 layers, d=64) and the small CNN learn a task they can learn, with AdamW at a fixed rate; every
10 steps (``--every``) each method of ``--methods`` (default: CurvatureEstimator's default, amortized_power,
Hutchinson with 10 probes) and the reference measure kappa on the same trajectory. The models are
too large for the exact Hessian, so the reference is |lambda|_max by power iteration with 20
iterations. The estimators compute their own gradient on the batch (no scheduler runs here), so the
secant methods pair the gradients of successive measurements; with ``--training-grads`` they measure
where a scheduler does instead, after backward with the training gradient handed over. The table
shows whether kappa falls over the first steps (warmup would emerge) or rises, per method, and how
each follows the reference.
Tasks: LM next-token prediction on sequences t_{i+1} = (5 t_i + 3) mod 256 from random starts;
CNN classification of 32x32 images whose class sets the mean of one of 10 pixel blocks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import SmallCNN, SmallTransformerLM, append_text, lm_loss  # noqa: E402

from fastopt import benchmarking  # noqa: E402
from fastopt.schedulers import CurvatureEstimator  # noqa: E402
from fastopt.schedulers.curvature import DEFAULT_METHOD, METHODS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def lm_batch(g, batch=16, seq=33):
    start = torch.randint(0, 256, (batch, 1), generator=g)
    seqs = [start]
    for _ in range(seq - 1):
        seqs.append((5 * seqs[-1] + 3) % 256)
    tokens = torch.cat(seqs, dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def cnn_batch(g, batch=32):
    y = torch.randint(0, 10, (batch,), generator=g)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 5)
        x[i, :, r * 16 : (r + 1) * 16, col * 6 : (col + 1) * 6] += 1.0
    return x, y


REFERENCE = ("power", 20)  # |lambda|_max by 20 power iterations: the exact Hessian is out of reach here


def trajectory(name, steps, every, methods, training_grads=False):
    """Per step measured: (step, loss, ||g||^2, {method: (||H||, kappa)}), one training run."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "transformer":
        model, loss_fn, batch, lr = SmallTransformerLM(), lm_loss, lm_batch, 1e-3
    else:
        model, loss_fn, batch, lr = SmallCNN(), F.cross_entropy, cnn_batch, 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    # An estimate changes nothing the training run sees (parameters, buffers, RNG): every method
    # measures the same trajectory.
    estimators = {
        label: CurvatureEstimator(model, loss_fn, method, n_samples=10, n_iterations=iterations)
        for label, (method, iterations) in methods.items()
    }
    rows = []

    def measure_all(grads):
        figures = {}
        loss, g_sq = math.nan, math.nan
        for label, est in estimators.items():
            m = est.measure(x, y, grads=grads if est.wants_grad else None)
            figures[label] = (m.hessian_norm, m.curvature)
            if math.isfinite(m.loss):
                loss, g_sq = m.loss, m.grad_norm_sq
        return loss, g_sq, figures

    for step in range(steps + 1):
        x, y = batch(g)
        due = step % every == 0
        if due and not training_grads:
            rows.append((step, *measure_all(None)))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if due and training_grads:  # where a scheduler measures: .grad handed over, dropout masks replayed
            rows.append((step, *measure_all([p.grad for p in model.parameters()])))
        opt.step()
    return rows


def _log_corr(a, b):
    return float(torch.corrcoef(torch.tensor([[math.log(v) for v in a], [math.log(v) for v in b]]))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(RESULTS, "curvature_warmup.md"))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(dict.fromkeys([DEFAULT_METHOD, "secant", "amortized_power", "hutchinson"])),
        choices=[m for m in METHODS if m != "exact"],
        help="measured beside the reference, power iteration with 20 iterations",
    )
    parser.add_argument(
        "--training-grads",
        action="store_true",
        help="measure after backward with the training gradient handed over, as the schedulers do "
        "(the gradient-only methods pair with it; the transformer's dropout masks are replayed)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = benchmarking.environment(torch.device("cpu"))
    methods = {m: (m, 5) for m in args.methods}
    methods["power x20 (reference)"] = REFERENCE
    text = [
        f"\n## kappa along training (AdamW lr 1e-3, every {args.every} steps"
        + (", training gradients handed over" if args.training_grads else "")
        + "), methods "
        + ", ".join(methods)
        + " -- "
        + " | ".join(f"{k} {v}" for k, v in env.items())
        + "\n"
    ]
    for name in ("transformer", "cnn"):
        rows = trajectory(name, args.steps, args.every, methods, args.training_grads)
        text.append(f"\n### {name}\n")
        reference = [r[3]["power x20 (reference)"][1] for r in rows]
        for label in methods:
            kappas = [r[3][label][1] for r in rows]
            first, low, last = kappas[0], min(kappas), kappas[-1]
            text.append(
                f"- {label}: kappa {first:.3g} at step 0, min {low:.3g}, {last:.3g} at step {rows[-1][0]} "
                f"({'falls' if last < first else 'rises'} over the run, x{last / first:.3g}); "
                f"corr(log kappa, reference) {_log_corr(kappas, reference):.3f}"
            )
        text.append("")
        text.append("| step | loss | ||g||^2 | " + " | ".join(f"{m}: ||H||, kappa" for m in methods) + " |")
        text.append("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
        text += [
            f"| {s} | {loss:.4g} | {g2:.4g} | " + " | ".join(f"{f[m][0]:.4g}, {f[m][1]:.4g}" for m in methods) + " |"
            for s, loss, g2, f in rows
        ]
    append_text(args.out, "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
