"""fastopt.noise core: noise estimates against analytic values, the smoother against the seed's
numbers, the policy's bounds and rules, NumPy and torch inputs alike, errors, state round trips."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastopt.noise import LossSmoother, NoiseAdaptiveLR, NoiseEstimator, NoiseStatistics


def exact_batch(mean, stds, batch, seed=0):
    """Rows ``mean + E`` where each column of E has sample mean exactly 0 and unbiased sample
    standard deviation exactly ``stds[i]`` (centred, then rescaled)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((batch, len(stds)))
    e -= e.mean(axis=0)
    e *= np.asarray(stds) / e.std(axis=0, ddof=1)
    return np.asarray(mean, dtype=np.float64) + e


# -- NoiseEstimator ------------------------------------------------------------------------------------
def test_statistics_of_a_constructed_batch_match_the_formulas():
    stds = np.array([0.5, 1.0, 2.0, 3.0])
    mean = np.array([1.0, -2.0, 0.5, 4.0])
    batch, per_row = 8, 4
    g = exact_batch(mean, stds, batch)
    est = NoiseEstimator()
    trace = float((stds**2).sum())  # tr(Sigma_row) = 14.25
    np.testing.assert_allclose(est.compute_variance(g), stds**2, rtol=1e-12)
    assert est.estimate_noise(g) == pytest.approx(math.sqrt(trace / 4), rel=1e-12)
    s = est.noise_statistics(g, samples_per_row=per_row)
    g2 = float((mean**2).sum())  # |g_bar|^2 = |mean|^2 = 21.25
    assert s.mean_grad_sq_norm == pytest.approx(g2, rel=1e-12)
    assert s.trace_row_covariance == pytest.approx(trace, rel=1e-12)
    assert s.true_grad_sq_norm == pytest.approx(g2 - trace / batch, rel=1e-12)
    assert s.b_simple == pytest.approx(per_row * trace / (g2 - trace / batch), rel=1e-12)
    assert est.gradient_noise_scale(g, samples_per_row=per_row) == s.b_simple
    assert s.noise_fraction == pytest.approx(trace / batch / g2, rel=1e-12)


def test_standard_normal_gradients_have_noise_scale_one():
    rng = np.random.default_rng(1)
    est = NoiseEstimator()
    # The seed's example: 32 x 10 standard-normal gradients give "about 1" (std of the estimate ~0.04).
    assert abs(est.estimate_noise(rng.standard_normal((32, 10))) - 1.0) < 0.2
    # Larger: the estimate's standard deviation is about sqrt(2 / (P (B-1))) / 2 = 0.0016.
    assert abs(est.estimate_noise(rng.standard_normal((4096, 50))) - 1.0) < 0.01
    # Scale and shift: std 3 per parameter around any mean.
    assert abs(est.estimate_noise(5.0 + 3.0 * rng.standard_normal((4096, 50))) - 3.0) < 0.03


def test_noise_estimators_are_unbiased():
    """Averaged over many batches, S and |g_bar|^2 - S/B approach tr(Sigma) and |G|^2, while the
    naive |g_bar|^2 is off by tr(Sigma)/B (far more than the Monte Carlo error here)."""
    rng = np.random.default_rng(2)
    true_mean = np.array([1.0, 0.0, -1.0, 0.5])  # |G|^2 = 2.25
    sigma = np.array([2.0, 1.0, 1.5, 0.5])  # tr(Sigma) = 7.5
    batch, trials = 6, 4000
    est = NoiseEstimator()
    stats = [est.noise_statistics(true_mean + sigma * rng.standard_normal((batch, 4))) for _ in range(trials)]
    trace = np.array([s.trace_row_covariance for s in stats])
    g2 = np.array([s.true_grad_sq_norm for s in stats])
    naive = np.array([s.mean_grad_sq_norm for s in stats])
    for values, truth in ((trace, 7.5), (g2, 2.25)):
        assert abs(values.mean() - truth) < 4 * values.std() / math.sqrt(trials)
    assert naive.mean() - 2.25 > 8 * naive.std() / math.sqrt(trials)  # the bias tr(Sigma)/B = 1.25


