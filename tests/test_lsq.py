"""fastopt.lm.least_squares against scipy.optimize.least_squares: classic test problems one by one
and batched, bounds, weights, robust losses, float32, stopping and status, errors."""

import math

import numpy as np
import pytest
import torch
from lsq_problems import MGH

from fastopt.lm import TERMINATION_MESSAGES, least_squares
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks

scipy_optimize = pytest.importorskip("scipy.optimize")
F64 = torch.float64


def _scipy(fn, x0, **kw):
    return scipy_optimize.least_squares(lambda x: fn(x, np), np.asarray(x0, dtype=float), **kw)


def _scipy_cost_at(fn, x, **kw):
    """scipy's cost (its loss definitions) at x: least_squares stops after its first evaluation."""
    return scipy_optimize.least_squares(lambda z: fn(z, np), np.asarray(x, dtype=float), max_nfev=1, **kw).cost


@pytest.mark.parametrize("name", sorted(MGH))
def test_minpack_problems_match_scipy(name):
    fn, x0, published = MGH[name]
    res = least_squares(lambda x: fn(x, torch), torch.tensor(x0, dtype=F64))
    ref = _scipy(fn, x0)
    assert res.success and ref.success, (res.message, ref.message)
    # Same local minimum: equal or lower cost, to 1e-9 relative (1e-10 absolute for zero-residual problems).
    assert res.cost.item() <= ref.cost * (1 + 1e-9) + 1e-10, (res.cost.item(), ref.cost)
    if published is not None:  # the minimum of sum(f**2) printed in Moré, Garbow and Hillstrom (1981)
        assert 2 * res.cost.item() == pytest.approx(published, rel=1e-5)
    # The reported cost is the cost at the reported x, in scipy's definition. torch and numpy
    # evaluate the residuals with their own exp/sin (an ulp apart, ~1e-16 on O(1) terms); at a
    # zero-residual minimum that is a large relative error of f, so the cost, 0.5 ||f||^2, agrees
    # to ||f|| * 1e-14 absolute rather than relatively (box_3d, cost 1e-20: with numpy 2.4.6 its exp
    # and torch's differ by an ulp on ~5% of inputs).
    scipy_cost = _scipy_cost_at(fn, res.x.numpy())
    assert res.cost.item() == pytest.approx(scipy_cost, rel=1e-12, abs=(2 * scipy_cost) ** 0.5 * 1e-14)
    assert res.x.shape == (len(x0),) and res.fun.shape == fn(np.asarray(x0, float), np).shape
    assert res.message == TERMINATION_MESSAGES[int(res.status)]


