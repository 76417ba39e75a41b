"""One attempt's damped system of a Levenberg-Marquardt step, solved by Householder QR.

``matrix`` holds the undamped Gauss-Newton matrix in its lower triangle (fastopt.lm keeps only that
triangle); the system is the symmetric matrix S with S[i, j] = S[j, i] = matrix[i, j] for i > j and
S[i, i] = diagonal[i] + shift (``diagonal`` is the undamped diagonal, ``shift`` the damping: lambda,
or lambda max|diag| under adaptive damping, rounded in the dtype as ``diagonal + shift``), and
x solves S x = rhs through S = QR: LAPACK's geqrf, Q^T rhs by ormqr (Q never formed), then
R x = Q^T rhs, as torch-levenberg-marquardt's 'qr' solve. A singular S gives inf or NaN entries.

This is the executable spec of ``fastopt._C``'s ``lm_small_solve`` (csrc/lm_small_solve_cpu.cpp),
which factors small systems in one call, and the path where that op is missing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lm_small_solve_reference", "check_lm_small_solve_args"]

_DTYPES = (torch.float32, torch.float64)


def check_lm_small_solve_args(matrix: Tensor, diagonal: Tensor, rhs: Tensor) -> None:
    """The op's argument checks: TypeError for a dtype or a device, ValueError for a shape."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"lm_small_solve: matrix must be square (n, n), got shape {tuple(matrix.shape)}")
    if matrix.dtype not in _DTYPES:
        raise TypeError(f"lm_small_solve: matrix must be float32 or float64, got {matrix.dtype}")
    n = matrix.shape[0]
    for name, t in (("diagonal", diagonal), ("rhs", rhs)):
        if t.dtype != matrix.dtype:
            raise TypeError(f"lm_small_solve: {name} must have the dtype of matrix ({matrix.dtype}), got {t.dtype}")
        if t.device != matrix.device:
            raise TypeError(f"lm_small_solve: {name} must be on matrix's device ({matrix.device}), got {t.device}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"lm_small_solve: {name} must have shape (n,) with n = {n}, got {tuple(t.shape)}")


def lm_small_solve_reference(matrix: Tensor, diagonal: Tensor, rhs: Tensor, *, shift: float) -> Tensor:
    """x with S x = rhs, S as the module doc says; a new tensor, the inputs unchanged."""
    check_lm_small_solve_args(matrix, diagonal, rhs)
    n = matrix.shape[0]
    lower = torch.ones(n, n, dtype=torch.bool, device=matrix.device).tril_()
    full = torch.where(lower, matrix, matrix.mT)
    full.diagonal().copy_(diagonal + shift)
    a, tau = torch.geqrf(full)
    y = torch.ormqr(a, tau, rhs.unsqueeze(1), left=True, transpose=True)
    return torch.linalg.solve_triangular(a, y, upper=True).squeeze(1)
