"""Solving the damped system for one damping value after another: :class:`DampedSolver`."""

from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ... import backends
from ...reference.lm import symmetrize_lower
from .normal_equations import NormalEquations, chosen_backend
from .workspace import Workspace

logger = logging.getLogger("fastopt.lm")

SOLVE_METHODS = ("qr", "cholesky", "solve")
REUSE_MODES = ("auto", "never", "eigh")
FALLBACKS = (None, "qr", "solve", "lstsq")

# Up to this many columns a 'qr' attempt goes to the lm_small_solve op (one call: the damped
# matrix built, factored and solved), where its backend is not plain torch. Measured against
# torch's geqrf + ormqr + solve_triangular on this project's CPU (2 threads, load 2): 2.5x / 1.8x
# faster at 61 columns (float32 / float64), 1.5x / 1.4x at 96, 1.6x / 0.89x at 128, 0.9x / 0.75x
# at 160 (bench/lm_sinc_floor.py times the 61-column solve each run).
SMALL_QR_COLUMNS = 96


class SolveFailed(RuntimeError):
    """A damped system could not be solved at this damping (not positive definite, singular)."""


def _cholesky_failure(info: int) -> SolveFailed:
    return SolveFailed(
        "linalg.cholesky: The factorization could not be completed because the input is not "
        f"positive-definite (the leading minor of order {info} is not positive-definite)."
    )


class DampedSolver:
    """Solves ``(matrix + damping) x = rhs`` for successive dampings of one step.

    ``solve_diagonal(shift)`` takes the damping as a vector added to the diagonal (the standard
    strategy's ``damping_diagonal``); ``solve_matrix(damped)`` takes a full damped matrix (custom
    ``apply``). Methods, as torch-levenberg-marquardt's ``_solve``: 'cholesky' (LAPACK potrf on the
    lower triangle, no copy to symmetrise), 'qr' (Householder QR; Q is applied, never formed),
    'solve' (LU with partial pivoting). A matrix that is not positive definite (cholesky) or is
    singular (solve) raises :class:`SolveFailed`; with ``fallback`` ('qr', 'solve' or 'lstsq')
    that method solves the same damped system instead. Factors go to the workspace's buffers.
    A 'qr' system of up to :data:`SMALL_QR_COLUMNS` columns goes to the ``lm_small_solve`` op
    (backend ``backend``, chosen by :mod:`fastopt.backends`) unless that resolves to plain torch.

    ``eigh`` mode (``reuse="eigh"``): one eigendecomposition of the undamped (for fletcher,
    diagonally scaled) matrix per step, then each damping costs two matrix-vector products:
    ``x = V (V^T rhs) / (w + lambda)``. Measured on this project's CPU (MKL, P = 2048 fp32),
    ``torch.linalg.eigh`` took ~100x a Cholesky, so ``reuse="auto"`` does not use it there.
    """

    def __init__(self, equations: NormalEquations, method: str, fallback: Optional[str] = None, backend: str = "auto"):
        self.eq, self.method, self.fallback = equations, method, fallback
        self._full: Optional[Tensor] = None
        self._spectral: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None
        self._small_qr = None
        m = equations.matrix
        if method == "qr" and m.shape[0] <= SMALL_QR_COLUMNS:
            try:
                chosen = chosen_backend("lm_small_solve", m.device, m.dtype, backend)
            except backends.BackendUnavailableError:
                chosen = None  # a backend named for the products that lacks this op: the path below
            # Plain torch would rebuild the full matrix per attempt: the path below keeps it.
            self._small_qr = chosen.fn if chosen is not None and chosen.name != "torch" else None

    # -- matrices -------------------------------------------------------------------------------
    def undamped_full(self) -> Tensor:
        """The full symmetric undamped matrix (a new tensor)."""
        self.eq.matrix.diagonal().copy_(self.eq.diagonal)
        return symmetrize_lower(self.eq.matrix)

    def _full_matrix(self) -> Tensor:
        """The full symmetric matrix in a workspace buffer, built once per step: one ``where``
        against a kept lower-triangle mask (the lower triangle, else the transposed one)."""
        if self._full is None:
            m = self.eq.matrix
            full = self.eq.workspace.matrix("full", m.shape[0], m.shape[1], m.dtype, m.device)
            torch.where(_lower_mask(m.shape[0], m.device), m, m.mT, out=full)
            self._full = full
        return self._full

    # -- solves ---------------------------------------------------------------------------------
    def solve_diagonal(self, shift: Union[Tensor, float]) -> Tensor:
        """The solution with ``shift`` (a float, or a tensor that broadcasts against the diagonal)
        added to the undamped diagonal."""
        if self._small_qr is not None:
            if isinstance(shift, Tensor) and shift.dim() > 0:  # fletcher: lambda diag(JJ)
                return self._small_qr(self.eq.matrix, self.eq.diagonal + shift, self.eq.rhs, shift=0.0)
            return self._small_qr(self.eq.matrix, self.eq.diagonal, self.eq.rhs, shift=float(shift))
        target = self.eq.matrix if self.method == "cholesky" else self._full_matrix()
        torch.add(self.eq.diagonal, shift, out=target.diagonal())
        # The full matrix is symmetric by construction: QR may read it as column-major.
        return self._solve(target, self.method, symmetric=self.method != "cholesky")

    def solve_matrix(self, damped: Tensor) -> Tensor:
        return self._solve(damped, self.method)

    def _solve(self, matrix: Tensor, method: str, symmetric: bool = False) -> Tensor:
        rhs = self.eq.rhs.unsqueeze(1)
        try:
            return _solve_with(matrix, rhs, method, self.eq.workspace, symmetric).squeeze(1)
        except SolveFailed:
            if self.fallback is None:
                raise
            full = matrix if method != "cholesky" else symmetrize_lower(matrix)
            logger.debug("fastopt.lm: %s failed; solving with %s", method, self.fallback)
            return _solve_with(full, rhs, self.fallback, self.eq.workspace).squeeze(1)

    def solve_spectral(self, damping: float, mode: str) -> Tensor:
        """``reuse="eigh"``: the solution for ``damping`` (lambda) under ``mode`` from one
        eigendecomposition per step. Raises SolveFailed where the damped matrix is not positive
        definite (where a Cholesky would fail)."""
        if self._spectral is None:
            self._spectral = self._decompose(mode)
        w, v, scale = self._spectral
        if mode == "adaptive":
            lam = damping * self.eq.diagonal.abs().max()
        else:
            lam = torch.as_tensor(damping, dtype=w.dtype, device=w.device)
        denom = w + lam
        if not bool((denom > 0).all()):
            raise SolveFailed("the damped matrix is not positive definite at this damping")
        rhs = self.eq.rhs if scale is None else self.eq.rhs * scale
        x = v @ ((v.t() @ rhs) / denom)
        return x if scale is None else x * scale

    def _decompose(self, mode: str):
        m = self.eq.matrix
        m.diagonal().copy_(self.eq.diagonal)
        if mode == "fletcher":
            d = self.eq.diagonal
            if not bool((d > 0).all()):
                raise SolveFailed("fletcher damping with a zero diagonal entry has no scaled eigendecomposition")
            scale = d.rsqrt()
            w, v = torch.linalg.eigh(m * scale[:, None] * scale[None, :])
            return w, v, scale
        w, v = torch.linalg.eigh(m)
        return w, v, None


