"""fastopt.lm.curve_fit against scipy.optimize.curve_fit: popt and pcov, sigma as standard
deviations and as covariance, absolute_sigma, bounds, batches, undefined covariance, failures,
errors."""

import math
import warnings

import numpy as np
import pytest
import torch

from fastopt.lm import OptimizeWarning, curve_fit
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks

scipy_optimize = pytest.importorskip("scipy.optimize")
F64 = torch.float64


def decay(x, p):
    return p[..., 0:1] * torch.exp(-p[..., 1:2] * x) + p[..., 2:3]


def decay1(x, p):  # one problem: p (P,), returns (M,)
    return p[0] * torch.exp(-p[1] * x) + p[2]


def decay_np(x, a, b, c):
    return a * np.exp(-b * x) + c


def decay_jac_np(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], -1)


def _data(seed=0, m=50):
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 4, m, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * x) + 0.5 + 0.05 * torch.randn(m, generator=gen, dtype=F64)
    sigma = 0.03 + 0.05 * torch.rand(m, generator=gen, dtype=F64)
    a = 0.01 * torch.randn(m, m, generator=gen, dtype=F64)
    cov = a @ a.T + torch.diag(sigma**2)
    return x, y, sigma, cov


P0 = [1.0, 1.0, 0.0]
# Both solvers run to the minimum, so that popt and pcov can be compared to rounding; the test
# with default tolerances below compares at the accuracy those give.
TIGHT = dict(ftol=1e-14, xtol=1e-14, gtol=1e-14)


def _scipy_fit(x, y, **kw):
    # scipy with the exact Jacobian, so that its pcov is free of finite-difference error
    return scipy_optimize.curve_fit(decay_np, x.numpy(), y.numpy(), p0=P0, jac=decay_jac_np, **TIGHT, **kw)


def _pcov_formula(popt, x, y, sigma=None, absolute_sigma=False):
    """scipy's definition at scipy's popt: pinv(J^T J) of the transformed residuals, scaled by
    sum(r**2) / (M - P) unless absolute_sigma. (scipy's default method="lm" factorises the
    Jacobian of the iterate before its last step, which puts its own pcov about 1e-6 off this.)"""
    x, y = x.numpy(), y.numpy()
    j, r = decay_jac_np(x, *popt), decay_np(x, *popt) - y
    if sigma is not None:
        sigma = np.asarray(sigma)
        if sigma.ndim == 2:
            chol = np.linalg.cholesky(sigma)
            j, r = np.linalg.solve(chol, j), np.linalg.solve(chol, r)
        else:
            j, r = j / sigma[:, None], r / sigma
    pcov = np.linalg.pinv(j.T @ j)
    return pcov if absolute_sigma else pcov * (r @ r) / (x.size - len(popt))


def _check_pcov(pcov, ref_pcov, popt_ref, x, y, **kw):
    np.testing.assert_allclose(pcov.numpy(), _pcov_formula(popt_ref, x, y, **kw), rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(pcov.numpy(), ref_pcov, rtol=2e-5, atol=1e-14)


@pytest.mark.parametrize(
    "case", ["none", "sigma", "sigma_absolute", "scalar_sigma", "covariance", "covariance_absolute"]
)
def test_single_fit_matches_scipy(case):
    x, y, sigma, cov = _data()
    kw = {
        "none": {},
        "sigma": dict(sigma=sigma),
        "sigma_absolute": dict(sigma=sigma, absolute_sigma=True),
        "scalar_sigma": dict(sigma=0.2),
        "covariance": dict(sigma=cov),
        "covariance_absolute": dict(sigma=cov, absolute_sigma=True),
    }[case]
    popt, pcov = curve_fit(decay1, x, y, P0, **TIGHT, **kw)
    ref_kw = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in kw.items()}
    if case == "scalar_sigma":  # scipy's jac wrapper needs a (M,) sigma; the same thing spelled out
        ref_kw["sigma"] = np.full(y.shape, 0.2)
    sp, sc = _scipy_fit(x, y, **ref_kw)
    np.testing.assert_allclose(popt.numpy(), sp, rtol=1e-7)
    _check_pcov(pcov, sc, sp, x, y, **ref_kw)
    assert popt.shape == (3,) and pcov.shape == (3, 3)