def test_micro_batch_rows_estimate_the_per_sample_noise_scale():
    """Rows that average b samples: b * S estimates the per-sample tr(Sigma), and |G|^2 is unchanged."""
    rng = np.random.default_rng(3)
    true_mean, sigma, b = np.array([0.5, -0.5, 1.0]), np.array([1.0, 2.0, 1.0]), 8  # tr(Sigma) = 6, |G|^2 = 1.5
    est = NoiseEstimator()
    stats = [
        est.noise_statistics((true_mean + sigma * rng.standard_normal((5, b, 3))).mean(axis=1), samples_per_row=b)
        for _ in range(4000)
    ]
    trace = np.array([s.trace_covariance for s in stats])
    g2 = np.array([s.true_grad_sq_norm for s in stats])
    assert abs(trace.mean() - 6.0) < 4 * trace.std() / math.sqrt(len(stats))
    assert abs(g2.mean() - 1.5) < 4 * g2.std() / math.sqrt(len(stats))


def test_b_simple_is_infinite_when_noise_swamps_the_mean():
    g = exact_batch(np.zeros(3), [1.0, 1.0, 1.0], 4)
    assert NoiseEstimator().gradient_noise_scale(g) == math.inf
    assert NoiseEstimator().noise_statistics(g).noise_fraction == 1.0
    assert NoiseEstimator().noise_statistics(np.array([[1.0, 0.0], [-1.0, 0.0]])).noise_fraction == 1.0  # g_bar = 0
    zeros = NoiseEstimator().noise_statistics(np.zeros((4, 3)))
    assert zeros.noise_fraction == 0.0 and zeros.noise_scale == 0.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_and_torch_inputs_agree(dtype):
    g = np.random.default_rng(4).standard_normal((16, 7)).astype(dtype)
    t = torch.from_numpy(g.copy())
    est = NoiseEstimator()
    var_np, var_t = est.compute_variance(g), est.compute_variance(t)
    assert isinstance(var_np, np.ndarray) and var_np.dtype == dtype
    assert isinstance(var_t, torch.Tensor) and var_t.dtype == t.dtype
    np.testing.assert_array_equal(var_np, var_t.numpy())
    assert est.estimate_noise(g) == est.estimate_noise(t)
    assert isinstance(est.estimate_noise(t), float)
    assert est.noise_statistics(g) == est.noise_statistics(t)
    # Lists, integers, and (batch, *param_shape) arrays flattened per row.
    assert est.estimate_noise(g.tolist()) == pytest.approx(est.estimate_noise(g.astype(np.float64)), rel=1e-12)
    ints = np.arange(12).reshape(4, 3) ** 2
    assert est.compute_variance(ints).dtype == np.float64
    assert est.noise_statistics(g.reshape(16, 7, 1)) == est.noise_statistics(g)


def test_low_precision_tensors_are_upcast():
    g = torch.randn(64, 33, generator=torch.Generator().manual_seed(5))
    est = NoiseEstimator()
    assert est.estimate_noise(g.bfloat16()) == pytest.approx(est.estimate_noise(g.bfloat16().float()), rel=1e-12)
    assert est.compute_variance(g.half()).dtype == torch.float16


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (np.ones((1, 5)), ValueError, r"gradients has batch_size 1 .* at least 2"),
        (np.ones(5), ValueError, r"gradients must have shape \(batch_size, num_params\)"),
        (np.ones((4, 0)), ValueError, "no parameters"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "1 non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "non-finite"),
        (np.ones((3, 2), dtype=complex), TypeError, "real numbers"),
        (torch.ones(3, 2, dtype=torch.bool), TypeError, "real numbers"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "real numbers"),
    ],
)
def test_bad_gradients_raise_naming_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        NoiseEstimator().estimate_noise(bad)


def test_min_batch_size_is_enforced_and_validated():
    with pytest.raises(ValueError, match="batch_size 3 .* at least 4"):
        NoiseEstimator(min_batch_size=4).estimate_noise(np.ones((3, 2)))
    with pytest.raises(ValueError, match="Invalid min_batch_size: 1"):
        NoiseEstimator(min_batch_size=1)
    with pytest.raises(ValueError, match="Invalid samples_per_row: 0"):
        NoiseEstimator().noise_statistics(np.ones((3, 2)), samples_per_row=0)


