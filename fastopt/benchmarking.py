"""Step-time benchmarks of fastopt against its peers, all providers timed in one process.

Used by ``python -m fastopt`` (a quick table) and by the scripts in bench/ (full runs that write
bench/results/). A row is one (workload, dtype, provider); the results are ratios against the
peers measured in the same run:

* ``time_vs_fused_adam``: step time / torch.optim.Adam(fused=True)'s step time (lower is better);
* ``speedup_vs_ladam``: ladam's step time / step time (higher is better);
* ``GBps``: the bytes an optimal fused step must move (read p, g and each state tensor, write p
  and the state) per second, beside ``copy_GBps``, a device copy of the same bytes in this run.

Why these hand-written tables beside the pytest-benchmark suite (``pytest bench --benchmark-only``,
bench/test_microbench_*.py, which tracks each provider's time across commits with
``--benchmark-autosave`` / ``--benchmark-compare``): pytest-benchmark stores absolute times per
test and compares a test with its own earlier runs; between tests of one run it shows only each
column's factor against the column's best. The ratios above are results: each row's against the
peers and the GB/s against a copy timed in the same run, written as columns of one CSV with the
device, versions and commit (bench/results/), and on CUDA timed by ``triton.testing.do_bench``
(L2 flushed between calls) rather than by the wall clock around a synchronised call.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from . import backends

Shape = Tuple[int, ...]


# -- workloads -------------------------------------------------------------------------------------
def resnet50_shapes() -> List[Shape]:
    """The 161 parameter shapes of torchvision's ResNet-50 (bottleneck blocks [3, 4, 6, 3])."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [
                (width, in_ch, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
                (4 * width, width, 1, 1),
                (4 * width,),
                (4 * width,),
            ]
            if b == 0:
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def small_tensors_shapes(n: int = 1000, low: int = 1024, high: int = 65536, seed: int = 0) -> List[Shape]:
    """``n`` 2-D tensors of ``low`` to ``high`` elements (sizes log-uniform, fixed by ``seed``)."""
    rng = random.Random(seed)
    out: List[Shape] = []
    for _ in range(n):
        numel = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        rows = max(3, int(numel**0.5))
        out.append((rows, max(3, numel // rows)))
    return out


def small_convnet_shapes() -> List[Shape]:
    """About 200 tensors of a small CNN: 3x3 conv weights of 16-128 channels, their BN and biases."""
    shapes: List[Shape] = []
    channels = [16, 32, 64, 128]
    for i, c in enumerate(channels):
        c_in = 3 if i == 0 else channels[i - 1]
        for j in range(16):
            shapes += [(c, c_in if j == 0 else c, 3, 3), (c,), (c,)]
    return shapes + [(10, 128), (10,)]


WORKLOADS: Dict[str, Callable[[], List[Shape]]] = {
    "4x4096x4096": lambda: [(4096, 4096)] * 4,
    "4x2048x2048": lambda: [(2048, 2048)] * 4,
    "4x1024x1024": lambda: [(1024, 1024)] * 4,
    "resnet50": resnet50_shapes,
    "1000x1K-64K": small_tensors_shapes,
    "convnet200": small_convnet_shapes,
}


# -- providers -------------------------------------------------------------------------------------
class FamilySpec(TypedDict):
    """An entry of :data:`FAMILY`."""

    cls: str  # the fastopt optimizer (fastopt.optim)
    op: str  # its backend op
    ladam: str  # its twin in ladam
    state_tensors: int  # state tensors per parameter
    torch_peers: Dict[str, Callable[..., torch.optim.Optimizer]]


# Per fastopt optimizer: its torch peers and its ladam twin. Learning rates are small so that
# parameters stay finite over thousands of timed steps.
FAMILY: Dict[str, FamilySpec] = {
    "ladam": dict(
        cls="LAdam",
        op="ladam_step",
        ladam="LAdamW",
        state_tensors=2,
        torch_peers={
            "torch.Adam(fused)": partial(torch.optim.Adam, fused=True),
            "torch.Adam(foreach)": partial(torch.optim.Adam, foreach=True),
        },
    ),
    "ladagrad": dict(
        cls="LAdaGrad",
        op="ladagrad_step",
        ladam="LAdaGrad",
        state_tensors=1,
        torch_peers={"torch.Adagrad(foreach)": partial(torch.optim.Adagrad, foreach=True)},
    ),
    "lrmsprop": dict(
        cls="LRMSProp",
        op="lrmsprop_step",
        ladam="LRMSProp",
        state_tensors=1,
        torch_peers={"torch.RMSprop(foreach)": partial(torch.optim.RMSprop, foreach=True)},
    ),
}


def providers(family: str, device: torch.device, dtype: torch.dtype) -> Dict[str, Callable]:
    """Name -> constructor(params) of every provider that can run here: the torch peers, ladam,
    and fastopt on each available backend."""
    from . import optim

    spec = FAMILY[family]
    out: Dict[str, Callable] = {}
    for name, ctor in spec["torch_peers"].items():
        if "fused" in name and not _fused_adam_supported(device, dtype):
            continue
        out[name] = partial(ctor, lr=1e-4)
    try:
        import ladam

        out[f"ladam.{spec['ladam']}"] = partial(getattr(ladam, spec["ladam"]), lr=1e-4)
    except ImportError:
        pass
    for backend in backends.BACKENDS:
        if backends.available(backend, spec["op"], device, dtype):
            out[f"fastopt.{spec['cls']}[{backend}]"] = partial(getattr(optim, spec["cls"]), lr=1e-4, backend=backend)
    return out


def _fused_adam_supported(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch.optim.Adam([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


# -- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, min_time_s: float = 0.5, max_reps: int = 1000, warmup: int = 3
) -> Tuple[float, float, float, int]:
    """(p50, p20, p80) milliseconds per call of ``fn`` and the number of timed calls.

    CUDA: triton.testing.do_bench when triton imports (it flushes the L2 between calls), else CUDA
    events per call. CPU: wall time per call, repeated until ``min_time_s`` has passed.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(min_time_s * 1000))
            return p50, p20, p80, -1
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7], len(times)


def _make_params(shapes: Sequence[Shape], device, dtype) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(s, generator=gen).to(device=device, dtype=dtype) * 1e-2
        params.append(p)
    return params


@dataclass
class Row:
    family: str
    workload: str
    n_tensors: int
    n_params: int
    dtype: str
    provider: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    reps: int
    time_vs_fused_adam: Optional[float] = None
    speedup_vs_ladam: Optional[float] = None
    GBps: float = 0.0
    copy_GBps: float = 0.0
    meta: Dict[str, str] = field(default_factory=dict)


def environment(device: torch.device) -> Dict[str, str]:
    """Device, versions and commit recorded beside every result."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = partial(subprocess.run, capture_output=True, text=True, cwd=here, timeout=5)
        commit = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or "-"
        if commit != "-" and git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "-"
    from . import __version__

    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "triton": triton_version,
        "fastopt": __version__,
        "commit": commit,
    }


def bench_workload(
    family: str,
    workload: str,
    device: Union[str, torch.device],
    dtype: torch.dtype,
    min_time_s: float = 0.5,
    only: Optional[Sequence[str]] = None,
) -> List[Row]:
    """Time one optimizer step of every provider on one workload; ratios against the peers."""
    device = torch.device(device)
    shapes = WORKLOADS[workload]()
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    elem = torch.empty((), dtype=dtype).element_size()
    moved = n_params * elem * (3 + 2 * FAMILY[family]["state_tensors"])  # p, g read; p written; state r+w
    src = torch.empty(moved // 2 // elem, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device, min_time_s)[0]  # noqa: F821 (ruff: `del` below)
    copy_gbps = moved / copy_ms / 1e6
    del src, dst  # free the copy's buffers before the providers allocate theirs
    meta = environment(device)
    rows = []
    for name, ctor in providers(family, device, dtype).items():
        if only and not any(o in name for o in only):
            continue
        params = _make_params(shapes, device, dtype)
        opt = ctor(params)
        p50, p20, p80, reps = measure(opt.step, device, min_time_s)
        rows.append(
            Row(
                family,
                workload,
                len(shapes),
                n_params,
                str(dtype).replace("torch.", ""),
                name,
                p50,
                p20,
                p80,
                reps,
                GBps=moved / p50 / 1e6,
                copy_GBps=copy_gbps,
                meta=meta,
            )
        )
        del opt, params
    fused = next((r.ms_p50 for r in rows if r.provider == "torch.Adam(fused)"), None)
    ladam_ms = next((r.ms_p50 for r in rows if r.provider.startswith("ladam.")), None)
    for r in rows:
        r.time_vs_fused_adam = r.ms_p50 / fused if fused else None
        r.speedup_vs_ladam = ladam_ms / r.ms_p50 if ladam_ms else None
    return rows


# -- output ----------------------------------------------------------------------------------------
def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[Row]) -> str:
    head = (
        "workload",
        "dtype",
        "provider",
        "ms p50",
        "p20-p80",
        "time/Adam(fused)",
        "ladam time/time",
        "GB/s",
        "copy GB/s",
    )
    lines = [
        (
            r.workload,
            r.dtype,
            r.provider,
            _fmt(r.ms_p50, ".3f"),
            f"{r.ms_p20:.3f}-{r.ms_p80:.3f}",
            _fmt(r.time_vs_fused_adam, ".2f"),
            _fmt(r.speedup_vs_ladam, ".1f"),
            _fmt(r.GBps, ".1f"),
            _fmt(r.copy_GBps, ".1f"),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def write_csv(rows: Sequence[Row], path: str) -> None:
    """Append rows (with device, versions and commit) to a CSV file, writing the header if new."""
    if not rows:
        return
    records = []
    for r in rows:
        d = asdict(r)
        d.update(d.pop("meta"))
        records.append(d)
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        if new:
            writer.writeheader()
        writer.writerows(records)
