"""The step ops of least_squares' iteration, lsq_propose and lsq_update: the cpu backend
(csrc/lsq_step_cpu.cpp) against fastopt.reference over odd shapes, bounds, every option and
non-finite input; whole solves on each backend; the rounding floor of the ftol test in float32;
errors naming the argument."""

import math

import pytest
import torch
from lsq_problems import MGH

from fastopt import backends
from fastopt.lm import curve_fit, least_squares
from fastopt.lm.workloads import gaussian_peak, gaussian_peaks
from fastopt.reference import lsq_propose_reference, lsq_update_reference
from fastopt.reference.batched_lsq import LSQ_RUNNING

F64 = torch.float64
OPS = ("lsq_propose", "lsq_update")
CPU = pytest.param(
    "cpu",
    marks=pytest.mark.skipif(
        not backends.available("cpu", "lsq_update"), reason=str(backends.why_not("cpu", "lsq_update"))
    ),
)
# float64: both do the same arithmetic but the C++ op in double with its own summation order;
# float32: the C++ op computes in double and rounds once, the reference rounds every operation.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def _state(batch, n, dtype, bounded, seed, broadcast_bounds=False):
    """A batch of LM states that reaches every branch: Cholesky failures (indefinite J^T J),
    frozen parameters on bounds, damping from 1e-6 to 1e8 (steps from large to below rounding),
    problems already stopped, non-finite evaluations."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    jac = randn(batch, n + 3, n) * (10 ** (2 * rand(batch, 1, n) - 1))
    res = randn(batch, n + 3)
    jtj = jac.transpose(1, 2) @ jac
    jtj[::7] = -torch.eye(n, dtype=F64)  # indefinite, and (lam below) too little damping: no factor
    g = (jac.transpose(1, 2) @ res.unsqueeze(-1)).squeeze(-1)
    x = randn(batch, n)
    if bounded:
        lb = x - rand(batch, n)
        ub = x + rand(batch, n)
        on_lower, on_upper = rand(batch, n) < 0.2, rand(batch, n) < 0.2
        x = torch.where(on_lower, lb, torch.where(on_upper & ~on_lower, ub, x))
        if broadcast_bounds:  # (P,) bounds broadcast: stride-0 views, as least_squares passes them
            lb = torch.full((n,), -1.5, dtype=F64).expand(batch, n)
            ub = torch.full((n,), 1.5, dtype=F64).expand(batch, n)
            x = x.clamp(-1.5, 1.5)
        frozen = ((x <= lb) & (g > 0)) | ((x >= ub) & (g < 0))
    else:
        lb = torch.full((batch, n), -math.inf, dtype=F64)
        ub = torch.full((batch, n), math.inf, dtype=F64)
        frozen = torch.zeros(batch, n, dtype=torch.bool)
    scale = torch.diagonal(jtj, dim1=-2, dim2=-1).abs() + 0.1
    lam = 10 ** (14 * rand(batch) - 6)
    lam[::7] = 1e-3
    cost = 0.5 * (res * res).sum(-1) + 1.0
    cast = dict(x=x, jtj=jtj, g=g, lam=lam, scale=scale, lb=lb, ub=ub, cost=cost)
    out = {k: t.to(dtype) for k, t in cast.items()}
    out["frozen"] = frozen
    return out


def _trial(st, dtype, n, seed):
    """The evaluation at a trial point: costs whose reductions span the gain ratios and the
    rounding-level changes the ftol tests look at, some non-finite; stopped problems."""
    gen = torch.Generator().manual_seed(seed + 1)
    batch = st["x"].shape[0]
    x_new, step, solved = lsq_propose_reference(
        *(st[k] for k in ("x", "jtj", "g", "lam", "scale", "frozen", "lb", "ub")), bounded=True
    )
    half_as = (st["jtj"].double() * step.double().unsqueeze(-2)).sum(-1)
    predicted = -(step.double() * (st["g"].double() + 0.5 * half_as)).sum(-1)
    ratios = torch.tensor([-3.0, 1e-6, 0.3, 0.9, 1.7, 2.6, 40.0], dtype=F64)
    rel = torch.tensor([0.0, 3e-16, -5e-15, 2e-9, -3e-7, 1e-6, 2e-5], dtype=F64)  # changes at rounding level
    idx = torch.arange(batch)
    cost = st["cost"].double()
    by_ratio = cost - predicted * ratios[idx % len(ratios)]
    by_rounding = cost * (1 - rel[(idx // 2) % len(rel)])
    cost_new = torch.where(idx % 3 == 0, by_rounding, by_ratio)
    jtj_new = st["jtj"].double() * (1 + 0.1 * torch.rand(batch, 1, 1, generator=gen, dtype=F64))
    g_new = st["g"].double() * torch.rand(batch, 1, generator=gen, dtype=F64)
    colsq_new = torch.diagonal(jtj_new, dim1=-2, dim2=-1).abs() * (0.5 + torch.rand(batch, 1, generator=gen))
    if batch > 17:
        cost_new[5], jtj_new[11, 0, -1], g_new[17, -1], colsq_new[4, 0] = math.nan, math.inf, -math.inf, math.inf
    status = torch.full((batch,), LSQ_RUNNING, dtype=torch.int64)
    status[::9], status[3::13] = 2, -1
    nfev = torch.randint(1, 6, (batch,), generator=gen, dtype=torch.int64)
    return dict(
        status=status,
        nfev=nfev,
        nu=(2.0 ** torch.randint(1, 6, (batch,), generator=gen)).to(dtype),
        x_new=x_new,
        step=step,
        solved=solved,
        cost_new=cost_new.to(dtype),
        jtj_new=jtj_new.to(dtype),
        g_new=g_new.to(dtype),
        colsq_new=colsq_new.to(dtype),
    )


def _assert_same(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape, a.dtype, b.dtype)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype], msg=lambda m: f"{what} output {i}: {m}")
        else:
            bad = (a != b).nonzero().flatten().tolist()
            assert not bad, (
                f"{what} output {i}: {len(bad)} mismatches, first at {bad[:5]}: {a[bad[:5]]} vs {b[bad[:5]]}"
            )


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("batch,n", [(1, 1), (37, 3), (301, 4), (64, 7), (9, 19)])
def test_propose_matches_reference(backend, dtype, bounded, batch, n):
    st = _state(batch, n, dtype, bounded, seed=batch * n)
    args = tuple(st[k] for k in ("x", "jtj", "g", "lam", "scale", "frozen", "lb", "ub"))
    fn = backends.choose("lsq_propose", "cpu", dtype, backend).fn
    want = lsq_propose_reference(*args, bounded=bounded)
    got = fn(*args, bounded=bounded)
    if dtype == torch.float64:
        _assert_same(got, want, dtype, f"lsq_propose {dtype} bounded={bounded}")
    else:
        # the op solves in double and rounds once: the reference in float64 on the same inputs,
        # rounded, to float32's rounding; the float32 reference (float32 LAPACK) to its own
        # error, about cond * eps
        exact = lsq_propose_reference(*(a.double() if a.is_floating_point() else a for a in args), bounded=bounded)
        exact = (exact[0].float(), (exact[0].float() - st["x"]) if bounded else exact[1].float(), exact[2])
        _assert_same(got, exact, dtype, f"lsq_propose {dtype} bounded={bounded} vs float64")
        torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-4)
        assert torch.equal(got[2], want[2])
    if batch >= 7:  # every 7th problem's J^T J is indefinite: both branches taken
        assert bool(want[2].any()) and not bool(want[2].all())
    if bounded:  # every trial point in the box
        assert bool(((got[0] >= st["lb"]) & (got[0] <= st["ub"])).all())


def test_propose_takes_broadcast_bounds():
    st = _state(50, 4, F64, True, seed=3, broadcast_bounds=True)
    args = tuple(st[k] for k in ("x", "jtj", "g", "lam", "scale", "frozen", "lb", "ub"))
    if not backends.available("cpu", "lsq_propose"):
        pytest.skip(backends.why_not("cpu", "lsq_propose"))
    got = backends.choose("lsq_propose", "cpu", F64, "cpu").fn(*args, bounded=True)
    want = lsq_propose_reference(*args, bounded=True)
    contiguous = lsq_propose_reference(*(a.contiguous() for a in args), bounded=True)
    _assert_same(got, want, F64, "broadcast bounds")
    _assert_same(want, contiguous, F64, "reference, broadcast vs contiguous bounds")


UPDATE_OPTIONS = [
    dict(ftol=1e-8, xtol=1e-8, gtol=1e-8, cost_noise=16 * 2.2e-16, max_nfev=5),
    dict(ftol=1.2e-7, xtol=1.2e-7, gtol=0.0, cost_noise=16 * 1.2e-7, max_nfev=4),
    dict(ftol=0.0, xtol=1e-3, gtol=1e-2, cost_noise=1e-6, max_nfev=100),  # ftol off: no rounding floor either
    dict(ftol=1e-3, xtol=0.0, gtol=0.0, cost_noise=0.0, max_nfev=1),
]


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("batch,n", [(37, 3), (301, 4), (64, 7), (27, 1)])
@pytest.mark.parametrize("options", UPDATE_OPTIONS, ids=["default64", "float32", "ftol_off", "max_nfev_1"])
def test_update_matches_reference(backend, dtype, bounded, batch, n, options):
    st = _state(batch, n, dtype, bounded, seed=batch + n)
    st.update(_trial(st, dtype, n, seed=batch))
    names = ("x", "cost", "jtj", "g", "frozen", "status", "nfev", "scale", "lam", "nu", "lb", "ub")
    names += ("x_new", "step", "solved", "cost_new", "jtj_new", "g_new", "colsq_new")
    args = tuple(st[k] for k in names)
    eps = torch.finfo(dtype).eps
    kw = dict(bounded=bounded, lam_min=eps * eps, lam_max=1 / (eps * eps), **options)
    before = [a.clone() for a in args]
    want = lsq_update_reference(*args, **kw)
    got = backends.choose("lsq_update", "cpu", dtype, backend).fn(*args, **kw)
    _assert_same(got, want, dtype, f"lsq_update {dtype} bounded={bounded} {options}")
    for a, b in zip(args, before):  # inputs untouched
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0, atol=0))
    status = want[6]
    # the batch reaches the branches: accepted and rejected, stopped by a tolerance, still running
    accepted = ~torch.isclose(want[0], st["x"]).all(-1) | (want[1] != st["cost"])
    assert bool(accepted.any()) and not bool(accepted.all())
    if options["max_nfev"] > 1:
        assert bool((status == LSQ_RUNNING).any())
    assert bool(((status > 0) & (st["status"] == LSQ_RUNNING)).any())


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ftol_rounding_floor(backend, dtype):
    """A predicted reduction below ftol * F and an actual one at the level of the costs' rounding
    (any sign, so the gain ratio is meaningless) meets ftol when cost_noise covers it, and only then."""
    eps = torch.finfo(dtype).eps
    st = _state(4, 2, dtype, False, seed=5)
    x = st["x"]
    step = 1e-9 * x.abs()
    eye = torch.eye(2, dtype=dtype).expand(4, 2, 2).contiguous()
    # g = -s: predicted reduction |s|^2 / 2 ~ 1e-18, below ftol * F even at ftol = eps
    cost = torch.full((4,), 0.1, dtype=dtype)
    cost_new = cost * (1 + torch.tensor([3.0, -3.0, 30.0, 0.0], dtype=dtype) * eps)
    running = torch.full((4,), LSQ_RUNNING, dtype=torch.int64)
    ones = torch.ones(4, 2, dtype=dtype)
    args = (x, cost, eye, -step, torch.zeros(4, 2, dtype=torch.bool), running, torch.ones(4, dtype=torch.int64))
    args += (ones, torch.ones(4, dtype=dtype), torch.full((4,), 2.0, dtype=dtype), st["lb"], st["ub"])
    args += (x + step, step, torch.ones(4, dtype=torch.bool), cost_new, eye, -step, ones)
    fn = backends.choose("lsq_update", "cpu", dtype, backend).fn
    # ftol at its floor, eps: MINPACK's test then needs |actual| <= eps F
    kw = dict(bounded=False, ftol=eps, xtol=0.0, gtol=0.0, max_nfev=100, lam_min=1e-30, lam_max=1e30)
    for impl in (fn, lsq_update_reference):
        with_floor = impl(*args, cost_noise=16 * eps, **kw)[6]
        without = impl(*args, cost_noise=0.0, **kw)[6]
        # +-3 eps F: within the floor, beyond MINPACK's test; 30 eps F: a real change (|ratio| huge,
        # rejected); 0: MINPACK's own test holds (actual 0 <= ftol F, ratio 0 <= 2)
        assert with_floor.tolist() == [2, 2, LSQ_RUNNING, 2], (impl, with_floor)
        assert without.tolist() == [LSQ_RUNNING, LSQ_RUNNING, LSQ_RUNNING, 2], (impl, without)


def test_float32_stops_by_ftol_without_extra_evaluations():
    """Gaussian peaks in float32: with the rounding floor the fits end by ftol, in no more
    evaluations than float64 takes (without it a third ended by xtol after growing the damping on
    rounding-level rejections: 7.6 evaluations per problem against 6.0), and at costs equal to the
    float64 fits' to float32 rounding."""
    t, y, p0, _ = gaussian_peaks(600, F64, seed=4)
    fits = {}
    for dtype in (torch.float64, torch.float32):
        popt, _, info, _, ier = curve_fit(gaussian_peak, t.to(dtype), y.to(dtype), p0.to(dtype), full_output=True)
        cost = 0.5 * ((gaussian_peak(t, popt.double()) - y) ** 2).sum(-1)
        fits[dtype] = (cost, info["nfev"].double(), ier)
    (c64, n64, _), (c32, n32, s32) = fits[torch.float64], fits[torch.float32]
    assert float(((s32 == 2) | (s32 == 4)).double().mean()) >= 0.97, s32.bincount(minlength=5)
    assert float(n32.mean()) <= float(n64.mean()) + 0.25, (n32.mean(), n64.mean())
    assert float((c32 <= c64 * (1 + 1e-6)).double().mean()) >= 0.99


