"""The LAdam family as torch optimizers: checkpoints (own, ladam's, torch's), errors, failed steps
that change nothing, closures, schedulers, parameter groups."""

import copy
import io

import pytest
import torch

import fastopt
from fastopt.backends import BackendUnavailableError
from fastopt.testing import assert_all_close, clone_params, grad_stream, make_params, set_grads

ladam = pytest.importorskip("ladam")

CONFIGS = [
    ("LAdam", dict(mode="variance_lap")),
    ("LAdam", dict(mode="update_lap", stencil="5point")),
    ("LAdam", dict(mode="weight_lap", weight_decay=0.1)),
    ("LAdam", dict(mode="wave_variance")),
    ("LAdaGrad", dict(lr_decay=0.01)),
    ("LRMSProp", dict(momentum=0.9)),
    ("LRMSProp", dict()),
]
FP32 = dict(rtol=1e-5, atol=1e-6)


def _state_tensors(opt, params):
    out = []
    for p in params:
        for _key, val in sorted(opt.state[p].items()):
            if torch.is_tensor(val):
                out.append(val)
    return out


def _run(opt, params, stream):
    for grads in stream:
        set_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("cls,kw", CONFIGS)
def test_state_dict_round_trip_continues_identically(cls, kw):
    kw = dict(lr=1e-2, c2=1e-2, min_spatial_size=4, **kw)
    params = make_params()
    opt = getattr(fastopt, cls)(params, backend="torch", **kw)
    grads = list(grad_stream(params, 16))
    _run(opt, params, grads[:7])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_params = clone_params(params)
    resumed = getattr(fastopt, cls)(resumed_params, backend="torch", **kw)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.backend == "torch", "load_state_dict must keep the optimizer's backend"
    _run(opt, params, grads[7:])
    _run(resumed, resumed_params, grads[7:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == resumed.state[q].keys()
    for a, b in zip(_state_tensors(opt, params), _state_tensors(resumed, resumed_params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", CONFIGS)
def test_resumes_from_a_ladam_state_dict(cls, kw):
    """A ladam user's checkpoint loads into fastopt, which then continues as ladam would."""
    kw = dict(lr=1e-2, c2=1e-2, min_spatial_size=4, **kw)
    if kw.get("mode") == "wave_variance":
        kw["wave_E0"] = 0.0  # the level is recorded at step 1 and must travel in the checkpoint
    theirs_cls = {"LAdam": ladam.LAdamW}.get(cls) or getattr(ladam, cls)
    params = make_params(torch.float64)
    theirs = theirs_cls(params, **kw)
    grads = list(grad_stream(params, 14))
    _run(theirs, params, grads[:6])
    ours_params = clone_params(params)
    ours = getattr(fastopt, cls)(ours_params, backend="torch", **kw)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _run(theirs, params, grads[6:])
    _run(ours, ours_params, grads[6:])
    assert_all_close(ours_params, params, rtol=1e-11, atol=1e-12, what="params after resuming")
    for p, q in zip(ours_params, params):
        if theirs.state[q]:
            assert ours.state[p]["step"].dtype == torch.float32
            assert ours.state[p]["step"].item() == theirs.state[q]["step"]


def test_ladam_state_keys_are_translated():
    params = make_params(names=["many"])
    theirs = ladam.LAdamW(params, mode="wave_variance")
    set_grads(params, [torch.randn(37, 29)])
    theirs.step()
    ours = fastopt.LAdam(clone_params(params), mode="wave_variance")
    ours.load_state_dict(theirs.state_dict())
    state = next(iter(ours.state.values()))
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "prev_exp_avg_sq", "wave_e0_sq", "use_lap"}
    assert torch.is_tensor(state["step"]) and state["step"].item() == 1.0
    assert torch.is_tensor(state["wave_e0_sq"]) and state["wave_e0_sq"].item() == pytest.approx(
        theirs.state[params[0]]["wave_E0_auto"]
    )


def test_c2_zero_is_adamw_and_state_dicts_load_both_ways_with_torch_adamw():
    params = make_params()
    ours = fastopt.LAdam(params, lr=1e-2, c2=0.0, weight_decay=0.1, backend="torch")
    torch_params = clone_params(params)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1)
    grads = list(grad_stream(params, 20, none_every=0))
    _run(ours, params, grads[:10])
    _run(theirs, torch_params, grads[:10])
    # AdamW divides sqrt(v) by sqrt(1 - b2^t) where ladam takes sqrt(v / (1 - b2^t)): round-off only.
    assert_all_close(params, torch_params, what="LAdam(c2=0) vs AdamW", **FP32)
    # Swap checkpoints: each continues from the other's state.
    ours_from_torch_params, torch_from_ours_params = clone_params(torch_params), clone_params(params)
    ours_from_torch = fastopt.LAdam(ours_from_torch_params, lr=1e-2, c2=0.0, weight_decay=0.1)
    ours_from_torch.load_state_dict(theirs.state_dict())
    torch_from_ours = torch.optim.AdamW(torch_from_ours_params, lr=1e-2, weight_decay=0.1)
    torch_from_ours.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch.optim does not copy
    for opt, ps in (
        (ours, params),
        (theirs, torch_params),
        (ours_from_torch, ours_from_torch_params),
        (torch_from_ours, torch_from_ours_params),
    ):
        _run(opt, ps, grads[10:])
    assert_all_close(ours_from_torch_params, torch_params, what="LAdam resumed from AdamW", **FP32)
    assert_all_close(torch_from_ours_params, params, what="AdamW resumed from LAdam", **FP32)
    assert ours_from_torch.param_groups[0]["c2"] == 0.0  # kept from the constructor


# -- bad arguments -----------------------------------------------------------------------------------
BAD = [
    ("LAdam", dict(lr=-1.0), ValueError, "lr"),
    ("LAdam", dict(lr="0.1"), TypeError, "lr"),
    ("LAdam", dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
    ("LAdam", dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1"),
    ("LAdam", dict(betas=0.9), ValueError, "betas"),
    ("LAdam", dict(eps=-1e-8), ValueError, "eps"),
    ("LAdam", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("LAdam", dict(c2=-1e-4), ValueError, "c2"),
    ("LAdam", dict(c2=float("nan")), ValueError, "c2"),
    ("LAdam", dict(mode="variance"), ValueError, r"mode.*variance_lap"),
    ("LAdam", dict(stencil="7point"), ValueError, r"stencil.*9point"),
    ("LAdam", dict(min_spatial_size=2.5), TypeError, "min_spatial_size"),
    ("LAdam", dict(min_spatial_size=-1), ValueError, "min_spatial_size"),
    ("LAdam", dict(wave_damping=1.5), ValueError, "wave_damping"),
    ("LAdam", dict(wave_E0=-1.0), ValueError, "wave_E0"),
    ("LAdam", dict(wave_dt=float("inf")), ValueError, "wave_dt"),
    ("LAdam", dict(backend="gpu"), ValueError, r"backend.*'auto', 'triton', 'cuda', 'cpu', 'torch'"),
    ("LAdaGrad", dict(lr_decay=-0.1), ValueError, "lr_decay"),
    ("LAdaGrad", dict(stencil="3point"), ValueError, "stencil"),
    ("LRMSProp", dict(alpha=1.0), ValueError, "alpha"),
    ("LRMSProp", dict(momentum=-0.5), ValueError, "momentum"),
]


@pytest.mark.parametrize("cls,kw,exc,match", BAD)
def test_bad_arguments_raise_naming_the_argument(cls, kw, exc, match):
    with pytest.raises(exc, match=match):
        getattr(fastopt, cls)(make_params(names=["many"]), **kw)


@pytest.mark.parametrize("cls,kw,exc,match", [b for b in BAD if "backend" not in b[1]])
def test_bad_group_values_raise_too(cls, kw, exc, match):
    opt = getattr(fastopt, cls)(make_params(names=["many"]))
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": make_params(names=["3d"]), **kw})
    assert len(opt.param_groups) == 1


def test_same_tensor_twice_is_an_error():
    p = make_params(names=["many"])[0]
    with pytest.raises(ValueError, match="twice"):
        fastopt.LAdam([p, p])
    q = make_params(names=["3d"])[0]
    with pytest.raises(ValueError, match="more than one parameter group"):
        fastopt.LAdam([{"params": [p]}, {"params": [p, q]}])


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, params, snapshot):
    values, sd = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p, before)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for pid, s in sd["state"].items():
        for k, val in s.items():
            assert torch.equal(torch.as_tensor(now["state"][pid][k]), torch.as_tensor(val)), (pid, k)


@pytest.mark.parametrize("breakage", ["sparse_grad", "bad_hyperparameter", "unavailable_backend", "complex"])
def test_a_failed_step_changes_nothing(breakage):
    params = make_params(names=["many", "3d", "1d_17", "4d_conv"])
    opt = fastopt.LAdam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, c2=1e-2)
    stream = list(grad_stream(params, 3, none_every=0))
    _run(opt, params, stream[:2])
    snapshot = _snapshot(opt, params)
    set_grads(params, stream[2])
    if breakage == "sparse_grad":
        params[3].grad = params[3].grad.to_sparse()
        expected = (RuntimeError, "sparse")
    elif breakage == "bad_hyperparameter":
        opt.param_groups[1]["c2"] = -1.0
        expected = (ValueError, "c2")
    elif breakage == "unavailable_backend":
        opt._backend = "cuda"  # what a checkpointed choice may name on a machine without CUDA
        expected = (BackendUnavailableError, "cuda")
    else:
        z = torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)
        z.grad = torch.ones_like(z)
        opt.add_param_group({"params": [z]})
        expected = (TypeError, "complex|floating")
    with pytest.raises(expected[0], match=expected[1]):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_named_backend_that_cannot_run_says_why():
    params = make_params(names=["many"])
    set_grads(params, [torch.ones(37, 29)])
    for name in ("triton", "cuda", "cpu"):
        reason = fastopt.backends.why_not(name, "ladam_step", "cpu", torch.float32)
        if reason is None:
            continue
        try:
            opt = fastopt.LAdam(params, backend=name)
        except BackendUnavailableError as err:  # the backend cannot load at all here
            assert name in str(err) and "pip install" in str(err)
            continue
        with pytest.raises(BackendUnavailableError, match=name):
            opt.step()


# -- torch conventions -----------------------------------------------------------------------------
def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    model = torch.nn.Linear(8, 4)
    opt = fastopt.LAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < losses[0]


def test_torch_lr_scheduler_drives_the_learning_rate_like_ladam():
    params = make_params()
    theirs_params = clone_params(params)
    ours = fastopt.LAdam(params, lr=1e-2, c2=1e-2, backend="torch")
    theirs = ladam.LAdamW(theirs_params, lr=1e-2, c2=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ours, theirs)]
    for grads in grad_stream(params, 10):
        set_grads(params, grads)
        set_grads(theirs_params, grads)
        ours.step(), theirs.step()
        for s in scheds:
            s.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert_all_close(params, theirs_params, what="with StepLR", **FP32)


