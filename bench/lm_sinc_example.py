"""Curve fitting with Levenberg-Marquardt: y = sinc(10 x) on 20000 points with
torch-levenberg-marquardt's 61-parameter network (1-20-1, tanh), shuffled batches of 1000,
against Adam (lr 0.01, same batches) given the same wall-clock time.

    python bench/lm_sinc_example.py                 # fastopt.lm.fit for up to 50 epochs, then Adam
    python bench/lm_sinc_example.py --epochs 10 --adam-lr 0.003

Prints the epochs (tqdm) and the final losses on all points; exit status 1 if LM does not reach
``--target`` (default 1e-6).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fastopt
from fastopt.lm.testing import shuffled_batches, sinc_data, tanh_mlp, train_adam_for


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--adam-lr", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=1e-6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    x, y = sinc_data(args.samples, dtype=dtype)
    mse = torch.nn.MSELoss()

    model = tanh_mlp((1, 20, 1), dtype=dtype)
    lm = fastopt.LM(model, mse, solve_method="solve")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        record = fastopt.lm.fit(lm, shuffled_batches(x, y, args.batch_size, epoch), epochs=1, progress=False)[0]
        with torch.no_grad():
            full = mse(model(x), y).item()
        if epoch % 5 == 0 or full < args.target or record["stopped"]:
            print(f"LM   epoch {epoch + 1:3d}  loss {full:.3e}  damping {record['damping']:.1e}")
        if full < args.target or record["stopped"]:
            break
    lm_time = time.perf_counter() - start
    with torch.no_grad():
        lm_loss = mse(model(x), y).item()

    adam_model = tanh_mlp((1, 20, 1), dtype=dtype)
    adam_steps, _ = train_adam_for(adam_model, mse, x, y, args.batch_size, lm_time, args.adam_lr)
    with torch.no_grad():
        adam_loss = mse(adam_model(x), y).item()

    print(f"\nLevenberg-Marquardt: loss {lm_loss:.3e} after {lm.steps} steps ({lm_time:.1f} s)")
    print(f"Adam (lr {args.adam_lr}): loss {adam_loss:.3e} after {adam_steps} steps in the same time")
    reached = lm_loss < args.target
    print(f"LM {'reached' if reached else 'did NOT reach'} loss < {args.target:g}")
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
