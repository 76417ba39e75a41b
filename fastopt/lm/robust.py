"""Robust loss functions of :func:`fastopt.lm.least_squares`, defined exactly as
``scipy.optimize.least_squares`` defines them.

A loss ``rho`` acts on the squared residuals ``z = f**2``; the cost of one problem is
``0.5 * sum_i rho(f_i**2)``. With a soft margin ``f_scale = C`` the loss is rescaled,
``rho_C(z) = C**2 * rho(z / C**2)``, so residuals well below ``C`` count as squares and larger ones
are damped. The implemented losses, their first and second derivatives in ``z``:

==========  ===========================  ========================  =============================
name        rho(z)                       rho'(z)                   rho''(z)
==========  ===========================  ========================  =============================
linear      z                            1                         0
soft_l1     2 (sqrt(1 + z) - 1)          (1 + z)^-1/2              -1/2 (1 + z)^-3/2
huber       z if z <= 1 else             1 if z <= 1 else z^-1/2   0 if z <= 1 else -1/2 z^-3/2
            2 sqrt(z) - 1
cauchy      log(1 + z)                   1 / (1 + z)               -1 / (1 + z)^2
arctan      arctan(z)                    1 / (1 + z^2)             -2 z / (1 + z^2)^2
==========  ===========================  ========================  =============================

A callable ``loss(z)`` returning ``(rho, rho', rho'')`` (three tensors shaped like ``z``) is accepted
too, as in scipy.

The solver minimises the robust cost with the Gauss-Newton model of scipy's
``scale_for_robust_loss_function`` (Triggs et al., "Bundle adjustment - a modern synthesis", 1999):
with ``s = sqrt(max(rho' + 2 rho'' f**2, eps))`` the scaled residuals ``f * rho' / s`` and the scaled
Jacobian ``s * J`` give ``J_s^T f_s = J^T (rho' f)``, the exact gradient of the cost, and
``J_s^T J_s`` a positive semi-definite Hessian approximation.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["LOSSES", "LossFunction", "robust_loss", "scale_for_robust_loss"]

Derivatives = Tuple[Tensor, Tensor, Tensor]
LossFunction = Callable[[Tensor], Derivatives]


def _linear(z: Tensor) -> Derivatives:
    return z, torch.ones_like(z), torch.zeros_like(z)


def _soft_l1(z: Tensor) -> Derivatives:
    t = 1 + z
    return 2 * (t.sqrt() - 1), t.rsqrt(), -0.5 * t.pow(-1.5)


def _huber(z: Tensor) -> Derivatives:
    inner = z <= 1
    # z is clamped away from 0 in the outer branch only so that its unused values stay finite.
    zo = torch.where(inner, torch.ones_like(z), z)
    return (
        torch.where(inner, z, 2 * zo.sqrt() - 1),
        torch.where(inner, torch.ones_like(z), zo.rsqrt()),
        torch.where(inner, torch.zeros_like(z), -0.5 * zo.pow(-1.5)),
    )


def _cauchy(z: Tensor) -> Derivatives:
    t = 1 + z
    return torch.log1p(z), 1 / t, -1 / (t * t)


def _arctan(z: Tensor) -> Derivatives:
    t = 1 + z * z
    return torch.arctan(z), 1 / t, -2 * z / (t * t)


LOSSES = {"linear": _linear, "soft_l1": _soft_l1, "huber": _huber, "cauchy": _cauchy, "arctan": _arctan}


def robust_loss(loss: Union[str, LossFunction], f: Tensor, f_scale: float) -> Derivatives:
    """``(rho, rho', rho'')`` of the residuals ``f`` with scipy's ``f_scale`` convention:
    ``z = (f / C)**2``, ``rho = C**2 rho_base(z)``, ``rho' = rho_base'(z)``, ``rho'' = rho_base''(z) / C**2``
    (derivatives with respect to ``f**2``)."""
    fn = LOSSES[loss] if isinstance(loss, str) else loss
    c2 = f_scale * f_scale
    rho, d1, d2 = fn((f / f_scale) ** 2)
    return rho * c2, d1, d2 / c2


def scale_for_robust_loss(jac: Tensor, f: Tensor, d1: Tensor, d2: Tensor) -> Tuple[Tensor, Tensor]:
    """scipy's ``scale_for_robust_loss_function``: ``(J * s, f * rho' / s)`` with
    ``s = sqrt(max(rho' + 2 rho'' f**2, eps))`` per residual; ``jac`` is (B, N, P), ``f`` (B, N)."""
    eps = torch.finfo(f.dtype).eps
    scale = (d1 + 2 * d2 * f * f).clamp_min(eps).sqrt()
    return jac * scale.unsqueeze(-1), f * (d1 / scale)


def validate_loss(loss: object) -> Optional[str]:
    """An error message if ``loss`` is neither a known name nor a callable, else None."""
    if callable(loss) or (isinstance(loss, str) and loss in LOSSES):
        return None
    return f"Invalid loss: {loss!r}. Choose from: {tuple(LOSSES)} or pass a callable loss(z) -> (rho, rho', rho'')"