def test_batch_of_different_problems_matches_scipy_one_by_one():
    """Rosenbrock from 16 starting points in one batch: each problem as scipy solves it alone, and
    problems that finish early stop changing (fewer evaluations) while the others continue."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(16, 2, generator=gen, dtype=F64) * 1.5
    res = least_squares(lambda x: MGH["rosenbrock"][0](x, torch), x0)
    single = [least_squares(lambda x: MGH["rosenbrock"][0](x, torch), x0[b]) for b in range(16)]
    for b in range(16):
        ref = _scipy(MGH["rosenbrock"][0], x0[b].numpy())
        assert res.cost[b].item() <= ref.cost + 1e-12
        np.testing.assert_allclose(res.x[b].numpy(), ref.x, rtol=1e-6, atol=1e-8)
        # a problem's iterates do not depend on the others in its batch
        assert torch.equal(res.x[b], single[b].x) and res.nfev[b] == single[b].nfev
    assert res.nfev.min() < res.nfev.max()


def _exp_decay_batch(batch, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, 30, dtype=F64)
    p = torch.stack(
        [
            0.5 + 2 * torch.rand(batch, generator=gen, dtype=F64),
            0.2 + 2 * torch.rand(batch, generator=gen, dtype=F64),
            0.4 * torch.rand(batch, generator=gen, dtype=F64),
        ],
        -1,
    )
    y = p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:] + 0.02 * torch.randn(batch, 30, generator=gen, dtype=F64)
    return t.to(dtype), y.to(dtype)


def _exp_residuals(t):
    return lambda p, y: p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:] - y


@pytest.mark.parametrize("compact", [True, False])
def test_batched_exponential_decay_matches_scipy(compact):
    t, y = _exp_decay_batch(40)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(40, 1)
    res = least_squares(_exp_residuals(t), x0, args=(y,), compact=compact, check_every=1 if compact else 3)
    assert res.x.shape == (40, 3) and res.fun.shape == (40, 30) and res.status.shape == (40,)
    for b in range(40):
        ref = scipy_optimize.least_squares(
            lambda p: p[0] * np.exp(-p[1] * t.numpy()) + p[2] - y[b].numpy(), x0[b].numpy()
        )
        assert res.cost[b].item() <= ref.cost * (1 + 1e-9)
        np.testing.assert_allclose(res.x[b].numpy(), ref.x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.fun.numpy(), _exp_residuals(t)(res.x, y).numpy(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_gaussian_peaks_match_scipy_curve_fit_cost(dtype):
    """The benchmark's problem: equal or better cost than scipy on every problem (float32 to
    its precision), with the cost of the float32 solution evaluated in float64."""
    t, y, p0, _ = gaussian_peaks(48, dtype)
    res = least_squares(lambda p, yb: gaussian_peak(t, p) - yb, p0, args=(y,))
    t64, y64 = t.double(), y.double()
    ours = 0.5 * ((gaussian_peak(t64, res.x.double()) - y64) ** 2).sum(-1)
    for b in range(48):
        ref = scipy_optimize.least_squares(
            lambda p: (gaussian_peak(t64, torch.from_numpy(p)) - y64[b]).numpy(), p0[b].double().numpy()
        )
        rtol = 1e-9 if dtype == torch.float64 else 1e-6
        assert ours[b].item() <= ref.cost * (1 + rtol), (b, ours[b].item(), ref.cost)
    assert bool(res.success.all())


def test_per_problem_data_is_sliced_when_finished_problems_are_dropped():
    """Shared data (leading dimension != B) reaches residual_fn unchanged, per-problem data by rows
    of the problems still running, kwargs too; the results do not depend on compaction."""
    t, y = _exp_decay_batch(12)
    seen = []

    def residuals(p, y_rows, t_shared, *, offset):
        seen.append((p.shape[0], y_rows.shape[0], tuple(t_shared.shape), offset.shape[0]))
        return p[:, :1] * torch.exp(-p[:, 1:2] * t_shared) + p[:, 2:] - y_rows + offset

    offset = torch.zeros(12, 1, dtype=F64)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(12, 1)
    a = least_squares(residuals, x0, args=(y, t), kwargs={"offset": offset})
    assert all(n == ny == no and ts == (30,) for n, ny, ts, no in seen)
    assert min(n for n, *_ in seen) < 12  # problems were dropped
    b = least_squares(residuals, x0, args=(y, t), kwargs={"offset": offset}, compact=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.nfev, b.nfev)


def test_a_shared_grid_as_long_as_the_batch_stays_shared():
    """1-D data is shared even when N == B (the common curve-fit call with as many problems as
    points); per-problem scalars come as (B, 1)."""
    t, y = _exp_decay_batch(30)  # 30 problems, 30 points
    scale = torch.linspace(1, 2, 30, dtype=F64).unsqueeze(-1)  # per problem, (B, 1)

    def residuals(p, y_rows, t_shared, s):
        assert t_shared.shape == (30,) and s.shape == (p.shape[0], 1)
        return (p[:, :1] * torch.exp(-p[:, 1:2] * t_shared) + p[:, 2:] - y_rows) * s

    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(30, 1)
    res = least_squares(residuals, x0, args=(y, t, scale))
    ref = least_squares(lambda p, yb: _exp_residuals(t)(p, yb), x0, args=(y,))
    np.testing.assert_allclose(res.x.numpy(), ref.x.numpy(), rtol=1e-6, atol=1e-8)
    assert bool(res.success.all())


def test_weights_are_scipy_with_sqrt_weighted_residuals():
    t, y = _exp_decay_batch(6)
    w = torch.rand(6, 30, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    w[:, ::5] = 0  # zero weights drop residuals
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(6, 1)
    for weights in (w, w[0]):  # per problem (B, N) and shared (N,)
        res = least_squares(_exp_residuals(t), x0, args=(y,), weights=weights)
        wb = weights.expand(6, 30)
        for b in range(6):
            ref = scipy_optimize.least_squares(
                lambda p: np.sqrt(wb[b].numpy()) * (p[0] * np.exp(-p[1] * t.numpy()) + p[2] - y[b].numpy()),
                x0[b].numpy(),
            )
            assert res.cost[b].item() == pytest.approx(ref.cost, rel=1e-9)
            np.testing.assert_allclose(res.x[b].numpy(), ref.x, rtol=1e-6)
        # fun is residual_fn's output, unweighted
        np.testing.assert_allclose(res.fun.numpy(), _exp_residuals(t)(res.x, y).numpy(), rtol=1e-14, atol=1e-14)


LOSSES = ["soft_l1", "huber", "cauchy", "arctan"]


def _outlier_data(seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, 40, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.05 * torch.randn(40, generator=gen, dtype=F64)
    y[::7] += 1.0
    return t, y


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("f_scale", [0.1, 1.0])
def test_robust_losses_match_scipy(loss, f_scale):
    t, y = _outlier_data(0)

    def fn(p, xp):
        return (
            p[..., 0:1] * xp.exp(-p[..., 1:2] * (t if xp is torch else t.numpy()))
            + p[..., 2:3]
            - (y if xp is torch else y.numpy())
        )

    x0 = [2.0, 1.0, 0.3]
    res = least_squares(
        lambda p: fn(p.unsqueeze(0), torch)[0], torch.tensor(x0, dtype=F64), loss=loss, f_scale=f_scale, return_jac=True
    )
    ref = _scipy(lambda p, xp: fn(p[None], xp)[0], x0, loss=loss, f_scale=f_scale)
    assert res.success and ref.success
    assert res.cost.item() <= ref.cost * (1 + 1e-9)
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-4, atol=1e-4)
    # The same cost, gradient and scaled Jacobian as scipy's at one point (scipy's robust scheme).
    at = scipy_optimize.least_squares(
        lambda p: fn(p[None], np)[0],
        res.x.numpy(),
        loss=loss,
        f_scale=f_scale,
        max_nfev=1,
        jac=lambda p: _exp_jac(p, t.numpy()),
    )
    assert res.cost.item() == pytest.approx(at.cost, rel=1e-12)
    np.testing.assert_allclose(res.jac.numpy(), at.jac, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(res.grad.numpy(), at.grad, rtol=1e-8, atol=1e-12)


def _exp_jac(p, t):
    e = np.exp(-p[1] * t)
    return np.stack([e, -p[0] * t * e, np.ones_like(t)], -1)


def test_callable_loss_is_scipys_callable_loss():
    t, y = _outlier_data(1)

    def my_loss(z):  # a soft_l1 variant written out: (rho, rho', rho'')
        s = 1 + z
        return 2 * ((s**0.5) - 1), s**-0.5, -0.5 * s**-1.5

    fn_t = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y
    fn_n = lambda p: p[0] * np.exp(-p[1] * t.numpy()) + p[2] - y.numpy()
    res = least_squares(fn_t, torch.tensor([2.0, 1.0, 0.3], dtype=F64), loss=my_loss, f_scale=0.5)
    ref = scipy_optimize.least_squares(fn_n, [2.0, 1.0, 0.3], loss=lambda z: np.stack(my_loss(z)), f_scale=0.5)
    assert res.cost.item() <= ref.cost * (1 + 1e-9)
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-5)


@pytest.mark.parametrize(
    "bounds", [([-2.0, -2.0], [0.5, 2.0]), ([-2.0, 1.5], [2.0, 3.0]), ([0.0, -math.inf], [math.inf, 0.5])]
)
def test_bounds_match_scipy_and_hold_at_every_evaluation(bounds):
    lb, ub = (torch.tensor(b, dtype=F64) for b in bounds)
    x0 = torch.clamp(torch.tensor([-1.2, 1.0], dtype=F64), lb, ub)
    evaluated = []

    def rosen(x):
        evaluated.append(x.detach().clone())
        return MGH["rosenbrock"][0](x, torch)

    res = least_squares(rosen, x0, bounds=bounds)
    ref = _scipy(MGH["rosenbrock"][0], x0.numpy(), bounds=bounds)
    assert res.success and ref.success
    assert res.cost.item() <= ref.cost * (1 + 1e-9) + 1e-14
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(res.active_mask.numpy(), ref.active_mask)
    xs = torch.stack([x.reshape(-1, 2) for x in evaluated if x.dim() in (1, 2)])
    assert bool(((xs >= lb) & (xs <= ub)).all()), "residual_fn was evaluated outside the bounds"


def test_per_problem_bounds_hold_exactly_in_float32():
    t, y, p0, _ = gaussian_peaks(32, torch.float32)
    lb = torch.tensor([0.0, -3.0, 0.1, -1.0]).repeat(32, 1)
    ub = torch.tensor([10.0, 3.0, 2.0, 1.0]).repeat(32, 1)
    ub[::2, 2] = 0.35  # half the problems get a width cap that binds for many
    p0 = torch.minimum(torch.maximum(p0, lb), ub)
    res = least_squares(lambda p, yb: gaussian_peak(t, p) - yb, p0, args=(y,), bounds=(lb, ub))
    assert bool(((res.x >= lb) & (res.x <= ub)).all())
    at_cap = res.x[::2, 2] == ub[::2, 2]
    assert bool(at_cap.any()) and bool((res.active_mask[::2, 2][at_cap] == 1).all())
    for b in range(0, 32, 3):
        ref = scipy_optimize.least_squares(
            lambda p: (gaussian_peak(t.double(), torch.from_numpy(p)) - y[b].double()).numpy(),
            p0[b].double().numpy(),
            bounds=(lb[b].double().numpy(), ub[b].double().numpy()),
        )
        ours = 0.5 * ((gaussian_peak(t.double(), res.x[b].double()) - y[b].double()) ** 2).sum()
        assert ours.item() <= ref.cost * (1 + 1e-5)


def test_jacobian_modes_agree_and_match_a_user_jacobian():
    """Forward mode, reverse mode (P > N) and a callable give the same Jacobian at x0."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 6, generator=gen, dtype=F64)

    def fn(x):  # (5, 6) -> (5, 3): more parameters than residuals
        return torch.tanh((a * x.unsqueeze(1)).sum(-1)) + x[:, :3] ** 2

    def jac(x):
        s = (a * x.unsqueeze(1)).sum(-1)
        j = (1 - torch.tanh(s) ** 2).unsqueeze(-1) * a
        j[:, :, :3] += torch.diag_embed(2 * x[:, :3])
        return j

    x0 = torch.randn(5, 6, generator=gen, dtype=F64)
    runs = {mode: least_squares(fn, x0, jac=mode, max_nfev=1, return_jac=True) for mode in ("auto", "jacfwd", "jacrev")}
    runs["callable"] = least_squares(fn, x0, jac=jac, max_nfev=1, return_jac=True)
    for r in runs.values():
        np.testing.assert_allclose(r.jac.numpy(), jac(x0).numpy(), rtol=1e-12, atol=1e-14)
        assert bool((r.status == 0).all()) and bool((r.nfev == 1).all())


