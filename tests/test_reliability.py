"""What users of fused optimizers trip over: AMP, non-finite gradients, empty and mixed-dtype
parameters, tensor learning rates, checkpoints moved between backends (DDP and FSDP2:
tests/test_distributed.py)."""

import copy
import io
import itertools

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.testing import TOLERANCES, assert_all_close, clone_params, grad_stream, make_params, set_grads

ladam = pytest.importorskip("ladam")


def _run(opt, params, stream):
    for grads in stream:
        set_grads(params, grads)
        opt.step()


# -- AMP ---------------------------------------------------------------------------------------------
def _linear_loss(params, grads):
    """A loss whose gradient with respect to each parameter is the given tensor."""
    return sum((p * g).sum() for p, g in zip(params, grads))


def test_grad_scaler_unscales_and_matches_an_unscaled_run():
    params = make_params(names=["many", "4d_conv", "1d_17"])
    plain = clone_params(params)
    opt = fastopt.LAdam(params, lr=1e-2, c2=1e-2)
    ref = fastopt.LAdam(plain, lr=1e-2, c2=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for grads in grad_stream(params, 5, none_every=0):
        # Scaled by a power of two, unscaling is exact: the steps must be identical.
        opt.zero_grad()
        scaler.scale(_linear_loss(params, grads)).backward()
        set_grads(plain, grads)
        scaler.step(opt)
        scaler.update()
        ref.step()
    assert_all_close(params, plain, rtol=0, atol=0, what="GradScaler run vs unscaled run")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_skips_a_step_with_non_finite_gradients(bad):
    params = make_params(names=["many", "4d_conv"])
    opt = fastopt.LAdam(params, lr=1e-2, c2=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stream = list(grad_stream(params, 3, none_every=0))
    for grads in stream[:2]:
        opt.zero_grad()
        scaler.scale(_linear_loss(params, grads)).backward()
        scaler.step(opt)
        scaler.update()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    scale = scaler.get_scale()
    opt.zero_grad()
    stream[2][1][0, 0, 1, 1] = bad
    scaler.scale(_linear_loss(params, stream[2])).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for pid, s in state_before["state"].items():
        for k, val in s.items():
            assert torch.equal(torch.as_tensor(opt.state_dict()["state"][pid][k]), torch.as_tensor(val))


# -- hostile input -----------------------------------------------------------------------------------
def test_non_finite_gradients_without_a_scaler_propagate_like_torch_adam():
    """Documented behaviour: as in torch.optim.Adam, NaN/inf gradients are not filtered. With
    c2 = 0 NaN lands exactly where Adam's does; with a Laplacian it also reaches stencil neighbours."""
    p = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    g[3, 4] = float("nan")
    results = {}
    for name, make in {
        "adam": lambda q: torch.optim.AdamW(q, lr=1e-2, weight_decay=0.0),
        "c2=0": lambda q: fastopt.LAdam(q, lr=1e-2, c2=0.0),
        "c2>0": lambda q: fastopt.LAdam(q, lr=1e-2, c2=1e-2),
    }.items():
        q = p.detach().clone().requires_grad_()
        q.grad = g.clone()
        make([q]).step()
        results[name] = torch.isnan(q.detach())
    assert torch.equal(results["c2=0"], results["adam"]) and int(results["adam"].sum()) == 1
    neighbourhood = torch.zeros(8, 8, dtype=torch.bool)
    neighbourhood[2:5, 3:6] = True  # the 9-point stencil's reach around (3, 4)
    assert torch.equal(results["c2>0"], neighbourhood)


def test_zero_element_parameters_step_like_ladam():
    shapes = [(0,), (0, 5), (5, 0), (3, 0, 2), (6, 7)]
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = clone_params(ours)
    opt = fastopt.LAdam(ours, c2=1e-2, min_spatial_size=0, backend="torch")
    ref = ladam.LAdamW(theirs, c2=1e-2, min_spatial_size=0)
    for grads in grad_stream(ours, 4, none_every=0):
        set_grads(ours, grads), set_grads(theirs, grads)
        opt.step(), ref.step()
    assert_all_close(ours, theirs, **TOLERANCES[torch.float64], what="with empty parameters")
    assert all(opt.state[p]["step"].item() == 4 for p in ours)


def test_an_empty_tensor_ladam_cannot_step_is_stepped():
    """ladam views a 3-D+ tensor as (shape[0], -1): for shape[0] == 0 torch refuses the view, so
    ladam raises once min_spatial_size=0 lets the empty tensor qualify. fastopt steps it (a no-op)."""
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(0, 2, 3), (6, 7)]]
    theirs = clone_params(ours)
    for p in ours + theirs:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="reshape"):
        ladam.LAdamW(theirs, c2=1e-2, min_spatial_size=0).step()
    for backend in [b for b in backends.BACKENDS if backends.available(b, "ladam_step", "cpu", torch.float64)]:
        params = clone_params(ours)
        for p in params:
            p.grad = torch.ones_like(p)
        opt = fastopt.LAdam(params, c2=1e-2, min_spatial_size=0, backend=backend)
        opt.step()
        assert opt.state[params[0]]["step"].item() == 1, backend
        assert not torch.equal(params[1], ours[1]), backend


