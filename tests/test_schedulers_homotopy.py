"""The HomotopyLR family against closed-form curvature: the rate falls above the target, warmup
emerges where the curvature decays, the seed's Experiment 1 problem; torch scheduler conventions
(get_last_lr, state_dict round trips), fastopt.LAdam, histories and plots, errors."""

import copy
import io
import math
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from _curvature_problems import Quadratic, SharpValley, half_mse, one_thread, quadratic_data  # noqa: F401

import fastopt
from fastopt.schedulers import (
    AdaptiveHomotopyLR,
    CurvatureAdaptiveLR,
    CurvatureEstimator,
    CurvatureWarmup,
    HomotopyAdam,
    HomotopyLR,
    PerLayerHomotopyLR,
    curvature_aware_clip,
    homotopy_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)


def _batches(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)) for _ in range(n)]


def _diagonal_quadratic(a=(1.0, 4.0, 16.0), start=(1.0, -1.0, 0.5)):
    """L = 1/2 sum a_i theta_i^2: H = diag(a) (Hutchinson is exact), g = a * theta, known kappa."""
    model = Quadratic(len(a)).to(DT)
    with torch.no_grad():
        model.theta.copy_(torch.tensor(start, dtype=DT))
    a = torch.tensor(a, dtype=DT)
    loss = lambda theta, _: 0.5 * (a * theta**2).sum()  # noqa: E731

    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = model.theta

        def forward(self, x):
            return self.theta

    def kappa():
        theta = model.theta.detach()
        return float(a.sum() / ((a * theta).pow(2).sum() + 1e-8))

    return Identity(), loss, kappa


# -- the rule --------------------------------------------------------------------------------------------
def test_lr_falls_when_curvature_exceeds_the_target_and_not_below():
    model, loss, kappa = _diagonal_quadratic()
    k0 = kappa()
    for target, alpha in [(k0 / 4, 1.0), (k0 / 4, 0.5), (k0 / 100, 2.0), (4 * k0, 1.0), (k0, 1.0)]:
        opt = torch.optim.SGD(model.parameters(), lr=123.0)
        hutchinson = CurvatureEstimator(model, loss, "hutchinson")  # exact here: H is diagonal
        sched = HomotopyLR(
            opt, model, loss, base_lr=0.1, curvature_target=target, alpha=alpha, estimation_freq=1, estimator=hutchinson
        )
        sched.update_curvature(None, None)
        opt.step()  # no gradients: a no-op, in the order torch schedulers expect
        sched.step()
        want = 0.1 / (1 + alpha * max(0.0, k0 / target - 1))
        assert sched.current_curvature == pytest.approx(k0, rel=1e-12)
        assert sched.get_last_lr() == [pytest.approx(want, rel=1e-12)]
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
        if target < k0:
            assert want < 0.1
        else:
            assert want == 0.1
    assert homotopy_scale(30.0, 10.0, 0.5) == 1 / (1 + 0.5 * 2)


def test_smoothing_and_estimation_freq():
    model, loss, kappa = _diagonal_quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hutchinson = CurvatureEstimator(model, loss, "hutchinson")  # exact here: H is diagonal
    sched = HomotopyLR(
        opt, model, loss, base_lr=0.01, curvature_target=1e-3, estimation_freq=3, smoothing=0.5, estimator=hutchinson
    )
    assert sched.get_last_lr() == [0.01]  # before any estimate the curvature is the target
    expected, seen = None, []
    for step in range(7):
        loss(model(None), None).backward()
        if step % 3 == 0:
            k = kappa()
            expected = k if expected is None else 0.5 * expected + 0.5 * k
            seen.append(step)
        assert sched.will_estimate == (step % 3 == 0)
        sched.update_curvature(None, None)
        opt.step()
        opt.zero_grad()
        sched.step()
        assert sched.current_curvature == pytest.approx(expected, rel=1e-12)
    assert sched.curvature_steps == seen == [0, 3, 6]
    assert len(sched.estimator.curvature_history) == 3
    assert len(sched.lr_history) == 8  # the initial rate and one per step


