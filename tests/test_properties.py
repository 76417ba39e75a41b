"""Property-based tests (hypothesis): random shapes, memory layouts and hyperparameters give the
reference's result; the reference gives ladam's (in fp64, so that any difference is a bug, not
round-off). Parameters and every state entry are compared (fastopt.testing.step_side_by_side)."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import backends
from fastopt.testing import (
    assert_all_close,
    clone_params,
    compare_optimizers,
    grad_stream,
    set_grads,
    step_side_by_side,
)

ladam = pytest.importorskip("ladam")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def parameters(draw, max_side=9, min_dims=1):
    """1 to 4 random tensors of min_dims to 4 dimensions with sides 0..max_side, contiguous,
    transposed, strided or channels_last. (ladam raises on 0-dim parameters that qualify for a
    Laplacian, so comparisons with it draw 1 dimension or more; see test_zero_dim_parameters.)"""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=min_dims, max_size=4)))
        layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "channels_last"]))
        if layout == "transposed" and len(shape) >= 2:
            t = torch.randn(*reversed(shape), dtype=torch.float64).permute(*reversed(range(len(shape))))
        elif layout == "strided" and len(shape) >= 1:
            t = torch.randn((2 * shape[0],) + shape[1:], dtype=torch.float64)[::2]
        elif layout == "channels_last" and len(shape) == 4:
            t = torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last)
        else:
            t = torch.randn(shape, dtype=torch.float64)
        out.append(t.requires_grad_())
    return out


def ladam_crashes_on(params, hyper):
    """ladam views a tensor of 3+ dimensions as (shape[0], -1), which torch cannot do for an empty
    tensor with shape[0] == 0; it tries when such a tensor qualifies for the Laplacian
    (min_spatial_size=0). fastopt steps it (nothing to do): test_reliability checks both sides."""
    return hyper["c2"] > 0 and hyper["min_spatial_size"] == 0 and any(p.dim() > 2 and p.shape[0] == 0 for p in params)


LADAM_HYPER = dict(
    lr=st.floats(1e-4, 1e-1),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    eps=st.floats(1e-10, 1e-3),
    weight_decay=st.sampled_from([0.0, 0.01, 0.2]),
    c2=st.floats(0.0, 0.1),
    stencil=st.sampled_from(["9point", "5point"]),
    min_spatial_size=st.integers(0, 40),
    mode=st.sampled_from(["variance_lap", "update_lap", "weight_lap", "wave_variance"]),
)


@SETTINGS
@given(params=parameters(), hyper=st.fixed_dictionaries(LADAM_HYPER), seed=st.integers(0, 2**16))
def test_reference_equals_ladam_in_float64(params, hyper, seed):
    assume(not ladam_crashes_on(params, hyper))
    step_side_by_side(
        "LAdam",
        params,
        backend="torch",
        hyper=hyper,
        steps=4,
        seed=seed,
        none_every=3,
        reference=ladam.LAdamW,
        state_keys="ladam",
        rtol=1e-9,
        atol=1e-12,
        what=f"{hyper}: ",
    )


SIBLING_HYPER = {
    "LAdaGrad": dict(
        lr=st.floats(1e-4, 1e-1),
        lr_decay=st.floats(0.0, 0.1),
        eps=st.floats(1e-10, 1e-3),
        weight_decay=st.sampled_from([0.0, 0.1]),
        c2=st.floats(0.0, 0.1),
        stencil=st.sampled_from(["9point", "5point"]),
        min_spatial_size=st.integers(0, 40),
    ),
    "LRMSProp": dict(
        lr=st.floats(1e-4, 1e-1),
        alpha=st.floats(0.5, 0.999),
        eps=st.floats(1e-10, 1e-3),
        weight_decay=st.sampled_from([0.0, 0.1]),
        momentum=st.sampled_from([0.0, 0.5, 0.9]),
        c2=st.floats(0.0, 0.1),
        stencil=st.sampled_from(["9point", "5point"]),
        min_spatial_size=st.integers(0, 40),
    ),
}


@pytest.mark.parametrize("cls", ["LAdaGrad", "LRMSProp"])
def test_sibling_references_equal_ladam_in_float64(cls):
    @SETTINGS
    @given(params=parameters(), hyper=st.fixed_dictionaries(SIBLING_HYPER[cls]), seed=st.integers(0, 2**16))
    def check(params, hyper, seed):
        assume(not ladam_crashes_on(params, hyper))
        step_side_by_side(
            cls,
            params,
            backend="torch",
            hyper=hyper,
            steps=4,
            seed=seed,
            none_every=3,
            reference=getattr(ladam, cls),
            state_keys="ladam",
            rtol=1e-9,
            atol=1e-12,
            what=f"{cls} {hyper}: ",
        )

    check()


def _other_backends():
    for name in backends.BACKENDS:
        if name == "torch":
            continue
        reason = backends.why_not(name, device="cpu")
        yield pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)


MODE_OPS = {
    "variance_lap": "ladam_step",
    "update_lap": "ladam_update_lap_step",
    "weight_lap": "ladam_weight_lap_step",
    "wave_variance": "ladam_wave_step",
}


@pytest.mark.parametrize("backend", list(_other_backends()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_backend_equals_the_reference(backend, dtype):
    """Random shapes, layouts and hyperparameters on each backend that runs on this machine's CPU,
    against backend 'torch': every LAdam mode whose op the backend claims for ``dtype`` (the others
    are left to auto, which picks the reference); skipped, with the reasons, if it claims none."""
    reasons = {mode: backends.why_not(backend, op, "cpu", dtype) for mode, op in MODE_OPS.items()}
    modes = [mode for mode, reason in reasons.items() if reason is None]
    if not modes:
        pytest.skip(f"backend={backend!r} runs no LAdam mode on {dtype}: " + "; ".join(sorted(set(reasons.values()))))

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        params=parameters(max_side=6, min_dims=0),
        hyper=st.fixed_dictionaries({**LADAM_HYPER, "mode": st.sampled_from(modes)}),
        seed=st.integers(0, 2**16),
    )
    def check(params, hyper, seed):
        if hyper["mode"] == "wave_variance":
            hyper = {**hyper, "wave_E0": 3.0}  # keeps v off its eps floor, where fp32 is chaotic
        ours = [p.detach().to(dtype).requires_grad_() for p in params]
        step_side_by_side(
            "LAdam",
            ours,
            backend=backend,
            hyper=hyper,
            steps=3,
            seed=seed,
            none_every=3,
            what=f"{backend} {dtype} {hyper}: ",
        )

    check()


@pytest.mark.parametrize("cls", ["LAdam", "LAdaGrad", "LRMSProp"])
def test_zero_dim_parameters_get_no_laplacian(cls):
    """Where ladam raises (a 0-dim parameter with min_spatial_size <= 1), fastopt steps it without
    a Laplacian: exactly ladam's step with c2 = 0."""
    ours = [torch.tensor(0.7, dtype=torch.float64, requires_grad=True)]
    theirs = clone_params(ours)
    opt = getattr(fastopt, cls)(ours, c2=0.05, min_spatial_size=0)
    ref = getattr(ladam, cls)(theirs, c2=0.0, min_spatial_size=0)
    for grads in grad_stream(ours, 5, none_every=0):
        set_grads(ours, grads), set_grads(theirs, grads)
        opt.step(), ref.step()
    assert opt.state[ours[0]]["use_lap"] is True and ref.state[theirs[0]]["use_lap"] is False
    assert_all_close(ours, theirs, rtol=0, atol=0, what="0-dim parameter")
    # The state within fp64 round-off (torch._foreach_addcmul_ and ladam's addcmul_ round LRMSProp's
    # square_avg 1 ulp apart), step counts equal; use_lap is the one entry that differs by design.
    ref.state[theirs[0]]["use_lap"] = True
    compare_optimizers(opt, ref, ours, theirs, rtol=1e-15, atol=0, state_keys="ladam", what="0-dim parameter: ").check()
