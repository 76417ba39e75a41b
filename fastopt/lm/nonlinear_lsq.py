"""Batched nonlinear least squares: thousands of independent small problems solved at once by
Levenberg-Marquardt, with scipy.optimize.least_squares's stopping rules, losses and result fields.

Each problem ``b`` minimises ``F(x_b) = 0.5 * sum_i rho(w_bi * f_bi(x_b)**2)`` over a box
``lb_b <= x_b <= ub_b``. Per problem and iteration (all problems advance together as tensors):

1. Gauss-Newton model at ``x``: ``A = J^T J``, ``g = J^T f`` of the weighted residuals, scaled for
   the robust loss as scipy does (:mod:`fastopt.lm.robust`); ``g`` is the exact gradient of F.
2. Step from the damped normal equations ``(A + lam * D) s = -g`` (Marquardt's scaling, as
   MINPACK: ``D = diag`` of the largest squared column norms of the weighted Jacobian seen so
   far, which makes the step invariant to a rescaling of the parameters), solved by Cholesky
   (the backend's ``lsq_propose`` op: csrc/lsq_step_cpu.cpp on CPU, else
   ``torch.linalg.cholesky_ex``). Where a factorisation fails the problem takes no
   step this iteration and its damping grows, as after a rejected step.
3. Bounds by projection with an active set (as scipy's "dogbox"): a parameter sitting on a bound
   whose gradient points out of the box is frozen for the step, the others move, and the trial
   point is clipped to the box, so every iterate satisfies the bounds exactly.
4. Gain ratio ``rho = (F(x) - F(x + s)) / (-(g.s + 0.5 s.A.s))``. Accept when ``rho > 1e-4``
   (MINPACK's threshold); then ``lam *= max(1/3, 1 - (2 rho - 1)**3)``, ``nu = 2``, else
   ``lam *= nu``, ``nu *= 2`` (Nielsen's update, H. B. Nielsen, "Damping parameter in Marquardt's
   method", IMM-REP-1999-05).
5. Stopping, with scipy's meanings, tested after every attempted step: ``ftol`` as scipy's
   method="lm" (MINPACK lmder, which scipy.optimize.curve_fit runs by default): the actual and
   the predicted reduction of the cost are both at most ``ftol * F`` and ``rho <= 2`` (the model
   agrees with the function); ``xtol`` as scipy's "trf"/"dogbox": ``||s|| < xtol * (xtol + ||x||)``;
   ``gtol`` as "dogbox" (and "trf" without bounds): ``||g_free||_inf < gtol`` at the new point,
   components frozen on a bound excluded; ``max_nfev``. A problem that stops keeps its parameters
   while the others continue. MINPACK's ftol test, unlike trf's ``dF < ftol * F and rho > 0.25``,
   also ends on a rejected step whose change is at the level of rounding.
6. The rounding floor of the ftol test. The actual reduction is the difference of two computed
   costs, each a sum of N rounded squares: it is known only to about
   ``cost_noise = 2 * (2 + log2 N) * eps`` relative (16 eps for N = 64). With the predicted
   reduction at most ``ftol * F``, an actual one within ``cost_noise * F`` also meets ftol: its sign
   and the gain ratio are then rounding. MINPACK works in float64, where the floor (3.6e-15 for
   N = 64) lies far below the default ftol and changes nothing; in float32 (16 eps = 1.9e-6 > ftol
   = eps) it is what ends a converged fit: without it, measured on 2,000 Gaussian peaks, 35% of the
   float32 fits rejected rounding-level steps, grew the damping and stopped by xtol, 7.6
   evaluations per problem against float64's 6.0; with it 5.7, at the same final costs
   (bench/results/lsq_profile_cpu.md).

Steps 2 to 5 are the backend's ``lsq_propose`` and ``lsq_update`` ops
(fastopt/reference/batched_lsq.py is their spec): on the CPU two calls of C++ per iteration,
one pass over each problem, instead of about 90 small torch operations over the batch.

The residuals and Jacobian of all problems come from one evaluation of ``residual_fn`` per
iteration (:mod:`fastopt.lm.batched_jacobian`), so ``nfev == njev`` counts iterations. The host
looks at the device only every ``check_every`` iterations, to stop when all problems have stopped
and to drop finished problems from the batch (``compact``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor

from .. import _validation as v
from .. import backends
from ..reference.batched_lsq import LSQ_RUNNING, free_gradient_norm
from .batched_jacobian import JAC_MODES, Evaluator, ProblemData, resolve_jac_mode
from .robust import robust_loss, scale_for_robust_loss, validate_loss

__all__ = ["least_squares", "LeastSquaresResult", "TERMINATION_MESSAGES"]

# scipy.optimize.least_squares's status codes and messages, where they apply; -1 is fastopt's.
TERMINATION_MESSAGES = {
    -1: "The residuals or their Jacobian are not finite at the initial point.",
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}
_RUNNING = LSQ_RUNNING
_INITIAL_DAMPING = 1e-3  # Marquardt's lambda_0 relative to diag(J^T J)
_COMPACT_BELOW = 0.5  # drop finished problems once at most this fraction still runs
# Problems per call of compiled code (CPU, GPU), or the batch size rounded up to a power of two if
# smaller. On this project's 2-core CPU 10,000 Gaussian fits (64 residuals, fp64) took 0.42 s warm
# in chunks of 4096 and 0.55 s in chunks of 1024 (fewer calls); GPU: large enough to fill the
# device (not measured: no GPU here).
_COMPILE_CHUNK = (4096, 1 << 16)
# Problems per eager evaluation (CPU, GPU): bounds the memory of torch.func's temporaries (about
# a dozen (P, chunk, N) tensors). On this project's CPU 30,000 Gaussian fits (64 residuals, fp64)
# took 13.9 s in chunks of 65536 and 3.7-4.5 s in chunks of 1024 to 4096 (temporaries that stay in
# cache, no fresh pages per op); GPU: large enough to fill the device (not measured).
_EAGER_CHUNK = (4096, 1 << 16)
# Problems per solver run (CPU, GPU): larger batches are solved block after block. On this
# project's CPU (1 thread) the bench_lsq workload took 15-18 us per problem at 2e3 to 1e5 problems
# but 30 us (float64) and 16 us (float32, from 10.5) at 1e6 in one run without blocks: the
# solver's per-iteration state (J^T J alone 128 MB in float64) went through fresh pages and main
# memory every operation. With blocks: 14.9 and 11.3 us of CPU time per problem at 1e6, against
# 12.9 and 10.5 at 1e4 (bench/results/lsq_cpu.md). GPU: no blocking below 2**22 problems (not
# measured: no GPU here).
_SOLVE_BLOCK = (16384, 1 << 22)


@dataclass
class _NormalEquations:
    """What curve_fit needs beyond the result: J^T J at each solution (the Gauss-Newton matrix the
    solver holds for its accepted point, of the scaled problem) and a way to get the Jacobian at
    the solution of some problems only."""

    jtj: Tensor
    jacobian_at: Callable[[Tensor], Tensor]


@dataclass
class LeastSquaresResult:
    """Per-problem results of :func:`least_squares`, scipy's ``OptimizeResult`` fields as tensors.

    Shapes are for a batch of B problems; for one problem given as x0 of shape (P,) the leading
    dimension is dropped (``x`` is (P,), ``cost`` and ``status`` are 0-dim, ``message`` a str).

    x: (B, P) solution. cost: (B,) ``0.5 * sum(rho(w * f**2))`` at x. fun: (B, N) residual_fn at
    x (unweighted). jac: (B, N, P) Jacobian of the weighted residuals at x, scaled for the robust
    loss as scipy's ``jac`` is (J^T J is the Gauss-Newton Hessian of the cost), or None unless
    ``return_jac=True``. grad: (B, P) gradient of the cost. optimality: (B,) inf-norm of the
    gradient over the parameters not frozen on a bound (what gtol tests). active_mask: (B, P)
    -1 at a lower bound, +1 at an upper bound, 0 inside. nfev, njev: (B,) evaluations of residuals
    and Jacobian (equal: one evaluation gives both). status: (B,) see :data:`TERMINATION_MESSAGES`.
    """

    x: Tensor
    cost: Tensor
    fun: Tensor
    jac: Optional[Tensor]
    grad: Tensor
    optimality: Tensor
    active_mask: Tensor
    nfev: Tensor
    njev: Tensor
    status: Tensor
    # for curve_fit: J^T J at the solutions and the Jacobian of chosen problems (not a public field)
    _normal_equations: Optional[_NormalEquations] = field(default=None, repr=False, compare=False)

    @property
    def success(self) -> Tensor:
        """True where a tolerance was met (status > 0), as scipy's ``success``."""
        return self.status > 0

    @property
    def message(self) -> Union[str, List[str]]:
        """scipy's message for each problem's status (a str for one problem)."""
        if self.status.dim() == 0:
            return TERMINATION_MESSAGES[int(self.status)]
        return [TERMINATION_MESSAGES[s] for s in self.status.tolist()]