def test_status_and_stopping_rules():
    fn = lambda x: MGH["rosenbrock"][0](x, torch)
    at_min = least_squares(fn, torch.tensor([1.0, 1.0], dtype=F64))
    assert int(at_min.status) == 1 and int(at_min.nfev) == 1  # gtol at x0, as scipy
    capped = least_squares(fn, torch.tensor([-1.2, 1.0], dtype=F64), max_nfev=5)
    assert int(capped.status) == 0 and int(capped.nfev) == 5 and not capped.success
    ref = _scipy(MGH["rosenbrock"][0], [-1.2, 1.0], max_nfev=5)
    assert ref.status == 0 and ref.nfev == 5
    loose = least_squares(fn, torch.tensor([-1.2, 1.0], dtype=F64), ftol=1e-2, xtol=None, gtol=None)
    assert int(loose.status) == 2
    xtol_only = least_squares(fn, torch.tensor([-1.2, 1.0], dtype=F64), ftol=None, xtol=1e-3, gtol=None)
    assert int(xtol_only.status) == 3
    # A batch in which one problem starts at its solution: it stops at once, unchanged.
    x0 = torch.tensor([[1.0, 1.0], [-1.2, 1.0]], dtype=F64)
    both = least_squares(fn, x0)
    assert torch.equal(both.x[0], x0[0]) and both.nfev.tolist()[0] == 1 and both.nfev.tolist()[1] > 1
    assert both.message[0] == TERMINATION_MESSAGES[1]


