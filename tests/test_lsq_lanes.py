"""Jacobians from forward lanes (fastopt.lm.forward_lanes) against torch.func.jacfwd, op by op,
in float64 and float32; the fallback to jacfwd for what lanes do not cover; and least_squares /
curve_fit with lanes against jacfwd and scipy on batches whose problems stop at different
iterations or fail."""

import math

import numpy as np
import pytest
import torch
from torch.func import jacfwd

from fastopt.lm import curve_fit, least_squares
from fastopt.lm.batched_jacobian import Evaluator, ProblemData
from fastopt.lm.forward_lanes import LaneDual, Unsupported, lanes_input, lanes_output
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks

F64 = torch.float64
T = torch.linspace(0.1, 2.0, 9, dtype=F64)
W = torch.linspace(-1.0, 1.0, 5 * 9, dtype=F64).reshape(5, 9)
L = torch.tril(torch.ones(9, 9, dtype=F64)) + 2 * torch.eye(9, dtype=F64)


def _t(p):
    return T.to(p.dtype)


# Each maps p (B, 5) to (B, 9); p is drawn in (0.5, 1.5) so that logs, roots and quotients are defined.
FUNCTIONS = {
    "gaussian_slices": lambda p: gaussian_peak(_t(p), p[:, :4]),
    "unbind": lambda p: (lambda a, b, c, d, e: a[:, None] * torch.exp(-b[:, None] * _t(p)) + c[:, None])(*p.unbind(-1)),
    "select_and_transpose": lambda p: p.T[0][:, None] * _t(p) + p[:, 4].unsqueeze(-1) ** 2,
    "split_chunk": lambda p: torch.cat(
        [p.split(2, -1)[0] * 3.0, p.chunk(5, -1)[3] - _t(p)[:6], torch.narrow(p, 1, 1, 0 + 1) / 2], -1
    ),
    "unary": lambda p: torch.stack(
        [
            torch.sin(p[:, 0]),
            torch.cos(p[:, 1]).tanh(),
            torch.sigmoid(p[:, 2]) + torch.atan(p[:, 3]),
            torch.log(p[:, 4]) * torch.log1p(p[:, 0]),
            torch.sqrt(p[:, 1]) - p[:, 2].rsqrt(),
            torch.exp2(p[:, 3]) + torch.expm1(p[:, 4]),
            torch.erf(p[:, 0]) * torch.erfc(p[:, 1]),
            torch.sinh(p[:, 2]) / torch.cosh(p[:, 3]),
            (p[:, 4] - 1).abs() + torch.square(p[:, 0]) + torch.reciprocal(p[:, 1]) + torch.tan(0.5 * p[:, 2]),
        ],
        -1,
    ),
    "inverse_trig_and_logs": lambda p: torch.stack(
        [torch.asin(p[:, 0] / 2), torch.acos(p[:, 1] / 2), torch.log2(p[:, 2]), torch.log10(p[:, 3])]
        + [torch.atan2(p[:, 4], p[:, 0])] * 5,
        -1,
    ),
    "powers": lambda p: (
        (p[:, 0:1] * _t(p)) ** 3
        + 2.0 ** (p[:, 1:2] * _t(p))
        + _t(p) ** p[:, 2:3]
        + p[:, 3:4].pow(p[:, 4:5])
        + (p[:, 0:1] - _t(p)).pow(2)
    ),
    "arithmetic_both_sides": lambda p: (
        1
        - p[:, :1] * _t(p)
        + _t(p) / p[:, 1:2]
        - p[:, 2:3] / _t(p)
        + 2 / p[:, 3:4]
        - (_t(p) - p[:, 4:5]) * (_t(p) - p[:, 4:5])
    ),
    "same_operand": lambda p: (lambda z: z * z + z / z + z - z)(p[:, :1] * _t(p) + p[:, 1:2]),
    "where_clamp": lambda p: (
        torch.where(_t(p) > 1.0, p[:, :1] * _t(p), p[:, 1:2] ** 2)
        + torch.clamp(p[:, 2:3] * _t(p), 0.3, 1.7)
        + (p[:, 3:4] * _t(p)).clamp_min(0.8)
        + (p[:, 4:5] - _t(p)).clamp(max=0.0)
    ),
    "matmul": lambda p: p @ W.to(p.dtype) + (p[:, :3, None] @ p[:, None, :3]).flatten(1)[:, :9],
    "reductions_and_shapes": lambda p: (
        (p[:, :, None] * _t(p)).sum(1)
        + p.mean(-1, keepdim=True)
        + p.cumsum(-1)[:, -1:]
        + p.reshape(-1, 5, 1).transpose(1, 2).reshape(-1, 5).flip(-1)[:, :1]
        + p.unsqueeze(1).expand(-1, 9, -1)[..., 2]
    ),
    "constants_and_comparisons": lambda p: (
        p[:, :1] * torch.ones_like(p[:, :1]) * (p[:, 1:2] > 1).to(p.dtype)
        + torch.sign(p[:, 2:3] - 1) * _t(p)
        + p[:, 3:4].detach() * p[:, 4:5]
    ),
    "triangular_solve": lambda p: torch.linalg.solve_triangular(
        L.to(p.dtype), (p[:, :1] * _t(p)).unsqueeze(-1), upper=False
    ).squeeze(-1),
    "independent_of_some": lambda p: p[:, 1:2] * _t(p),
    "multi_column_views": lambda p: (
        p[:, [0, 2, 2]] @ W[:3].to(p.dtype)
        + p.T.contiguous()[1:3].T.sum(-1, keepdim=True)
        + p.unsqueeze(-1).movedim(1, 2)[:, :, 3:5].flatten(1)[:, :1] * p.unbind(1)[4][:, None]
    ),
}