def test_default_tolerances_agree_with_scipy_finite_difference_fit_to_their_accuracy():
    for seed in range(4):
        x, y, _, _ = _data(seed)
        popt, pcov = curve_fit(decay1, x, y, P0)
        sp, sc = scipy_optimize.curve_fit(decay_np, x.numpy(), y.numpy(), p0=P0)
        np.testing.assert_allclose(popt.numpy(), sp, rtol=2e-6)
        np.testing.assert_allclose(pcov.numpy(), sc, rtol=1e-4)


@pytest.mark.parametrize("sigma_kind", ["none", "shared", "per_problem", "covariance"])
def test_batched_fit_matches_scipy_per_problem(sigma_kind):
    batch = 8
    data = [_data(seed) for seed in range(batch)]
    x = data[0][0]
    y = torch.stack([d[1] for d in data])
    sigma = {
        "none": None,
        "shared": data[0][2],
        "per_problem": torch.stack([d[2] for d in data]),
        "covariance": torch.stack([d[3] for d in data]),
    }[sigma_kind]
    popt, pcov = curve_fit(decay, x, y, P0, sigma=sigma, **TIGHT)
    assert popt.shape == (batch, 3) and pcov.shape == (batch, 3, 3)
    for b in range(batch):
        s = None if sigma is None else (sigma if sigma.dim() == 1 else sigma[b]).numpy()
        sp, sc = _scipy_fit(x, y[b], sigma=s)
        np.testing.assert_allclose(popt[b].numpy(), sp, rtol=1e-7)
        _check_pcov(pcov[b], sc, sp, x, y[b], sigma=s)


