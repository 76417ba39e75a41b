"""The training forward's random numbers replayed in the gradient-only estimators (amortized_power,
secant_same_batch): with dropout active, the gradient at the shifted point draws the training
forward's masks, so one gradient pairs with .grad; the user's random stream is left as it was; the
replay is used only where the latest forward is the one behind .grad."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _curvature_problems import one_thread  # noqa: F401

from fastopt.schedulers import CurvatureEstimator, HomotopyLR

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


class _FunctionalDropout(nn.Module):
    """Dropout by F.dropout inside forward: no nn.Dropout module to detect."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, self.training))


def _dropout_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)).double().train()


def _data(seed=1, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _hv_under(model, x, y, state, v):
    """||H v|| of the loss with the dropout masks drawn from generator state ``state`` (double backward)."""
    params = list(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
    return float(torch.cat([t.flatten() for t in hv]).norm())


@pytest.mark.parametrize("make", [_dropout_mlp, lambda: _FunctionalDropout().double().train()], ids=["module", "F"])
def test_one_gradient_with_the_training_forwards_masks(make):
    model = make()
    x, y = _data()
    est = CurvatureEstimator(model, F.cross_entropy, "amortized_power")  # before the forward: it records
    before = torch.get_rng_state()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    after = torch.get_rng_state()
    m = est.measure(x, y, grads=[p.grad for p in model.parameters()])
    assert m.n_gradients == 1
    assert torch.equal(torch.get_rng_state(), after)  # the user's stream did not move
    norm = torch.cat([t.flatten() for t in grads]).norm()
    v = [t / norm for t in grads]  # the first estimate's vector: the normalised training gradient
    assert m.hessian_norm == pytest.approx(_hv_under(model, x, y, before, v), rel=1e-4)
    # Other masks give another Hessian: the agreement above is the replay's, not a coincidence.
    other = torch.Generator().manual_seed(123).get_state()
    assert abs(_hv_under(model, x, y, other, v) / m.hessian_norm - 1) > 1e-2


def test_replay_only_for_the_forward_behind_grad():
    model = _dropout_mlp()
    x, y = _data()
    est = CurvatureEstimator(model, F.cross_entropy, "amortized_power")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def forward_backward(inputs):
        opt.zero_grad()
        F.cross_entropy(model(inputs), y).backward()
        return [p.grad for p in model.parameters()]

    grads = forward_backward(x)
    assert est.measure(x.clone(), y, grads=grads).n_gradients == 1  # equal inputs, another tensor
    twin = copy.deepcopy(model)  # carries the hook along: its forwards are not the model's
    twin(x + 1)
    assert est.measure(x, y, grads=grads).n_gradients == 1
    opt.step()  # the parameters moved since the forward: central differences, two own gradients
    assert est.measure(x, y, grads=grads).n_gradients == 2
    grads = forward_backward(x)
    assert est.measure(x + 1, y, grads=grads).n_gradients == 2  # not the forward's inputs
    with torch.no_grad():
        model(x + 1)  # a forward without gradients is not recorded: the training one still holds
    assert est.measure(x, y, grads=grads).n_gradients == 1
    model(x + 1)  # a later forward with gradients is the latest: .grad is not its gradient
    assert est.measure(x, y, grads=grads).n_gradients == 2


def test_secant_same_batch_replays_too():
    model = _dropout_mlp()
    x, y = _data()
    est = CurvatureEstimator(model, F.cross_entropy, "secant_same_batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        m = est.measure(x, y, grads=[p.grad for p in model.parameters()])
        opt.step()
    assert m.n_gradients == 1
    # y = g(theta_t) - g(theta_{t'}), both under the latest training forward's masks: with the
    # same masks at both points the secant of a small step is near H s, so ||y|| / ||s|| stays
    # within the spectrum's scale instead of carrying the gradient noise of other masks / h.
    assert 0 < m.hessian_norm < 10


def test_homotopy_lr_leaves_the_users_random_stream_alone():
    """Training with HomotopyLR draws the same random numbers as training without it."""

    def train(with_scheduler):
        model = _dropout_mlp()
        x, y = _data()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = HomotopyLR(opt, model, F.cross_entropy, estimation_freq=2) if with_scheduler else None
        torch.manual_seed(5)
        draws = []
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if sched is not None:
                sched.update_curvature(x, y)
            opt.step()
            if sched is not None:
                sched.step()
            draws.append(torch.rand(4))
        return torch.stack(draws), sched

    plain, _ = train(False)
    scheduled, sched = train(True)
    assert torch.equal(plain, scheduled)
    assert len(sched.estimator.curvature_history) == 3
    assert sched.estimator.last_measurement.n_gradients == 1


def test_the_hook_goes_with_the_estimator():
    model = _dropout_mlp()
    est = CurvatureEstimator(model, F.cross_entropy, "amortized_power")
    assert len(model._forward_pre_hooks) == 1
    buf = io.BytesIO()
    torch.save(model, buf)  # the hook pickles (as one that records nothing)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _data()[0]
    model(x)
    loaded(x + 1)  # the loaded copy's forward does not reach est: the model's is still the latest
    assert est._recorder.replay_state(x) is not None
    del est
    assert len(model._forward_pre_hooks) == 0
    CurvatureEstimator(model, F.cross_entropy, "hutchinson")  # needs no training gradient: no hook
    assert len(model._forward_pre_hooks) == 0