def _jacfwd(fn, p):
    def shifted(v):
        r = fn(p + v)
        return r, r

    jac, value = jacfwd(shifted, has_aux=True)(torch.zeros_like(p[0]))
    return value, jac


def _points(batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(batch, 5, generator=gen, dtype=F64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_lanes_jacobian_matches_jacfwd(name, dtype):
    fn = FUNCTIONS[name]
    p = _points(7, dtype)
    value, jac = lanes_output(fn(lanes_input(p)), 5)
    ref_value, ref_jac = _jacfwd(fn, p)
    assert value.dtype == jac.dtype == dtype and jac.shape == (7, 9, 5)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(value, ref_value, **tol)
    torch.testing.assert_close(jac, ref_jac, **tol)


def test_zero_lanes_stay_none():
    """A residual that depends on one parameter carries one lane: the others are never computed."""
    out = FUNCTIONS["independent_of_some"](lanes_input(_points(3, F64)))
    assert isinstance(out, LaneDual)
    assert [u is not None for u in out.lanes] == [False, True, False, False, False]
    gauss = FUNCTIONS["gaussian_slices"](lanes_input(_points(3, F64)))
    assert [u is not None for u in gauss.lanes] == [True, True, True, True, False]
    # the offset's lane is the constant 1.0 of the column it was sliced as: no tensor
    assert gauss.lanes[3] == 1.0 and not torch.is_tensor(gauss.lanes[3])


@pytest.mark.parametrize(
    "fn",
    [
        lambda p: torch.nn.functional.softplus(p[:, :1] * T),  # a function lanes do not cover
        lambda p: torch.special.i0(p[:, :1] * T),
        lambda p: (lambda z: z.add_(1.0))(p[:, :1] * T),  # in place
        lambda p: p[:, :1] * T * float(p[0, 1]),  # a value leaves the tensor world
    ],
)
def test_unsupported_operations_raise_and_the_evaluator_falls_back_to_jacfwd(fn):
    p = _points(4, F64)
    with pytest.raises((Unsupported, AttributeError)):
        fn(lanes_input(p))
    evaluator = Evaluator(lambda x: fn(x), "lanes", single=False)
    value, jac = evaluator.residuals_and_jacobian(p, ProblemData((), {}, None, 4))
    assert evaluator.jac == "jacfwd" and evaluator.lanes_fallback
    ref_value, ref_jac = _jacfwd(fn, p)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(jac, ref_jac)


def test_supported_function_keeps_lanes():
    evaluator = Evaluator(FUNCTIONS["unary"], "lanes", single=False)
    evaluator.residuals_and_jacobian(_points(5, F64), ProblemData((), {}, None, 5))
    assert evaluator.jac == "lanes" and evaluator.lanes_fallback is None


def _peaks_with_a_failure(batch, dtype):
    """Gaussian peaks, some started far away (more iterations), one with a nonfinite start."""
    t, y, p0, _ = gaussian_peaks(batch, F64, seed=3)
    p0 = p0.clone()
    p0[::3, 2] = 2.5  # a wide start: these problems need more iterations
    p0[1, 2] = 0.0  # width 0: residuals are not finite at x0 (status -1)
    return t.to(dtype), y.to(dtype), p0.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 37, 301])