def _tolerance(name: str, value: Any) -> float:
    """A tolerance as a float: >= 0, or None (disabled: 0)."""
    v.optional(v.at_least(0.0))(name, value)
    return 0.0 if value is None else float(value)


def _as_parameters(x0: Any) -> Tensor:
    if not torch.is_tensor(x0):
        try:
            x0 = torch.as_tensor(x0, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"x0 must be a tensor of shape (B, P) or (P,), got {type(x0).__name__}") from err
    if x0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x0 must be float32 or float64, got {x0.dtype} (convert with x0.double() or x0.float())")
    if x0.dim() not in (1, 2) or x0.shape[-1] == 0:
        raise ValueError(f"x0 must have shape (B, P) or (P,) with P >= 1, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 must only have finite values")
    return x0


def _bound(name: str, value: Any, like: Tensor) -> Tensor:
    """A bound broadcast to the (B, P) shape of ``like``: a scalar, (P,), (1, P) or (B, P)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(t, like.shape)
    except RuntimeError:
        raise ValueError(
            f"bounds: {name} of shape {tuple(t.shape)} does not broadcast to the parameters' shape "
            f"{tuple(like.shape)}; give a scalar, (P,) or (B, P)"
        ) from None


def prepare_bounds(bounds: Any, x: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """(lb, ub, bounded): (B, P) views of the bounds and whether any is finite. ``bounds`` is a pair
    (lb, ub) or an object with ``lb`` and ``ub`` attributes (scipy.optimize.Bounds)."""
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        bounds = (bounds.lb, bounds.ub)
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (lb, ub), got {bounds!r}")
    lb, ub = _bound("lb", bounds[0], x), _bound("ub", bounds[1], x)
    if bool(torch.isnan(lb).any() | torch.isnan(ub).any()):
        raise ValueError("bounds must not contain nan")
    if not bool((lb < ub).all()):
        raise ValueError("Each lower bound must be strictly less than each upper bound.")
    outside = ((x < lb) | (x > ub)).any(-1)
    if bool(outside.any()):
        which = outside.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"x0 is infeasible: outside the bounds in problem(s) {which}{' ...' if int(outside.sum()) > 10 else ''}"
        )
    bounded = bool(torch.isfinite(lb).any() | torch.isfinite(ub).any())
    return lb, ub, bounded


def _sqrt_weights(weights: Any, batch: int, n: int, like: Tensor) -> Optional[Tensor]:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape not in ((n,), (batch, n)):
        raise ValueError(f"weights must have shape (N,) = ({n},) or (B, N) = ({batch}, {n}), got {tuple(w.shape)}")
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError("weights must be finite and >= 0")
    return w.sqrt()


class _Model:
    """Cost, Gauss-Newton matrix and gradient from weighted residuals and their Jacobian, in the
    solver's dtype."""

    def __init__(self, loss, f_scale: float, gram: Callable, dtype: torch.dtype):
        self.loss, self.f_scale, self.gram, self.dtype = loss, f_scale, gram, dtype
        self.linear = loss == "linear"

    def scaled(self, f: Tensor, jac: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(cost, J, f) with J and f scaled for the robust loss (unchanged for "linear")."""
        f, jac = f.to(self.dtype), jac.to(self.dtype)
        if self.linear:
            return 0.5 * (f * f).sum(-1), jac, f
        rho, d1, d2 = robust_loss(self.loss, f, self.f_scale)
        jac_s, f_s = scale_for_robust_loss(jac, f, d1, d2)
        return 0.5 * rho.sum(-1), jac_s, f_s

    def __call__(self, f: Tensor, jac: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(cost, J^T J, J^T f of the scaled problem, squared column norms of the unscaled J).

        The damping is scaled by the unscaled column norms: the robust scaling can make J^T J
        degenerate (huber's curvature vanishes outside f_scale), and damping relative to a
        degenerate matrix would be off by as many orders of magnitude as it is.
        """
        cost, jac_s, f_s = self.scaled(f, jac)
        jtj, jtf = self.gram(jac_s, f_s)
        if self.linear:
            return cost, jtj, jtf, torch.diagonal(jtj, dim1=-2, dim2=-1).contiguous()
        jac = jac.to(self.dtype)
        return cost, jtj, jtf, (jac * jac).sum(-2)


def least_squares(
    residual_fn: Callable[..., Tensor],
    x0: Tensor,
    *,
    args: Sequence[Any] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    jac: Union[str, Callable[..., Tensor]] = "auto",
    bounds: Any = (-math.inf, math.inf),
    weights: Optional[Tensor] = None,
    loss: Union[str, Callable] = "linear",
    f_scale: float = 1.0,
    ftol: Optional[float] = 1e-8,
    xtol: Optional[float] = 1e-8,
    gtol: Optional[float] = 1e-8,
    max_nfev: Optional[int] = None,
    return_jac: bool = False,
    check_every: Optional[int] = None,
    compact: bool = True,
    compile: bool = False,
    backend: str = "auto",
) -> LeastSquaresResult:
    """Solve B independent nonlinear least-squares problems at once with Levenberg-Marquardt.

    Minimises, for every problem b, ``F(x_b) = 0.5 * sum_i rho(w_bi * f_bi(x_b)**2)`` subject to
    ``lb <= x_b <= ub``, where ``f_b = residual_fn(x)[b]``. The algorithm is in the module docstring;
    arguments and results follow ``scipy.optimize.least_squares``.

    Args:
        residual_fn: ``residual_fn(x, *args, **kwargs)``: plain torch code mapping x (B, P) to
            residuals (B, N). Row b must depend only on ``x[b]`` and on per-problem data of problem
            b: Jacobians are computed for the whole batch under that assumption
            (:mod:`fastopt.lm.batched_jacobian`). For x0 of shape (P,) it maps (P,) to (N,).
        x0: initial parameters, (B, P) or (P,), float32 or float64; the solver runs in this dtype
            on this device.
        args, kwargs: extra arguments of residual_fn. Tensors of two or more dimensions whose
            leading dimension is B are per-problem data (row b belongs to problem b; give a
            per-problem scalar as (B, 1)) and are sliced with x when finished problems are
            dropped; 1-D tensors and anything else are shared and passed unchanged. Shared data
            of two or more dimensions whose leading dimension happens to be B must be closed
            over by residual_fn instead.
        jac: "auto" (forward mode if P <= N, else reverse mode), "lanes" (forward mode through
            :mod:`fastopt.lm.forward_lanes`, what "auto" runs eagerly; a function using an
            operation lanes do not cover falls back to jacfwd), "jacfwd", "jacrev" (torch.func),
            or a callable ``jac(x, *args, **kwargs)`` returning the (B, N, P) Jacobian of
            residual_fn. Under ``compile=True`` forward mode is jacfwd.
        bounds: (lb, ub), each a scalar, (P,) or (B, P); +-inf for no bound; or an object with
            ``lb``/``ub`` (scipy.optimize.Bounds). Needs lb < ub and lb <= x0 <= ub. Every iterate
            and the solution satisfy the bounds exactly (projection with an active set).
        weights: per-residual weights w >= 0, (N,) or (B, N): the cost is
            ``0.5 * sum(rho(w * f**2))``, as scipy with residuals ``sqrt(w) * f``.
        loss: "linear", "soft_l1", "huber", "cauchy", "arctan" or a callable ``loss(z)`` returning
            (rho, rho', rho''), exactly as scipy (:mod:`fastopt.lm.robust`).
        f_scale: soft margin C between inlier and outlier residuals: ``rho_C(z) = C**2 rho(z / C**2)``.
        ftol, xtol, gtol: tolerances with scipy's meanings (module docstring); None or 0 disables
            one. ftol and xtol below the dtype's epsilon (1.19e-7 in float32) act as that epsilon:
            a smaller relative change cannot be observed; and an actual reduction within the
            costs' rounding counts as meeting ftol (module docstring, item 6).
        max_nfev: evaluations per problem before stopping with status 0; default 100 * P
            (scipy's for its "trf" and "dogbox" methods).
        return_jac: also return the Jacobian at the solution (one more evaluation, B*N*P memory).
        check_every: iterations between host checks (default 1 on CPU, where a check costs
            nothing, and 4 on GPUs, where it waits for the device). Problems that stop in between
            stay unchanged; their extra evaluations are not counted in nfev.
        compact: drop finished problems from the batch at checks once at most half still run, so
            that stragglers do not keep the whole batch busy.
        compile: evaluate residuals, Jacobian and normal equations through ``torch.compile``, in
            fixed-size chunks of problems: seconds of compilation on the first call for a
            residual_fn, dtype and data shape (reused by later calls through torch.compile's
            cache, which guards on the function's code and closure, dtypes and shapes; past
            torch._dynamo.config.recompile_limit variants it evaluates eagerly), then several
            times fewer passes over memory per iteration. Needs what torch.compile needs (a C++
            compiler on CPU).
        backend: implementation of the batched J^T J / J^T f op ("auto", "triton", "cuda", "cpu",
            "torch"; see fastopt.backends) and of the iteration's step ops (lsq_propose,
            lsq_update: "cpu" and "torch"; a backend without them runs the torch reference).

    Returns:
        :class:`LeastSquaresResult`.

    Raises:
        TypeError / ValueError naming the argument for invalid input; ValueError as scipy for one
        problem whose residuals are not finite at x0 (a batch marks such problems with status -1).
    """
    if not callable(residual_fn):
        raise TypeError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
    x0 = _as_parameters(x0)
    single = x0.dim() == 1
    x = (x0.unsqueeze(0) if single else x0).detach().clone()
    batch, n_params = x.shape
    dtype, device = x.dtype, x.device
    if not callable(jac):
        v.one_of(JAC_MODES, otherwise="pass a callable")("jac", jac)
    reason = validate_loss(loss)
    if reason:
        raise ValueError(reason)
    v.finite_positive("f_scale", f_scale)
    tols = {name: _tolerance(name, value) for name, value in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol))}
    if not any(tols.values()):
        raise ValueError("At least one of the tolerances ftol, xtol, gtol must be > 0")
    eps = torch.finfo(dtype).eps
    ftol_, xtol_ = (max(tols[k], eps) if tols[k] > 0 else 0.0 for k in ("ftol", "xtol"))
    gtol_ = tols["gtol"]
    if max_nfev is None:
        max_nfev = 100 * n_params
    v.int_at_least(1)("max_nfev", max_nfev)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    v.int_at_least(1)("check_every", check_every)
    backends.validate_backend_name(backend)
    v.instance_of((tuple, list), "a tuple or list")("args", args)
    v.optional(v.instance_of(dict, "a dict"))("kwargs", kwargs)
    lb, ub, bounded = prepare_bounds(bounds, x)
    gram = backends.choose("batched_gram", device, dtype, backend)

    data = ProblemData(args, kwargs or {}, None, batch if not single else -1)
    evaluator = Evaluator(residual_fn, jac, single)
    with torch.no_grad():
        f0 = _raw_in_chunks(evaluator, x, data)
    n_res = _check_residuals(f0, batch, single)
    data.sqrt_weights = _sqrt_weights(weights, batch, n_res, x)
    model = _Model(loss, float(f_scale), gram.fn, dtype)
    if compile:
        chunk = min(_COMPILE_CHUNK[device.type == "cuda"], 1 << max(batch - 1, 0).bit_length())
    else:
        chunk = _EAGER_CHUNK[device.type == "cuda"]
    # A backend whose J^T J torch.compile fuses with the Jacobian (the torch backend's) runs inside
    # the compiled code; other backends' kernels are called on the Jacobian it writes out. Compiled
    # code is reused across calls by torch.compile's own cache (guarded on the function's code,
    # closure, dtypes and shapes).
    evaluator = Evaluator(
        residual_fn,
        resolve_jac_mode(jac, n_params, n_res, bool(compile)),
        single,
        model,
        compile=bool(compile),
        fuse_reduce=gram.fuses_reduce,
        chunk=chunk,
    )

    # The actual reduction F(x) - F(x + s) is computed from two costs, each a sum of N squares
    # rounded in the dtype: about (2 + log2 N) eps relative each when the residuals themselves
    # are computed to 1 ulp. A reduction below twice that is rounding (see _Rules, lsq_update).
    rules = _Rules(
        bounded,
        ftol_,
        xtol_,
        gtol_,
        2 * (2 + math.log2(n_res)) * eps,
        int(max_nfev),
        int(check_every),
        bool(compact),
    )
    propose, update = (_step_op(op, device, dtype, backend) for op in ("lsq_propose", "lsq_update"))

    def solver_for(d: ProblemData, lo: Tensor, hi: Tensor) -> _Solver:
        return _Solver(evaluator, d, lo, hi, rules, propose, update)

    with torch.no_grad():  # forward-mode and torch.func transforms work inside it; no graphs kept
        block = _SOLVE_BLOCK[device.type == "cuda"]
        if batch <= block:
            out = solver_for(data, lb, ub).run(x)
        else:
            # Independent problems, solved block after block: every per-iteration tensor then
            # stays block-sized (cache-resident, allocations reused) however large the batch.
            parts = []
            for start in range(0, batch, block):
                stop = min(start + block, batch)
                part = solver_for(data.rows(start, stop), lb[start:stop], ub[start:stop])
                parts.append(part.run(x[start:stop]))
            out = {k: torch.cat([o[k] for o in parts]) for k in parts[0]}
        jac_out: Optional[Tensor] = None
        if return_jac:
            f_weighted, j = evaluator.residuals_and_jacobian(out["x"], data)
            jac_out = model.scaled(f_weighted, j)[1]
            # without weights the evaluation's residuals are residual_fn's: no second evaluation
            fun = (f_weighted if data.sqrt_weights is None else _raw_in_chunks(evaluator, out["x"], data)).to(dtype)
        else:
            fun = _raw_in_chunks(evaluator, out["x"], data).to(dtype)
    active = torch.zeros_like(out["x"], dtype=torch.int8)
    active = torch.where(out["x"] <= lb, -1, torch.where(out["x"] >= ub, 1, active)).to(torch.int8)
    # Every field but jac (None unless return_jac) is a tensor.
    fields = dict(
        x=out["x"],
        cost=out["cost"],
        fun=fun,
        grad=out["g"],
        optimality=out["optimality"],
        active_mask=active,
        nfev=out["nfev"],
        njev=out["nfev"].clone(),
        status=out["status"],
    )
    if single:
        if int(out["status"][0]) == -1:
            raise ValueError("Residuals are not finite in the initial point.")
        fields = {k: val[0] for k, val in fields.items()}
        jac_out = jac_out[0] if jac_out is not None else None

    def jacobian_at(index: Tensor) -> Tensor:
        """The scaled Jacobian (len(index), N, P) at the solutions of problems ``index``."""
        with torch.no_grad():
            return model.scaled(*evaluator.residuals_and_jacobian(out["x"][index], data.take(index)))[1]

    return LeastSquaresResult(jac=jac_out, **fields, _normal_equations=_NormalEquations(out["jtj"], jacobian_at))