def _solve(name, backend, dtype):
    fn, x0, _ = MGH[name]
    return least_squares(lambda x: fn(x, torch), torch.tensor(x0, dtype=dtype).repeat(3, 1), backend=backend)


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("name", sorted(MGH))
def test_mgh_solves_match_torch_backend(backend, name):
    a, b = _solve(name, backend, F64), _solve(name, "torch", F64)
    torch.testing.assert_close(a.cost, b.cost, rtol=1e-8, atol=1e-12)
    assert torch.equal(a.status, b.status) and torch.equal(a.nfev, b.nfev), (a.status, b.status, a.nfev, b.nfev)


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["linear", "soft_l1", "cauchy"])
def test_bounded_weighted_fits_match_torch_backend(backend, dtype, loss):
    """Bounds that bind, weights, robust losses, several steps: the same fits on both backends."""
    t, y, p0, _ = gaussian_peaks(203, F64, m=33, seed=2)
    t, y, p0 = t.to(dtype), y.to(dtype), p0.to(dtype)
    lb = torch.tensor([0.0, -0.5, 0.2, -0.1], dtype=dtype)
    ub = torch.tensor([1.5, 0.5, 2.0, 0.1], dtype=dtype)
    p0 = torch.minimum(torch.maximum(p0, lb), ub)
    w = torch.linspace(0.5, 2.0, 33, dtype=dtype)

    def residuals(p, yb):
        return gaussian_peak(t, p) - yb

    kw = dict(args=(y,), bounds=(lb, ub), weights=w, loss=loss, f_scale=0.1)
    a = least_squares(residuals, p0, backend=backend, **kw)
    b = least_squares(residuals, p0, backend="torch", **kw)
    assert bool((a.active_mask != 0).any())  # some bound binds
    rtol = 1e-9 if dtype == F64 else 2e-5
    torch.testing.assert_close(a.cost, b.cost, rtol=rtol, atol=1e-10)
    # float32: rounding differences move some stops by an iteration (94% identical in this batch)
    same = (a.status == b.status) & (a.nfev == b.nfev)
    assert float(same.double().mean()) >= (1.0 if dtype == F64 else 0.85), same.double().mean()


