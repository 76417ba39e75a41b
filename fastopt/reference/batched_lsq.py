"""Many small least-squares problems at once, eager torch: the executable spec of the
``batched_gram`` op (kernels/batched_gram.py is tested against it) and of the two ops of a
batched Levenberg-Marquardt iteration, ``lsq_propose`` and ``lsq_update``
(csrc/lsq_step_cpu.cpp is tested against them; the algorithm is described in
:mod:`fastopt.lm.nonlinear_lsq`).

For problem ``b`` with Jacobian ``J_b`` (N x P) and residuals ``r_b`` (N)::

    jtj[b] = J_b^T J_b        (P x P, symmetric positive semi-definite)
    jtr[b] = J_b^T r_b        (P)

Math in fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 (:func:`fastopt.reference.math_dtype`),
results rounded once to the input dtype. fp32 products are IEEE fp32 on every device: a CUDA
caller that enabled TF32 matmuls gets them switched off for this op, because TF32's 10-bit
mantissa would make J^T J singular for the ill-conditioned problems LM is used on.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Tuple

import torch
from torch import Tensor

from ._precision import math_dtype

__all__ = [
    "batched_gram_reference",
    "check_gram_inputs",
    "lsq_propose_reference",
    "lsq_update_reference",
    "free_gradient_norm",
    "LSQ_RUNNING",
    "LSQ_ACCEPT_RATIO",
]

LSQ_RUNNING = -9  # status of a problem still iterating (the others are scipy's codes, and -1)
LSQ_ACCEPT_RATIO = 1e-4  # MINPACK lmder's acceptance threshold of the gain ratio


def check_gram_inputs(jac: Tensor, res: Tensor) -> None:
    """Shapes and dtypes every implementation of ``batched_gram`` takes."""
    if jac.dim() != 3:
        raise ValueError(f"batched_gram: jac must have shape (B, N, P), got {tuple(jac.shape)}")
    if res.shape != jac.shape[:2]:
        raise ValueError(f"batched_gram: res must have shape (B, N) = {tuple(jac.shape[:2])}, got {tuple(res.shape)}")
    if res.dtype != jac.dtype or res.device != jac.device:
        raise ValueError(
            f"batched_gram: jac and res must share dtype and device, got {jac.dtype} on {jac.device} "
            f"and {res.dtype} on {res.device}"
        )


@contextlib.contextmanager
def _ieee_fp32(t: Tensor) -> Iterator[None]:
    """IEEE fp32 matmuls on CUDA for the duration (TF32 off), the caller's setting restored after."""
    if t.device.type != "cuda" or t.dtype != torch.float32:
        yield
        return
    # The fp32_precision API: reading and restoring it also works after the legacy allow_tf32 /
    # set_float32_matmul_precision calls, whereas reading allow_tf32 after the new API raises.
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def batched_gram_reference(jac: Tensor, res: Tensor) -> Tuple[Tensor, Tensor]:
    """``(J^T J, J^T r)`` per problem: ``jac`` (B, N, P), ``res`` (B, N) -> (B, P, P), (B, P).

    Any strides; the outputs are new contiguous tensors in the inputs' dtype.
    """
    check_gram_inputs(jac, res)
    dtype = math_dtype(jac.dtype)
    j, r = jac.to(dtype), res.to(dtype)
    jt = j.transpose(1, 2)
    with _ieee_fp32(j):
        jtj = torch.bmm(jt, j)
        jtr = torch.bmm(jt, r.unsqueeze(-1)).squeeze(-1)
    return jtj.to(jac.dtype), jtr.to(jac.dtype)


# Arguments of the step ops: name -> (rank: 1 (B,), 2 (B, P), 3 (B, P, P); dtype, None: the x dtype)
_PROPOSE_ARGS = dict(x=2, jtj=3, g=2, lam=1, scale=2, frozen=(2, torch.bool), lb=2, ub=2)
_UPDATE_ARGS = dict(
    x=2,
    cost=1,
    jtj=3,
    g=2,
    frozen=(2, torch.bool),
    status=(1, torch.int64),
    nfev=(1, torch.int64),
    scale=2,
    lam=1,
    nu=1,
    lb=2,
    ub=2,
    x_new=2,
    step=2,
    solved=(1, torch.bool),
    cost_new=1,
    jtj_new=3,
    g_new=2,
    colsq_new=2,
)