# -- LossSmoother -----------------------------------------------------------------------------------------
def test_smoother_reproduces_the_seed_example():
    smoother = LossSmoother(alpha=0.9)
    assert smoother.get_smoothed_loss() is None
    got = [round(smoother.update(x), 4) for x in [2.5, 2.3, 2.6, 2.1, 2.4, 2.0, 1.9]]
    # The seed prints 2.5000 2.4800 2.4920 2.4528 2.4475 2.4028 2.3625. Its last value is an
    # arithmetic slip: 0.9 * 2.402768 + 0.1 * 1.9 = 2.3524912.
    assert got == [2.5, 2.48, 2.492, 2.4528, 2.4475, 2.4028, 2.3525]
    assert smoother.get_smoothed_loss() == pytest.approx(2.3524912, abs=1e-12)


def test_smoother_window_is_a_moving_average_of_the_ema():
    smoother = LossSmoother(alpha=0.5, window=2)
    ema, out = [], []
    for loss in [4.0, 0.0, 4.0, 0.0, 4.0]:
        ema.append(loss if not ema else 0.5 * ema[-1] + 0.5 * loss)
        out.append(smoother.update(loss))
    assert out == [4.0, 3.0, 2.5, 2.25, 2.125]  # EMA 4, 2, 3, 1.5, 2.75
    assert out[1:] == [(a + b) / 2 for a, b in zip(ema, ema[1:])]


def test_smoother_deviation_and_raw_mode():
    raw = LossSmoother(alpha=0.0)
    assert [raw.update(x) for x in (3.0, 1.0, 2.0)] == [3.0, 1.0, 2.0]
    assert raw.deviation == 1.0  # |2 - 1|
    s = LossSmoother(alpha=0.9)
    s.update(1.0)
    assert s.deviation == 0.0
    s.update(3.0)
    assert s.deviation == pytest.approx(2.0)  # bias-corrected: the one deviation |3 - 1|


def test_smoother_accepts_scalars_of_any_kind_and_rejects_the_rest():
    s = LossSmoother()
    s.update(torch.tensor(2.0))
    s.update(np.float32(1.0))
    s.update(np.array([3.0]))
    assert s.num_updates == 3
    with pytest.raises(ValueError, match="loss must be a single number"):
        s.update(torch.ones(2))
    with pytest.raises(ValueError, match="Invalid loss: nan"):
        s.update(float("nan"))
    with pytest.raises(ValueError, match="Invalid loss: inf"):
        s.update(float("inf"))
    with pytest.raises(TypeError, match="loss must be a real number"):
        s.update("1.0")
    assert s.num_updates == 3
    for alpha in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="Invalid alpha"):
            LossSmoother(alpha)
    with pytest.raises(ValueError, match="Invalid window: 0"):
        LossSmoother(window=0)


def test_smoother_state_round_trip():
    a = LossSmoother(0.8, window=3)
    for x in (5.0, 4.0, 4.5, 3.0):
        a.update(x)
    b = LossSmoother(0.8, window=3)
    b.load_state_dict(a.state_dict())
    assert [a.update(x) for x in (2.0, 2.5)] == [b.update(x) for x in (2.0, 2.5)]
    assert a.deviation == b.deviation
    with pytest.raises(ValueError, match="alpha=0.8"):
        LossSmoother(0.9, window=3).load_state_dict(a.state_dict())


# -- NoiseAdaptiveLR ------------------------------------------------------------------------------------------
def clean_batch(n=8, p=5):
    return np.tile(np.linspace(1.0, 2.0, p), (n, 1))  # identical rows: noise fraction 0


def pure_noise_batch(n=8, p=5, seed=0):
    return exact_batch(np.zeros(p), np.ones(p), n, seed)  # mean exactly 0: noise fraction 1