def test_warmup_emerges_where_curvature_decays():
    """SharpValley: the curvature starts ~100x the target and decays along the descent path, so the
    rate starts ~100x below base and rises to base by itself; near the far minimum the gradient
    vanishes, kappa grows again and the rate falls. Every rate is checked against the closed form."""
    model = SharpValley().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = HomotopyLR(
        opt,
        model,
        model.loss,
        base_lr=0.5,
        curvature_target=1.0,
        alpha=1.0,
        estimation_freq=1,
        smoothing=0.0,
        estimator=CurvatureEstimator(model, model.loss, "hutchinson", n_samples=2),
    )
    lrs = []
    for _ in range(400):
        opt.zero_grad()
        model.loss(model(None), None).backward()
        expected = 0.5 / (1 + max(0.0, model.analytic_curvature() - 1.0))
        sched.update_curvature(None, None)  # at the current parameters
        opt.step()
        sched.step()  # the rate of the next step
        lr = sched.get_last_lr()[0]
        assert lr == pytest.approx(expected, rel=1e-9)
        lrs.append(lr)
    assert lrs[0] < 0.5 / 50  # starts 50-100x below base: the kappa at the start is about 100
    reached = next(i for i, lr in enumerate(lrs) if lr == 0.5)
    assert 20 < reached < 300  # base is reached later, by itself
    assert all(b >= a for a, b in zip(lrs[:reached], lrs[1 : reached + 1]))  # monotone warmup
    assert min(lrs[reached:]) < 0.1  # and the rate falls again near the minimum


def test_experiment1_quadratic_with_known_curvature():
    """The seed's Experiment 1 problem (least squares, condition number 100): along a HomotopyLR run
    the power-method kappa equals lambda_max / ||g||^2 from the closed-form Hessian. The comparison of
    final losses against constant-LR SGD and Adam is bench/experiment_quadratic.py (stated in
    bench/results/curvature_experiment1.md)."""
    x, y, theta_star, hess = quadratic_data(dim=8, n=64, condition=100.0)
    lam = float(torch.linalg.eigvalsh(hess).max())
    model = Quadratic(8).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / lam)
    est = CurvatureEstimator(model, half_mse, method="power", n_iterations=200, tol=1e-12)
    sched = HomotopyLR(
        opt, model, half_mse, base_lr=1.0 / lam, curvature_target=1.0, estimation_freq=5, smoothing=0.0, estimator=est
    )
    for step in range(40):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        if sched.will_estimate:
            g = hess @ (model.theta.detach() - theta_star)
            want = lam / (float(g @ g) + 1e-8)
        sched.update_curvature(x, y)
        if step % 5 == 0:
            assert sched.curvature_history[-1] == pytest.approx(want, rel=1e-6)
        opt.step()
        sched.step()
    assert sched.curvature_history == sorted(sched.curvature_history)  # kappa grows toward the minimum


# -- CurvatureAdaptiveLR: the seed's user-facing scheduler ----------------------------------------------
def test_curvature_adaptive_lr_uses_the_step_graph_in_the_seed_loop():
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = CurvatureAdaptiveLR(
        opt,
        model,
        base_lr=1e-2,
        curvature_target=0.5,
        adaptation_rate=0.25,
        estimation_freq=2,
        method="hutchinson",
        n_samples=4,
    )
    reference = CurvatureEstimator(twin, half_mse, "hutchinson", n_samples=4)
    smoothed = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for i, (x, y) in enumerate(_batches(6)):
            twin.load_state_dict(model.state_dict())
            opt.zero_grad()
            loss = half_mse(model(x), y)
            loss.backward(retain_graph=sched.will_estimate)
            if i % 2 == 0:
                k = reference.estimate(x, y)
                smoothed = k if i == 0 else 0.75 * smoothed + 0.25 * k
            sched.step(loss)
            want = 1e-2 / (1 + max(0.0, smoothed / 0.5 - 1))
            assert sched.get_last_lr() == [pytest.approx(want, rel=1e-10)]
            assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]  # used by this step's optimizer.step()
            opt.step()
    assert len(sched.curvature_history) == 3
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)