def test_chi_anneal_matches_ladam_and_round_trips():
    ours_opt = fastopt.LAdam(make_params(names=["many"]), lr=1e-3)
    theirs_opt = ladam.LAdamW(make_params(names=["many"]), lr=1e-3)
    ours = fastopt.ChiAnnealScheduler(ours_opt, total_steps=50, warmup_frac=0.1, settle_frac=0.4)
    theirs = ladam.ChiAnnealScheduler(theirs_opt, total_steps=50, warmup_frac=0.1, settle_frac=0.4)
    lrs = []
    for _ in range(55):
        ours.step(), theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr()
        lrs.append(ours.get_last_lr()[0])
    assert lrs[0] == pytest.approx(1e-3 / 5) and max(lrs) == 1e-3 and lrs[49] == pytest.approx(0.0)
    again = fastopt.ChiAnnealScheduler(ours_opt, total_steps=50)
    again.load_state_dict(ours.state_dict())
    assert again.state_dict() == ours.state_dict()
    for kw, match in (
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_frac=1.0), "warmup_frac"),
        (dict(total_steps=10, warmup_frac=0.6, settle_frac=0.6), r"warmup_frac \+ settle_frac"),
    ):
        with pytest.raises(ValueError, match=match):
            fastopt.ChiAnnealScheduler(ours_opt, **kw)