def test_least_squares_with_lanes_takes_jacfwds_steps(dtype, batch):
    t, y, p0 = _peaks_with_a_failure(max(batch, 2), dtype)
    t, y, p0 = t, y[:batch], p0[:batch]

    def fn(p, yb):
        return gaussian_peak(t, p) - yb

    lanes = least_squares(fn, p0, args=(y,), jac="lanes", return_jac=True)
    ref = least_squares(fn, p0, args=(y,), jac="jacfwd", return_jac=True)
    # The two Jacobians round differently (about 1e-16 relative), which can move a problem across
    # a stopping threshold (xtol met one iteration earlier or later, status 2 <-> 4): compare the
    # outcome, not the bits.
    assert torch.equal(lanes.status > 0, ref.status > 0) and torch.equal(lanes.status == -1, ref.status == -1)
    ok = ref.status > 0
    if dtype == F64:
        assert int((lanes.nfev - ref.nfev).abs().max()) <= 2
        torch.testing.assert_close(lanes.x[ok], ref.x[ok], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(lanes.jac[ok], ref.jac[ok], rtol=1e-7, atol=1e-7)
    else:  # float32 paths part by rounding near the stopping thresholds, to the same minima
        assert abs(float(lanes.nfev.double().mean() / ref.nfev.double().mean()) - 1) < 0.1
    cost = 0.5 * ((gaussian_peak(t.double(), lanes.x.double()) - y.double()) ** 2).sum(-1)
    ref_cost = 0.5 * ((gaussian_peak(t.double(), ref.x.double()) - y.double()) ** 2).sum(-1)
    torch.testing.assert_close(cost[ok], ref_cost[ok], rtol=1e-9 if dtype == F64 else 1e-6, atol=0)
    if batch > 1:
        assert int(lanes.status[1]) == -1 and torch.equal(lanes.x[1], p0[1])
        assert lanes.nfev[ok].min() < lanes.nfev[ok].max()


def test_single_problem_with_lanes_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t, y, p0, _ = gaussian_peaks(1, F64, seed=5)

    def g(x, a, mu, s, c):
        return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c

    ref, _ = scipy_optimize.curve_fit(g, t.numpy(), y[0].numpy(), p0=p0[0].numpy())
    popt, pcov = curve_fit(lambda x, p: gaussian_peak(x, p), t, y[0], p0[0])
    np.testing.assert_allclose(popt.numpy(), ref, rtol=1e-6, atol=1e-8)
    assert pcov.shape == (4, 4) and bool(torch.isfinite(pcov).all())


def test_curve_fit_cost_matches_scipy_with_lanes_in_both_dtypes():
    """Odd batch, problems converging at different iterations: every final cost is scipy's or lower."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t, y, p0, _ = gaussian_peaks(53, F64, seed=11)

    def g(x, a, mu, s, c):
        return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c

    ref = np.stack([scipy_optimize.curve_fit(g, t.numpy(), y[b].numpy(), p0=p0[b].numpy())[0] for b in range(53)])
    ref_cost = 0.5 * ((gaussian_peak(t, torch.from_numpy(ref)) - y) ** 2).sum(-1)
    for dtype, rtol in ((F64, 1e-9), (torch.float32, 1e-6)):
        popt, _, info, _, ier = curve_fit(
            lambda x, p: gaussian_peak(x, p), t.to(dtype), y.to(dtype), p0.to(dtype), full_output=True
        )
        cost = 0.5 * ((gaussian_peak(t, popt.double()) - y) ** 2).sum(-1)
        assert bool((ier > 0).all())
        assert bool((cost <= ref_cost * (1 + rtol)).all()), (cost / ref_cost - 1).max()
        assert info["nfev"].min() < info["nfev"].max()
        assert not math.isnan(float(cost.sum()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_covariance_from_normal_equations_is_the_jacobian_route(dtype):
    """inv(J^T J) where J^T J is well conditioned; the Jacobian route (scipy's pinv) for the rest,
    evaluated only for those problems."""
    from fastopt.lm.curve_fitting import covariance_from_jacobian, covariance_from_normal_equations

    gen = torch.Generator().manual_seed(7)
    jac = torch.randn(9, 21, 3, generator=gen, dtype=F64)
    jac[4, :, 2] = jac[4, :, 1]  # rank deficient
    jac[6, :, 0] *= 1e-9  # badly scaled: cond(J^T J) ~ 1e18
    jac = jac.to(dtype)
    jtj = jac.mT @ jac
    asked = []

    def jacobian_at(index):
        asked.append(index.tolist())
        return jac[index]

    pcov = covariance_from_normal_equations(jtj, 21, jacobian_at)
    ref = covariance_from_jacobian(jac.double())
    assert asked == [[4, 6]]
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-6)
    keep = [b for b in range(9) if b not in (4, 6)]
    torch.testing.assert_close(pcov[keep].double(), ref[keep], **tol)
    torch.testing.assert_close(pcov[[4, 6]], covariance_from_jacobian(jac[[4, 6]]))


def test_solving_in_blocks_gives_the_same_result(monkeypatch):
    """A batch larger than the solver block (here 16 problems of an odd 53) is solved block after
    block, per-problem data and bounds sliced with it: the same result as one block."""
    import fastopt.lm.nonlinear_lsq as nonlinear_lsq

    t, y, p0 = _peaks_with_a_failure(53, F64)
    lb = torch.full_like(p0, -5.0)
    lb[::2, 0] = 0.0  # bounds that differ between problems
    ub = torch.full_like(p0, 5.0)

    def fn(p, yb):
        return gaussian_peak(t, p) - yb

    whole = least_squares(fn, p0, args=(y,), bounds=(lb, ub), return_jac=True)
    monkeypatch.setattr(nonlinear_lsq, "_SOLVE_BLOCK", (16, 16))
    blocks = least_squares(fn, p0, args=(y,), bounds=(lb, ub), return_jac=True)
    for field in ("x", "cost", "fun", "jac", "grad", "optimality", "status", "nfev", "active_mask"):
        torch.testing.assert_close(getattr(blocks, field), getattr(whole, field), rtol=0, atol=0, equal_nan=True)
    assert int(blocks.status[1]) == -1