def test_curvature_adaptive_lr_explains_a_freed_graph_and_a_late_call():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CurvatureAdaptiveLR(opt, model, estimation_freq=1)
    x, y = _batches(1)[0]
    loss = half_mse(model(x), y)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"retain_graph=scheduler.will_estimate"):
        sched.step(loss)
    assert sched.step_count == 0 and sched.curvature_history == []  # the failed step changed nothing
    opt.zero_grad()
    loss = half_mse(model(x), y)
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match=r"before optimizer.step\(\)"):
        sched.step(loss)
    with pytest.raises(TypeError, match="call scheduler.step\\(loss\\)"):
        sched.update_curvature(x, y)


# -- AdaptiveHomotopyLR --------------------------------------------------------------------------------
def test_adaptive_homotopy_lr_warmup_then_learned_target():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = AdaptiveHomotopyLR(
        opt,
        model,
        half_mse,
        base_lr=0.05,
        warmup_steps=5,
        adaptation_rate=0.2,
        estimator=CurvatureEstimator(model, half_mse, n_samples=3),
    )
    assert sched.get_last_lr() == [pytest.approx(0.05 / 5)]
    for t, (x, y) in enumerate(_batches(12)):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        sched.update_curvature(x, y)
        opt.step()
        sched.step()
        history = sched.curvature_history
        if t + 1 < 5:
            assert sched.curvature_target is None
            assert sched.get_last_lr() == [pytest.approx(0.05 * (t + 2) / 5)]
        elif t + 1 == 5:
            assert sched.curvature_target == pytest.approx(np.percentile(history, 75), rel=1e-12)
            target = sched.curvature_target
        else:
            target = 0.8 * target + 0.2 * np.percentile(history[-100:], 75)
            assert sched.curvature_target == pytest.approx(target, rel=1e-12)
        if sched.curvature_target is not None:
            want = 0.05 / (1 + max(0.0, history[-1] / sched.curvature_target - 1))
            assert sched.get_last_lr() == [pytest.approx(want, rel=1e-12)]
    assert len(sched.target_history) == 8


# -- PerLayerHomotopyLR -------------------------------------------------------------------------------
def test_per_layer_rates_from_per_layer_curvature():
    model = _mlp()
    opt = torch.optim.SGD(PerLayerHomotopyLR.param_groups(model, weight_decay=0.0), lr=1.0)
    sched = PerLayerHomotopyLR(model, half_mse, base_lr=0.02, optimizer=opt, n_samples=6)
    twin = CurvatureEstimator(model, half_mse, n_samples=6, groups="layers")
    for x, y in _batches(3):
        kappas = twin.estimate_per_group(x, y)
        lrs = sched.step(x, y)
        median = float(np.median(list(kappas.values())))
        assert set(lrs) == {"0", "2"}
        for name, k in kappas.items():
            assert lrs[name] == pytest.approx(0.02 / (1 + k / median), rel=1e-12)
        assert sched.get_last_lr() == [lrs[g["name"]] for g in opt.param_groups]
    mixed = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="several layers"):
        PerLayerHomotopyLR(model, half_mse, optimizer=mixed)
    alone = PerLayerHomotopyLR(model, half_mse, base_lr=0.02)
    assert set(alone.get_per_layer_lr(*_batches(1)[0])) == {"0", "2"}


# -- CurvatureWarmup --------------------------------------------------------------------------------------
def test_curvature_warmup_grows_geometrically_and_holds_at_high_curvature():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    warm = CurvatureWarmup(
        opt,
        model,
        half_mse,
        target_lr=0.3,
        warmup_steps=8,
        curvature_threshold=1e12,
        estimator=CurvatureEstimator(model, half_mse, n_samples=2),
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)
    for i, (x, y) in enumerate(_batches(12)):
        lr = warm.step(x, y)
        assert lr == pytest.approx(min(0.3, 0.003 * 100 ** ((i + 1) / 8)), rel=1e-12)
        assert opt.param_groups[0]["lr"] == lr
    assert warm.done and warm.current_lr == 0.3
    assert len(warm.curvature_history) == 8  # no estimates once done
    held = CurvatureWarmup(opt, model, half_mse, target_lr=0.3, warmup_steps=8, curvature_threshold=1e-12)
    for x, y in _batches(3):
        assert held.step(x, y) == pytest.approx(0.003)
    assert held.held_steps == 3