def test_suggest_c2_matches_ladam():
    for arch in ("pinn", "transformer", "mlp", "cnn", "cnn_denoise", "auto", "PINN"):
        assert fastopt.suggest_c2(arch) == ladam.suggest_c2(arch)
    with pytest.raises(ValueError, match="Choose from"):
        fastopt.suggest_c2("gpt")


def test_constructor_mirrors_ladam_positionally_and_aliases():
    assert fastopt.LAdamW is fastopt.LAdam
    p = make_params(names=["many"])
    opt = fastopt.LAdam(p, 1e-2, (0.8, 0.99), 1e-7, 0.01, 1e-3, "update_lap", "5point", 8)
    g = opt.param_groups[0]
    assert (
        g["lr"],
        g["betas"],
        g["eps"],
        g["weight_decay"],
        g["c2"],
        g["mode"],
        g["stencil"],
        g["min_spatial_size"],
    ) == (1e-2, (0.8, 0.99), 1e-7, 0.01, 1e-3, "update_lap", "5point", 8)
    assert opt.backend == "auto"


def test_wave_e0_auto_is_the_same_as_zero():
    runs = []
    for e0 in (0.0, "auto"):
        params = make_params(names=["many", "4d_conv"])
        opt = fastopt.LAdam(params, mode="wave_variance", wave_E0=e0, c2=1e-2)
        _run(opt, params, grad_stream(params, 6, none_every=0))
        runs.append(params)
    assert_all_close(runs[0], runs[1], rtol=0, atol=0, what="wave_E0='auto' vs 0.0")