def _raw_in_chunks(evaluator: Evaluator, x: Tensor, data: ProblemData) -> Any:
    """residual_fn at x, at most _EAGER_CHUNK problems per call, so that its temporaries stay small:
    at 100,000 problems one call on the whole batch took 0.48 s of a 1.9 s solve (float64, this
    project's CPU, bench/results/lsq_profile_cpu.md), fresh pages for every 51 MB temporary."""
    batch, chunk = x.shape[0], _EAGER_CHUNK[x.device.type == "cuda"]
    if batch <= chunk:
        return evaluator.raw(x, data)
    parts = [evaluator.raw(x[s : s + chunk], data.rows(s, min(s + chunk, batch))) for s in range(0, batch, chunk)]
    if not all(torch.is_tensor(f) for f in parts):
        return parts[0]  # not a tensor: _check_residuals says so
    return torch.cat(parts)


def _check_residuals(f: Any, batch: int, single: bool) -> int:
    """N, after checking that residual_fn returned a (B, N) tensor (or (N,) for one problem)."""
    want = "(N,)" if single else f"(B, N) = ({batch}, N)"
    if not torch.is_tensor(f):
        raise TypeError(f"residual_fn must return a tensor of shape {want}, got {type(f).__name__}")
    if f.dim() != 2 or f.shape[0] != batch or f.shape[1] == 0:
        got = tuple(f.shape[1:]) if single else tuple(f.shape)
        raise ValueError(f"residual_fn must return a tensor of shape {want} with N >= 1, got {got}")
    if not f.is_floating_point():
        raise TypeError(f"residual_fn must return floating-point residuals, got {f.dtype}")
    return int(f.shape[1])


