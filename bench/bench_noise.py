"""Overhead of fastopt.noise.NoiseAdaptiveOptimizer per training step of a small CNN, as a
fraction of the step time of the bare optimizer, all measured in this one process.

    python bench/bench_noise.py                      # CPU: SGD(momentum), Adam, LAdam; a few minutes
    python bench/bench_noise.py --optimizers sgd ladam --pairs 100 --device cuda

A step is 4 micro-batches of 16 CIFAR-sized images (forward, backward) and one optimizer step, or
one backward of the whole batch of 64. Modes:

* ``accum bare``: the optimizer alone, gradient accumulation over the 4 micro-batches;
* ``accum wrapped``: the same plus ``record_micro_batch`` after each backward and the wrapper's
  ``step`` (noise from the 4 micro-batch gradients);
* ``batch bare``: one backward of the batch of 64 and the optimizer's step;
* ``per-sample wrapped``: ``per_sample_backward`` (torch.func vmap(grad) over the 64 samples, in
  place of the backward) and the wrapper's step, against ``batch bare``;
* ``per-sample 1/10 (derived)``: per-sample gradients on one step in ten: the row above / 10;
* ``wrapper work``: the wrapper's own calls inside ``accum wrapped`` (4 ``record_micro_batch``
  and its ``step``, timed inline) minus the bare step of the same pair, over ``accum bare``:
  the overhead without the noise of two whole-step timings (host time, exact on CPU).

End-to-end modes are timed as back-to-back pairs (bare, wrapped; the order alternating); each
overhead is the median (p20-p80) over pairs of ``t_wrapped / t_bare - 1``, so that load drifting
on a shared machine hits both halves of a pair. Rows go to bench/results/noise_<device>.csv
(device, versions, commit in each) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fastopt
from fastopt import benchmarking
from fastopt.noise import NoiseAdaptiveOptimizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH, MICRO = 64, 4

OPTIMIZERS: Dict[str, Callable] = {
    "sgd": partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    "adam": partial(torch.optim.Adam, lr=1e-3),
    "ladam": partial(fastopt.LAdam, lr=1e-3, c2=1e-4),
}


def small_cnn() -> torch.nn.Module:
    """Three 3x3 conv layers (16, 32, 64 channels), pooling, a linear head: 24k parameters."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


@dataclass
class NoiseBenchRow:
    optimizer: str
    mode: str
    baseline: str
    n_params: int
    ms_p50: float
    ms_p20: float
    ms_p80: float
    overhead_p50: float
    overhead_p20: float
    overhead_p80: float
    samples: int
    meta: Dict[str, str] = field(default_factory=dict)


def paired(
    fn_a: Callable[[], None], fn_b: Callable[[], None], pairs: int, device, inline: Optional[Dict[str, float]] = None
) -> Dict[str, List[float]]:
    """Time ``fn_a`` and ``fn_b`` back to back ``pairs`` times (alternating which goes first);
    per pair, ``t_b / t_a - 1``. Load that drifts on a shared machine hits both halves of a pair.
    With ``inline`` (which the functions fill with their "bare"/"wrapped" step and record times),
    also ``(wrapped - bare) / t_a`` per pair: what the wrapper's own calls cost."""
    for fn in (fn_a, fn_b, fn_a, fn_b):  # warm-up
        fn()
    out: Dict[str, List[float]] = {"a": [], "b": [], "overhead": [], "inline": []}
    for i in range(pairs):
        t = {}
        for key in ("a", "b") if i % 2 == 0 else ("b", "a"):
            t[key] = benchmarking.measure(fn_a if key == "a" else fn_b, device, min_time_s=0.0, max_reps=1, warmup=0)[0]
        out["a"].append(t["a"])
        out["b"].append(t["b"])
        out["overhead"].append(t["b"] / t["a"] - 1)
        if inline is not None:
            out["inline"].append((inline["wrapped"] - inline["bare"]) / t["a"])
    return out


