"""Cost of curvature estimation (fastopt.schedulers), all variants timed in one process.

    python bench/bench_curvature.py                  # CPU, one intra-op thread, all workloads
    python bench/bench_curvature.py --threads 2 --workloads cnn --rounds 20

Two questions, per workload (a small CNN, a small transformer LM, and a tiny MLP where per-call
overhead dominates):

1. Overhead of HomotopyLR, update_curvature called every step: ``freq`` training steps with the
   scheduler at estimation_freq=freq (one estimate among them) against ``freq`` plain steps, as a
   fraction of the plain steps' time, at freq 10 (and each of ``--freqs``). Per estimator method:
   secant (the training gradients, no extra pass), secant_same_batch (one extra gradient per
   estimate), amortized_power (the default: one power iteration per estimate, a gradient at a
   shifted point paired with the training gradient, the training forward's dropout masks
   replayed), Hutchinson with 5 probes per HVP engine and on a quarter batch
   (estimation_batch_size), power iteration (5 products), amortized_power and secant_same_batch on
   a quarter batch (two quarter-batch gradients each); the scheduler's bookkeeping alone (a
   HomotopyLR that never estimates); CurvatureAdaptiveLR with its default and with Hutchinson on
   the step's own graph.
2. The cost of one estimate of each method in training steps: a training step with the estimate
   between backward and optimizer step (where the schedulers run it, the gradient in .grad) less a
   plain training step, over the plain step; batched probes against a Python loop of
   double-backward calls (the seed's Hutchinson loop), whole estimates and the 5 products alone.

Every variant trains its own copy of the model (deep copies of one initialisation), so the forward
hook an estimator puts on its model runs in its own variant's steps only. Every variant runs once
per round, the order rotated each round; ratios are medians of per-round ratios (paired), so load
on the machine that drifts between rounds cancels. Prints a table, appends CSV rows (device,
threads, versions, commit in every row) to bench/results/curvature_<device>.csv and a Markdown
copy of the table to the .md beside it. ``--variants`` keeps only the variants whose name holds one
of the given strings (the baselines always run).
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastopt import benchmarking
from fastopt.schedulers import CurvatureAdaptiveLR, CurvatureEstimator, HomotopyLR, _hvp
from fastopt.schedulers.curvature import DEFAULT_METHOD

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROBES = 5  # Hutchinson probes, power iterations
FREQ = 10
DEFAULT_FREQ = inspect.signature(HomotopyLR).parameters["estimation_freq"].default
LOOP = "step + estimate: hutchinson reverse_over_reverse_loop (Python loop)"


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
def bench(name: str, device: torch.device, rounds: int, freqs=(FREQ,), variants=None) -> List[Dict[str, object]]:
    model0, x, y, loss_fn, desc = workload(name, device)
    n_params = sum(p.numel() for p in model0.parameters())
    quarter = max(1, x.shape[0] // 4)

    def fresh():
        """A copy of the initial model and its own Adam: each variant trains its own."""
        model = copy.deepcopy(model0)
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)

    def plain_steps(steps):
        model, opt = fresh()

        def run():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()

        return run

    def with_homotopy(method="hutchinson", freq=FREQ, estimating=True, **estimator_kwargs):
        model, opt = fresh()
        est = CurvatureEstimator(model, loss_fn, method, n_samples=PROBES, n_iterations=PROBES, **estimator_kwargs)
        sched = HomotopyLR(
            opt,
            model,
            loss_fn,
            base_lr=1e-4,
            curvature_target=1e30,
            estimation_freq=freq if estimating else 2**62,
            estimator=est,
        )
        if not estimating:
            sched.step_count = 1  # past the first estimate: the scheduler's bookkeeping alone

        def run():
            for _ in range(freq):  # step_count % freq == 0 at the first: exactly one estimate per call
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                sched.update_curvature(x, y)
                opt.step()
                sched.step()

        return run

    def with_graph_scheduler(method):
        model, opt = fresh()
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

    # (name, steps, factory): the factories build their model copy only if the variant is kept.
    loop_specs = [
        *[(_named(f"HomotopyLR {m}", m), FREQ, lambda m=m: with_homotopy(m)) for m in ("secant", "secant_same_batch")],
        *[
            (
                _named(f"HomotopyLR amortized_power, estimation_freq={f}", "amortized_power", f),
                f,
                lambda f=f: with_homotopy("amortized_power", freq=f),
            )
            for f in sorted({FREQ, *freqs})
        ],
        (
            "HomotopyLR bookkeeping alone (never estimates: forward hook, update_curvature, step)",
            FREQ,
            lambda: with_homotopy("amortized_power", estimating=False),
        ),
        (
            f"HomotopyLR amortized_power, estimation_batch_size={quarter}",
            FREQ,
            lambda: with_homotopy("amortized_power", estimation_batch_size=quarter),
        ),
        (
            f"HomotopyLR secant_same_batch, estimation_batch_size={quarter}",
            FREQ,
            lambda: with_homotopy("secant_same_batch", estimation_batch_size=quarter),
        ),
        ("HomotopyLR hutchinson reverse_over_reverse", FREQ, lambda: with_homotopy(hvp="reverse_over_reverse")),
        ("HomotopyLR hutchinson forward_over_reverse", FREQ, lambda: with_homotopy(hvp="forward_over_reverse")),
        (
            "HomotopyLR hutchinson reverse_over_reverse_loop (seed)",
            FREQ,
            lambda: with_homotopy(hvp="reverse_over_reverse_loop"),
        ),
        (
            f"HomotopyLR hutchinson, estimation_batch_size={quarter}",
            FREQ,
            lambda: with_homotopy(estimation_batch_size=quarter),
        ),
        ("HomotopyLR power", FREQ, lambda: with_homotopy("power")),
        *[
            (_named(f"CurvatureAdaptiveLR step(loss) {m}", m), FREQ, lambda m=m: with_graph_scheduler(m))
            for m in ("secant", "amortized_power")
        ],
        ("CurvatureAdaptiveLR step(loss) hutchinson, graph reused", FREQ, lambda: with_graph_scheduler("hutchinson")),
    ]
    loop_specs = [spec for spec in loop_specs if _kept(spec[0], variants)]
    steps_of = {n: steps for n, steps, _ in loop_specs}
    loops = {f"{steps} plain steps": plain_steps(steps) for steps in sorted(set(steps_of.values()))}
    steps_of.update({n: int(n.split()[0]) for n in loops})
    loops.update({n: make() for n, _, make in loop_specs})

    estimator_specs = {
        **{
            f"step + estimate: {m}": dict(method=m) for m in ("secant", "secant_same_batch", "amortized_power", "power")
        },
        "step + estimate: hutchinson reverse_over_reverse (batched)": dict(
            method="hutchinson", hvp="reverse_over_reverse"
        ),
        "step + estimate: hutchinson forward_over_reverse (batched, torch.func)": dict(
            method="hutchinson", hvp="forward_over_reverse"
        ),
        LOOP: dict(method="hutchinson", hvp="reverse_over_reverse_loop"),
    }
    estimator_specs = {n: kw for n, kw in estimator_specs.items() if n == LOOP or _kept(n, variants)}

    def training_step(estimator_kwargs=None):
        """One training step; with ``estimator_kwargs``, an estimate where a scheduler runs it:
        after backward (the gradient in .grad, the training forward's generator state recorded),
        before optimizer.step() (which moves the parameters: a secant pairs two points)."""
        model, opt = fresh()
        est = None
        if estimator_kwargs is not None:
            est = CurvatureEstimator(model, loss_fn, n_samples=PROBES, n_iterations=PROBES, **estimator_kwargs)

        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if est is not None:
                est.estimate(x, y, grads=[p.grad for p in est.params] if est.wants_grad else None)
            opt.step()

        return run, est

    one_step = {"1 training step": training_step()[0]}
    estimators = {}
    for n, kw in estimator_specs.items():
        one_step[n], estimators[n] = training_step(kw)

    env = _environment(device)
    rows = []

    def add(section, times, baseline_of, what, ratio_of=_paired):
        for n, ts in times.items():
            rows.append(_row(name, desc, n_params, section, n, ts, ratio_of(ts, times[baseline_of(n)]), what, env))

    loop_times = interleaved(loops, rounds, device)
    add(
        "overhead",
        loop_times,
        lambda n: f"{steps_of[n]} plain steps",
        "time / time of as many plain steps (1 + overhead)",
    )
    step_times = interleaved(one_step, rounds, device)
    add(
        "estimate",
        step_times,
        lambda n: "1 training step",
        "(time of a step with the estimate - time of a step) / time of a step: one estimate in training steps",
        _paired_excess,
    )
    plain = step_times["1 training step"]
    loop_est = step_times[LOOP]
    for r in rows[-len(one_step) :]:
        if r["variant"] != "1 training step":
            r["speedup_vs_loop"] = round(_paired_excess_ratio(loop_est, step_times[r["variant"]], plain), 3)
    # The 5 products alone, on one gradient graph built outside the timing.
    est = estimators[LOOP]
    objective = _hvp.Objective(est.model, loss_fn, est.names, est.params, x, y, 0, True)
    graph = _hvp.ReverseOverReverse(objective)
    probes = [torch.randint(0, 2, (PROBES,) + tuple(p.shape), device=device).to(p.dtype) * 2 - 1 for p in est.params]
    products = {
        "products: batched (is_grads_batched)": lambda: _with(graph, True).hvp(probes),
        "products: Python loop of double-backward calls": lambda: _with(graph, False).hvp(probes),
    }
    prod_times = interleaved(products, rounds * 2, device)
    loop_name = "products: Python loop of double-backward calls"
    add("products", prod_times, lambda n: loop_name, "time / time of the loop")
    for r in rows[-len(products) :]:
        r["speedup_vs_loop"] = round(_paired(prod_times[loop_name], prod_times[r["variant"]]), 3)
    return rows


def profile_estimate(name: str, device: torch.device, rounds: int) -> List[Dict[str, object]]:
    """Where one estimate of the default method goes, against one training step: a gradient
    (forward + backward), the same gradient through the estimator's objective (functional_call,
    cloned buffers, its evaluation context), the estimate where HomotopyLR runs it (after the
    training forward and backward: the forward recorded, the gradient in .grad), and its reductions
    alone (norms, dots, the step length, the vector update). Ratios: paired per round, in training
    steps; the estimate alone is (forward + backward + estimate) - (forward + backward)."""
    model, x, y, loss_fn, desc = workload(name, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    est = CurvatureEstimator(model, loss_fn)
    params = est.params

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def gradient():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def objective_gradient():
        objective, _ = est._objective(x, y)
        _hvp.loss_and_grads(objective, [p.detach() for p in params])

    def gradient_and_estimate():
        gradient()
        est.estimate(x, y, grads=[p.grad for p in params])

    def reductions():
        g = est._usable([p.grad for p in params])
        v = est._power_vector
        est._fd_step([p.detach() for p in params], v)
        est._secant_figures(torch.tensor(math.nan), g, v, g, 1, 0)
        est._keep_vector(v, g)

    phases = {
        "training step": train_step,
        "gradient (forward + backward)": gradient,
        "gradient through the estimator's objective": objective_gradient,
        "forward + backward + estimate": gradient_and_estimate,
        "the estimate's reductions alone": reductions,
    }
    train_step()
    gradient_and_estimate()  # the power vector exists from here on
    times = interleaved(phases, rounds, device)
    base = times["training step"]
    # The estimate alone, per round: (forward + backward + estimate) - (forward + backward).
    alone = [b - a for a, b in zip(times["gradient (forward + backward)"], times["forward + backward + estimate"])]
    times["estimate alone (the difference of the two above)"] = alone
    env = _environment(device)
    n_params = sum(p.numel() for p in params)
    what = "time / time of a training step (paired per round)"
    return [_row(name, desc, n_params, "profile", n, ts, _paired(ts, base), what, env) for n, ts in times.items()]


def _environment(device: torch.device) -> Dict[str, str]:
    env = benchmarking.environment(device)
    env["threads"] = str(torch.get_num_threads())
    return env


def _row(workload_name, desc, n_params, section, variant, ts, ratio, what, env) -> Dict[str, object]:
    """One CSV row: the variant's time quantiles (ms), its ratio and what the ratio means, the environment."""
    p50, p20, p80 = _quantiles(ts)
    return dict(
        workload=workload_name,
        description=desc,
        n_params=n_params,
        section=section,
        variant=variant,
        ms_p50=round(p50, 3),
        ms_p20=round(p20, 3),
        ms_p80=round(p80, 3),
        rounds=len(ts),
        ratio=round(ratio, 4),
        ratio_means=what,
        **env,
    )


