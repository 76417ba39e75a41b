"""Backend "cpu" for LAdam's modes update_lap, weight_lap and wave_variance (csrc/ladam_step_cpu.cpp,
csrc/ladam_wave_step_cpu.cpp) against fastopt.reference.

Every option of each mode (both stencils, weight decay on and off, c2 = 0, wave_E0 fixed and
recorded from the first step, the wave's damping and coupling), fp32, fp64, bf16 and fp16, the shape zoo
(1-D below and at the stencil's size, fewer than 3 rows or columns, 3-D to 5-D, channels_last,
transposed and strided parameters), 0-dim parameters and a flat tensor without the Laplacian, ten
steps with gradients missing on some (so step counts diverge), parameters and every state tensor
compared after every step. Each on one thread with the default tiles and on two threads with tiles
shrunk to a few elements (test hook torch.ops.fastopt._set_cpu_tiling), so that halos between
tiles and threads are everywhere; tensors big enough for several default tiles; the same bits on
one thread and two; a bad input leaves parameters and state unchanged.
"""

import pytest
import torch
from test_cpu_backend import DTYPES, LARGE, RUNS, STEPS, threads_and_tiling

import fastopt
from fastopt import backends
from fastopt.extension import ladam_update_lap_step_cpu, ladam_wave_step_cpu, ladam_weight_lap_step_cpu
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

OPS = {"update_lap": "ladam_update_lap_step", "weight_lap": "ladam_weight_lap_step", "wave_variance": "ladam_wave_step"}

# Every option the modes have, each at least once.
CONFIGS = {
    "update_lap 9point": dict(mode="update_lap"),
    "update_lap 5point no decay": dict(mode="update_lap", stencil="5point", weight_decay=0.0),
    "weight_lap 9point": dict(mode="weight_lap"),
    "weight_lap 5point": dict(mode="weight_lap", stencil="5point", betas=(0.8, 0.99)),
    "weight_lap c2=0": dict(mode="weight_lap", c2=0.0),
    "wave E0 recorded 9point": dict(mode="wave_variance"),
    "wave E0 auto 5point": dict(mode="wave_variance", wave_E0="auto", stencil="5point", wave_damping=0.2),
    "wave E0 fixed": dict(mode="wave_variance", wave_E0=0.5, wave_dt=0.3, wave_kappa=0.7, wave_damping=1.0),
    "wave no damping no decay": dict(mode="wave_variance", wave_damping=0.0, weight_decay=0.0, c2=0.05),
}


def _dtype_id(d):
    return str(d).replace("torch.", "")


def make_groups(dtype, large=False, seed=0):
    """Two groups: the zoo (or LARGE) plus 0-dim parameters with the Laplacian asked for, and a
    flat tensor without it (min_spatial_size above its size)."""
    torch.manual_seed(seed)
    if large:
        names = list(LARGE)
        lap = [torch.randn(s, dtype=dtype) for s in LARGE.values()]
    else:
        names = list(ZOO) + ["scalar", "scalar_2"]
        lap = [ZOO[n](dtype) for n in ZOO] + [torch.randn((), dtype=dtype), torch.randn((), dtype=dtype)]
    lap = [p.requires_grad_() for p in lap]
    flat = [torch.randn(300000 if large else 3000, dtype=dtype).requires_grad_()]
    return names + ["flat"], lap, flat


def groups_of(lap, flat):
    # min_spatial_size=0: the 0-dim parameters ask for the Laplacian and get none (no layout).
    return [{"params": lap, "min_spatial_size": 0}, {"params": flat, "min_spatial_size": 10**9}]


