"""Levenberg-Marquardt step time: fastopt against torch-levenberg-marquardt, in one process.

    python bench/bench_lm.py                          # every problem, CPU
    python bench/bench_lm.py --problems sinc61 mlp4353 --steps 6
    python bench/bench_lm.py --device cuda            # Triton products on a GPU

Problems (fp32 unless named otherwise, solve_method='cholesky'):

* ``mlp4353``: 1-64-64-1 tanh MLP (4353 parameters), 8000 samples: the overdetermined case
  where J^T J dominates;
* ``sinc61``: the package's sinc example, 1-20-1 tanh (61 parameters), 1000 samples;
* ``under4353``: the 4353-parameter MLP on 1000 samples: underdetermined (J J^T, 1000 x 1000);
* ``split1153``: 1-32-32-1 (1153 parameters), 8000 samples, max_batch_size=1000 (split batch);
* ``products``: the ``jacobian_products`` op alone on J of 8000 x 4353 (+ the residual column),
  on the backend ``--backend`` resolves to and on every other backend that can run it here (on
  CPU: the C++ op of fastopt._C and the torch reference), against ``J.T @ J`` (torch) and, when
  numpy is installed, numpy's ``J.T @ J`` (its BLAS syrk).

Each provider trains its own copy of the same model on the same data, and the providers step in
turn (tlm, fastopt, tlm, ...), so that load from other processes hits them alike. A last row per
problem, ``floor``, times only what an implementation taking tlm's steps cannot skip (the J^T J
product and one Cholesky per attempt, see :func:`floor_step`): its ``tlm_time/time`` is the most
any such implementation could gain on this machine. Per problem
the table gives the median wall time of a step, the median CPU time (process time, all threads)
and ``tlm_time/time`` (the ratio of the medians; higher = fastopt faster). Attempts per step are
compared (``same_attempts``) and the largest parameter difference after the last step is
reported: with identical attempts the iterates are the same up to fp32 round-off.

Rows are appended to bench/results/lm_<device>.csv (device, versions and commit in every row),
and the table to lm_<device>.md beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import fastopt
import fastopt.lm as flm
from fastopt import backends, benchmarking
from fastopt.lm.testing import sinc_data, tanh_mlp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


PROBLEMS = {
    "mlp4353": dict(widths=(1, 64, 64, 1), samples=8000, kwargs=dict()),
    "sinc61": dict(widths=(1, 20, 1), samples=1000, kwargs=dict()),
    "under4353": dict(widths=(1, 64, 64, 1), samples=1000, kwargs=dict()),
    "split1153": dict(widths=(1, 32, 32, 1), samples=8000, kwargs=dict(max_batch_size=1000)),
}


def providers(problem: dict, backend: str) -> Dict[str, Callable]:
    """Name -> (constructor(model) -> step function(x, y) -> attempts, flat parameters getter)."""
    import torch_levenberg_marquardt as tlm

    kw = dict(solve_method="cholesky", **problem["kwargs"])

    def tlm_module(model):
        m = tlm.training.LevenbergMarquardtModule(model, **kw)
        return (lambda x, y: int(m.training_step(x, y)[3]["attempts"])), (lambda: m.flat_params)

    def drop_in(model):
        m = flm.LevenbergMarquardtModule(model, backend=backend, **kw)
        return (lambda x, y: int(m.training_step(x, y)[3]["attempts"])), (lambda: m.flat_params)

    def front(model):
        lm = fastopt.LM(model, backend=backend, **kw)
        return (lambda x, y: lm.step(x, y).attempts), (lambda: lm.flat_params)

    return {
        "tlm.LevenbergMarquardtModule": tlm_module,
        "fastopt.lm.LevenbergMarquardtModule": drop_in,
        "fastopt.LM": front,
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FLOOR = "floor: J^T J op + attempts x Cholesky"


def floor_step(
    n_rows: int, n_params: int, device: torch.device, dtype: torch.dtype, backend: str, tlm_attempts: List[int]
) -> Callable:
    """What no implementation taking tlm's steps can skip, timed alone: the Gram product of a
    random [J | r] of the problem's shape (J J^T when underdetermined) by fastopt's
    ``jacobian_products`` op, and one Cholesky of the damped matrix per attempt of tlm's step in
    this round. No Jacobian, no forward pass, no triangular solves: ``tlm_time/time`` of this row
    bounds the speed-up any implementation with identical iterates can reach here."""
    gen = torch.Generator().manual_seed(0)
    over = n_rows >= n_params
    a = torch.randn(n_rows, n_params + 1, generator=gen).to(device, dtype)
    if not over:
        a = a[:, :n_params].t().contiguous()  # rows: parameters, columns: residuals (J J^T)
    size = n_params + 1 if over else n_rows
    fn = backends.select("jacobian_products", device, dtype, backend)
    out = flm._engine.Workspace().matrix("gram", size, size, dtype, device)
    spd = torch.eye(size - 1 if over else size, dtype=dtype, device=device) * 2 + 1e-3

    def step(x, y) -> int:
        fn(a, out.zero_(), scale=1.0 / n_rows)
        for _ in range(tlm_attempts[-1]):
            torch.linalg.cholesky_ex(spd)
        return tlm_attempts[-1]

    return step


def bench_problem(name: str, device: torch.device, dtype: torch.dtype, steps: int, backend: str) -> List[dict]:
    problem = PROBLEMS[name]
    x, y = sinc_data(problem["samples"], dtype=dtype, device=device)
    runs = {}
    for pname, ctor in providers(problem, backend).items():
        step, params = ctor(tanh_mlp(problem["widths"]).to(device, dtype))
        runs[pname] = dict(step=step, params=params, wall=[], cpu=[], attempts=[])
    n_params = sum(p.numel() for p in tanh_mlp(problem["widths"]).parameters())
    tlm_attempts = runs["tlm.LevenbergMarquardtModule"]["attempts"]  # tlm steps first in each round
    runs[FLOOR] = dict(
        step=floor_step(problem["samples"], n_params, device, dtype, backend, tlm_attempts),
        params=None,
        wall=[],
        cpu=[],
        attempts=[],
    )
    for _ in range(steps + 1):  # the first round warms up (allocations, lazy imports) and is not timed
        for run in runs.values():
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            attempts = run["step"](x, y)
            _sync(device)
            run["wall"].append(time.perf_counter() - w0)
            run["cpu"].append(time.process_time() - c0)
            run["attempts"].append(attempts)
    ref = runs["tlm.LevenbergMarquardtModule"]
    rows = []
    for pname, run in runs.items():
        wall, cpu = run["wall"][1:], run["cpu"][1:]
        diff = (run["params"]() - ref["params"]()).abs().max().item() if run["params"] else float("nan")
        rows.append(
            dict(
                problem=name,
                params=n_params,
                samples=problem["samples"],
                dtype=str(dtype).replace("torch.", ""),
                provider=pname,
                backend=backend if pname != "tlm.LevenbergMarquardtModule" else "-",
                steps=len(wall),
                ms_wall_p50=1e3 * statistics.median(wall),
                ms_cpu_p50=1e3 * statistics.median(cpu),
                tlm_time_over_time=statistics.median(ref["wall"][1:]) / statistics.median(wall),
                tlm_cpu_over_cpu=statistics.median(ref["cpu"][1:]) / statistics.median(cpu),
                same_attempts=run["attempts"] == ref["attempts"],
                attempts=" ".join(map(str, run["attempts"])),
                max_param_diff=diff,
            )
        )
    return rows


def bench_products(device: torch.device, dtype: torch.dtype, reps: int, backend: str) -> List[dict]:
    """The op alone on [J | r] of 8000 x (4353 + 1), out with 64-byte aligned rows as fastopt.lm
    allocates it, against J.T @ J."""
    n, p = 8000, 4353
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, p + 1, generator=gen).to(device, dtype)
    j = a[:, :p].contiguous()
    ws = flm._engine.Workspace()
    out = ws.matrix("gram", p + 1, p + 1, dtype, device)
    resolved = backends.resolve("jacobian_products", device, dtype, backend)
    cases = {"torch: J.T @ J": lambda: j.t() @ j}
    # The resolved backend first, then every other backend that can run the op here (the C++
    # op of fastopt._C and the torch reference on CPU), each its own row of the same run.
    names = [resolved] + [
        b for b in backends.BACKENDS if b != resolved and backends.available(b, "jacobian_products", device, dtype)
    ]
    for name in names:
        fn = backends.implementation("jacobian_products", name)
        label = f"fastopt jacobian_products[{name}] on [J | r]" + (" (auto)" if name == resolved else "")
        cases[label] = lambda fn=fn: fn(a, out.zero_(), scale=1.0 / n)
    if device.type == "cpu":
        try:
            jn = j.numpy()  # torch raises RuntimeError("Numpy is not available") without numpy
            cases["numpy: J.T @ J (its BLAS syrk, for reference)"] = lambda: jn.T @ jn
        except (ImportError, RuntimeError):
            pass
    times = {k: ([], []) for k in cases}
    for i in range(reps + 1):
        for k, f in cases.items():
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            _sync(device)
            if i:
                times[k][0].append(time.perf_counter() - w0)
                times[k][1].append(time.process_time() - c0)
    base_w = statistics.median(times["torch: J.T @ J"][0])
    base_c = statistics.median(times["torch: J.T @ J"][1])
    rows = []
    for k, (w, c) in times.items():
        rows.append(
            dict(
                problem="products 8000x4353",
                params=p,
                samples=n,
                dtype=str(dtype).replace("torch.", ""),
                provider=k,
                backend="-",
                steps=len(w),
                ms_wall_p50=1e3 * statistics.median(w),
                ms_cpu_p50=1e3 * statistics.median(c),
                time_over_JtJ=statistics.median(w) / base_w,
                cpu_over_JtJ=statistics.median(c) / base_c,
            )
        )
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: List[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = [keys] + [[_fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(keys))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _append_csv(path: str, rows: List[dict], env: Dict[str, str]) -> None:
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fields += list(env)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, **env})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--problems",
        nargs="+",
        default=["products", "sinc61", "split1153", "under4353", "mlp4353"],
        choices=["products"] + sorted(PROBLEMS),
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per provider (default: 5 for the 4353-parameter problems, 40 for the others)",
    )
    parser.add_argument("--backend", default="auto", choices=backends.CHOICES)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32
    env = benchmarking.environment(device)
    import torch_levenberg_marquardt as tlm

    env["torch_levenberg_marquardt"] = tlm.__version__
    env["threads"] = str(torch.get_num_threads())
    env["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    header = " | ".join(f"{k} {v}" for k, v in env.items())
    print(header, flush=True)
    rows: List[dict] = []
    for name in args.problems:
        if name == "products":
            new = bench_products(device, dtype, args.steps or 3, args.backend)
        else:
            steps = args.steps or (5 if "4353" in name else 40)
            new = bench_problem(name, device, dtype, steps, args.backend)
        print(table(new), "\n", flush=True)
        rows += new
    step_rows = [r for r in rows if "time_over_JtJ" not in r]
    product_rows = [r for r in rows if "time_over_JtJ" in r]
    base = args.out or os.path.join(RESULTS, f"lm_{device.type}.csv")
    for path, part in ((base, step_rows), (base.replace("lm_", "lm_products_"), product_rows)):
        if part:
            _append_csv(path, part, env)
    with open(os.path.splitext(base)[0] + ".md", "a") as f:
        f.write(f"\n## {header}\n\n```\n{table(rows)}\n```\n")
    out = base
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