@dataclass(frozen=True)
class _Rules:
    """The stopping rules and loop settings of one solve (tolerances already floored for the dtype)."""

    bounded: bool
    ftol: float
    xtol: float
    gtol: float
    cost_noise: float  # relative rounding of a difference of two costs (see least_squares)
    max_nfev: int
    check_every: int
    compact: bool


class _Solver:
    """The batched iteration; state tensors are indexed by problem along dimension 0. ``propose``
    and ``update`` are the backend's ``lsq_propose`` and ``lsq_update``
    (fastopt.reference.batched_lsq has their meaning)."""

    def __init__(
        self,
        evaluator: Evaluator,
        data: ProblemData,
        lb: Tensor,
        ub: Tensor,
        rules: _Rules,
        propose: Callable[..., Tuple[Tensor, Tensor, Tensor]],
        update: Callable[..., Tuple[Tensor, ...]],
    ):
        self.evaluator, self.data = evaluator, data
        self.lb, self.ub, self.rules = lb, ub, rules
        self.propose, self.update = propose, update

    def _evaluate(self, x: Tensor, data: ProblemData) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        # The evaluator reduces with _Model: (cost, J^T J, J^T f, squared column norms).
        return cast(Tuple[Tensor, Tensor, Tensor, Tensor], self.evaluator.terms(x, data))

    def run(self, x: Tensor) -> Dict[str, Tensor]:
        rules = self.rules
        batch, n_params = x.shape
        dtype, device = x.dtype, x.device
        eps = torch.finfo(dtype).eps
        lam_min, lam_max = eps * eps, 1 / (eps * eps)
        cost, jtj, g, colsq = self._evaluate(x, self.data)
        finite = torch.isfinite(cost) & torch.isfinite(jtj).flatten(1).all(-1) & torch.isfinite(g).all(-1)
        frozen, gnorm = free_gradient_norm(x, g, self.lb, self.ub, rules.bounded)
        status = torch.full((batch,), _RUNNING, dtype=torch.int64, device=device)
        status = torch.where(~finite, -1, torch.where(gnorm < rules.gtol, 1, status))
        nfev = torch.ones(batch, dtype=torch.int64, device=device)
        if rules.max_nfev <= 1:
            status = torch.where(status == _RUNNING, 0, status)
        st = dict(
            x=x,
            cost=cost,
            jtj=jtj,
            g=g,
            frozen=frozen,
            optimality=gnorm,
            status=status,
            nfev=nfev,
            scale=torch.where(colsq > 0, colsq, torch.ones_like(colsq)),
            lam=torch.full((batch,), _INITIAL_DAMPING, dtype=dtype, device=device),
            nu=torch.full((batch,), 2.0, dtype=dtype, device=device),
            lb=self.lb,
            ub=self.ub,
            index=torch.arange(batch, device=device),
        )
        out = {k: st[k].clone() for k in ("x", "cost", "g", "jtj", "optimality", "status", "nfev")}
        data = self.data
        iteration = 0
        while True:
            if iteration % rules.check_every == 0:
                running = st["status"] == _RUNNING
                n_running = int(running.sum())  # the one host synchronisation
                if n_running == 0:
                    break
                if rules.compact and 2 <= n_running <= _COMPACT_BELOW * st["x"].shape[0]:
                    self._store(out, st)
                    keep = running.nonzero().flatten()
                    st = {k: t.index_select(0, keep) for k, t in st.items()}
                    data = data.take(keep)
            st = self._iterate(st, data, lam_min, lam_max)
            iteration += 1
        self._store(out, st)
        return out

    @staticmethod
    def _store(out: Dict[str, Tensor], st: Dict[str, Tensor]) -> None:
        for k, t in out.items():
            t.index_copy_(0, st["index"], st[k])

    def _iterate(self, st: Dict[str, Tensor], data: ProblemData, lam_min: float, lam_max: float) -> Dict[str, Tensor]:
        rules = self.rules
        x_new, step, solved = self.propose(
            st["x"], st["jtj"], st["g"], st["lam"], st["scale"], st["frozen"], st["lb"], st["ub"], bounded=rules.bounded
        )
        new = self.update(
            *(st[k] for k in ("x", "cost", "jtj", "g", "frozen", "status", "nfev", "scale", "lam", "nu", "lb", "ub")),
            x_new,
            step,
            solved,
            *self._evaluate(x_new, data),
            bounded=rules.bounded,
            ftol=rules.ftol,
            xtol=rules.xtol,
            gtol=rules.gtol,
            cost_noise=rules.cost_noise,
            max_nfev=rules.max_nfev,
            lam_min=lam_min,
            lam_max=lam_max,
        )
        return dict(st, **dict(zip(_UPDATED, new)))


# the state lsq_update returns, in its order
_UPDATED = ("x", "cost", "jtj", "g", "frozen", "optimality", "status", "nfev", "scale", "lam", "nu")


def _step_op(op: str, device: torch.device, dtype: torch.dtype, backend: str) -> Callable:
    """The step op (lsq_propose, lsq_update) of ``backend``; the reference where that backend
    has none (the cpu and torch backends have them; a backend named for batched_gram, e.g.
    triton, need not)."""
    try:
        return backends.choose(op, device, dtype, backend).fn
    except backends.BackendUnavailableError:
        return backends.choose(op, device, dtype, "torch").fn