def test_mixed_dtypes_in_one_group_step_each_dtype_by_its_own_rules():
    torch.manual_seed(0)
    mixed = [
        torch.randn(9, 11, dtype=dt, requires_grad=True)
        for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float32)
    ]
    alone = clone_params(mixed)
    opt = fastopt.LAdam(mixed, lr=1e-2, c2=1e-2)
    singles = [fastopt.LAdam([p], lr=1e-2, c2=1e-2) for p in alone]
    for grads in grad_stream(mixed, 4):
        set_grads(mixed, grads), set_grads(alone, grads)
        opt.step()
        for s in singles:
            s.step()
    assert_all_close(mixed, alone, rtol=0, atol=0, what="mixed-dtype group vs one optimizer per tensor")


def test_tensor_learning_rate_is_read_each_step():
    params, again = make_params(names=["many", "3d"]), None
    again = clone_params(params)
    lr = torch.tensor(1e-2)
    opt = fastopt.LAdam(params, lr=lr, c2=1e-2)
    ref = fastopt.LAdam(again, lr=1e-2, c2=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for grads in grad_stream(params, 6):
        set_grads(params, grads), set_grads(again, grads)
        opt.step(), ref.step()
        sched.step(), ref_sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref.param_groups[0]["lr"])
    assert_all_close(params, again, rtol=1e-6, atol=1e-7, what="tensor lr vs float lr")
    with pytest.raises(TypeError, match="lr as a tensor"):
        fastopt.LAdam(params, lr=torch.tensor([1e-2, 1e-3]))


# -- checkpoints across backends ------------------------------------------------------------------------
def _backend_pairs():
    # Every backend on every device type it can run on (triton on CPU: the interpreter); CUDA
    # pairs are listed (and skipped with their reason) on machines without a GPU.
    combos = [(b, d) for b in backends.BACKENDS for d in ("cpu", "cuda") if d in backends._SPECS[b].devices]
    for (a, da), (b, db) in itertools.product(combos, repeat=2):
        reasons = [
            r
            for r in (
                backends.why_not(a, "ladam_step", da, torch.float32),
                backends.why_not(b, "ladam_step", db, torch.float32),
            )
            if r
        ]
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        yield pytest.param(a, da, b, db, marks=marks, id=f"{a}-{da}->{b}-{db}")


@pytest.mark.parametrize("save_backend,save_device,load_backend,load_device", list(_backend_pairs()))
def test_checkpoint_moves_between_backends_and_devices(save_backend, save_device, load_backend, load_device):
    kw = dict(lr=1e-2, c2=1e-2, min_spatial_size=4)
    params = make_params(device=save_device)
    opt = fastopt.LAdam(params, backend=save_backend, **kw)
    stream = list(grad_stream(params, 10))
    _run(opt, params, stream[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location=load_device)
    moved = [
        torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=load_device).copy_(p).requires_grad_()
        for p in ckpt["params"]
    ]
    resumed = fastopt.LAdam(moved, backend=load_backend, **kw)
    resumed.load_state_dict(ckpt["opt"])
    _run(opt, params, stream[5:])
    _run(resumed, moved, [[None if g is None else g.to(load_device) for g in gs] for gs in stream[5:]])
    assert_all_close(
        [p.cpu() for p in moved],
        [p.cpu() for p in params],
        **TOLERANCES[torch.float32],
        what=f"{save_backend}/{save_device} -> {load_backend}/{load_device}",
    )