def test_nonfinite_start_is_status_minus_one_in_a_batch_and_an_error_alone():
    fn = lambda x: torch.stack([torch.log(x[..., 0]), x[..., 1] - 2], -1)
    res = least_squares(fn, torch.tensor([[-1.0, 0.0], [2.0, 0.0]], dtype=F64))
    assert res.status.tolist()[0] == -1 and res.nfev.tolist()[0] == 1 and bool(res.success[1])
    assert torch.equal(res.x[0], torch.tensor([-1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="Residuals are not finite in the initial point"):
        least_squares(fn, torch.tensor([-1.0, 0.0], dtype=F64))


def test_failed_cholesky_takes_no_step_and_retries_with_more_damping(monkeypatch):
    """Where the factorisation reports failure the problem stays put for that iteration (one
    more evaluation) and then converges as before; its batch mates are not affected. The torch
    backend's step (torch.linalg.cholesky_ex, patched here); the cpu op's failed factorisations
    are compared with it in tests/test_lsq_step.py."""
    t, y = _exp_decay_batch(3)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(3, 1)
    clean = least_squares(_exp_residuals(t), x0, args=(y,), compact=False, backend="torch")
    real = torch.linalg.cholesky_ex
    calls = []

    def flaky(a, **kw):
        chol, info = real(a, **kw)
        calls.append(1)
        if len(calls) == 1:
            info = info.clone()
            info[1] = 2  # problem 1's first factorisation "fails"
        return chol, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    res = least_squares(_exp_residuals(t), x0, args=(y,), compact=False, backend="torch")
    assert len(calls) > 1 and res.nfev[1] == clean.nfev[1] + 1
    np.testing.assert_allclose(res.x[1].numpy(), clean.x[1].numpy(), rtol=1e-7)
    assert torch.equal(res.x[0], clean.x[0]) and torch.equal(res.x[2], clean.x[2])


def test_float32_runs_in_float32_and_keeps_the_inputs():
    t, y, p0, _ = gaussian_peaks(8, torch.float32)
    p0_copy, y_copy = p0.clone(), y.clone()
    res = least_squares(lambda p, yb: gaussian_peak(t, p) - yb, p0, args=(y,), return_jac=True)
    assert res.x.dtype == res.cost.dtype == res.fun.dtype == res.jac.dtype == torch.float32
    assert torch.equal(p0, p0_copy) and torch.equal(y, y_copy)
    assert bool(res.success.all())


def test_compiled_evaluation_gives_the_eager_result():
    """compile=True: chunks of 8 problems for a batch of 6 (padded), shrinking as problems finish,
    and the compiled Jacobian at the solution."""
    t, y = _exp_decay_batch(6)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(6, 1)
    x0[::2] = torch.tensor([3.0, 0.2, 0.5], dtype=F64)  # uneven finishing times
    fn = _exp_residuals(t)
    eager = least_squares(fn, x0, args=(y,), return_jac=True)
    compiled = least_squares(fn, x0, args=(y,), compile=True, return_jac=True)
    assert eager.nfev.min() < eager.nfev.max()
    np.testing.assert_allclose(compiled.x.numpy(), eager.x.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(compiled.jac.numpy(), eager.jac.numpy(), rtol=1e-10, atol=1e-12)
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.nfev, eager.nfev)


def test_evaluation_in_chunks_gives_the_same_result(monkeypatch):
    import fastopt.lm.nonlinear_lsq as nonlinear_lsq

    t, y = _exp_decay_batch(10)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64).repeat(10, 1)
    whole = least_squares(_exp_residuals(t), x0, args=(y,), return_jac=True)
    monkeypatch.setattr(nonlinear_lsq, "_EAGER_CHUNK", (4, 4))
    chunked = least_squares(_exp_residuals(t), x0, args=(y,), return_jac=True)
    torch.testing.assert_close(chunked.x, whole.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.jac, whole.jac, rtol=1e-12, atol=1e-14)
    assert torch.equal(chunked.nfev, whole.nfev)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x0="abc"), TypeError, "x0 must be"),
        (dict(x0=torch.zeros(2, dtype=torch.int64)), TypeError, "x0 must be float32 or float64"),
        (dict(x0=torch.zeros(2, 3, 4, dtype=F64)), ValueError, r"x0 must have shape \(B, P\) or \(P,\)"),
        (dict(x0=torch.tensor([math.nan, 1.0], dtype=F64)), ValueError, "x0 must only have finite values"),
        (dict(jac="2-point"), ValueError, "Invalid jac: '2-point'"),
        (dict(loss="l1"), ValueError, "Invalid loss: 'l1'. Choose from"),
        (dict(f_scale=0.0), ValueError, "Invalid f_scale: 0.0"),
        (dict(ftol=-1.0), ValueError, "Invalid ftol: -1.0"),
        (dict(ftol=None, xtol=0, gtol=None), ValueError, "At least one of the tolerances"),
        (dict(max_nfev=0), ValueError, "Invalid max_nfev: 0"),
        (dict(check_every=0), ValueError, "Invalid check_every: 0"),
        (dict(backend="fastest"), ValueError, "Invalid backend: 'fastest'"),
        (dict(bounds=(0.0,)), ValueError, r"bounds must be a pair \(lb, ub\)"),
        (dict(bounds=([0.0, 0.0, 0.0], 5.0)), ValueError, "bounds: lb of shape"),
        (dict(bounds=(1.0, 1.0)), ValueError, "Each lower bound must be strictly less than each upper bound"),
        (dict(bounds=(0.0, 5.0)), ValueError, r"x0 is infeasible: outside the bounds in problem\(s\) \[0\]"),
        (dict(weights=torch.ones(3, dtype=F64)), ValueError, r"weights must have shape \(N,\) = \(2,\)"),
        (dict(weights=-torch.ones(2, dtype=F64)), ValueError, "weights must be finite and >= 0"),
        (dict(args=torch.zeros(2)), TypeError, "args must be a tuple or list"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    call = dict(residual_fn=lambda x: MGH["rosenbrock"][0](x, torch), x0=torch.tensor([-1.2, 1.0], dtype=F64))
    call.update(kwargs)
    with pytest.raises(error, match=match):
        least_squares(call.pop("residual_fn"), call.pop("x0"), **call)


def test_bad_residual_functions_raise_naming_them():
    x0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(TypeError, match="residual_fn must be callable"):
        least_squares(None, x0)
    with pytest.raises(ValueError, match=r"residual_fn must return a tensor of shape \(B, N\) = \(3, N\)"):
        least_squares(lambda x: x.sum(-1), x0)
    with pytest.raises(ValueError, match=r"shape \(B, N\) = \(3, N\) with N >= 1, got \(2, 2\)"):
        least_squares(lambda x: x[:2], x0)
    with pytest.raises(TypeError, match="residual_fn must return a tensor"):
        least_squares(lambda x: x.tolist(), x0)