def test_per_problem_xdata_and_float32_gaussian_peaks():
    t, y, p0, _ = gaussian_peaks(16, torch.float32)
    shift = torch.linspace(-0.5, 0.5, 16).unsqueeze(-1)
    xdata = t + shift  # (B, M): each problem its own grid
    y = gaussian_peak(xdata.double(), p0.double() * 1.1).float() + 0.02 * torch.randn(
        16, t.numel(), generator=torch.Generator().manual_seed(2)
    )
    popt, pcov = curve_fit(lambda x, p: gaussian_peak(x, p), xdata, y, p0)
    assert popt.dtype == pcov.dtype == torch.float32
    for b in range(16):
        g = lambda x, a, mu, s, c: a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c
        sp, sc = scipy_optimize.curve_fit(
            g, xdata[b].double().numpy(), y[b].double().numpy(), p0=p0[b].double().numpy()
        )
        np.testing.assert_allclose(popt[b].double().numpy(), sp, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(pcov[b].double().numpy(), sc, rtol=2e-2, atol=1e-7)


def test_bounded_fit_matches_scipy_trf():
    x, y, sigma, _ = _data(3)
    bounds = ([0.0, 1.4, -1.0], [10.0, 5.0, 1.0])  # binds the decay rate at 1.4
    popt, pcov = curve_fit(decay1, x, y, [1.0, 2.0, 0.0], sigma=sigma, bounds=bounds)
    sp, sc = scipy_optimize.curve_fit(
        decay_np, x.numpy(), y.numpy(), p0=[1.0, 2.0, 0.0], sigma=sigma.numpy(), bounds=bounds, jac=decay_jac_np
    )
    assert popt[1].item() == 1.4 and sp[1] == pytest.approx(1.4)
    np.testing.assert_allclose(popt.numpy(), sp, rtol=1e-6)
    np.testing.assert_allclose(pcov.numpy(), sc, rtol=1e-5)


def test_rank_deficient_jacobian_gives_scipy_pseudo_inverse():
    """A parameter the model ignores: scipy's "trf" branch discards its zero singular value."""
    x, y, _, _ = _data(4)
    f = lambda x_, p: p[0] * torch.exp(-p[1] * x_) + p[2] + 0 * p[3]
    popt, pcov = curve_fit(f, x, y, [1.0, 1.0, 0.0, 0.5])
    sp, sc = scipy_optimize.curve_fit(
        lambda x_, a, b, c, d: decay_np(x_, a, b, c) + 0 * d,
        x.numpy(),
        y.numpy(),
        p0=[1.0, 1.0, 0.0, 0.5],
        method="trf",
        jac=lambda x_, a, b, c, d: np.concatenate([decay_jac_np(x_, a, b, c), np.zeros((x_.size, 1))], -1),
    )
    np.testing.assert_allclose(popt.numpy(), sp, rtol=1e-6)
    np.testing.assert_allclose(pcov.numpy(), sc, rtol=1e-5, atol=1e-12)
    assert pcov[3].abs().max().item() == 0.0


def test_batch_mixing_full_rank_and_rank_deficient_jacobians():
    """One model, per-problem xdata (B, 2, M) that switches a parameter off for problem 1: its
    covariance comes from the SVD path, the others' from the triangular inverse; all as scipy."""
    x, _, _, _ = _data()
    z = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    xdata = torch.stack([x.expand(3, -1), z[:, None] * torch.ones_like(x)], 1)
    ys = torch.stack([_data(seed)[1] for seed in range(3)])

    def f(xd, p):
        grid, zz = xd[:, 0], xd[:, 1]
        return p[:, :1] * torch.exp(-p[:, 1:2] * grid) + p[:, 2:3] + p[:, 3:4] * zz * grid

    popt, pcov = curve_fit(f, xdata, ys, [1.0, 1.0, 0.0, 0.1], **TIGHT)
    for b in range(3):
        zb = float(z[b])
        sp, sc = scipy_optimize.curve_fit(
            lambda x_, a, k, c, d: decay_np(x_, a, k, c) + d * zb * x_,
            x.numpy(),
            ys[b].numpy(),
            p0=[1.0, 1.0, 0.0, 0.1],
            method="trf",
            **TIGHT,
            jac=lambda x_, a, k, c, d: np.concatenate([decay_jac_np(x_, a, k, c), zb * x_[:, None]], -1),
        )
        np.testing.assert_allclose(popt[b].numpy(), sp, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(pcov[b].numpy(), sc, rtol=1e-5, atol=1e-12)
    assert pcov[1, 3].abs().max().item() == 0.0 and pcov[0, 3, 3].item() > 0


def test_undefined_covariance_is_inf_with_a_warning_as_scipy():
    x, y, _, _ = _data(5, m=3)
    f2 = lambda x_, p: p[0] * x_ + p[1] * x_**2 + p[2]  # 3 points, 3 parameters: exact fit
    with pytest.warns(OptimizeWarning, match="Covariance of the parameters could not be estimated"):
        popt, pcov = curve_fit(f2, x, y, [0.0, 0.0, 0.0])
    with pytest.warns(scipy_optimize.OptimizeWarning):
        sp, sc = scipy_optimize.curve_fit(
            lambda x_, a, b, c: a * x_ + b * x_**2 + c, x.numpy(), y.numpy(), p0=[0.0, 0.0, 0.0]
        )
    assert bool(torch.isinf(pcov).all()) and np.isinf(sc).all()
    np.testing.assert_allclose(popt.numpy(), sp, rtol=1e-6, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, pcov_abs = curve_fit(f2, x, y, [0.0, 0.0, 0.0], absolute_sigma=True)  # defined: no scaling
    assert bool(torch.isfinite(pcov_abs).all())


def test_batched_covariance_warning_counts_problems():
    x = torch.linspace(0, 1, 3, dtype=F64)
    y = torch.stack([x, 2 * x, x**2])
    with pytest.warns(OptimizeWarning, match="for 3 of 3 problems"):
        curve_fit(lambda x_, p: p[:, :1] * x_ + p[:, 1:2] * x_**2 + p[:, 2:], x, y, [0.0, 0.0, 0.0])


def test_failures_raise_alone_and_warn_in_a_batch():
    x, y, _, _ = _data(6)
    with pytest.raises(RuntimeError, match="Optimal parameters not found: The maximum number of function"):
        curve_fit(decay1, x, y, P0, maxfev=2)
    with pytest.warns(OptimizeWarning, match=r"Optimal parameters not found for 2 of 2 problems"):
        popt, pcov, info, mesg, ier = curve_fit(decay, x, torch.stack([y, y]), P0, max_nfev=2, full_output=True)
    assert ier.tolist() == [0, 0] and info["nfev"].tolist() == [2, 2] and mesg[0].startswith("The maximum")


def test_full_output():
    x, y, sigma, _ = _data(7)
    popt, pcov, info, mesg, ier = curve_fit(decay1, x, y, P0, sigma=sigma, full_output=True)
    np.testing.assert_allclose(info["fvec"].numpy(), ((decay1(x, popt) - y) / sigma).numpy(), rtol=1e-12, atol=1e-14)
    assert int(ier) in (1, 2, 3, 4) and isinstance(mesg, str) and int(info["nfev"]) >= 1


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(p0=None), ValueError, "p0 is required"),
        (dict(method="trf"), ValueError, "Invalid method: 'trf'"),
        (dict(sigma=torch.ones(7, dtype=F64)), ValueError, r"`sigma` has incorrect shape \(7,\)"),
        (dict(sigma=-torch.eye(50, dtype=F64)), ValueError, "`sigma` must be positive definite."),
        (dict(sigma=torch.zeros(50, dtype=F64)), ValueError, "sigma must be finite and nonzero"),
        (dict(ydata=torch.zeros(2, 3, 4, dtype=F64)), ValueError, r"ydata must have shape \(B, M\) or \(M,\)"),
        (dict(p0=torch.zeros(2, 3, dtype=F64)), ValueError, r"p0 must have shape \(P,\) for one problem"),
        (dict(args=(1,)), TypeError, r"unexpected keyword argument\(s\) \['args'\]"),
        (dict(max_nfev=5, maxfev=5), ValueError, "give max_nfev or maxfev, not both"),
        (dict(ydata=torch.full((50,), math.nan, dtype=F64)), ValueError, "ydata must not contain NaN or inf"),
        (dict(f=3), TypeError, "f must be callable"),
    ],
)
def test_bad_arguments_raise_naming_them(call, error, match):
    x, y, _, _ = _data()
    kw = dict(f=decay1, xdata=x, ydata=y, p0=P0)
    kw.update(call)
    with pytest.raises(error, match=match):
        curve_fit(kw.pop("f"), kw.pop("xdata"), kw.pop("ydata"), kw.pop("p0"), **kw)


