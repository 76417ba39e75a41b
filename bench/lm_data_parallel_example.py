"""Data-parallel Levenberg-Marquardt with torchrun: the sinc fit of lm_sinc_example.py, each
global batch split across the ranks.

    torchrun --nproc-per-node 2 bench/lm_data_parallel_example.py            # gloo, CPU
    torchrun --nproc-per-node 4 bench/lm_data_parallel_example.py --backend nccl --device cuda
    python bench/lm_data_parallel_example.py --check                         # 1 process, for comparison

Every rank draws the same shuffled global batches (same seed), keeps its own slice of each
(``batch[rank::world]``: uneven slices are fine) and calls ``lm.step`` on it; one all-reduce per
step adds the ranks' J^T J, J^T r and losses, so all ranks take the same step, the step one
process would take on the whole batch. Rank 0 prints the loss and damping after each epoch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastopt
from fastopt.lm.testing import shuffled_batches, sinc_data, tanh_mlp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend: gloo (CPU) or nccl (CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true", help="run in one process (no torchrun) for comparison")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ and not args.check
    if distributed:
        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        rank, world = 0, 1
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    model = tanh_mlp((1, 20, 1), seed=0, dtype=torch.float64).to(device)
    x, y = sinc_data(args.samples, dtype=torch.float64, device=device)
    lm = fastopt.LM(model, torch.nn.MSELoss(), process_group=dist.group.WORLD if distributed else None)
    for epoch in range(args.epochs):
        losses = []
        for xb, yb in shuffled_batches(x, y, args.batch_size, seed=epoch):
            result = lm.step(xb[rank::world], yb[rank::world])  # this rank's slice of the global batch
            losses.append(float(result.loss))  # the global batch's loss, on every rank
        if rank == 0:
            print(
                f"epoch {epoch}: mean loss {sum(losses) / len(losses):.6e}, damping {result.damping:.1e}, ranks {world}"
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
