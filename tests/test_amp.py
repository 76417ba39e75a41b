"""AMP in the step: torch.amp.GradScaler hands the LAdam family ``grad_scale`` and ``found_inf``
(``_step_supports_amp_scaling``, as for torch's fused Adam) and every backend unscales the
gradients and skips a non-finite step inside its kernel.

Each test runs the same training twice under a GradScaler: once with the in-kernel path, once with
the scaler unscaling the gradients itself (``_step_supports_amp_scaling = False`` on the instance,
the path every optimizer without fused AMP takes), and asks for the same parameters and state,
bit for bit (the scale is a power of two, so unscaling is exact either way): for finite steps, for
a step with an inf/NaN gradient in the middle of a run and for one at the very first step.
"""

import copy

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.testing import grad_stream, make_params

SHAPES = ["many", "1d_17", "3d", "transposed"]  # 2-D stencil, 1-D stencil, 3-D, strided params
# (optimizer, hyperparameters) covering every LAdam-family op
CONFIGS = {
    "ladam": ("LAdam", dict(lr=1e-2, c2=1e-2, weight_decay=1e-2)),
    "ladam_update_lap": ("LAdam", dict(lr=1e-2, c2=1e-2, mode="update_lap")),
    "ladam_weight_lap": ("LAdam", dict(lr=1e-2, c2=1e-2, mode="weight_lap")),
    "ladam_wave": ("LAdam", dict(lr=1e-2, c2=1e-2, mode="wave_variance")),
    "ladagrad": ("LAdaGrad", dict(lr=1e-2, c2=1e-2, lr_decay=1e-3)),
    "lrmsprop": ("LRMSProp", dict(lr=1e-2, c2=1e-2, momentum=0.9)),
}
_CLS_OPS = {
    "LAdam": {
        "variance_lap": "ladam_step",
        "update_lap": "ladam_update_lap_step",
        "weight_lap": "ladam_weight_lap_step",
        "wave_variance": "ladam_wave_step",
    },
    "LAdaGrad": "ladagrad_step",
    "LRMSProp": "lrmsprop_step",
}


def _op(cls_name, kwargs):
    ops = _CLS_OPS[cls_name]
    return ops[kwargs.get("mode", "variance_lap")] if isinstance(ops, dict) else ops


def _skip_unless(backend, op, dtype=torch.float32):
    reason = backends.why_not(backend, op, "cpu", dtype)
    if reason:
        pytest.skip(reason)


def _linear_loss(params, grads):
    """A loss whose gradient with respect to each parameter is the given tensor."""
    return sum((p * g).sum() for p, g in zip(params, grads))


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b, what):
    (params_a, state_a), (params_b, state_b) = a, b
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        assert torch.equal(x, y), f"{what}: params[{i}] differ (max |diff| {(x - y).abs().max().item():.3g})"
    assert state_a.keys() == state_b.keys(), f"{what}: state of different parameters"
    for pid in state_a:
        assert state_a[pid].keys() == state_b[pid].keys(), f"{what}: state[{pid}] keys differ"
        for key, x in state_a[pid].items():
            y = state_b[pid][key]
            same = torch.equal(x, y) if torch.is_tensor(x) else x == y
            assert same, f"{what}: state[{pid}][{key!r}] differs: {x} vs {y}"


def _train(
    cls_name, kwargs, backend, *, in_kernel, bad_at=(), steps=4, dtype=torch.float32, bad=float("inf"), clip=None
):
    """Run ``steps`` GradScaler steps; steps listed in ``bad_at`` get a non-finite gradient. Returns
    the snapshot after every step and whether the grads were left scaled (the in-kernel path)."""
    params = make_params(dtype, names=SHAPES)
    opt = getattr(fastopt, cls_name)(params, backend=backend, **kwargs)
    if not in_kernel:
        opt._step_supports_amp_scaling = False  # the scaler unscales the grads and skips step() itself
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)  # the scale changes too
    history, grads_left_scaled = [], []
    for i, grads in enumerate(grad_stream(params, steps, none_every=0)):
        if i in bad_at:
            grads[0].view(-1)[5] = bad
        opt.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(_linear_loss(params, grads)).backward()
        if clip is not None:  # the user unscales to clip: the step then gets found_inf only
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        history.append(_snapshot(params, opt))
        grads_left_scaled.append(
            all(
                torch.allclose(p.grad, (g * scale).to(dtype), rtol=0, atol=0, equal_nan=True)
                for p, g in zip(params, grads)
            )
        )
    return history, grads_left_scaled