def test_clean_gradients_grow_the_rate_geometrically_to_max_lr():
    policy = NoiseAdaptiveLR(0.01, max_lr=0.05, growth=0.25)
    lrs = [policy.get_adapted_lr(clean_batch(), 1.0) for _ in range(12)]
    expected = [min(0.01 * 1.25 ** (k + 1), 0.05) for k in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert policy.noise_fraction == 0.0


def test_pure_noise_shrinks_the_rate_to_min_lr():
    policy = NoiseAdaptiveLR(0.01, min_lr=0.004, growth=0.25)
    lrs = [policy.get_adapted_lr(pure_noise_batch(seed=k), 1.0) for k in range(6)]
    assert lrs == pytest.approx([max(0.01 / 1.25 ** (k + 1), 0.004) for k in range(6)], rel=1e-12)
    assert policy.noise_fraction == 1.0


def test_target_is_ceiling_times_one_minus_noise_fraction():
    """McCandlish's eps_max / (1 + B_noise/B) = max_lr (1 - phi): reached from any start."""
    policy = NoiseAdaptiveLR(0.1, min_lr=0.01, max_lr=1.0, noise_beta=0.0, growth=0.5)
    g = exact_batch([2.0, 2.0], [2.0, 2.0], 4)  # N = 8/4 = 2, |g_bar|^2 = 8: phi = 1/4
    for _ in range(20):
        lr = policy.get_adapted_lr(g, 1.0)
    assert policy.noise_fraction == pytest.approx(0.25, rel=1e-12)
    assert lr == pytest.approx(0.75, rel=1e-12)


def test_loss_rise_cuts_the_rate_lowers_the_ceiling_and_holds_for_the_cooldown():
    policy = NoiseAdaptiveLR(0.01, max_lr=0.08, growth=1.0, decrease_factor=0.5, cooldown=3, rise_tolerance=0.0)
    for loss in (5.0, 4.0, 3.0):  # falling loss, clean gradient: 0.02, 0.04, 0.08
        policy.update_policy(0.0, loss)
    assert policy.lr == pytest.approx(0.08)
    assert policy.update_policy(0.0, 3.5) == pytest.approx(0.04)  # rise: cut
    assert policy.ceiling == pytest.approx(0.04) and policy.num_cuts == 1
    held = [policy.update_policy(0.0, 9.0 + k) for k in range(3)]  # rises during the cooldown change nothing
    assert held == pytest.approx([0.04] * 3) and policy.num_cuts == 1
    assert policy.update_policy(0.0, 2.0) == pytest.approx(0.04)  # free again, but capped by the ceiling


def test_rise_tolerance_ignores_rises_within_the_loss_fluctuation():
    policy = NoiseAdaptiveLR(0.01, rise_tolerance=2.0, growth=0.1)
    policy.update_policy(0.0, 1.0, loss_deviation=0.5)
    policy.update_policy(0.0, 1.9, loss_deviation=0.5)  # 1.9 <= best + 2 * 0.5
    assert policy.num_cuts == 0
    policy.update_policy(0.0, 2.1, loss_deviation=0.5)
    assert policy.num_cuts == 1


@settings(max_examples=60, deadline=None)
@given(
    base=st.floats(1e-5, 1.0),
    low=st.floats(0.01, 1.0),
    high=st.floats(1.0, 100.0),
    growth=st.floats(0.01, 10.0),
    decrease=st.floats(0.01, 1.0),
    cooldown=st.integers(0, 5),
    steps=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(-1e6, 1e6), st.floats(0.0, 1e3)), min_size=1, max_size=40),
)
def test_rate_stays_within_bounds(base, low, high, growth, decrease, cooldown, steps):
    min_lr, max_lr = base * low, base * high
    policy = NoiseAdaptiveLR(base, min_lr, max_lr, growth=growth, decrease_factor=decrease, cooldown=cooldown)
    for phi, loss, dev in steps:
        lr = policy.update_policy(phi, loss, dev)
        assert min_lr <= lr <= max_lr
        assert lr == policy.lr


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(2, 9),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-3.0, 3.0),
    losses=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=15),
)
def test_rate_from_gradients_stays_within_bounds(seed, batch, scale, offset, losses):
    rng = np.random.default_rng(seed)
    policy = NoiseAdaptiveLR(0.01, 0.002, 0.03, growth=0.5, cooldown=1)
    for loss in losses:
        lr = policy.get_adapted_lr(offset + scale * rng.standard_normal((batch, 3)), loss)
        assert 0.002 <= lr <= 0.03
        assert 0.0 <= policy.noise_fraction <= 1.0


def test_numpy_and_torch_drive_the_policy_identically():
    rng = np.random.default_rng(6)
    batches = [0.3 * k + rng.standard_normal((8, 4)) for k in range(10)]
    losses = [float(x) for x in rng.uniform(1.0, 2.0, 10)]
    a, b = NoiseAdaptiveLR(0.01), NoiseAdaptiveLR(0.01)
    lr_np = [a.get_adapted_lr(g, loss) for g, loss in zip(batches, losses)]
    lr_t = [b.get_adapted_lr(torch.from_numpy(g), torch.tensor(loss)) for g, loss in zip(batches, losses)]
    assert lr_np == lr_t
    assert len(set(lr_np)) > 5  # the rate moved