# -- clipping and HomotopyAdam -------------------------------------------------------------------------
def test_curvature_aware_clip():
    g = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]  # norm 5
    out = curvature_aware_clip(g, curvature=1e4, max_norm=4.0)  # bound 4 / (1 + 1) = 2
    assert out[1] is None
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in out if t is not None)) == pytest.approx(2.0)
    torch.testing.assert_close(out[0], g[0] * 0.4)
    assert curvature_aware_clip(g, curvature=0.0, max_norm=10.0)[0] is g[0]  # under the bound: untouched
    assert curvature_aware_clip(g, curvature=3.0, max_norm=4.0, curvature_scale=1.0)[2].item() == pytest.approx(
        4.0 * (1.0 / 5.0)
    )
    with pytest.raises(ValueError, match="Invalid curvature"):
        curvature_aware_clip(g, curvature=-1.0)
    with pytest.raises(ValueError, match="Invalid max_norm"):
        curvature_aware_clip(g, curvature=1.0, max_norm=0.0)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a tensor"):
        curvature_aware_clip([1.0], curvature=1.0)


def test_homotopy_adam_sets_rates_then_steps_like_adam():
    model = _mlp()
    twin = copy.deepcopy(model)
    est = CurvatureEstimator(model, half_mse, "hutchinson", n_samples=3)
    twin_est = CurvatureEstimator(twin, half_mse, "hutchinson", n_samples=3)
    opt = HomotopyAdam(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
        lr=0.1,
        curvature_estimator=est,
        curvature_scale=2.0,
        betas=(0.8, 0.9),
    )
    ref = torch.optim.Adam(
        [{"params": twin[0].parameters()}, {"params": twin[2].parameters(), "lr": 0.5}], lr=0.1, betas=(0.8, 0.9)
    )
    for x, y in _batches(4):
        for o, m in ((opt, model), (ref, twin)):
            o.zero_grad()
            half_mse(m(x), y).backward()
        k = twin_est.estimate(x, y)
        for group, base in zip(ref.param_groups, (0.1, 0.5)):
            group["lr"] = base / (1 + k / 2.0)
        opt.step(inputs=x, targets=y)
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert opt.curvature_history == twin_est.curvature_history
    plain = HomotopyAdam(model.parameters(), lr=0.1)  # no estimator: plain Adam, inputs ignored
    plain.step(inputs=x, targets=y)
    with pytest.raises(TypeError, match="estimator must be a CurvatureEstimator"):
        HomotopyAdam(model.parameters(), curvature_estimator=object())


# -- torch scheduler conventions: checkpoints, LAdam ---------------------------------------------------------
def _drive(kind, model, opt, sched, batches):
    for x, y in batches:
        opt.zero_grad()
        loss = half_mse(model(x), y)
        if kind == "CurvatureAdaptiveLR":
            loss.backward(retain_graph=sched.will_estimate)
            sched.step(loss)
            opt.step()
        elif kind in ("HomotopyLR", "AdaptiveHomotopyLR"):
            loss.backward()
            sched.update_curvature(x, y)
            opt.step()
            sched.step()
        elif kind == "HomotopyAdam":
            loss.backward()
            opt.step(inputs=x, targets=y)
        else:  # PerLayerHomotopyLR, CurvatureWarmup
            loss.backward()
            sched.step(x, y)
            opt.step()