@functools.lru_cache(maxsize=8)
def _lower_mask(n: int, device: torch.device) -> Tensor:
    """True on and below the diagonal of an n x n matrix (kept: one per size and device)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def _solve_with(matrix: Tensor, rhs: Tensor, method: str, workspace: Workspace, symmetric: bool = False) -> Tensor:
    """``matrix x = rhs`` by ``method``; ``symmetric``: ``matrix`` equals its transpose (then QR
    factors its column-major view, the layout LAPACK works in, and copies no transpose)."""
    n = matrix.shape[0]
    if method == "cholesky":
        # The factor goes to a column-major buffer (LAPACK's layout: no copy back) and LAPACK
        # factors its lower triangle, the lower triangle ``matrix`` holds. torch copies the
        # row-major ``matrix`` into that buffer first, a transposing copy, yet potrf('L') after
        # it ran faster than potrf('U') on the untransposed copy: P = 4353 fp32, 2 threads,
        # MKL on this project's AMD EPYC, 199-208 ms against 223-246 ms per attempt
        # (alternating, same process).
        factor = workspace.get("factor", (n, n), matrix.dtype, matrix.device).mT
        info = workspace.get("info", (), torch.int32, matrix.device)
        torch.linalg.cholesky_ex(matrix, out=(factor, info))
        if int(info) != 0:
            raise _cholesky_failure(int(info))
        return torch.cholesky_solve(rhs, factor)
    if method == "qr":
        # Into a column-major factor: geqrf writes LAPACK's layout with no transposing copy back,
        # and ormqr and the triangular solve read it as it is (61 x 61 fp32: ~6 us less an attempt).
        factor = workspace.get("factor", (n, n), matrix.dtype, matrix.device).mT
        tau = workspace.get("tau", (n,), matrix.dtype, matrix.device)
        a, tau = torch.geqrf(matrix.mT if symmetric else matrix, out=(factor, tau))
        y = torch.ormqr(a, tau, rhs, left=True, transpose=True)
        return torch.linalg.solve_triangular(a, y, upper=True)
    if method == "solve":
        lu, pivots, info = torch.linalg.lu_factor_ex(
            matrix,
            out=(
                workspace.get("factor", (n, n), matrix.dtype, matrix.device),
                workspace.get("pivots", (n,), torch.int32, matrix.device),
                workspace.get("info", (), torch.int32, matrix.device),
            ),
        )
        if int(info) != 0:
            raise SolveFailed("torch.linalg.solve: The solver failed because the input matrix is singular.")
        return torch.linalg.lu_solve(lu, pivots, rhs)
    if method == "lstsq":
        # The minimum-norm solution by SVD. LAPACK's default gelsy returned 0 for a damped
        # matrix with one zero row and column (checked with torch 2.13), and CUDA's only driver,
        # gels, assumes full rank: gelsd on the CPU, the pseudo-inverse elsewhere.
        if matrix.device.type == "cpu":
            return torch.linalg.lstsq(matrix, rhs, driver="gelsd").solution
        return torch.linalg.pinv(matrix) @ rhs
    raise ValueError(f"Invalid solve_method: {method!r}. Choose from: {SOLVE_METHODS}")