def test_noise_fraction_is_a_ratio_of_averages():
    rng = np.random.default_rng(7)
    policy = NoiseAdaptiveLR(0.01, noise_beta=0.5)
    stats = [NoiseEstimator().noise_statistics(k + rng.standard_normal((6, 3))) for k in range(3)]
    for s in stats:
        policy.adapt_from_statistics(s, 1.0)
    w = [0.5 * 0.25, 0.5 * 0.5, 0.5]  # EMA weights of the three batches
    noise = sum(wi * s.mean_noise_power for wi, s in zip(w, stats))
    energy = sum(wi * s.mean_grad_sq_norm for wi, s in zip(w, stats))
    assert policy.noise_fraction == pytest.approx(noise / energy, rel=1e-12)


def test_policy_state_round_trip_continues_identically():
    rng = np.random.default_rng(8)
    batches = [0.2 * k + rng.standard_normal((6, 3)) for k in range(30)]
    losses = rng.uniform(0.0, 3.0, 30)
    a = NoiseAdaptiveLR(0.05, cooldown=2, window=3)
    for g, loss in zip(batches[:15], losses[:15]):
        a.get_adapted_lr(g, loss)
    b = NoiseAdaptiveLR(0.05, cooldown=2, window=3)
    b.load_state_dict(a.state_dict())
    assert b.last_statistics == a.last_statistics
    assert [a.get_adapted_lr(g, x) for g, x in zip(batches[15:], losses[15:])] == [
        b.get_adapted_lr(g, x) for g, x in zip(batches[15:], losses[15:])
    ]
    with pytest.raises(ValueError, match="hyperparameters"):
        NoiseAdaptiveLR(0.05, cooldown=3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="expected a dict with keys"):
        b.load_state_dict({"lr": 1.0})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(base_lr=0.0), r"Invalid base_lr: 0\.0"),
        (dict(base_lr=-1.0), "Invalid base_lr"),
        (dict(base_lr=float("inf")), "Invalid base_lr"),
        (dict(base_lr=0.1, min_lr=0.2), r"min_lr <= base_lr <= max_lr"),
        (dict(base_lr=0.1, max_lr=0.05), r"min_lr <= base_lr <= max_lr"),
        (dict(base_lr=0.1, min_lr=0.0), "Invalid min_lr"),
        (dict(base_lr=0.1, growth=0.0), "Invalid growth"),
        (dict(base_lr=0.1, decrease_factor=0.0), "Invalid decrease_factor"),
        (dict(base_lr=0.1, decrease_factor=1.5), "Invalid decrease_factor"),
        (dict(base_lr=0.1, noise_beta=1.0), "Invalid noise_beta"),
        (dict(base_lr=0.1, cooldown=-1), "Invalid cooldown"),
        (dict(base_lr=0.1, rise_tolerance=-0.5), "Invalid rise_tolerance"),
        (dict(base_lr=0.1, alpha=1.0), "Invalid alpha"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseAdaptiveLR(**kwargs)


def test_bad_types_and_policy_inputs():
    with pytest.raises(TypeError, match="cooldown must be an int"):
        NoiseAdaptiveLR(0.1, cooldown=1.5)
    with pytest.raises(TypeError, match="base_lr must be a real number"):
        NoiseAdaptiveLR("0.1")
    with pytest.raises(TypeError, match="estimator must be a NoiseEstimator"):
        NoiseAdaptiveLR(0.1, estimator=object())
    policy = NoiseAdaptiveLR(0.1)
    with pytest.raises(ValueError, match="Invalid noise_fraction: 1.5"):
        policy.update_policy(1.5, 1.0)
    with pytest.raises(ValueError, match="Invalid loss_deviation"):
        policy.update_policy(0.5, 1.0, -1.0)
    with pytest.raises(ValueError, match="gradients has batch_size 1"):
        policy.get_adapted_lr(np.ones((1, 3)), 1.0)
    with pytest.raises(TypeError, match="statistics must be NoiseStatistics"):
        policy.adapt_from_statistics({"batch_size": 2}, 1.0)
    with pytest.raises(ValueError, match="statistics.trace_row_covariance must be finite"):
        policy.adapt_from_statistics(NoiseStatistics(2, 3, 1, 1.0, float("nan")), 1.0)
    with pytest.raises(ValueError, match="Invalid loss: nan"):
        policy.get_adapted_lr(np.ones((3, 2)), float("nan"))
    assert policy.num_updates == 0 and policy.smoother.num_updates == 0 and policy.lr == 0.1