def _make(kind, model):
    est = CurvatureEstimator(model, half_mse, n_samples=2, groups="layers" if kind == "PerLayerHomotopyLR" else None)
    if kind == "HomotopyAdam":
        opt = HomotopyAdam(model.parameters(), lr=0.01, curvature_estimator=est)
        return opt, opt
    if kind == "PerLayerHomotopyLR":
        opt = torch.optim.SGD(PerLayerHomotopyLR.param_groups(model), lr=0.01, momentum=0.9)
        return opt, PerLayerHomotopyLR(model, half_mse, base_lr=0.02, optimizer=opt, estimator=est, estimation_freq=2)
    opt = fastopt.LAdam(model.parameters(), lr=0.01, backend="torch")
    if kind == "HomotopyLR":
        return opt, HomotopyLR(
            opt, model, half_mse, base_lr=0.01, curvature_target=0.2, estimation_freq=3, estimator=est
        )
    if kind == "AdaptiveHomotopyLR":
        return opt, AdaptiveHomotopyLR(
            opt, model, half_mse, base_lr=0.01, warmup_steps=4, adaptation_rate=0.3, estimation_freq=2, estimator=est
        )
    if kind == "CurvatureAdaptiveLR":
        return opt, CurvatureAdaptiveLR(
            opt,
            model,
            base_lr=0.01,
            curvature_target=0.2,
            estimation_freq=3,
            estimator=CurvatureEstimator(model, None, n_samples=2),
        )
    return opt, CurvatureWarmup(
        opt, model, half_mse, target_lr=0.01, warmup_steps=10, curvature_threshold=5.0, estimator=est
    )


KINDS = [
    "HomotopyLR",
    "AdaptiveHomotopyLR",
    "CurvatureAdaptiveLR",
    "PerLayerHomotopyLR",
    "CurvatureWarmup",
    "HomotopyAdam",
]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_continues_identically(kind):
    batches = _batches(14)
    model = _mlp()
    opt, sched = _make(kind, model)
    _drive(kind, model, opt, sched, batches[:7])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _drive(kind, model, opt, sched, batches[7:])

    resumed_model = _mlp()
    resumed_opt, resumed_sched = _make(kind, resumed_model)
    buf.seek(0)
    saved = torch.load(buf)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    if resumed_sched is not resumed_opt:
        resumed_sched.load_state_dict(saved["sched"])
    _drive(kind, resumed_model, resumed_opt, resumed_sched, batches[7:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed_sched.curvature_history == sched.curvature_history
    assert resumed_sched.lr_history == sched.lr_history
    assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert len(sched.curvature_history) >= 3


def test_scheduler_rates_drive_ladam_exactly():
    """HomotopyLR on fastopt.LAdam gives the same parameters as LAdam stepped with those rates by hand."""
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = fastopt.LAdam(model.parameters(), lr=0.01, c2=1e-3, min_spatial_size=4, backend="torch")
    ref = fastopt.LAdam(twin.parameters(), lr=0.01, c2=1e-3, min_spatial_size=4, backend="torch")
    sched = HomotopyLR(
        opt,
        model,
        half_mse,
        base_lr=0.01,
        curvature_target=0.05,
        estimation_freq=2,
        estimator=CurvatureEstimator(model, half_mse, n_samples=3),
    )
    for x, y in _batches(6):
        lr = opt.param_groups[0]["lr"]
        for o, m in ((opt, model), (ref, twin)):
            o.zero_grad()
            half_mse(m(x), y).backward()
        sched.update_curvature(x, y)
        ref.param_groups[0]["lr"] = lr
        opt.step()
        ref.step()
        sched.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert len({lr for (lr,) in sched.lr_history}) > 1  # the rate did move
    assert min(lr for (lr,) in sched.lr_history) < 0.01


def test_base_lr_none_scales_each_groups_own_rate():
    model = _mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], lr=0.4)
    sched = HomotopyLR(opt, model, half_mse, base_lr=None, curvature_target=1e-6, estimation_freq=1)
    x, y = _batches(1)[0]
    sched.update_curvature(x, y)
    opt.step()
    sched.step()
    scale = sched.lr_scale()
    assert 0 < scale < 1
    assert sched.get_last_lr() == [pytest.approx(0.1 * scale), pytest.approx(0.4 * scale)]