def test_batched_p0_shape_is_checked():
    x, y, _, _ = _data()
    with pytest.raises(ValueError, match=r"p0 must have shape \(P,\) or \(B, P\) = \(2, P\)"):
        curve_fit(decay, x, torch.stack([y, y]), torch.zeros(3, 3, dtype=F64))


@pytest.mark.parametrize("sigma_kind", ["sigma", "covariance"])
def test_user_jacobian(sigma_kind):
    x, y, sigma, cov = _data(8)
    s = sigma if sigma_kind == "sigma" else cov

    def jac(x_, p):
        e = torch.exp(-p[1] * x_)
        return torch.stack([e, -p[0] * x_ * e, torch.ones_like(x_)], -1)

    popt, pcov = curve_fit(decay1, x, y, P0, sigma=s, jac=jac, **TIGHT)
    popt_auto, pcov_auto = curve_fit(decay1, x, y, P0, sigma=s, **TIGHT)
    sp, sc = _scipy_fit(x, y, sigma=s.numpy())
    np.testing.assert_allclose(popt.numpy(), sp, rtol=1e-7)
    _check_pcov(pcov, sc, sp, x, y, sigma=s.numpy())
    torch.testing.assert_close(pcov, pcov_auto, rtol=1e-9, atol=1e-15)


def test_shared_xdata_as_long_as_the_batch():
    t, y, p0, _ = gaussian_peaks(64, m=64)  # B == M: xdata (M,) is still shared
    popt, pcov = curve_fit(lambda x, p: gaussian_peak(x, p), t, y, p0)
    assert popt.shape == (64, 4) and bool(torch.isfinite(pcov).all())
    ref = [
        scipy_optimize.curve_fit(
            lambda x, a, mu, s, c: a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c, t.numpy(), y[b].numpy(), p0=p0[b].numpy()
        )[0]
        for b in range(0, 64, 8)
    ]
    np.testing.assert_allclose(popt[::8].numpy(), np.stack(ref), rtol=1e-5, atol=1e-6)
