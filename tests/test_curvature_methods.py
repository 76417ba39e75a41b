"""The estimators that reuse what training computes (secant, secant_same_batch, amortized_power) and
the dense reference (exact): closed forms on quadratics, the exact Hessian of small models, the
scaling of kappa with the Hessian, checkpoints, and the schedulers running them without extra passes."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _curvature_problems import Quadratic, exact_hessian, half_mse, mlp_with, one_thread, quadratic_data  # noqa: F401

from fastopt.schedulers import (
    AdaptiveHomotopyLR,
    CurvatureAdaptiveLR,
    CurvatureEstimator,
    CurvatureWarmup,
    HomotopyAdam,
    HomotopyLR,
    PerLayerHomotopyLR,
)
from fastopt.schedulers.curvature import DEFAULT_METHOD, MAX_EXACT_PARAMETERS, METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _mlp_problem(seed=0, n=32):
    torch.manual_seed(seed)
    model = mlp_with(nn.Tanh).double()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _largest_magnitude(h):
    eig = torch.linalg.eigvalsh(h)
    return float(eig.abs().max())


class _Point(nn.Module):
    """The model is its parameter vector; the loss function holds the quadratic."""

    def __init__(self, dim):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=DT))

    def forward(self, x):
        return self.theta


def test_method_is_validated_with_the_allowed_values():
    model, _, _ = _mlp_problem()
    with pytest.raises(ValueError, match=r"Invalid method: 'bb'\. Choose from: \('secant', 'secant_same_batch'") as err:
        CurvatureEstimator(model, F.cross_entropy, method="bb")
    for name in METHODS:
        assert repr(name) in str(err.value)
    assert DEFAULT_METHOD in METHODS and CurvatureEstimator(model, F.cross_entropy).method == DEFAULT_METHOD


def test_exact_method_matches_autograd_functional_hessian():
    model, x, y = _mlp_problem()
    h = exact_hessian(model, F.cross_entropy, x, y)
    est = CurvatureEstimator(model, F.cross_entropy, "exact", groups="layers", max_probes_per_pass=17)
    m = est.measure(x, y)
    assert m.hessian_norm == pytest.approx(_largest_magnitude(h), rel=1e-10)
    assert m.trace == pytest.approx(float(h.trace()), rel=1e-10)
    assert abs(m.top_eigenvalue) == m.hessian_norm and m.n_products == h.shape[0]
    assert m.curvature == pytest.approx(m.hessian_norm / (m.grad_norm_sq + 1e-8), rel=1e-12)
    # layer blocks: "0" holds the first Linear's weight and bias, the first 6*10+10 entries
    block = h[:70, :70]
    assert m.groups["0"].hessian_norm == pytest.approx(_largest_magnitude(block), rel=1e-10)
    big = nn.Linear(MAX_EXACT_PARAMETERS, 1)
    with pytest.raises(ValueError, match=r"method='exact' builds the dense Hessian: 4097 .*MAX_EXACT_PARAMETERS=4096"):
        CurvatureEstimator(big, half_mse, "exact")


@pytest.mark.parametrize("method", METHODS)
def test_kappa_scales_with_the_hessian_at_a_fixed_gradient(method):
    """L_k(theta) = g0.theta + k/2 theta^T A theta at theta = 0: the gradient is g0 for every k, the
    Hessian k A. kappa must scale by k. The secant methods first measure at -s (a fixed step back),
    then at 0, where y = k A s exactly. Exact arithmetic gives exactly k for every method (the same
    seed draws the same probes for every k; amortized_power starts from g0, the same for every k).
    Tolerance: 1e-12 relative for the methods using products and gradients of the same point;
    1e-6 for amortized_power's one-sided finite difference of float64 gradients
    (rounding eps * ||g|| / (h ||kAv||) with h ~ 1.5e-8: about 1e-8 here)."""
    dim = 6
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], dtype=DT)) @ q.T
    g0 = torch.randn(dim, generator=g, dtype=DT)
    step = torch.randn(dim, generator=g, dtype=DT) * 0.3
    kappas = {}
    for k in (0.1, 1.0, 10.0, 1000.0):
        model = _Point(dim)
        loss = lambda theta, _, k=k: g0 @ theta + 0.5 * k * theta @ a @ theta  # noqa: E731
        est = CurvatureEstimator(model, loss, method, seed=5, n_iterations=3)
        if method in ("secant", "secant_same_batch"):
            with torch.no_grad():
                model.theta.copy_(-step)
            est.measure(None, None)
            with torch.no_grad():
                model.theta.zero_()
        m = est.measure(None, None)
        assert m.grad_norm_sq == pytest.approx(float(g0 @ g0), rel=1e-12)
        kappas[k] = m.curvature
    rel = 1e-6 if method == "amortized_power" else 1e-12
    for k, kappa in kappas.items():
        assert kappa == pytest.approx(k * kappas[1.0], rel=rel), (method, k)


def test_secant_along_sgd_steps_is_the_closed_form_on_a_quadratic():
    """Least squares, full batch: y = H s exactly, so kappa = ||H s|| / ||s|| / (||g||^2 + eps),
    and the directional curvature s^T H s / s^T s, with s the path since the previous estimate."""
    x, y, theta_star, hess = quadratic_data(dim=8, n=64, condition=100.0)
    model = Quadratic(8).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    est = CurvatureEstimator(model, half_mse, "secant")
    sched = HomotopyLR(
        opt, model, half_mse, base_lr=0.01, curvature_target=1e30, estimation_freq=3, smoothing=0.0, estimator=est
    )
    previous = None
    for _ in range(20):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        theta = model.theta.detach().clone()
        if sched.will_estimate:
            sched.update_curvature(x, y)
            m = sched.estimator.last_measurement
            gv = hess @ (theta - theta_star)
            if previous is None:
                assert m.n_gradients == 2  # the first estimate: a central difference, two gradients
                s = hess @ (theta - theta_star)  # along the gradient; curvature of H on that direction
            else:
                assert m.n_gradients == 0  # from .grad: no pass of its own
                s = theta - previous
            hs = hess @ s
            assert m.hessian_norm == pytest.approx(float(hs.norm() / s.norm()), rel=1e-6)
            assert m.directional_curvature == pytest.approx(float(s @ hs / (s @ s)), rel=1e-6)
            assert m.curvature == pytest.approx(m.hessian_norm / (float(gv @ gv) + 1e-8), rel=1e-6)
            assert sched.current_curvature == m.curvature
            previous = theta
        else:
            sched.update_curvature(x, y)
        opt.step()
        sched.step()


def test_secant_same_batch_removes_the_gradient_noise_of_another_batch():
    """Mini-batches of a least-squares problem: the Hessian of batch B is X_B^T X_B / |B|. The
    same-batch secant is exactly ||H_B s|| / ||s|| with both gradients on B; the plain secant pairs
    two batches' gradients and so differs (their gradient noise)."""
    x, y, theta_star, _ = quadratic_data(dim=8, n=256, condition=100.0)
    y = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=DT)  # noise: batches differ
    model = Quadratic(8).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    same = CurvatureEstimator(model, half_mse, "secant_same_batch")
    plain = CurvatureEstimator(model, half_mse, "secant")
    g = torch.Generator().manual_seed(5)
    previous, differs = None, 0
    for _ in range(12):
        idx = torch.randint(0, 256, (16,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        half_mse(model(xb), yb).backward()
        grads = [model.theta.grad]
        theta = model.theta.detach().clone()
        a = same.measure(xb, yb, grads=grads)
        b = plain.measure(xb, yb, grads=grads)
        if previous is not None:
            s = theta - previous
            hs = (xb.T @ xb / 16) @ s
            assert a.hessian_norm == pytest.approx(float(hs.norm() / s.norm()), rel=1e-6)
            assert a.n_gradients == 1  # the previous point's gradient on this batch
            assert b.n_gradients == 0
            differs += abs(b.hessian_norm / a.hessian_norm - 1) > 1e-3
        previous = theta
        opt.step()
    assert differs >= 8


@pytest.mark.parametrize("source", ["inputs", "training grads", "loss graph"])
def test_amortized_power_converges_to_the_largest_eigenvalue(source):
    model, x, y = _mlp_problem()
    top = _largest_magnitude(exact_hessian(model, F.cross_entropy, x, y))
    est = CurvatureEstimator(model, None if source == "loss graph" else F.cross_entropy, "amortized_power")
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    grads = [p.grad for p in model.parameters()]
    norms = []
    for _ in range(60):
        if source == "loss graph":
            m = est.measure_from_loss(loss)
        else:
            m = est.measure(x, y, grads=grads if source == "training grads" else None)
        norms.append(m.hessian_norm)
    assert norms[-1] == pytest.approx(top, rel=1e-4)
    assert norms[0] < norms[-1]  # from below, as power iteration from the gradient
    assert m.n_gradients == {"inputs": 2, "training grads": 1, "loss graph": 0}[source]


def test_amortized_power_takes_central_differences_under_dropout_it_cannot_replay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Dropout(0.2), nn.Linear(10, 3)).double().train()
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    est = CurvatureEstimator(model, F.cross_entropy, "amortized_power")  # after the forward: none recorded
    m = est.measure(x, y, grads=[p.grad for p in model.parameters()])
    assert m.n_gradients == 2  # the training forward's masks unknown: both gradients its own


def test_secant_methods_read_grads_only_when_usable():
    model, x, y = _mlp_problem()
    est = CurvatureEstimator(model, F.cross_entropy, "secant")
    est.measure(x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    assert est.measure(x, y, grads=zeros).n_gradients == 1  # zeroed .grad: computes its own
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert est.measure(x, y, grads=[None] * 4).n_gradients == 1
    with pytest.raises(ValueError, match=r"grads must hold one tensor per measured parameter \(4\), got 1"):
        est.measure(x, y, grads=zeros[:1])
    with pytest.raises(ValueError, match=r"grads\[1\] must be a tensor of shape \(10,\)"):
        est.measure(x, y, grads=[zeros[0], torch.ones(3), zeros[2], zeros[3]])
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="secant_same_batch.*a loss does not carry"):
        CurvatureEstimator(model, None, "secant_same_batch").estimate_from_loss(loss)
    # the estimator's own pass at the same point as before: a virtual step again, never 0/0
    same = est.measure(x, y)
    again = est.measure(x, y)
    assert again.n_gradients == 3 and again.curvature == pytest.approx(same.curvature, rel=1e-3)


@pytest.mark.parametrize("method", ["secant", "secant_same_batch", "amortized_power"])
def test_state_dict_round_trip_of_the_new_state(method):
    model, x, y = _mlp_problem()
    twin = copy.deepcopy(model)
    a = CurvatureEstimator(model, F.cross_entropy, method, seed=2)
    a.estimate(x, y)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            p.add_(0.02)
            q.copy_(p)
    a.estimate(x, y)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CurvatureEstimator(twin, F.cross_entropy, method, seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                p.mul_(0.97)
                q.copy_(p)
        assert a.estimate(x, y) == b.estimate(x, y)
    assert a.last_measurement == b.last_measurement
    state = a.state_dict()
    state["secant_point"] = {"params": [torch.zeros(2)], "grads": [torch.zeros(2)]}
    with pytest.raises(ValueError, match="secant_point does not match"):
        b.load_state_dict(state)


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _train(model, steps, hook):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
        hook(x, y)


@pytest.mark.parametrize("method", [DEFAULT_METHOD, "secant"])
@pytest.mark.parametrize(
    "kind", ["HomotopyLR", "AdaptiveHomotopyLR", "PerLayerHomotopyLR", "CurvatureWarmup", "HomotopyAdam", "Adaptive"]
)
def test_every_scheduler_feeds_its_estimator_the_training_gradient(kind, method):
    """Every scheduler hands its estimator the training gradient (.grad), so the model's forward
    runs once per training step plus only what the method adds: the secant, two gradients at its
    first estimate (a central difference) and none after; amortized_power, one gradient per
    estimate (no dropout here). CurvatureAdaptiveLR differentiates the loss graph instead: no
    forward at all (amortized_power: one Hessian-vector product per estimate)."""
    torch.manual_seed(0)
    model = _Counting(mlp_with(nn.Tanh).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    est = CurvatureEstimator(model, None if kind == "Adaptive" else F.cross_entropy, method, groups=None)
    if kind == "HomotopyLR":
        sched = HomotopyLR(opt, model, F.cross_entropy, estimation_freq=2, estimator=est)
    elif kind == "AdaptiveHomotopyLR":
        sched = AdaptiveHomotopyLR(opt, model, F.cross_entropy, warmup_steps=3, estimator=est)
    elif kind == "PerLayerHomotopyLR":
        est = CurvatureEstimator(model, F.cross_entropy, method, groups="layers")
        opt = torch.optim.SGD(PerLayerHomotopyLR.param_groups(model), lr=0.05)
        sched = PerLayerHomotopyLR(model, F.cross_entropy, optimizer=opt, estimator=est)
    elif kind == "CurvatureWarmup":
        sched = CurvatureWarmup(
            opt, model, F.cross_entropy, 0.05, warmup_steps=50, curvature_threshold=1e30, estimator=est
        )
    elif kind == "HomotopyAdam":
        opt = HomotopyAdam(model.parameters(), lr=1e-3, curvature_estimator=est)
    else:
        sched = CurvatureAdaptiveLR(opt, model, estimation_freq=2, estimator=est)

    def hook(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=kind == "Adaptive")
        if kind in ("HomotopyLR", "AdaptiveHomotopyLR"):
            sched.update_curvature(x, y)
            opt.step()
            sched.step()
        elif kind in ("PerLayerHomotopyLR", "CurvatureWarmup"):
            sched.step(x, y)
            opt.step()
        elif kind == "HomotopyAdam":
            opt.step(inputs=x, targets=y)
        else:
            sched.step(loss)
            opt.step()

    _train(model, 12, hook)
    estimates = len(est.curvature_history)
    assert estimates >= 6 and all(k > 0 for k in est.curvature_history)
    if kind == "Adaptive":
        extra = 0
    else:
        extra = 2 if method == "secant" else estimates
    assert model.calls == 12 + extra
    assert est.last_measurement.n_gradients == (0 if kind == "Adaptive" or method == "secant" else 1)


def test_the_schedulers_default_estimator_is_the_default_method():
    model = mlp_with(nn.Tanh).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    defaults = [
        HomotopyLR(opt, model, F.cross_entropy).estimator,
        AdaptiveHomotopyLR(opt, model, F.cross_entropy).estimator,
        PerLayerHomotopyLR(model, F.cross_entropy).estimator,
        CurvatureWarmup(opt, model, F.cross_entropy, 0.05).estimator,
        CurvatureAdaptiveLR(opt, model).estimator,
        CurvatureEstimator(model, F.cross_entropy),
    ]
    assert [e.method for e in defaults] == [DEFAULT_METHOD] * len(defaults)


def test_amortized_power_survives_a_non_finite_batch():
    """A NaN loss gives a NaN estimate, and the power vector stays as it was: the next good batch
    continues the iteration where it was."""
    model, x, y = _mlp_problem()
    est = CurvatureEstimator(model, F.cross_entropy, "amortized_power")
    for _ in range(3):
        est.measure(x, y)
    vector = [t.clone() for t in est._power_vector]
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert not math.isfinite(est.measure(bad, y).curvature)
    assert all(torch.equal(a, b) for a, b in zip(vector, est._power_vector))
    assert math.isfinite(est.measure(x, y).curvature)