def check_step_inputs(op: str, spec: dict, tensors: Tuple[Tensor, ...]) -> None:
    """Shapes and dtypes every implementation of ``op`` (lsq_propose, lsq_update) takes: TypeError
    for a dtype, ValueError for a shape, each naming the argument."""
    x = tensors[0]
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape (B, P), got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    batch, n = x.shape
    for (name, kind), t in zip(spec.items(), tensors):
        rank, dtype = kind if isinstance(kind, tuple) else (kind, x.dtype)
        if t.dtype != dtype or t.device != x.device:
            raise TypeError(f"{op}: {name} must be {dtype} on {x.device}, got {t.dtype} on {t.device}")
        want = [batch] + [n] * (rank - 1)
        if list(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def free_gradient_norm(x: Tensor, g: Tensor, lb: Tensor, ub: Tensor, bounded: bool) -> Tuple[Tensor, Tensor]:
    """(frozen mask, inf-norm of the gradient over the free parameters). Frozen: on a bound with
    the descent direction -g leaving the box (scipy dogbox's active set)."""
    if not bounded:
        return torch.zeros_like(x, dtype=torch.bool), g.abs().amax(-1)
    frozen = ((x <= lb) & (g > 0)) | ((x >= ub) & (g < 0))
    return frozen, torch.where(frozen, 0, g).abs().amax(-1)


def lsq_propose_reference(
    x: Tensor,
    jtj: Tensor,
    g: Tensor,
    lam: Tensor,
    scale: Tensor,
    frozen: Tensor,
    lb: Tensor,
    ub: Tensor,
    *,
    bounded: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The Levenberg-Marquardt step of each problem and its trial point: ``(x_new, step, solved)``.

    x, g, scale, lb, ub: (B, P); jtj: (B, P, P); lam: (B,); frozen: (B, P) bool. Solves
    ``(J^T J + lam * diag(scale)) step = -g`` by Cholesky; frozen parameters (bounded only) get an
    identity row and no step. Where the factorisation fails or the step is not finite, ``solved``
    is False and the step 0. With bounds the trial point is clipped to the box and ``step`` is
    ``x_new - x``.
    """
    check_step_inputs("lsq_propose", _PROPOSE_ARGS, (x, jtj, g, lam, scale, frozen, lb, ub))
    if bounded:
        free = (~frozen).to(x.dtype)
        damped = jtj * (free.unsqueeze(-1) * free.unsqueeze(-2))
        damped = damped + torch.diag_embed(lam.unsqueeze(-1) * scale * free + (1 - free))
        rhs = -g * free
    else:
        damped = jtj + torch.diag_embed(lam.unsqueeze(-1) * scale)
        rhs = -g
    chol, info = torch.linalg.cholesky_ex(damped)
    step = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    solved = (info == 0) & torch.isfinite(step).all(-1)
    step = torch.where(solved.unsqueeze(-1), step, 0)
    x_new = x + step
    if bounded:
        x_new = torch.minimum(torch.maximum(x_new, lb), ub)
        step = x_new - x
    return x_new, step, solved


def lsq_update_reference(
    x: Tensor,
    cost: Tensor,
    jtj: Tensor,
    g: Tensor,
    frozen: Tensor,
    status: Tensor,
    nfev: Tensor,
    scale: Tensor,
    lam: Tensor,
    nu: Tensor,
    lb: Tensor,
    ub: Tensor,
    x_new: Tensor,
    step: Tensor,
    solved: Tensor,
    cost_new: Tensor,
    jtj_new: Tensor,
    g_new: Tensor,
    colsq_new: Tensor,
    *,
    bounded: bool,
    ftol: float,
    xtol: float,
    gtol: float,
    cost_noise: float,
    max_nfev: int,
    lam_min: float,
    lam_max: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Accept or reject each problem's trial point, update its damping and test the stopping rules.

    State in: x (B, P), cost (B,), jtj (B, P, P), g (B, P), frozen (B, P) bool, status and nfev
    (B,) int64, scale (B, P), lam and nu (B,), lb and ub (B, P); the trial from
    :func:`lsq_propose_reference` (x_new, step, solved) and the evaluation at x_new (cost_new,
    jtj_new, g_new, colsq_new: squared column norms of the unscaled Jacobian). Returns the new
    ``(x, cost, jtj, g, frozen, optimality, status, nfev, scale, lam, nu)``; the inputs are not
    modified. Problems not running (status != LSQ_RUNNING) keep their state (their nfev too).

    ftol (MINPACK's test): actual and predicted reduction both at most ``ftol * cost`` and the
    gain ratio at most 2, or (ftol > 0) the predicted reduction at most ``ftol * cost`` and the
    actual one at most ``cost_noise * cost``: a computed reduction that small is rounding of the
    two costs, so its sign and the ratio say nothing. xtol: ``||step|| < xtol * (xtol + ||x||)``.
    gtol: inf-norm of the free gradient at the accepted point below gtol (wins over the others).
    """
    check_step_inputs(
        "lsq_update",
        _UPDATE_ARGS,
        (x, cost, jtj, g, frozen, status, nfev, scale, lam, nu, lb, ub, x_new, step, solved)
        + (cost_new, jtj_new, g_new, colsq_new),
    )
    for name, value in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol), ("cost_noise", cost_noise)):
        if not value >= 0:
            raise ValueError(f"lsq_update: {name} must be >= 0, got {value}")
    if max_nfev < 1:
        raise ValueError(f"lsq_update: max_nfev must be >= 1, got {max_nfev}")
    if not 0 < lam_min <= lam_max:
        raise ValueError(
            f"lsq_update: lam_min and lam_max must satisfy 0 < lam_min <= lam_max, got {lam_min} and {lam_max}"
        )
    running = status == LSQ_RUNNING
    # predicted reduction -(g.s + s.A.s / 2); torch.linalg.vecdot is one dispatch for mul and sum
    half_as = (jtj * step.unsqueeze(-2)).sum(-1)
    predicted = torch.linalg.vecdot(step, torch.add(g, half_as, alpha=0.5)).neg_()
    actual = cost - cost_new
    ratio = torch.where(predicted > 0, actual / predicted, -math.inf).nan_to_num_(nan=-math.inf)
    # one reduction for "all finite": a sum is finite only if its terms are (or it overflowed)
    finite = torch.isfinite(jtj_new.sum((-1, -2)).add_(g_new.sum(-1)).add_(cost_new))
    usable = solved & finite
    accept = usable & (ratio > LSQ_ACCEPT_RATIO) & running

    # MINPACK's ftol test (lmder info 1): max(|actual|, predicted) <= ftol * F is its pair of tests
    # in one; or the actual reduction lost in the costs' rounding (see the docstring).
    small_prediction = predicted <= ftol * cost
    ftol_met = usable & small_prediction & (actual.abs() <= ftol * cost) & (ratio <= 2)
    if ftol > 0 and cost_noise > 0:
        ftol_met |= usable & small_prediction & (actual.abs() <= cost_noise * cost)
    xtol_met = solved & (torch.linalg.vector_norm(step, dim=-1) < xtol * (xtol + torch.linalg.vector_norm(x, dim=-1)))
    # status codes: 2 ftol, 3 xtol, 4 both (2 + 3 - 1), 0 neither
    code = 2 * ftol_met.to(torch.int64) + 3 * xtol_met.to(torch.int64) - (ftol_met & xtol_met).to(torch.int64)

    take = accept.unsqueeze(-1)
    x = torch.where(take, x_new, x)
    g = torch.where(take, g_new, g)
    jtj = torch.where(take.unsqueeze(-1), jtj_new, jtj)
    cost = torch.where(accept, cost_new, cost)
    scale = torch.where(take & torch.isfinite(colsq_new), torch.maximum(scale, colsq_new), scale)
    shrink = (1 - (2 * ratio - 1) ** 3).clamp_min_(1 / 3)
    lam = (lam * torch.where(accept, shrink, nu)).clamp_(lam_min, lam_max)
    nu = torch.where(accept, 2.0, nu * 2)
    if bounded:
        frozen, gnorm = free_gradient_norm(x, g, lb, ub, bounded)
    else:  # nothing is ever frozen: keep the mask
        gnorm = g.abs().amax(-1)
    code = torch.where(accept & (gnorm < gtol), 1, code)  # gtol wins, as in scipy's loop

    nfev = nfev + running
    status = torch.where(running & (code > 0), code, status)
    status = torch.where((status == LSQ_RUNNING) & (nfev >= max_nfev), 0, status)
    return x, cost, jtj, g, frozen, gnorm, status, nfev, scale, lam, nu
