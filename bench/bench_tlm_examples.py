"""torch-levenberg-marquardt's two examples end to end, under the package and under fastopt.lm.

    python bench/bench_tlm_examples.py                    # both examples, both loaders, 3 rounds
    python bench/bench_tlm_examples.py --examples sinc --loaders dataloader --rounds 5

The examples are run by :mod:`fastopt.lm.package_examples` with the package passed in (the only
change a user makes is the import), each fit timed as a whole (loader iteration, steps, metrics,
the tqdm bar; bars go to stderr):

* ``sinc``: 20000 points, batches of 1000, Adam (lr 0.01) then LM (qr), 10 epochs. Loader
  ``fast`` is the example's ``utils.FastDataLoader(repeat=10, shuffle=True)`` (200 steps an
  epoch); ``dataloader`` a plain shuffled ``DataLoader`` over the ``TensorDataset`` (20 steps an
  epoch), where the package's ``fit`` pays the per-sample collation and fastopt's does not.
* ``digits``: the MNIST example's 1026-parameter CNN (LM: CrossEntropy, cholesky, lr 0.05) with a
  torchmetrics Accuracy, on 28 x 28 digits drawn here; ``--train`` images, batches of 5000.

Rounds alternate the packages (tlm, fastopt, tlm, ...) so that load from other processes hits both
alike. Reported per (example, loader, trainer): the median seconds of each package, the ratio
``tlm / fastopt`` per round (min-max) and the final losses. Trainer ``loader`` (sinc only) is the
loader iterated alone for the same epochs (no training): what each package's ``fit`` pays for its
batches. Appends to
bench/results/tlm_examples_<device>.csv and writes the table to tlm_examples_<device>.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

import fastopt.lm as flm
from fastopt import benchmarking
from fastopt.lm.package_examples import LOADERS, digits_example, sinc_example

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(example: str, package, loader: str, args) -> Dict[str, float]:
    if example == "sinc":
        return sinc_example(package, loader=loader, epochs=args.sinc_epochs)
    from torchmetrics import Accuracy

    return digits_example(
        package,
        loader=loader,
        train=args.train,
        epochs=args.digits_epochs,
        metrics=lambda: {"accuracy": Accuracy(task="multiclass", num_classes=10)},
    )


def loader_seconds(package, loader: str, epochs: int) -> float:
    """Seconds to iterate the sinc example's batches for ``epochs`` epochs, nothing else: the
    package's fit iterates the loader itself, fastopt's goes through ``iterate_batches``."""
    from fastopt.lm.loader import iterate_batches
    from fastopt.lm.package_examples import _loader
    from fastopt.lm.testing import sinc_data

    x, y = sinc_data(20000)
    batches = _loader(package, torch.utils.data.TensorDataset(x, y), 1000, 10, loader, "cpu")
    iterate = iterate_batches if package is flm else iter
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in iterate(batches):
            pass
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", nargs="+", default=["sinc", "digits"], choices=["sinc", "digits"])
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sinc-epochs", type=int, default=10)
    parser.add_argument("--digits-epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=10000, help="digits: training images")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_levenberg_marquardt as tlm

    env = benchmarking.environment(torch.device("cpu"))
    env["tlm"] = getattr(tlm, "__version__", "-")
    rows: List[dict] = []
    for example in args.examples:
        for loader in args.loaders:
            runs: Dict[str, List[Dict[str, float]]] = {"tlm": [], "fastopt": []}
            run(example, flm, loader, args)  # warm-up: first calls of torch.func, the extension
            for _ in range(args.rounds):
                for name, package in (("tlm", tlm), ("fastopt", flm)):
                    runs[name].append(run(example, package, loader, args))
            if example == "sinc":
                for name, package in (("tlm", tlm), ("fastopt", flm)):
                    for r in runs[name]:
                        r["loader_seconds"] = loader_seconds(package, loader, args.sinc_epochs)
                        r["loader_loss"] = float("nan")
            for trainer in ("adam", "lm") + (("loader",) if example == "sinc" else ()):
                t_tlm = [r[f"{trainer}_seconds"] for r in runs["tlm"]]
                t_ours = [r[f"{trainer}_seconds"] for r in runs["fastopt"]]
                ratios = [a / b for a, b in zip(t_tlm, t_ours)]
                rows.append(
                    {
                        "example": example,
                        "loader": loader,
                        "trainer": trainer,
                        "tlm_s": statistics.median(t_tlm),
                        "fastopt_s": statistics.median(t_ours),
                        "x_tlm_over_fastopt": statistics.median(t_tlm) / statistics.median(t_ours),
                        "ratio_min": min(ratios),
                        "ratio_max": max(ratios),
                        "tlm_loss": runs["tlm"][-1][f"{trainer}_loss"],
                        "fastopt_loss": runs["fastopt"][-1][f"{trainer}_loss"],
                        "rounds": args.rounds,
                        **env,
                    }
                )
                print(_line(rows[-1]), flush=True)
    table = _table(rows)
    print("\n" + table)
    device = "cpu"
    path = os.path.join(RESULTS, f"tlm_examples_{device}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(RESULTS, f"tlm_examples_{device}.md"), "a") as f:
        f.write(
            f"\n## {env['device']}, torch {env['torch']}, tlm {env['tlm']}, commit {env['commit']}\n\n"
            f"`python bench/bench_tlm_examples.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n"
        )
    return 0


def _line(r: dict) -> str:
    return (
        f"{r['example']:7s} {r['loader']:10s} {r['trainer']:4s} tlm {r['tlm_s']:7.2f} s  fastopt "
        f"{r['fastopt_s']:7.2f} s  x{r['x_tlm_over_fastopt']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  "
        f"loss tlm {r['tlm_loss']:.4e} fastopt {r['fastopt_loss']:.4e}"
    )


def _table(rows: List[dict]) -> str:
    head = (
        "| example | loader | trainer | tlm s | fastopt s | tlm / fastopt (per-round range) | final loss tlm "
        "| final loss fastopt |"
    )
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        lines.append(
            f"| {r['example']} | {r['loader']} | {r['trainer']} | {r['tlm_s']:.2f} | {r['fastopt_s']:.2f} | "
            f"{r['x_tlm_over_fastopt']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
            f"{r['tlm_loss']:.4e} | {r['fastopt_loss']:.4e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
