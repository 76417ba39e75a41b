"""fastopt.noise PyTorch integration: the wrapper's noise statistics against gradients computed one
by one, its steps against the bare optimizer's, lr bounds, checkpoints, errors."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import fastopt
from fastopt.noise import NoiseAdaptiveLR, NoiseAdaptiveOptimizer, NoiseEstimator, per_sample_gradient_statistics


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).to(dtype)


def make_data(n=16, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def accumulate(model, opt, x, y, k):
    """k micro-batches, each loss divided by k; record after each backward. Returns the rows."""
    rows, before = [], torch.zeros(sum(p.numel() for p in model.parameters()), dtype=x.dtype)
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        loss = F.cross_entropy(model(xb), yb) / k
        loss.backward()
        opt.record_micro_batch(loss)
        after = flat_grad(model)
        rows.append(after - before)
        before = after.clone()
    return torch.stack(rows)


def test_accumulation_statistics_match_the_micro_batch_gradients():
    model = make_model()
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = make_data(24)
    rows = accumulate(model, opt, x, y, 6)
    got = opt._statistics()
    want = NoiseEstimator().noise_statistics(rows)
    assert got.batch_size == 6 and got.num_params == want.num_params
    assert got.mean_grad_sq_norm == pytest.approx(want.mean_grad_sq_norm, rel=1e-12)
    assert got.trace_row_covariance == pytest.approx(want.trace_row_covariance, rel=1e-10)


def test_accumulation_statistics_stay_accurate_when_the_mean_dominates():
    """Welford's update: micro-batch gradients 1 +- 1e-4 in fp32. Subtracting sums of squares
    (sum |d_i|^2 - k |d_bar|^2, each about 5000) would lose their 5e-5 difference to fp32 rounding."""
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD([p], lr=0.1))
    gen = torch.Generator().manual_seed(0)
    rows = 1.0 + 1e-4 * torch.randn(5, 1000, generator=gen)
    sums = []
    for row in rows:
        p.grad = row.clone() if p.grad is None else p.grad + row
        sums.append(p.grad.double())
        opt.record_micro_batch(1.0)
    # The micro-batch gradients as the fp32 running sums hold them.
    recovered = torch.diff(torch.stack(sums), dim=0, prepend=torch.zeros(1, 1000, dtype=torch.float64))
    want = NoiseEstimator().noise_statistics(recovered)
    assert opt._statistics().trace_row_covariance == pytest.approx(want.trace_row_covariance, rel=1e-3)


def test_parameters_that_get_a_gradient_late_count_as_zero_before():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD([a, b], lr=0.1))
    rows = torch.tensor(
        [[1.0, 2.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.0, 4.0, -1.0], [2.0, 2.0, 2.0, 1.0, 1.0]], dtype=torch.float64
    )
    a.grad = rows[0, :3].float().clone()
    opt.record_micro_batch(1.0)
    a.grad += rows[1, :3].float()
    b.grad = rows[1, 3:].float().clone()
    opt.record_micro_batch(1.0)
    a.grad += rows[2, :3].float()
    b.grad += rows[2, 3:].float()
    opt.record_micro_batch(1.0)
    want = NoiseEstimator().noise_statistics(rows)
    got = opt._statistics()
    assert got.trace_row_covariance == pytest.approx(want.trace_row_covariance, rel=1e-6)
    assert got.mean_grad_sq_norm == pytest.approx(want.mean_grad_sq_norm, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 5, 1])
def test_per_sample_statistics_match_gradients_computed_one_by_one(chunk_size):
    model = make_model()
    x, y = make_data(13)
    rows = []
    for i in range(13):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(flat_grad(model))
    model.zero_grad()
    want = NoiseEstimator().noise_statistics(torch.stack(rows))
    stats, mean_grads, mean_loss = per_sample_gradient_statistics(model, F.cross_entropy, x, y, chunk_size=chunk_size)
    assert stats.batch_size == 13 and stats.num_params == want.num_params
    assert stats.mean_grad_sq_norm == pytest.approx(want.mean_grad_sq_norm, rel=1e-10)
    assert stats.trace_row_covariance == pytest.approx(want.trace_row_covariance, rel=1e-10)
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(torch.cat([g.flatten() for g in mean_grads]), flat_grad(model), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=0)


def test_per_sample_backward_replaces_backward():
    model, twin = make_model(), make_model()
    x, y = make_data(12)
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = opt.per_sample_backward(model, F.cross_entropy, x, y, chunk_size=4)
    F.cross_entropy(twin(x), y).backward()
    torch.testing.assert_close(flat_grad(model), flat_grad(twin), rtol=1e-12, atol=1e-14)
    assert loss.requires_grad is False
    with pytest.raises(RuntimeError, match="once per step"):
        opt.per_sample_backward(model, F.cross_entropy, x, y)
    with pytest.raises(RuntimeError, match="already measured by per_sample_backward"):
        opt.record_micro_batch(1.0)


def test_per_sample_only_differentiates_the_optimizers_parameters():
    model = make_model()
    first = list(model[0].parameters())
    x, y = make_data(8)
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD(first, lr=0.1))
    opt.per_sample_backward(model, F.cross_entropy, x, y)
    assert all(p.grad is not None for p in first)
    assert all(p.grad is None for p in model[2].parameters())
    assert opt._statistics().num_params == sum(p.numel() for p in first)


OPTIMIZERS = [
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    ("LAdam", lambda ps: fastopt.LAdam(ps, lr=1e-2, c2=1e-3, min_spatial_size=4, backend="torch")),
]


@pytest.mark.parametrize("name,ctor", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("source", ["micro_batches", "per_sample"])
def test_wrapped_steps_equal_the_bare_optimizer_at_the_chosen_lr(name, ctor, source):
    """Only the lr changes: the bare optimizer, given the wrapper's lr and the same gradients,
    takes exactly the same steps."""
    model, twin = make_model(), make_model()
    wrapped = NoiseAdaptiveOptimizer(ctor(list(model.parameters())), max_lr=0.2 if name == "SGD" else 0.05)
    bare = ctor(list(twin.parameters()))
    lrs = []
    for step in range(8):
        x, y = make_data(16, seed=step)
        if source == "micro_batches":
            accumulate(model, wrapped, x, y, 4)
        else:
            wrapped.per_sample_backward(model, F.cross_entropy, x, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        wrapped.step()
        lrs.append(wrapped.lr)
        bare.param_groups[0]["lr"] = wrapped.lr
        bare.step()
        wrapped.zero_grad()
        bare.zero_grad()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert len(set(lrs)) > 3  # the policy did move the rate
    assert wrapped.param_groups[0]["lr"] == wrapped.lr


def test_rate_follows_the_noise_and_stays_in_bounds():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD([p], lr=0.1), min_lr=0.05, max_lr=0.4, growth=0.5, noise_beta=0.0)
    gen = torch.Generator().manual_seed(0)

    def step(rows, loss=1.0):
        for row in rows:
            p.grad = row.clone() if p.grad is None else p.grad + row
            opt.record_micro_batch(loss)
        opt.step()
        opt.zero_grad()
        assert 0.05 <= opt.lr <= 0.4
        return opt.lr

    clean = [step(torch.ones(4, 4)) for _ in range(6)]  # identical micro-batches: no noise
    assert clean[-1] == pytest.approx(0.4)
    noisy = []
    for _ in range(8):
        rows = torch.randn(4, 4, generator=gen)
        noisy.append(step(rows - rows.mean(0)))  # mean exactly 0: pure noise
    assert noisy[-1] == pytest.approx(0.05)


def test_param_groups_keep_their_lr_ratio():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.3}], lr=0.1))
    for _ in range(3):
        for row in torch.ones(2, 3):
            for q in (a, b):
                q.grad = row.clone() if q.grad is None else q.grad + row
            opt.record_micro_batch(1.0)
        opt.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == opt.lr > 0.1
    assert opt.param_groups[1]["lr"] == pytest.approx(3 * opt.lr, rel=1e-12)


def test_state_dict_round_trip_continues_identically():
    def train(model, opt, steps):
        for step in steps:
            x, y = make_data(12, seed=step)
            accumulate(model, opt, x, y, 3)
            opt.step()
            opt.zero_grad()

    model = make_model()
    opt = NoiseAdaptiveOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), cooldown=2)
    train(model, opt, range(5))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed_model = make_model(seed=9)
    resumed = NoiseAdaptiveOptimizer(torch.optim.Adam(resumed_model.parameters(), lr=1e-2), cooldown=2)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.lr == opt.lr and resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train(model, opt, range(5, 10))
    train(resumed_model, resumed, range(5, 10))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.policy.state_dict() == opt.policy.state_dict()


def test_bad_state_dicts_change_nothing():
    model = make_model()
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    good = opt.state_dict()
    with pytest.raises(ValueError, match="expected a dict with keys"):
        opt.load_state_dict({"optimizer": good["optimizer"]})
    with pytest.raises(ValueError, match="2 base learning rates for 1 parameter groups"):
        opt.load_state_dict({**good, "base_lrs": [0.1, 0.2]})
    other = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), cooldown=3)
    with pytest.raises(ValueError, match="hyperparameters"):
        other.load_state_dict(good)
    bad_inner = copy.deepcopy(good)
    bad_inner["optimizer"]["param_groups"].append(copy.deepcopy(bad_inner["optimizer"]["param_groups"][0]))
    before = opt.policy.state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(bad_inner)
    assert opt.policy.state_dict() == before


def test_step_without_measurement_keeps_the_rate_and_one_micro_batch_is_an_error():
    model = make_model()
    opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = make_data(8)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # nothing recorded: plain step at the current lr
    assert opt.lr == 0.1 and opt.policy.num_updates == 0
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.record_micro_batch(loss)
    with pytest.raises(ValueError, match="only 1 micro-batch was recorded"):
        opt.step()
    opt.zero_grad()
    accumulate(model, opt, x, y, 2)
    opt._losses.clear()
    with pytest.raises(ValueError, match="pass loss="):
        opt.step()
    opt.step(loss=1.0)
    assert opt.policy.num_updates == 1


def test_failed_step_leaves_the_rate_and_policy_as_they_were():
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("boom")

    model = make_model()
    opt = NoiseAdaptiveOptimizer(Failing(model.parameters(), lr=0.1))
    x, y = make_data(8)
    accumulate(model, opt, x, y, 4)
    before = opt.policy.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert opt.policy.state_dict() == before and opt.param_groups[0]["lr"] == 0.1


def test_tensor_lr_and_low_precision_gradients():
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = NoiseAdaptiveOptimizer(torch.optim.Adam([p], lr=torch.tensor(0.01)))
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    sums = []
    for row in rows:
        p.grad = row.clone() if p.grad is None else p.grad + row
        sums.append(p.grad.double())
        opt.record_micro_batch(torch.tensor(1.0))
    # The micro-batch gradients as the bf16 running sums hold them.
    recovered = torch.diff(torch.stack(sums), dim=0, prepend=torch.zeros(1, 8, dtype=torch.float64))
    want = NoiseEstimator().noise_statistics(recovered)
    assert opt._statistics().trace_row_covariance == pytest.approx(want.trace_row_covariance, rel=1e-5)
    opt.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(opt.lr, rel=1e-7) and opt.lr != 0.01


def test_constructor_and_recording_errors():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        NoiseAdaptiveOptimizer(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either policy or policy options"):
        NoiseAdaptiveOptimizer(sgd, NoiseAdaptiveLR(0.1), cooldown=2)
    with pytest.raises(TypeError, match="policy must be a NoiseAdaptiveLR"):
        NoiseAdaptiveOptimizer(sgd, policy=0.1)
    with pytest.raises(ValueError, match="Invalid max_lr"):
        NoiseAdaptiveOptimizer(sgd, max_lr=-1.0)
    opt = NoiseAdaptiveOptimizer(sgd)
    x, y = make_data(8)
    with pytest.raises(ValueError, match="same number >= 2 of samples"):
        opt.per_sample_backward(model, F.cross_entropy, x, y[:4])
    with pytest.raises(ValueError, match="Invalid chunk_size: 0"):
        opt.per_sample_backward(model, F.cross_entropy, x, y, chunk_size=0)
    F.cross_entropy(model(x), y).backward()
    opt.record_micro_batch(1.0)
    model[0].weight.grad = None
    with pytest.raises(RuntimeError, match="became None between micro-batches"):
        opt.record_micro_batch(1.0)
    opt.zero_grad()
    assert opt._rows == 0


def test_grad_scaler_drives_the_wrapper_like_unscaled_gradients():
    """torch.amp.GradScaler.step(wrapper) works, and scaling the loss by 2^10 leaves the noise
    fraction (a ratio) and so the rates unchanged."""

    def run(scaler):
        model = make_model(torch.float32)
        opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        lrs = []
        for step in range(4):
            x, y = make_data(16, torch.float32, seed=step)
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                loss = F.cross_entropy(model(xb), yb) / 4
                (scaler.scale(loss) if scaler else loss).backward()
                opt.record_micro_batch(loss)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
            lrs.append(opt.lr)
        return lrs, [p.detach().clone() for p in model.parameters()]

    lrs, params = run(None)
    scaled_lrs, scaled_params = run(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert scaled_lrs == pytest.approx(lrs, rel=1e-6) and len(set(lrs)) > 1
    for p, q in zip(params, scaled_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
