"""Batched ``curve_fit``: scipy.optimize.curve_fit's meaning for many independent fits at once.

Each problem b fits ``ydata[b] ~ f(xdata, p_b)`` by minimising the transformed residuals
``r_b = T_b (f(xdata, p_b) - ydata[b])`` with :func:`fastopt.lm.least_squares`, where ``T_b`` is 1
(no sigma), ``diag(1 / sigma_b)`` (standard deviations) or ``L_b^-1`` with ``L_b L_b^T = sigma_b``
(a covariance matrix), as scipy does. The covariance of the estimate is scipy's: the
Moore-Penrose inverse of ``J^T J`` from the singular values of the (transformed, robust-scaled)
Jacobian at the solution, those below ``eps * max(M, P) * s_max`` discarded, scaled by the residual
variance ``2 * cost / (M - P)`` unless ``absolute_sigma``; where it cannot be estimated
(NaN in the Jacobian, or M <= P without absolute_sigma) it is filled with inf and an
:class:`OptimizeWarning` is issued. Problems whose J^T J (which the solver holds at the solution)
is well conditioned get it as ``inv(J^T J)`` without evaluating J again; the others from J
(:func:`covariance_from_normal_equations`).

Differences from scipy, all because problems are batched:
* ``f(xdata, p)`` takes the parameters as one tensor p of shape (B, P) (or (P,) for one
  problem), not as separate arguments, so ``p0`` is required.
* A problem that does not converge (status <= 0) raises RuntimeError, as in scipy, only when
  there is one problem; a batch warns with the count and returns its last iterate (see
  ``full_output``).
* scipy's default method="lm" inverts R of the QR factorisation of J without discarding small
  singular values; fastopt discards them for every fit (scipy's "trf" branch). For a Jacobian of
  full rank the two agree to rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .batched_jacobian import is_per_problem
from .nonlinear_lsq import least_squares

__all__ = ["curve_fit", "OptimizeWarning", "covariance_from_jacobian", "covariance_from_normal_equations"]

_FORWARDED = ("ftol", "xtol", "gtol", "max_nfev", "loss", "f_scale", "check_every", "compact", "compile", "backend")


class OptimizeWarning(UserWarning):
    """Issued where scipy issues scipy.optimize.OptimizeWarning (covariance not estimated) and for
    batch members that did not converge."""


def covariance_from_jacobian(jac: Tensor) -> Tensor:
    """``pinv(J^T J)`` per problem, J (B, M, P): scipy.optimize.curve_fit's Moore-Penrose inverse
    from the SVD of J, singular values below ``eps * max(M, P) * s_max`` discarded.

    With J = QR (M >= P) that is ``R^-1 R^-T`` wherever no singular value falls below the
    threshold. Problems whose R is well away from it (Frobenius condition estimate, an upper
    bound of the 2-norm one, below ``1e-3 / (eps * max(M, P))``) take the triangular inverse; the
    rest (nearly rank-deficient, singular, non-finite) take the SVD of R, which has J's singular
    values and right singular vectors. Why: batched LAPACK SVDs of small matrices cost about 12 us
    each on this project's CPU, the triangular solve about 1 us.
    """
    m, p = jac.shape[-2:]
    if m < p:
        return _pinv_from_svd(jac, max(m, p))
    r = torch.linalg.qr(jac, mode="r")[1]
    eye = torch.eye(p, dtype=jac.dtype, device=jac.device).expand_as(r)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    cond = torch.linalg.matrix_norm(r) * torch.linalg.matrix_norm(r_inv)
    safe = torch.isfinite(cond) & (cond * torch.finfo(jac.dtype).eps * max(m, p) < 1e-3)
    pcov = r_inv @ r_inv.transpose(-2, -1)
    if not bool(safe.all()):
        rest = (~safe).nonzero().flatten()
        pcov = pcov.index_copy(0, rest, _pinv_from_svd(r.index_select(0, rest), max(m, p)))
    return pcov


def covariance_from_normal_equations(jtj: Tensor, m: int, jacobian_at: Callable[[Tensor], Tensor]) -> Tensor:
    """:func:`covariance_from_jacobian` from ``J^T J`` (B, P, P), which the solver holds at its
    solution anyway, without evaluating J where that is as accurate.

    ``inv(J^T J)`` from its Cholesky factor equals ``pinv(J^T J)`` for problems whose J^T J is well
    away from singular: Frobenius condition estimate (an upper bound of cond(J)**2, since J^T J
    squares J's singular values) below ``1e-3 / (eps * max(M, P))``, the bound
    :func:`covariance_from_jacobian` puts on cond(J), here on its square. Forming J^T J costs
    accuracy only where it squares an ill-conditioned J, and those problems are the ones sent on:
    the rest (nearly rank-deficient, singular, non-finite) get ``jacobian_at(index)``, their
    Jacobians at the solution, and scipy's SVD threshold through :func:`covariance_from_jacobian`.
    Why: at 100,000 Gaussian fits the Jacobian at the solution (200 MB in float64) and its QR took
    1.7 s of a 3.8 s call on this project's CPU, this function 54 ms of a 1.9 s call
    (bench/results/lsq_profile_cpu.md).
    """
    p = jtj.shape[-1]
    size = max(m, p)
    chol, info = torch.linalg.cholesky_ex(jtj)
    factored = (info == 0) & torch.isfinite(chol).flatten(1).all(-1)
    # cholesky_inverse raises on a zero pivot: failed factors become identities (their rows go on)
    eye = torch.eye(p, dtype=jtj.dtype, device=jtj.device)
    pcov = torch.cholesky_inverse(torch.where(factored.reshape(-1, 1, 1), chol, eye))
    cond = torch.linalg.matrix_norm(jtj) * torch.linalg.matrix_norm(pcov)
    safe = factored & torch.isfinite(cond) & (cond * torch.finfo(jtj.dtype).eps * size < 1e-3)
    if not bool(safe.all()):
        rest = (~safe).nonzero().flatten()
        pcov = pcov.index_copy(0, rest, covariance_from_jacobian(jacobian_at(rest)))
    return pcov


def _pinv_from_svd(a: Tensor, size: int) -> Tensor:
    """``pinv(A^T A)`` from the SVD of A (..., K, P), singular values below ``eps * size * s_max``
    discarded (scipy's threshold, with size = max(M, P) of the Jacobian)."""
    _, s, vt = torch.linalg.svd(a, full_matrices=False)
    threshold = torch.finfo(a.dtype).eps * size * s[..., :1]
    keep = s > threshold
    inv_sq = torch.where(keep, 1 / torch.where(keep, s, torch.ones_like(s)) ** 2, torch.zeros_like(s))
    return (vt.transpose(-2, -1) * inv_sq.unsqueeze(-2)) @ vt


def _as_float(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or array-like, got {type(value).__name__}") from err
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must be real-valued, got {t.dtype}")
    return t.to(dtype)


def curve_fit(
    f: Callable[[Any, Tensor], Tensor],
    xdata: Any,
    ydata: Any,
    p0: Any,
    sigma: Any = None,
    absolute_sigma: bool = False,
    bounds: Any = (-math.inf, math.inf),
    *,
    method: Optional[str] = None,
    jac: Union[str, Callable[[Any, Tensor], Tensor]] = "auto",
    check_finite: bool = True,
    full_output: bool = False,
    **kwargs: Any,
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Dict, Any, Tensor]]:
    """Fit ``ydata ~ f(xdata, p)`` for one problem or a batch, as scipy.optimize.curve_fit.

    Args:
        f: model ``f(xdata, p)``: p (B, P) -> (B, M) predictions, plain torch code (differentiated
            with torch.func; row b may depend only on p[b] and on problem b's data). For a single
            problem (ydata of shape (M,)) p is (P,) and f returns (M,).
        xdata: independent variable, passed to f unchanged: shared by all problems (e.g. (M,)),
            unless it is a tensor of two or more dimensions whose leading dimension is B (e.g.
            (B, M): then xdata[b] belongs to problem b and is sliced with it). Floating tensors and
            array-likes are converted to the fit's dtype.
        ydata: (B, M) data of B problems, or (M,) for one.
        p0: initial parameters, (B, P), or (P,) shared by all problems. Its dtype (float32 or
            float64; float64 for array-likes) is the dtype of the fit.
        sigma: None; standard deviations of ydata: a scalar, (M,) or (B, M) (residuals
            ``(f - y) / sigma``); or covariance matrices: (M, M) for one problem, (B, M, M) for a
            batch (residuals ``L^-1 (f - y)`` with ``L L^T = sigma``).
        absolute_sigma: sigma is absolute; else pcov is scaled by ``2 * cost / (M - P)``.
        bounds: (lb, ub) as in :func:`fastopt.lm.least_squares`: scalars, (P,) or (B, P).
        method: only None: fastopt runs its batched Levenberg-Marquardt, bounded or not.
        jac: "auto", "lanes", "jacfwd", "jacrev" (see :func:`fastopt.lm.least_squares`) or a
            callable ``jac(xdata, p)`` returning df/dp, (B, M, P)
            (or (M, P) for one problem).
        check_finite: raise ValueError if xdata or ydata hold NaN or inf.
        full_output: also return ``infodict`` (``nfev``, ``fvec``: transformed residuals at the
            solution), ``mesg`` and ``ier`` (status codes of
            :data:`fastopt.lm.TERMINATION_MESSAGES`).
        **kwargs: forwarded to least_squares: ftol, xtol, gtol, max_nfev (or scipy's maxfev),
            loss, f_scale, check_every, compact, compile, backend.

    Returns:
        ``(popt, pcov)``: (B, P) and (B, P, P) (or (P,) and (P, P)), or with ``full_output``
        ``(popt, pcov, infodict, mesg, ier)``.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if method is not None:
        raise ValueError(
            f"Invalid method: {method!r}. fastopt.lm.curve_fit runs its batched Levenberg-Marquardt "
            "(with bounds by projection); leave method=None"
        )
    if p0 is None:
        raise ValueError("p0 is required: f takes the parameters as one tensor, so their number cannot be inferred")
    if "maxfev" in kwargs:
        if "max_nfev" in kwargs:
            raise ValueError("give max_nfev or maxfev, not both")
        kwargs["max_nfev"] = kwargs.pop("maxfev")
    unknown = sorted(set(kwargs) - set(_FORWARDED))
    if unknown:
        raise TypeError(
            f"curve_fit got unexpected keyword argument(s) {unknown}; it forwards {_FORWARDED} "
            "to least_squares ('args' is not supported: close over extra data in f)"
        )
    if not torch.is_tensor(p0):
        p0 = torch.as_tensor(p0, dtype=torch.float64)
    if p0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"p0 must be float32 or float64, got {p0.dtype}")
    dtype, device = p0.dtype, p0.device
    y = _as_float("ydata", ydata, dtype, device)
    if y.dim() not in (1, 2) or y.shape[-1] == 0:
        raise ValueError(f"ydata must have shape (B, M) or (M,) with M >= 1, got {tuple(y.shape)}")
    single = y.dim() == 1
    batch, m = (1, y.shape[0]) if single else tuple(y.shape)
    if single and p0.dim() != 1:
        raise ValueError(f"p0 must have shape (P,) for one problem (ydata of shape (M,)), got {tuple(p0.shape)}")
    if not single:
        if p0.dim() == 1:
            p0 = p0.expand(batch, -1)
        if p0.dim() != 2 or p0.shape[0] != batch:
            raise ValueError(
                f"p0 must have shape (P,) or (B, P) = ({batch}, P) for ydata of shape {tuple(y.shape)}, "
                f"got {tuple(p0.shape)}"
            )
    n_params = p0.shape[-1]
    if torch.is_tensor(xdata) and xdata.is_floating_point():
        xdata = xdata.to(device=device, dtype=dtype)
    elif isinstance(xdata, (list, tuple)) or type(xdata).__module__ == "numpy":
        xdata = _as_float("xdata", xdata, dtype, device)
    if check_finite:
        if not bool(torch.isfinite(y).all()):
            raise ValueError("ydata must not contain NaN or inf (or pass check_finite=False)")
        if torch.is_tensor(xdata) and xdata.is_floating_point() and not bool(torch.isfinite(xdata).all()):
            raise ValueError("xdata must not contain NaN or inf (or pass check_finite=False)")

    transform, kind = _transform(sigma, y, single, batch, m, dtype, device)
    per_problem_x = (not single) and is_per_problem(xdata, batch)
    shared_x = None if per_problem_x else xdata

    def residuals(p, yb, tb, *rest):
        return _apply(kind, tb, f(rest[0] if per_problem_x else shared_x, p) - yb)

    def transformed_jac(p, yb, tb, *rest):
        j = jac(rest[0] if per_problem_x else shared_x, p)
        if kind == "cov":
            return torch.linalg.solve_triangular(tb, j, upper=False)
        return j if kind == "none" else j * tb.unsqueeze(-1)

    args = (y, transform) + ((xdata,) if per_problem_x else ())
    res = least_squares(
        residuals,
        p0,
        args=args,
        jac=transformed_jac if callable(jac) else jac,
        bounds=bounds,
        **kwargs,
    )
    normal = res._normal_equations
    assert normal is not None  # least_squares always attaches it
    pcov = covariance_from_normal_equations(normal.jtj, m, normal.jacobian_at)
    status = res.status.reshape(-1)
    cost = res.cost.reshape(-1)
    undefined = torch.isnan(pcov).flatten(1).any(-1)
    if not absolute_sigma:
        if m > n_params:
            pcov = pcov * (2 * cost / (m - n_params)).reshape(-1, 1, 1)
        else:
            undefined = torch.ones_like(undefined)
    pcov = torch.where(undefined.reshape(-1, 1, 1), math.inf, pcov)
    n_undefined = int(undefined.sum())
    if n_undefined:
        where = "" if single else f" for {n_undefined} of {batch} problems"
        warnings.warn(f"Covariance of the parameters could not be estimated{where}", OptimizeWarning, stacklevel=2)
    failed = status <= 0
    if bool(failed.any()):
        if single:
            message = res.message
            assert isinstance(message, str)  # one problem: one message
            raise RuntimeError("Optimal parameters not found: " + message)
        first = failed.nonzero().flatten()[:10].tolist()
        warnings.warn(
            f"Optimal parameters not found for {int(failed.sum())} of {batch} problems (e.g. {first}); "
            "their popt is the last iterate (full_output=True gives each problem's status)",
            OptimizeWarning,
            stacklevel=2,
        )
    popt = res.x
    if single:
        pcov = pcov[0]
    if not full_output:
        return popt, pcov
    infodict = {"nfev": res.nfev, "fvec": res.fun}
    return popt, pcov, infodict, res.message, res.status


def _transform(sigma, y: Tensor, single: bool, batch: int, m: int, dtype, device) -> Tuple[Tensor, str]:
    """(per-problem transform data, kind): kind "none" (ones), "inv" (1 / sigma, (B, M)) or "cov"
    (lower Cholesky factors, (B, M, M)); for one problem without the leading B."""
    lead = () if single else (batch,)
    if sigma is None:
        return torch.ones(lead + (m,), dtype=dtype, device=device), "none"
    s = _as_float("sigma", sigma, dtype, device)
    if s.numel() == 1 or s.shape == (m,) or (not single and s.shape == (batch, m)):
        if not bool((torch.isfinite(s) & (s != 0)).all()):
            raise ValueError("sigma must be finite and nonzero")
        return torch.broadcast_to(1 / s.reshape(s.shape if s.numel() > 1 else ()), lead + (m,)), "inv"
    if (single and s.shape == (m, m)) or (not single and s.shape == (batch, m, m)):
        chol, info = torch.linalg.cholesky_ex(s)
        if bool((info != 0).any()):
            raise ValueError("`sigma` must be positive definite.")
        return chol, "cov"
    want = "a scalar, (M,) or (M, M)" if single else "a scalar, (M,), (B, M) or (B, M, M)"
    raise ValueError(
        f"`sigma` has incorrect shape {tuple(s.shape)}: give {want} with M = {m}" + ("" if single else f", B = {batch}")
    )


def _apply(kind: str, t: Tensor, r: Tensor) -> Tensor:
    if kind == "none":
        return r
    if kind == "inv":
        return r * t
    return torch.linalg.solve_triangular(t, r.unsqueeze(-1), upper=False).squeeze(-1)
