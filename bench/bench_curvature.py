"""Cost of curvature estimation (fastopt.schedulers), all variants timed in one process.

    python bench/bench_curvature.py                  # CPU, one intra-op thread, all workloads
    python bench/bench_curvature.py --threads 2 --workloads cnn --rounds 20

Two questions, per workload (a small CNN, a small transformer LM, and a tiny MLP where per-call
overhead dominates):

1. Overhead of HomotopyLR at estimation_freq=10, update_curvature called every step: ten training
   steps with the scheduler (one estimate among them) against ten plain steps, as a fraction of
   the plain steps' time. Per estimator method: secant (the training gradients, no extra pass),
   secant_same_batch (one extra gradient per estimate), amortized_power (the default: one power
   iteration per estimate by finite differences: one or two extra gradients), Hutchinson with 5
   probes per HVP engine and on a quarter batch (estimation_batch_size), power iteration (5
   products), amortized_power and secant_same_batch on a quarter batch (two quarter-batch gradients
   each); CurvatureAdaptiveLR with its default and with Hutchinson on the step's own graph.
2. The cost of one estimate of each method against one training step (the secant methods given
   the training gradient, as the schedulers do); batched probes against a Python loop of
   double-backward calls (the seed's Hutchinson loop), whole estimates and the 5 products alone.

Every variant runs once per round, the order rotated each round; ratios are medians of per-round
ratios (paired), so load on the machine that drifts between rounds cancels. Prints a table,
appends CSV rows (device, threads, versions, commit in every row) to
bench/results/curvature_<device>.csv and a Markdown copy of the table to the .md beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastopt import benchmarking
from fastopt.schedulers import CurvatureAdaptiveLR, CurvatureEstimator, HomotopyLR, _hvp
from fastopt.schedulers.curvature import DEFAULT_METHOD

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROBES = 5  # Hutchinson probes, power iterations
FREQ = 10
LOOP = "estimate: hutchinson reverse_over_reverse_loop (Python loop)"


# -- workloads ---------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x))


class SmallTransformerLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, layers: int = 2, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.encoder(self.embed(tokens) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _mse(out, target):
    return ((out - target) ** 2).mean()


def workload(name: str, device: torch.device):
    """(model, inputs, targets, loss_fn, optimizer factory, description)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "cnn":
        model = SmallCNN()
        x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        loss_fn, desc = F.cross_entropy, "CNN 3 conv (16-32-64) + BN, batch 32x3x32x32, CE"
    elif name == "transformer":
        model = SmallTransformerLM()
        x = torch.randint(0, 256, (16, 32), generator=g)
        y = torch.randint(0, 256, (16, 32), generator=g)
        loss_fn, desc = lm_loss, "transformer LM 2 layers d=64 4 heads, batch 16x32 tokens, CE"
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
        x, y = torch.randn(64, 32, generator=g), torch.randn(64, 8, generator=g)
        # Written out: F.mse_loss breaks forward-over-reverse in torch (pytorch/pytorch#123996).
        loss_fn, desc = _mse, "MLP 32-64-64-8 tanh, batch 64, MSE"
    else:
        raise ValueError(f"Unknown workload: {name}. Choose from: {WORKLOADS}")
    model = model.to(device).train()
    return model, x.to(device), y.to(device), loss_fn, desc


WORKLOADS = ("cnn", "transformer", "mlp")