def step_both(kw, dtype, steps, threads=1, tiling=None, large=False):
    names, lap, flat = make_groups(dtype, large)
    step_side_by_side(
        "LAdam",
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
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cpu_mode_matches_reference(config, dtype, run):
    kw = CONFIGS[config]
    assert backends.resolve(OPS[kw["mode"]], "cpu", dtype) == "cpu"
    step_both(kw, dtype, STEPS, *RUNS[run])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("config", ["update_lap 9point", "weight_lap 5point", "wave E0 fixed"])
def test_cpu_mode_matches_reference_across_default_tiles(config, dtype):
    """The default tiling on tensors large enough to span several tiles, on two threads. (The
    wave with E0 recorded: see the next test.)"""
    step_both(CONFIGS[config], dtype, 3, threads=2, large=True)


def test_wave_recorded_e0_on_large_tensors():
    """E0^2 recorded from the first step's mean g^2 on tensors of 10^5 elements, two threads, default
    tiles. The kernel sums in double in a fixed order (the same bits on any thread count); the
    reference calls torch's mean, whose last bit depends on the thread count (measured here: the
    reference on 1 thread and on 2 differs by up to 2.5e-4 relative in p after 3 steps, since
    where v is clamped near eps that ulp is amplified by 1/sqrt(v)). So E0^2 must agree to 2 ulp,
    and then, with the reference continuing from the kernel's E0^2, everything to the usual
    tolerances."""
    torch.manual_seed(0)
    params = [torch.randn(2, 100000).requires_grad_(), torch.randn(700, 300).requires_grad_()]
    copies = [p.detach().clone().requires_grad_() for p in params]
    hyper = {**COMMON, **CONFIGS["wave E0 recorded 9point"]}
    ours = fastopt.LAdam(params, backend="cpu", **hyper)
    ref = fastopt.LAdam(copies, backend="torch", **hyper)
    for t, grads in enumerate(grad_stream(params, 4, none_every=0)):
        set_grads(params, grads)
        set_grads(copies, grads)
        with threads_and_tiling(2, None):
            ours.step()
        ref.step()
        if t == 0:
            for p, q in zip(params, copies):
                e0, e0_ref = ours.state[p]["wave_e0_sq"], ref.state[q]["wave_e0_sq"]
                torch.testing.assert_close(e0, e0_ref, rtol=2.5e-7, atol=0)
                e0_ref.copy_(e0)
                assert_close(p, q, **TOLERANCES[torch.float32], scale_atol=True, what="step 1")
    compare_optimizers(ours, ref, params, copies, **TOLERANCES[torch.float32], scale_atol=True).check()


@pytest.mark.parametrize("config", ["update_lap 9point", "weight_lap 9point", "wave E0 recorded 9point"])
def test_mode_results_do_not_depend_on_the_thread_count(config):
    """Tiles are cut by shape, never by thread count, and halos come from the old state: one
    thread and two give the same bits, with halos every few elements and with the default tiles."""
    for tiling in ((5, 40, 0), None):
        runs = []
        for threads in (1, 2):
            names, lap, flat = make_groups(torch.float32, large=tiling is None)
            opt = fastopt.LAdam(groups_of(lap, flat), backend="cpu", **{**COMMON, **CONFIGS[config]})
            for grads in grad_stream(lap + flat, 6 if tiling else 3):
                set_grads(lap + flat, grads)
                with threads_and_tiling(threads, tiling):
                    opt.step()
            runs.append((opt, lap + flat))
        (one, params_one), (two, params_two) = runs
        compare_optimizers(
            two, one, params_two, params_one, rtol=0, atol=0, names=names, what=f"tiling {tiling}, 2 threads vs 1: "
        ).check()


def test_auto_picks_cpu_for_every_ladam_family_op():
    for op in ("ladam_step", *OPS.values(), "ladagrad_step", "lrmsprop_step"):
        for dtype in DTYPES:
            assert backends.resolve(op, "cpu", dtype) == "cpu", (op, dtype)


# -- bad input: an error naming the argument, nothing written ---------------------------------------
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, c2=1e-2, stencil="9point")
WAVE = dict(lr=1e-2, beta1=0.9, eps=1e-8, weight_decay=0.1, c2=1e-2, stencil="9point", wave_dt=0.1,
            wave_kappa=0.1, wave_E0=0.0, wave_damping=0.5)  # fmt: skip


def mode_inputs(wave, n=3):
    torch.manual_seed(0)
    shapes = [(6, 5), (7,), (4, 3, 3)][:n]
    lists = dict(
        params=[torch.randn(s) for s in shapes],
        grads=[torch.randn(s) for s in shapes],
        exp_avgs=[torch.rand(s) for s in shapes],
        exp_avg_sqs=[torch.rand(s) for s in shapes],
    )
    if wave:
        lists["prev_exp_avg_sqs"] = [torch.rand(s) for s in shapes]
        lists["wave_e0_sqs"] = [torch.zeros(()) for _ in shapes]
    lists["steps"] = [torch.tensor(1.0) for _ in shapes]  # step 1: the wave records E0^2 (a write)
    lists["use_laps"] = [True] * n
    return lists


