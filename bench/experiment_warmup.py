"""Does warmup emerge on a real model? kappa = ||H|| / ||g||^2 along the first steps of training.

    python bench/experiment_warmup.py            # appends to bench/results/curvature_warmup.md

The seed's claim: at initialisation kappa is high, so HomotopyLR's rate starts low and rises as
kappa decays ("warmup emerges"). Here a small transformer LM (bench_curvature.SmallTransformerLM,
2 layers, d=64) and the small CNN learn a task they can learn, with AdamW at a fixed rate; kappa is
measured every 10 steps (Hutchinson, 10 probes, default engine) and so are the loss and
||g||^2. The table shows whether kappa falls over the first steps (warmup would emerge) or rises.
Tasks: LM next-token prediction on sequences t_{i+1} = (5 t_i + 3) mod 256 from random starts;
CNN classification of 32x32 images whose class sets the mean of one of 10 pixel blocks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import SmallCNN, SmallTransformerLM, append_text, lm_loss  # noqa: E402

from fastopt import benchmarking  # noqa: E402
from fastopt.schedulers import CurvatureEstimator  # noqa: E402

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


def trajectory(name, steps, every):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "transformer":
        model, loss_fn, batch, lr = SmallTransformerLM(), lm_loss, lm_batch, 1e-3
    else:
        model, loss_fn, batch, lr = SmallCNN(), F.cross_entropy, cnn_batch, 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    est = CurvatureEstimator(model, loss_fn, n_samples=10)
    rows = []
    for step in range(steps + 1):
        x, y = batch(g)
        if step % every == 0:
            m = est.measure(x, y)
            rows.append((step, m.loss, m.grad_norm_sq, m.hessian_norm, m.curvature))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(RESULTS, "curvature_warmup.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = benchmarking.environment(torch.device("cpu"))
    text = [
        "\n## kappa along training (AdamW lr 1e-3, Hutchinson 10 probes) -- "
        + " | ".join(f"{k} {v}" for k, v in env.items())
        + "\n"
    ]
    for name in ("transformer", "cnn"):
        rows = trajectory(name, args.steps, args.every)
        first, low = rows[0][4], min(r[4] for r in rows)
        last = rows[-1][4]
        text.append(
            f"\n### {name}: kappa {first:.3g} at step 0, min {low:.3g}, {last:.3g} at step {rows[-1][0]} "
            f"({'falls' if last < first else 'rises'} over the run)\n"
        )
        text.append("| step | loss | ||g||^2 | |tr H| | kappa |")
        text.append("| --- | --- | --- | --- | --- |")
        text += [f"| {s} | {loss:.4g} | {g2:.4g} | {h:.4g} | {k:.4g} |" for s, loss, g2, h, k in rows]
    append_text(args.out, "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
