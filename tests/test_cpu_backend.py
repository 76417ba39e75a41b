"""Backend "cpu" (the C++ extension fastopt._C, csrc/*_cpu.cpp) against fastopt.reference.

Every op the extension implements, both stencils, every dtype it claims, the shape zoo plus
tensors that cross the kernels' tile boundaries (rows, columns, 1-D and elementwise tiles),
gradients that are None on some steps, parameters and every state tensor compared after every
step; with 1 and 2 threads and with tiles shrunk to a few elements (test hook
torch.ops.fastopt._set_cpu_tiling), so that halos between tiles, and between threads, are
everywhere. The halo logic is also checked to give the same bits whatever the thread count.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.testing import (
    COMMON,
    TOLERANCES,
    ZOO,
    assert_close,
    compare_optimizers,
    grad_stream,
    set_grads,
    step_side_by_side,
)

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason=str(backends.why_not("cpu")))

STEPS = 10
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

CONFIGS = {
    "LAdam 9point": ("LAdam", "ladam_step", dict(stencil="9point")),
    "LAdam 5point": ("LAdam", "ladam_step", dict(stencil="5point")),
    "LAdaGrad 9point": ("LAdaGrad", "ladagrad_step", dict(lr_decay=0.01)),
    "LAdaGrad 5point": ("LAdaGrad", "ladagrad_step", dict(lr_decay=0.01, stencil="5point")),
    "LRMSProp 9point": ("LRMSProp", "lrmsprop_step", dict()),
    "LRMSProp momentum 9point": ("LRMSProp", "lrmsprop_step", dict(momentum=0.9)),
    "LRMSProp momentum 5point": ("LRMSProp", "lrmsprop_step", dict(momentum=0.9, stencil="5point")),
}

# (threads, tiling): tiling None is the default (csrc/multi_tensor_cpu.h: tiles of <= 4096
# columns and ~128K elements, one thread below 32K elements, so the zoo is one tile per tensor);
# (max_cols, target_elems, serial_below) shrinks the tiles and threads every step: (7, 48, 0)
# gives tiles a few rows tall and narrower than most grids, (3, 3, 0) one-row tiles.
RUNS = {"1 thread": (1, None), "2 threads, small tiles": (2, (7, 48, 0)), "2 threads, one-row tiles": (2, (3, 3, 0))}

# Shapes that the default tiling cuts into several tiles, one of each kind.
LARGE = {
    "row_tiles": (700, 300),  # 2-D, full-width tiles of 350 rows
    "column_tiles": (5, 9000),  # 2-D, 3 tiles of 3000 columns: halo rows and columns
    "line_tiles": (10000,),  # 1-D stencil, 3 tiles
    "clamp_tiles": (2, 100000),  # use_lap without a layout: elementwise tiles, clamped
}


@contextlib.contextmanager
def threads_and_tiling(threads, tiling):
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    old_tiling = torch.ops.fastopt._set_cpu_tiling(*tiling) if tiling else None
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_tiling is not None:
            torch.ops.fastopt._set_cpu_tiling(*old_tiling)


def make_groups(dtype, large=False, seed=0):
    """Two groups: the zoo (or LARGE) with the Laplacian, and a flat tensor without it
    (min_spatial_size above its size): elementwise tiles."""
    torch.manual_seed(seed)
    if large:
        names = list(LARGE)
        lap = [torch.randn(s, dtype=dtype).requires_grad_() for s in LARGE.values()]
    else:
        names = list(ZOO)
        lap = [ZOO[n](dtype).requires_grad_() for n in ZOO]
    flat = [torch.randn(300000 if large else 3000, dtype=dtype).requires_grad_()]
    return names + ["flat"], lap, flat


def groups_of(lap, flat):
    return [{"params": lap}, {"params": flat, "min_spatial_size": 10**9}]


def step_both(cls_name, kw, dtype, steps, threads=1, tiling=None, large=False):
    """Step backend "cpu" and backend "torch" side by side; compare params and every state entry
    after every step. TOLERANCES with atol scaled to each tensor's magnitude: the momentum buffer
    sums terms of order 10 (g / sqrt(a) with a ~ (1 - alpha) g^2) that cancel, so its round-off
    is that of 10."""
    names, lap, flat = make_groups(dtype, large)
    step_side_by_side(
        cls_name,
        groups_of(lap, flat),
        backend="cpu",
        hyper={**COMMON, **kw},
        steps=steps,
        none_every=4,
        every_step=True,
        scale_atol=True,
        names=names,
        step_context=lambda: threads_and_tiling(threads, tiling),
    )


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cpu_matches_reference(config, dtype, run):
    cls_name, op, kw = CONFIGS[config]
    assert backends.resolve(op, "cpu", dtype, "cpu") == "cpu"
    step_both(cls_name, kw, dtype, STEPS, *RUNS[run])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("config", ["LAdam 9point", "LAdaGrad 5point", "LRMSProp momentum 9point"])
def test_cpu_matches_reference_across_default_tiles(config, dtype):
    """The default tiling on tensors large enough to span several tiles, on two threads."""
    cls_name, _, kw = CONFIGS[config]
    step_both(cls_name, kw, dtype, 3, threads=2, large=True)


@pytest.mark.parametrize("config", ["LAdam 9point", "LRMSProp momentum 5point"])
def test_results_do_not_depend_on_the_thread_count(config):
    """Tiles are cut by shape, never by thread count, and halos come from the old state: one
    thread and two must give the same bits, also with halos between every few elements."""
    cls_name, _, kw = CONFIGS[config]
    runs = []
    for threads in (1, 2):
        names, lap, flat = make_groups(torch.float32)
        opt = getattr(fastopt, cls_name)(groups_of(lap, flat), backend="cpu", **{**COMMON, **kw})
        for grads in grad_stream(lap + flat, 6):
            set_grads(lap + flat, grads)
            with threads_and_tiling(threads, (5, 40, 0)):
                opt.step()
        runs.append((opt, lap + flat))
    (one, params_one), (two, params_two) = runs
    compare_optimizers(two, one, params_two, params_one, rtol=0, atol=0, names=names, what="2 threads vs 1: ").check()


def test_auto_picks_cpu_for_the_ops_it_implements():
    # Every LAdam-family op; the other LAdam modes are tested in tests/test_cpu_ladam_modes.py.
    ops = ("ladam_step", "ladam_update_lap_step", "ladam_weight_lap_step", "ladam_wave_step")
    for op in ops + ("ladagrad_step", "lrmsprop_step"):
        for dtype in DTYPES:
            assert backends.resolve(op, "cpu", dtype) == "cpu"


def test_isa_follows_aten_cpu_capability():
    info = torch.ops.fastopt.build_info()
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        assert "isa=baseline" in info, info
    else:
        assert "isa=" in info, info


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default", reason="already the baseline ISA")
def test_baseline_isa_matches_reference():
    """The loops are compiled twice (AVX2+FMA, baseline); this machine runs the AVX2 ones, so run
    part of this file again with ATEN_CPU_CAPABILITY=default, which selects the baseline ones."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "isa_follows or (matches_reference and small and (LAdam or momentum))",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-5000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_non_contiguous_gradients_and_parameters(dtype):
    """Gradients in other layouts than their parameters (transposed, channels_last, strided),
    parameters that are views; the state stays contiguous in logical order."""
    torch.manual_seed(0)
    base = torch.randn(20, 48, dtype=dtype)
    params = [
        torch.randn(12, 8, 3, 3, dtype=dtype),
        torch.randn(30, 20, dtype=dtype),
        base[:, ::2].clone(),
        base[:, 1::2],
    ]
    ref_params = [p.clone() for p in params]
    grads = [
        torch.randn(12, 8, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(20, 30, dtype=dtype).t(),
        torch.randn(20, 48, dtype=dtype)[:, ::2],
        torch.randn(20, 24, dtype=dtype),
    ]
    assert not any(g.is_contiguous() for g in grads[:3]) and not params[3].is_contiguous()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, c2=1e-2, stencil="9point")
    states = [[torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params] for _ in range(4)]
    steps = [torch.tensor(3.0) for _ in params]
    from fastopt.extension import ladam_step_cpu
    from fastopt.reference import ladam_step_reference

    ladam_step_cpu(params, grads, states[0], states[1], steps, [True] * 4, **kw)
    ladam_step_reference(ref_params, grads, states[2], states[3], steps, [True] * 4, **kw)
    tol = TOLERANCES[dtype]
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, **tol, scale_atol=True, what=f"param {i}")
        assert_close(states[0][i], states[2][i], **tol, scale_atol=True, what=f"exp_avg {i}")
        assert_close(states[1][i], states[3][i], **tol, scale_atol=True, what=f"exp_avg_sq {i}")
    assert torch.equal(base[:, 1::2], params[3]), "the view's storage was not updated in place"