def bench_optimizer(name: str, device: torch.device, pairs: int, meta) -> List[NoiseBenchRow]:
    torch.manual_seed(0)
    model = small_cnn().to(device)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    bare = OPTIMIZERS[name](model.parameters())
    wrapped = NoiseAdaptiveOptimizer(OPTIMIZERS[name](model.parameters()))
    chunks = list(zip(x.chunk(MICRO), y.chunk(MICRO)))
    n_params = sum(p.numel() for p in model.parameters())

    inline: Dict[str, float] = {}

    def accum(record: bool) -> None:
        # perf_counter around the wrapper's calls and the step: "wrapper work" compares their sum
        # with the bare step of the same pair (host time; on CUDA the record ops are async).
        opt, spent = (wrapped if record else bare), 0.0
        for xb, yb in chunks:
            loss = F.cross_entropy(model(xb), yb) / MICRO
            loss.backward()
            if record:
                t0 = time.perf_counter()
                wrapped.record_micro_batch(loss)
                spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.step()
        inline["wrapped" if record else "bare"] = (spent + time.perf_counter() - t0) * 1e3
        opt.zero_grad()

    def batch_bare() -> None:
        F.cross_entropy(model(x), y).backward()
        bare.step()
        bare.zero_grad()

    def per_sample() -> None:
        wrapped.per_sample_backward(model, F.cross_entropy, x, y)
        wrapped.step()
        wrapped.zero_grad()

    def row(mode, baseline, times, overheads):
        q = partial(_quantile, overheads) if overheads else (lambda _: float("nan"))
        t = partial(_quantile, times) if times else (lambda _: float("nan"))
        return NoiseBenchRow(
            name, mode, baseline, n_params, t(0.5), t(0.2), t(0.8), q(0.5), q(0.2), q(0.8), len(times), meta
        )

    accumulation = paired(partial(accum, False), partial(accum, True), pairs, device, inline)
    per_sample_vs_batch = paired(batch_bare, per_sample, pairs, device)
    rows = [
        row("accum bare", "-", accumulation["a"], None),
        row("accum wrapped", "accum bare", accumulation["b"], accumulation["overhead"]),
        row("wrapper work", "accum bare", [], accumulation["inline"]),
        row("batch bare", "-", per_sample_vs_batch["a"], None),
        row("per-sample wrapped", "batch bare", per_sample_vs_batch["b"], per_sample_vs_batch["overhead"]),
    ]
    ps = rows[-1]
    rows.append(
        NoiseBenchRow(
            name,
            "per-sample 1/10 (derived)",
            "batch bare",
            n_params,
            float("nan"),
            float("nan"),
            float("nan"),
            ps.overhead_p50 / 10,
            ps.overhead_p20 / 10,
            ps.overhead_p80 / 10,
            0,
            meta,
        )
    )
    return rows


def _quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def format_table(rows: List[NoiseBenchRow]) -> str:
    head = ("optimizer", "mode", "ms p50", "ms p20-p80", "vs", "overhead p50", "overhead p20-p80")
    lines = [
        (
            r.optimizer,
            r.mode,
            f"{r.ms_p50:.2f}",
            f"{r.ms_p20:.2f}-{r.ms_p80:.2f}" if r.samples else "-",
            r.baseline,
            "-" if r.baseline == "-" else f"{100 * r.overhead_p50:+.1f}%",
            "-" if r.baseline == "-" else f"{100 * r.overhead_p20:+.1f}%..{100 * r.overhead_p80:+.1f}%",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam", "ladam"], choices=sorted(OPTIMIZERS))
    parser.add_argument("--pairs", type=int, default=100, help="back-to-back (bare, wrapped) step pairs per mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (CPU default 1: a loaded machine stalls multi-threaded ops)",
    )
    parser.add_argument("--out", default=None, help="CSV to append to (default bench/results/noise_<device>.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    meta = benchmarking.environment(device)
    rows = []
    for name in args.optimizers:
        rows += bench_optimizer(name, device, args.pairs, meta)
    header = " | ".join(f"{k} {v}" for k, v in meta.items())
    table = format_table(rows)
    print(header)
    print(
        f"small CNN ({rows[0].n_params} parameters), batch {BATCH} = {MICRO} micro-batches of {BATCH // MICRO}, "
        f"{args.pairs} back-to-back pairs per comparison"
    )
    print(table)
    out = args.out or os.path.join(RESULTS, f"noise_{device.type}.csv")
    benchmarking.write_csv(rows, out)
    with open(os.path.splitext(out)[0] + ".md", "a") as f:
        f.write(
            f"\n## {header}\n\nsmall CNN ({rows[0].n_params} parameters), batch {BATCH} = {MICRO} micro-batches "
            f"of {BATCH // MICRO}, {args.pairs} back-to-back pairs per comparison\n\n```\n{table}\n```\n"
        )
    print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