def test_a_non_finite_estimate_leaves_the_rate_alone():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = HomotopyLR(opt, model, half_mse, base_lr=0.1, curvature_target=1e-3, estimation_freq=1)
    x, y = _batches(1)[0]
    sched.update_curvature(x, y)
    opt.step()
    sched.step()
    lr = sched.get_last_lr()
    with pytest.warns(RuntimeWarning, match="non-finite curvature"):
        sched.update_curvature(x, torch.full_like(y, float("nan")))
    opt.step()
    sched.step()
    assert sched.get_last_lr() == lr
    assert math.isnan(sched.estimator.curvature_history[-1]) and len(sched.curvature_history) == 1


def test_plots_write_pngs_and_explain_a_missing_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = HomotopyLR(opt, model, half_mse, estimation_freq=1)
    for x, y in _batches(3):
        sched.update_curvature(x, y)
        opt.step()
        sched.step()
    for path in (
        sched.plot_curvature_history(str(tmp_path / "k.png")),
        sched.plot_lr_history(str(tmp_path / "lr.png")),
    ):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    per_layer = PerLayerHomotopyLR(model, half_mse)
    per_layer.step(x, y)
    with open(per_layer.plot_layer_curvature_history(str(tmp_path / "layers.png")), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"plot_lr_history needs matplotlib.*pip install .fastopt\[plot\]."):
        sched.plot_lr_history(str(tmp_path / "again.png"))


def test_errors_name_the_argument():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (lambda: HomotopyLR(object(), model, half_mse), TypeError, "optimizer must be a torch.optim.Optimizer"),
        (lambda: HomotopyLR(opt, model, half_mse, base_lr=-1.0), ValueError, "Invalid base_lr"),
        (lambda: HomotopyLR(opt, model, half_mse, curvature_target=0.0), ValueError, "Invalid curvature_target"),
        (lambda: HomotopyLR(opt, model, half_mse, alpha=float("inf")), ValueError, "Invalid alpha"),
        (lambda: HomotopyLR(opt, model, half_mse, estimation_freq=0), ValueError, "Invalid estimation_freq"),
        (lambda: HomotopyLR(opt, model, half_mse, smoothing=1.0), ValueError, "Invalid smoothing"),
        (lambda: HomotopyLR(opt, model, half_mse, estimator="x"), TypeError, "estimator must be a CurvatureEstimator"),
        (lambda: HomotopyLR(opt, None, half_mse), TypeError, "model must be a torch.nn.Module"),
        (lambda: CurvatureAdaptiveLR(opt, model, adaptation_rate=0.0), ValueError, "Invalid adaptation_rate"),
        (lambda: AdaptiveHomotopyLR(opt, model, half_mse, warmup_steps=0), ValueError, "Invalid warmup_steps"),
        (lambda: AdaptiveHomotopyLR(opt, model, half_mse, percentile=101.0), ValueError, "Invalid percentile"),
        (lambda: AdaptiveHomotopyLR(opt, model, half_mse, adaptation_rate=2.0), ValueError, "Invalid adaptation_rate"),
        (lambda: PerLayerHomotopyLR(model, half_mse, base_lr=float("nan")), ValueError, "Invalid base_lr"),
        (
            lambda: PerLayerHomotopyLR(model, half_mse, estimator=CurvatureEstimator(model, half_mse)),
            ValueError,
            "needs an estimator with groups",
        ),
        (lambda: CurvatureWarmup(opt, model, half_mse, 0.1, start_factor=0.0), ValueError, "Invalid start_factor"),
        (lambda: CurvatureWarmup(opt, model, half_mse, 0.1, warmup_steps=-2), ValueError, "Invalid warmup_steps"),
        (
            lambda: CurvatureWarmup(opt, model, half_mse, 0.1, curvature_threshold=-1),
            ValueError,
            "Invalid curvature_threshold",
        ),
        (lambda: HomotopyAdam(model.parameters(), curvature_scale=0), ValueError, "Invalid curvature_scale"),
    ]
    for make, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            make()
    sched = HomotopyLR(opt, model, half_mse)
    with pytest.raises(KeyError, match="no 'estimator' entry"):
        sched.load_state_dict({"base_lr": 0.1})
    state = sched.state_dict()
    state["bogus"] = 1
    with pytest.raises(KeyError, match="unexpected keys"):
        sched.load_state_dict(state)