def test_step_ops_are_dispatched_like_the_others():
    assert set(OPS) <= set(backends.OPS)
    for op in OPS:
        assert backends.resolve(op, "cpu", F64, "torch") == "torch"
        assert backends.why_not("torch", op, "cpu", torch.float16) is not None  # least_squares' dtypes only
        if backends.available("cpu", op):
            assert backends.resolve(op, "cpu", torch.float32) == "cpu"


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_bad_inputs_name_them(backend):
    st = _state(5, 3, F64, True, seed=1)
    st.update(_trial(st, F64, 3, seed=1))
    propose = backends.choose("lsq_propose", "cpu", F64, backend).fn
    update = backends.choose("lsq_update", "cpu", F64, backend).fn
    pargs = [st[k] for k in ("x", "jtj", "g", "lam", "scale", "frozen", "lb", "ub")]
    with pytest.raises(ValueError, match=r"lsq_propose: jtj must have shape \[5, 3, 3\]"):
        propose(*pargs[:1], pargs[1][:, :2], *pargs[2:], bounded=True)
    with pytest.raises(TypeError, match="lsq_propose: frozen must be"):
        propose(*pargs[:5], pargs[5].double(), *pargs[6:], bounded=True)
    with pytest.raises(TypeError, match="lsq_propose: x must be float32 or float64"):
        propose(pargs[0].half(), *pargs[1:], bounded=True)
    names = ("x", "cost", "jtj", "g", "frozen", "status", "nfev", "scale", "lam", "nu", "lb", "ub")
    names += ("x_new", "step", "solved", "cost_new", "jtj_new", "g_new", "colsq_new")
    uargs = [st[k] for k in names]
    kw = dict(bounded=True, ftol=1e-8, xtol=1e-8, gtol=1e-8, cost_noise=0.0, max_nfev=10, lam_min=1e-30, lam_max=1e30)
    bad = list(uargs)
    bad[18] = bad[18][:4]
    with pytest.raises(ValueError, match=r"lsq_update: colsq_new must have shape \[5, 3\]"):
        update(*bad, **kw)
    bad = list(uargs)
    bad[5] = bad[5].int()
    with pytest.raises(TypeError, match="lsq_update: status must be"):
        update(*bad, **kw)
    with pytest.raises(ValueError, match="lsq_update: xtol must be >= 0"):
        update(*uargs, **dict(kw, xtol=-1.0))
    with pytest.raises(ValueError, match="lsq_update: max_nfev must be >= 1"):
        update(*uargs, **dict(kw, max_nfev=0))
    with pytest.raises(ValueError, match="lsq_update: lam_min and lam_max must satisfy"):
        update(*uargs, **dict(kw, lam_min=2.0, lam_max=1.0))