def _kept(name: str, variants) -> bool:
    return not variants or any(v in name for v in variants)


def _paired_excess(a: List[float], base: List[float]) -> float:
    """Median over rounds of (a - base) / base: the extra time of ``a`` in units of ``base``."""
    return statistics.median([(x - y) / y for x, y in zip(a, base)])


def _paired_excess_ratio(a: List[float], b: List[float], base: List[float]) -> float:
    """Median over rounds of (a - base) / (b - base): how many times more ``a`` adds than ``b``."""
    ratios = [(x - z) / (y - z) for x, y, z in zip(a, b, base) if y != z]
    return statistics.median(ratios) if ratios else float("nan")


def _named(label: str, method: str, freq: Optional[int] = None) -> str:
    """``label (default)`` for the estimator's default method (at HomotopyLR's default frequency)."""
    default = method == DEFAULT_METHOD and freq in (None, DEFAULT_FREQ)
    return f"{label} (default)" if default else label


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
    parser.add_argument(
        "--freqs", type=int, nargs="+", default=[10, 20], help="estimation_freq values of the default method's overhead"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="keep variants whose name holds one of these")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the phases of one default estimate against a training step -> curvature_profile_<device>.md",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if args.profile:
        rows = [r for name in args.workloads for r in profile_estimate(name, device, args.rounds * 4)]
        env = {k: rows[0][k] for k in ("device", "threads", "torch", "fastopt", "commit")}
        out = args.out or os.path.join(RESULTS, f"curvature_profile_{device.type}.md")
        header = " | ".join(f"{k} {v}" for k, v in env.items())
        append_text(out, f"\n## {header}\n\n```\n{format_table(rows)}\n```\n")
        return 0
    for name in args.workloads:
        rows += bench(name, device, args.rounds, args.freqs, args.variants)
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