# -- timing --------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, device, warmup: int = 2):
    """Per name: every round's seconds; each round runs every fn once, order rotated per round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def _quantiles(ts: List[float]) -> Tuple[float, float, float]:
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
    return statistics.median(ts) * 1e3, q[1] * 1e3, q[7] * 1e3


def _paired(a: List[float], b: List[float]) -> float:
    return statistics.median([x / y for x, y in zip(a, b)])


# -- the measurements ---------------------------------------------------------------------------------
def bench(name: str, device: torch.device, rounds: int) -> List[Dict[str, object]]:
    model, x, y, loss_fn, desc = workload(name, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    quarter = max(1, x.shape[0] // 4)

    def plain_steps():
        for _ in range(FREQ):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    def with_homotopy(method="hutchinson", **estimator_kwargs):
        est = CurvatureEstimator(model, loss_fn, method, n_samples=PROBES, n_iterations=PROBES, **estimator_kwargs)
        sched = HomotopyLR(
            opt, model, loss_fn, base_lr=1e-4, curvature_target=1e30, estimation_freq=FREQ, estimator=est
        )

        def run():
            for _ in range(FREQ):  # step_count % FREQ == 0 at the first: exactly one estimate per call
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                sched.update_curvature(x, y)
                opt.step()
                sched.step()

        return run

    def with_graph_scheduler(method):
        sched = CurvatureAdaptiveLR(
            opt, model, base_lr=1e-4, curvature_target=1e30, estimation_freq=FREQ, method=method, n_samples=PROBES
        )

        def run():
            for _ in range(FREQ):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward(retain_graph=sched.will_estimate)
                sched.step(loss)
                opt.step()

        return run

    loops = {
        "10 plain steps": plain_steps,
        **{_named(f"HomotopyLR {m}", m): with_homotopy(m) for m in ("secant", "secant_same_batch", "amortized_power")},
        f"HomotopyLR amortized_power, estimation_batch_size={quarter}": with_homotopy(
            "amortized_power", estimation_batch_size=quarter
        ),
        f"HomotopyLR secant_same_batch, estimation_batch_size={quarter}": with_homotopy(
            "secant_same_batch", estimation_batch_size=quarter
        ),
        "HomotopyLR hutchinson reverse_over_reverse": with_homotopy(hvp="reverse_over_reverse"),
        "HomotopyLR hutchinson forward_over_reverse": with_homotopy(hvp="forward_over_reverse"),
        "HomotopyLR hutchinson reverse_over_reverse_loop (seed)": with_homotopy(hvp="reverse_over_reverse_loop"),
        f"HomotopyLR hutchinson, estimation_batch_size={quarter}": with_homotopy(estimation_batch_size=quarter),
        "HomotopyLR power": with_homotopy("power"),
        **{
            _named(f"CurvatureAdaptiveLR step(loss) {m}", m): with_graph_scheduler(m)
            for m in ("secant", "amortized_power")
        },
        "CurvatureAdaptiveLR step(loss) hutchinson, graph reused": with_graph_scheduler("hutchinson"),
    }
    estimators = {
        f"estimate: {m}": CurvatureEstimator(model, loss_fn, m, n_samples=PROBES, n_iterations=PROBES)
        for m in ("secant", "secant_same_batch", "amortized_power", "power")
    }
    estimators.update(
        {
            "estimate: hutchinson reverse_over_reverse (batched)": CurvatureEstimator(
                model, loss_fn, n_samples=PROBES, hvp="reverse_over_reverse", method="hutchinson"
            ),
            "estimate: hutchinson forward_over_reverse (batched, torch.func)": CurvatureEstimator(
                model, loss_fn, n_samples=PROBES, hvp="forward_over_reverse", method="hutchinson"
            ),
            LOOP: CurvatureEstimator(
                model, loss_fn, n_samples=PROBES, hvp="reverse_over_reverse_loop", method="hutchinson"
            ),
        }
    )

    def training_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()  # .grad keeps this step's gradient: the secant estimates below read it

    def estimate(e):
        # As a scheduler calls it: the training gradient in .grad (the step before moved the
        # parameters, so a secant pairs two different points).
        return e.estimate(x, y, grads=[p.grad for p in e.params] if e.wants_grad else None)

    one_step = {"1 training step": training_step}
    one_step.update({n: (lambda e=e: estimate(e)) for n, e in estimators.items()})

    env = benchmarking.environment(device)
    env["threads"] = str(torch.get_num_threads())
    rows = []

    def add(section, times, baseline, what):
        base = times[baseline]
        for n, ts in times.items():
            p50, p20, p80 = _quantiles(ts)
            rows.append(
                dict(
                    workload=name,
                    description=desc,
                    n_params=n_params,
                    section=section,
                    variant=n,
                    ms_p50=round(p50, 3),
                    ms_p20=round(p20, 3),
                    ms_p80=round(p80, 3),
                    rounds=len(ts),
                    ratio=round(_paired(ts, base), 4),
                    ratio_means=what,
                    **env,
                )
            )

    loop_times = interleaved(loops, rounds, device)
    add("overhead", loop_times, "10 plain steps", "time / time of 10 plain steps (1 + overhead)")
    step_times = interleaved(one_step, rounds, device)
    add("estimate", step_times, "1 training step", "time / time of 1 training step")
    loop_est = step_times[LOOP]
    for r in rows[-len(one_step) :]:
        r["speedup_vs_loop"] = round(_paired(loop_est, step_times[r["variant"]]), 3)
    # The 5 products alone, on one gradient graph built outside the timing (after the training
    # above: the graph saves the parameters, which optimizer.step() changes in place).
    est = estimators["estimate: hutchinson reverse_over_reverse (batched)"]
    objective = _hvp.Objective(model, loss_fn, est.names, est.params, x, y, 0, True)
    graph = _hvp.ReverseOverReverse(objective)
    probes = [torch.randint(0, 2, (PROBES,) + tuple(p.shape), device=device).to(p.dtype) * 2 - 1 for p in est.params]
    products = {
        "products: batched (is_grads_batched)": lambda: _with(graph, True).hvp(probes),
        "products: Python loop of double-backward calls": lambda: _with(graph, False).hvp(probes),
    }
    prod_times = interleaved(products, rounds * 2, device)
    add("products", prod_times, "products: Python loop of double-backward calls", "time / time of the loop")
    for r in rows[-len(products) :]:
        r["speedup_vs_loop"] = round(
            _paired(prod_times["products: Python loop of double-backward calls"], prod_times[r["variant"]]), 3
        )
    return rows


def _named(label: str, method: str) -> str:
    return f"{label} (default)" if method == DEFAULT_METHOD else label


def _with(graph, batched):
    graph.batched = batched
    return graph


def append_text(path: str, text: str) -> None:
    """Print ``text`` and append it to the file at ``path`` (directories made as needed)."""
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def format_table(rows) -> str:
    head = ("workload", "section", "variant", "ms p50", "p20-p80", "ratio", "speedup vs loop")
    lines = [
        (
            r["workload"],
            r["section"],
            r["variant"],
            f"{r['ms_p50']:.2f}",
            f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f}",
            f"{r['ratio']:.3f}",
            str(r.get("speedup_vs_loop", "")) or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on an oversubscribed machine 2 OpenMP threads "
        "made these small workloads 10-100x slower and noisy)",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in args.workloads:
        rows += bench(name, device, args.rounds)
    env = {k: rows[0][k] for k in ("device", "threads", "torch", "fastopt", "commit")}
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    descriptions = "\n".join(
        sorted({f"- {r['workload']}: {r['description']}, {r['n_params']} parameters" for r in rows})
    )
    out = args.out or os.path.join(RESULTS, f"curvature_{device.type}.csv")
    append_text(
        os.path.splitext(out)[0] + ".md", f"\n## {header}\n\n{descriptions}\n\n```\n{format_table(rows)}\n```\n"
    )
    fields = list(dict.fromkeys(k for r in rows for k in r))
    new = not os.path.exists(out)
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