def _check(cls_name, kwargs, backend, bad_at=(), dtype=torch.float32, bad=float("inf")):
    ours, scaled = _train(cls_name, kwargs, backend, in_kernel=True, bad_at=bad_at, dtype=dtype, bad=bad)
    theirs, unscaled = _train(cls_name, kwargs, backend, in_kernel=False, bad_at=bad_at, dtype=dtype, bad=bad)
    # The paths really differ: in-kernel unscaling leaves .grad scaled; the scaler's own unscales it.
    assert all(scaled), "the in-kernel path unscaled .grad: GradScaler did not hand grad_scale to the step"
    assert not any(unscaled[i] for i in range(len(unscaled)) if i not in bad_at)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i == 0 and 0 in bad_at:  # only the in-kernel path has state yet (zeros, no step counted)
            a, b = (a[0], {}), (b[0], {})
        _assert_same(a, b, f"{backend} step {i}: in-kernel unscaling vs GradScaler.unscale_")
    for i in bad_at:  # a skipped step leaves everything as it was (or as it was never stepped)
        before = ours[i - 1] if i > 0 else ([p.detach() for p in make_params(dtype, names=SHAPES)], None)
        for x, y in zip(ours[i][0], before[0]):
            assert torch.equal(x, y), f"{backend}: the skipped step {i} changed a parameter"
        if before[1] is not None:
            _assert_same(ours[i], before, f"{backend}: the skipped step {i}")
        else:  # skipped first step: state exists (as with torch's fused Adam) but counts no step
            assert all(float(s["step"]) == 0 for s in ours[i][1].values())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_in_kernel_unscaling_matches_the_scaler(backend, config):
    cls_name, kwargs = CONFIGS[config]
    _skip_unless(backend, _op(cls_name, kwargs))
    _check(cls_name, kwargs, backend)


@pytest.mark.parametrize("config", ["ladam", "ladam_wave", "ladagrad", "lrmsprop"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_non_finite_step_is_skipped_in_the_kernel(backend, config):
    cls_name, kwargs = CONFIGS[config]
    _skip_unless(backend, _op(cls_name, kwargs))
    _check(cls_name, kwargs, backend, bad_at=(2,))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_non_finite_first_step_is_skipped(backend):
    _skip_unless(backend, "ladam_step")
    _check("LAdam", CONFIGS["ladam"][1], backend, bad_at=(0,), bad=float("nan"))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_unscaled_by_the_user_to_clip(backend):
    """scaler.unscale_(opt) before step (to clip): GradScaler then hands the step found_inf and no
    grad_scale; the result must be that of the scaler's own path, a non-finite step skipped."""
    _skip_unless(backend, "ladam_step")
    kwargs = CONFIGS["ladam"][1]
    ours, _ = _train("LAdam", kwargs, backend, in_kernel=True, bad_at=(2,), clip=0.5)
    theirs, _ = _train("LAdam", kwargs, backend, in_kernel=False, bad_at=(2,), clip=0.5)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _assert_same(a, b, f"{backend} step {i}: unscale_ + clip, in the step vs the scaler's path")
    _assert_same(ours[2], ours[1], f"{backend}: the skipped step 2")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_gradients(backend):
    """bf16 has fp32's exponent range: unscaling by a power of two is exact in the grad dtype too."""
    _skip_unless(backend, "ladam_step", torch.bfloat16)
    _check("LAdam", CONFIGS["ladam"][1], backend, bad_at=(2,), dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_the_checks_fail_when_a_backend_ignores_found_inf(backend, monkeypatch):
    """Mutation check: a backend that drops found_inf must be caught by the comparison above."""
    _skip_unless(backend, "ladam_step")
    real = backends.implementation

    def ignoring_found_inf(op, name):
        fn = real(op, name)

        def step(*args, found_inf=None, **kwargs):
            return fn(*args, **kwargs)

        return step

    monkeypatch.setattr(backends, "implementation", ignoring_found_inf)
    with pytest.raises(AssertionError, match="step 2"):
        _check("LAdam", CONFIGS["ladam"][1], backend, bad_at=(2,))


def test_the_ops_check_the_amp_inputs():
    """The fused backends name the bad argument (the optimizer always passes float32 scalars)."""
    params = make_params(names=["many"])
    p, g = params[0].detach(), torch.randn(37, 29)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.ones(())
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, c2=1e-2, stencil="9point")
    for backend in ("cpu", "triton"):
        if backends.why_not(backend, "ladam_step", "cpu", torch.float32):
            continue
        fn = backends.select("ladam_step", "cpu", torch.float32, backend)
        with pytest.raises((RuntimeError, ValueError), match="grad_scale"):
            fn([p], [g], [m], [v], [step], [True], grad_scale=torch.ones((), dtype=torch.float64), **hyper)
        with pytest.raises((RuntimeError, ValueError), match="found_inf"):
            fn([p], [g], [m], [v], [step], [True], found_inf=torch.zeros(2), **hyper)