def test_deepcopy_and_pickle_keep_the_backend():
    opt = fastopt.LAdam(make_params(names=["many"]), backend="torch")
    assert copy.deepcopy(opt).backend == "torch"
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).backend == "torch"


def test_parameters_that_never_get_a_gradient_have_no_state():
    params = make_params(names=["many", "3d"])
    opt = fastopt.LAdam(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.state[params[0]]["step"].item() == 1 and len(opt.state[params[1]]) == 0


@pytest.mark.parametrize(
    "ours_cls,torch_cls,kw",
    [
        ("LAdaGrad", torch.optim.Adagrad, dict(lr=1e-2, lr_decay=0.01)),
        ("LRMSProp", torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, momentum=0.5)),
    ],
)
def test_siblings_with_c2_zero_are_torch_adagrad_and_rmsprop_and_swap_checkpoints(ours_cls, torch_cls, kw):
    params = make_params()
    torch_params = clone_params(params)
    ours = getattr(fastopt, ours_cls)(params, c2=0.0, **kw)
    theirs = torch_cls(torch_params, **kw)
    grads = list(grad_stream(params, 12, none_every=0))
    _run(ours, params, grads[:6])
    _run(theirs, torch_params, grads[:6])
    assert_all_close(params, torch_params, what=f"{ours_cls}(c2=0) vs {torch_cls.__name__}", **FP32)
    ours_from_torch_params, torch_from_ours_params = clone_params(torch_params), clone_params(params)
    ours_from_torch = getattr(fastopt, ours_cls)(ours_from_torch_params, c2=0.0, **kw)
    ours_from_torch.load_state_dict(theirs.state_dict())
    torch_from_ours = torch_cls(torch_from_ours_params, **kw)
    torch_from_ours.load_state_dict(copy.deepcopy(ours.state_dict()))
    for opt, ps in (
        (ours, params),
        (theirs, torch_params),
        (ours_from_torch, ours_from_torch_params),
        (torch_from_ours, torch_from_ours_params),
    ):
        _run(opt, ps, grads[6:])
    assert_all_close(ours_from_torch_params, torch_params, what="resumed from torch", **FP32)
    assert_all_close(torch_from_ours_params, params, what="torch resumed from fastopt", **FP32)