BAD = {
    "grads": (lambda kw: kw["grads"].__setitem__(2, torch.randn(5, 5)), r"grads\[2\] has shape"),
    "exp_avg_sqs": (lambda kw: kw["exp_avg_sqs"].__setitem__(1, kw["exp_avg_sqs"][1].double()), r"exp_avg_sqs\[1\]"),
    "stencil": (lambda kw: kw.__setitem__("stencil", "7point"), r"stencil '7point'. Choose from: 9point, 5point"),
    "steps": (lambda kw: kw["steps"].__setitem__(2, torch.tensor(1.0, dtype=torch.float64)), r"steps\[2\]"),
    "prev_exp_avg_sqs": (
        lambda kw: kw["prev_exp_avg_sqs"].__setitem__(2, torch.rand(4, 3, 3).transpose(1, 2)),
        r"prev_exp_avg_sqs\[2\] is not contiguous",
    ),
    "wave_e0_sqs": (lambda kw: kw["wave_e0_sqs"].__setitem__(1, torch.zeros(2)), r"wave_e0_sqs\[1\] must be a tensor"),
    "wave_e0_sqs dtype": (
        lambda kw: kw["wave_e0_sqs"].__setitem__(2, torch.zeros((), dtype=torch.float64)),
        r"wave_e0_sqs\[2\] is Double",
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("mode", list(OPS))
def test_bad_input_leaves_params_and_state_unchanged(mode, bad):
    wave = mode == "wave_variance"
    if bad.startswith(("prev_", "wave_")) and not wave:
        pytest.skip("a wave_variance argument")
    fn = {"update_lap": ladam_update_lap_step_cpu, "weight_lap": ladam_weight_lap_step_cpu}.get(
        mode, ladam_wave_step_cpu
    )
    kw = {**mode_inputs(wave), **(WAVE if wave else HYPER)}
    corrupt, message = BAD[bad]
    corrupt(kw)
    before = {k: [t.clone() for t in kw[k]] for k in kw if isinstance(kw[k], list) and torch.is_tensor(kw[k][0])}
    with pytest.raises(RuntimeError, match=message):
        fn(**kw)
    for key, tensors in before.items():
        for i, (t, old) in enumerate(zip(kw[key], tensors)):
            assert torch.equal(t, old), f"{key}[{i}] was written by a step that failed"
    # The same inputs, repaired, do step (the check is not failing for another reason).
    good = {**mode_inputs(wave), **(WAVE if wave else HYPER)}
    fn(**good)
    assert not torch.equal(good["params"][0], mode_inputs(wave)["params"][0])


@pytest.mark.parametrize("mode", list(OPS))
def test_optimizer_step_with_a_bad_group_changes_nothing(mode):
    """Through the optimizer: a bad hyperparameter in the second group fails the step before the
    first group is stepped; parameters, state and step counts stay as they were."""
    torch.manual_seed(0)
    a, b = torch.randn(9, 7, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    opt = fastopt.LAdam([{"params": [a]}, {"params": [b]}], backend="cpu", mode=mode, **COMMON)
    a.grad, b.grad = torch.randn(9, 7), torch.randn(5, 4)
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    opt.param_groups[1]["stencil"] = "7point"
    with pytest.raises(ValueError, match="stencil"):
        opt.step()
    assert torch.equal(a, a_before) and torch.equal(b, b_before)
    for key, value in saved.items():
        assert torch.equal(opt.state[a][key], value), key


@pytest.mark.parametrize("mode", list(OPS))
def test_opcheck(mode):
    """Schema (mutated lists annotated), fake implementation and dispatch of the new ops, as
    torch.compile relies on them."""
    wave = mode == "wave_variance"
    inputs = mode_inputs(wave)
    inputs["steps"] = [torch.tensor(3.0) for _ in inputs["steps"]]
    op = getattr(torch.ops.fastopt, OPS[mode]).default
    kwargs = dict(WAVE if wave else HYPER)
    torch.library.opcheck(op, tuple(inputs.values()), kwargs)
