"""fastopt's torch backend (fastopt.reference) against the real ladam 0.4.1 package.

The shape zoo, every mode, both stencils, weight decay on and off, parameter groups with their own
c2 and stencil, gradients that are None on some steps, 25+ steps; parameters and every state
tensor are compared after every step.
"""

import pytest
import torch

import fastopt
from fastopt.testing import ZOO, assert_close, clone_params, grad_stream, make_params, set_grads

ladam = pytest.importorskip("ladam")
assert ladam.__version__ == "0.4.1", "the parity tests pin ladam 0.4.1 (pip install ladam==0.4.1)"

STEPS = 27
# fp32 round-off: observed differences are a few 1e-7 on O(1) parameters (the Laplacian sums in
# another order than ladam's conv2d); fp64 checks the math itself.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-11, atol=1e-12)}
LADAM_KEYS = {
    "LAdam": {"exp_avg": "m", "exp_avg_sq": "v", "prev_exp_avg_sq": "v_prev"},
    "LAdaGrad": {"sum": "sum"},
    "LRMSProp": {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer"},
}


def run_both(ours_cls, theirs_cls, groups_of, dtype=torch.float32, steps=STEPS, **kw):
    """Step fastopt and ladam on equal parameters and gradients; compare after every step."""
    ours_params = make_params(dtype)
    theirs_params = clone_params(ours_params)
    ours = ours_cls(groups_of(ours_params), backend="torch", **kw)
    theirs = theirs_cls(groups_of(theirs_params), **kw)
    keys = LADAM_KEYS[ours_cls.__name__]
    names = list(ZOO)
    for t, grads in enumerate(grad_stream(ours_params, steps)):
        set_grads(ours_params, grads)
        set_grads(theirs_params, grads)
        ours.step()
        theirs.step()
        for name, p, q in zip(names, ours_params, theirs_params):
            where = f"step {t + 1}, {name} {tuple(p.shape)}"
            assert_close(p, q, what=f"param at {where}", **TOL[dtype])
            s_ours, s_theirs = ours.state[p], theirs.state[q]
            assert bool(s_ours) == bool(s_theirs), f"state created at {where}: {bool(s_ours)} vs {bool(s_theirs)}"
            if not s_theirs:
                continue
            assert float(s_ours["step"]) == s_theirs["step"], where
            assert s_ours["use_lap"] == s_theirs["use_lap"], where
            for ours_key, theirs_key in keys.items():
                if theirs_key in s_theirs:
                    assert_close(s_ours[ours_key], s_theirs[theirs_key], what=f"{ours_key} at {where}", **TOL[dtype])
    return ours_params, theirs_params


def one_group(params):
    return params


def two_groups(params):
    """Own c2 and stencil per group; the second keeps the default min_spatial_size."""
    half = len(params) // 2
    return [
        {"params": params[:half], "c2": 3e-2, "stencil": "5point"},
        {"params": params[half:], "c2": 1e-2, "min_spatial_size": 16},
    ]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("stencil", ["9point", "5point"])
@pytest.mark.parametrize("mode", ["variance_lap", "update_lap", "weight_lap", "wave_variance"])
def test_ladam_matches_ladam(mode, stencil, weight_decay):
    # wave_variance in fp32 is chaotic once v sits on its eps floor (ladam in fp32 and in fp64 then
    # differ by 1e-1): a background level E0 = 3 keeps v away from it; fp64 below checks the defaults.
    extra = dict(wave_E0=3.0) if mode == "wave_variance" else {}
    run_both(
        fastopt.LAdam,
        ladam.LAdamW,
        one_group,
        lr=1e-2,
        c2=1e-2,
        mode=mode,
        stencil=stencil,
        weight_decay=weight_decay,
        min_spatial_size=4,
        **extra,
    )


@pytest.mark.parametrize("mode", ["variance_lap", "update_lap", "weight_lap", "wave_variance"])
def test_ladam_matches_ladam_float64_defaults(mode):
    run_both(
        fastopt.LAdam, ladam.LAdamW, one_group, dtype=torch.float64, mode=mode, lr=1e-2, c2=1e-2, weight_decay=0.05
    )


@pytest.mark.parametrize("mode", ["variance_lap", "update_lap", "weight_lap", "wave_variance"])
def test_ladam_param_groups_with_own_c2_and_stencil(mode):
    extra = dict(wave_E0=3.0) if mode == "wave_variance" else {}
    run_both(fastopt.LAdam, ladam.LAdamW, two_groups, lr=1e-2, mode=mode, min_spatial_size=4, **extra)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("stencil", ["9point", "5point"])
@pytest.mark.parametrize("lr_decay", [0.0, 0.05])
def test_ladagrad_matches_ladam(stencil, weight_decay, lr_decay):
    run_both(
        fastopt.LAdaGrad,
        ladam.LAdaGrad,
        one_group,
        lr=1e-2,
        lr_decay=lr_decay,
        c2=1e-2,
        stencil=stencil,
        weight_decay=weight_decay,
        min_spatial_size=4,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("stencil", ["9point", "5point"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lrmsprop_matches_ladam(stencil, weight_decay, momentum):
    run_both(
        fastopt.LRMSProp,
        ladam.LRMSProp,
        one_group,
        lr=1e-3,
        alpha=0.9,
        momentum=momentum,
        c2=1e-2,
        stencil=stencil,
        weight_decay=weight_decay,
        min_spatial_size=4,
    )


@pytest.mark.parametrize("cls", ["LAdam", "LAdaGrad", "LRMSProp"])
def test_siblings_param_groups_and_float64(cls):
    run_both(getattr(fastopt, cls), getattr(ladam, cls), two_groups, dtype=torch.float64, lr=1e-2)


@pytest.mark.parametrize("cls", ["LAdam", "LAdaGrad", "LRMSProp"])
def test_laplacian_changes_exactly_the_tensors_that_use_it(cls):
    """Parity above is not vacuous: with c2 > 0 the tensors with a stencil move differently from
    c2 = 0 and all others move identically."""
    runs = {}
    for c2 in (0.0, 1e-2):
        params = make_params()
        opt = getattr(fastopt, cls)(params, lr=1e-2, c2=c2, min_spatial_size=4, backend="torch")
        for grads in grad_stream(params, 5, none_every=0):
            set_grads(params, grads)
            opt.step()
        runs[c2] = params
    for name, p0, p1 in zip(ZOO, runs[0.0], runs[1e-2]):
        has_stencil = fastopt.reference.stencil_layout(p0.shape) is not None and p0.numel() >= 4
        assert torch.equal(p0, p1) != has_stencil, name


def test_1d_and_2d_laplacian_against_ladams_convolution():
    """fastopt.reference.laplacian against ladam's own conv-based Laplacian on the whole zoo."""
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.float64, dict(rtol=1e-12, atol=1e-12))):
        for stencil in ("9point", "5point"):
            k2 = ladam.LAdamW._get_lap_kernel_2d(torch.device("cpu"), dtype, stencil)
            k1 = ladam.LAdamW._get_lap_kernel_1d(torch.device("cpu"), dtype)
            for name, p in zip(ZOO, make_params(dtype)):
                theirs = ladam.LAdamW._laplacian(p.detach(), k2, k1)
                ours = fastopt.reference.laplacian(p.detach(), stencil)
                assert_close(ours, theirs, what=f"{stencil} {name}", **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["variance_lap", "update_lap", "weight_lap", "wave_variance"])
def test_low_precision_step_is_the_fp32_step_rounded_once(dtype, mode):
    """The dtype policy: bf16/fp16 parameters and state, math in fp32. Each step from a given
    low-precision state equals ladam's fp32 step from the same (upcast) state, rounded once."""
    params = [p for p in make_params(dtype) if p.is_contiguous()]
    kw = dict(
        lr=1e-2,
        c2=1e-2,
        mode=mode,
        min_spatial_size=4,
        weight_decay=0.1,
        **(dict(wave_E0=3.0) if mode == "wave_variance" else {}),
    )
    ours = fastopt.LAdam(params, backend="torch", **kw)
    for t, grads in enumerate(grad_stream(params, 6, none_every=0)):
        fp32 = [p.detach().float().requires_grad_() for p in params]
        theirs = ladam.LAdamW(fp32, **kw)
        for p, q in zip(params, fp32):
            s = ours.state[p]
            if s:
                theirs.state[q].update(
                    step=int(s["step"]), use_lap=s["use_lap"], m=s["exp_avg"].float(), v=s["exp_avg_sq"].float()
                )
                if mode == "wave_variance":
                    theirs.state[q].update(v_prev=s["prev_exp_avg_sq"].float(), wave_E0_auto=float(s["wave_e0_sq"]))
        set_grads(params, grads)
        set_grads(fp32, [g.float() for g in grads])
        ours.step()
        theirs.step()
        for i, (p, q) in enumerate(zip(params, fp32)):
            # One rounding of the same fp32 value: equal, or one ulp apart where ladam's conv2d and
            # fastopt's stencil round differently right at a rounding boundary.
            assert_close(
                p.float(), q.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=0, what=f"{dtype} step {t} param {i}"
            )
            assert_close(
                ours.state[p]["exp_avg_sq"].float(),
                theirs.state[q]["v"].to(dtype).float(),
                rtol=torch.finfo(dtype).eps,
                atol=0,
                what=f"v step {t} param {i}",
            )
