"""The computations of a Levenberg-Marquardt step, shared by both fronts of :mod:`fastopt.lm`.

* :class:`FlatParameters`: the trainable parameters as one flat vector (the model's parameters
  become views into it, as in torch-levenberg-marquardt), with a backup for rejected attempts.
* :class:`ResidualJacobian`: ``[J | r]`` for a batch (slice), J = dr/dtheta over the selected
  parameters, by torch.func: per-sample ``vmap`` of ``jacrev`` (or ``jacfwd`` when a sample has more
  residuals than there are parameters). The residual column comes out of the same pass: the
  residual function is ``s * r(theta)`` evaluated at ``s = 1``, whose derivative in ``s`` is r.
* :func:`normal_equations`: ``J^T J / B`` and ``J^T r / B`` (overdetermined) or ``J J^T / B`` and
  ``r / B`` (underdetermined), through the ``jacobian_products`` op chosen by
  :func:`fastopt.backends.select`, slice by slice, the lower triangle only.
* :class:`DampedSolver`: the damped system for one damping value after another. The undamped
  matrix stays in place; an attempt rewrites only its diagonal (O(P)), since every factorization
  copies the matrix anyway. ``reuse="eigh"`` factors once per step instead (see its doc).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call, jacfwd, jacrev, vmap

from .. import backends
from ..reference.lm import symmetrize_lower
from ._tree import tree_slice, tree_unsqueeze

logger = logging.getLogger("fastopt.lm")

SOLVE_METHODS = ("qr", "cholesky", "solve")
JACOBIAN_MODES = ("auto", "jacrev", "jacfwd")
REUSE_MODES = ("auto", "never", "eigh")
FALLBACKS = (None, "qr", "solve", "lstsq")
LINALG_DTYPES = (torch.float32, torch.float64)


class SolveFailed(RuntimeError):
    """A damped system could not be solved at this damping (not positive definite, singular)."""


# -- parameters ----------------------------------------------------------------------------------
class FlatParameters:
    """The model's trainable parameters as one flat vector ``flat`` (the parameters' ``.data``
    become views into it, so one ``flat.add_`` updates the model), plus ``backup``."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        kinds = {(p.device, p.dtype) for _, p in named}
        if len(kinds) > 1:
            raise ValueError("Levenberg-Marquardt needs all trainable parameters on one device with one "
                             f"dtype; got {sorted(str(k) for k in kinds)}")
        device, dtype = next(iter(kinds))
        if dtype not in LINALG_DTYPES:
            raise TypeError(f"Levenberg-Marquardt solves its systems in float32 or float64; the model's "
                            f"parameters are {dtype} (convert the model with model.float() or model.double())")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.splits = [p.numel() for _, p in named]
        self.offsets = [0]
        for n in self.splits:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self.device, self.dtype = device, dtype
        self.flat = torch.cat([p.detach().flatten() for _, p in named])
        for (_, p), start, n in zip(named, self.offsets, self.splits):
            p.data = self.flat[start:start + n].view_as(p)
        self.backup = self.flat.clone()

    @torch.no_grad()
    def save(self) -> None:
        self.backup = self.flat.clone()

    @torch.no_grad()
    def restore(self) -> None:
        self.flat.copy_(self.backup)

    def tensors(self, flat: Tensor) -> Dict[str, Tensor]:
        """Name -> view of ``flat`` (a vector laid out like :attr:`flat`) in each parameter's shape."""
        return {name: t.view(shape) for name, t, shape in zip(self.names, torch.split(flat, self.splits), self.shapes)}


@dataclass
class Selection:
    """The columns of a step's Jacobian: flat indices (in the order given) and, per parameter
    tensor, how its entries enter: all of them in order ('whole'), none, or some ('partial')."""
    indices: Tensor
    plan: List[Tuple[str, Optional[Tensor], Optional[Tensor]]]  # (kind, positions in indices, local indices)

    @property
    def size(self) -> int:
        return self.indices.numel()


def make_selection(params: FlatParameters, indices: Any) -> Selection:
    """Check a strategy's indices and plan how each parameter tensor is rebuilt from them."""
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError("a parameter selection strategy must return a 1-D integer tensor of flat indices; got "
                         f"{indices if not isinstance(indices, Tensor) else (indices.dtype, tuple(indices.shape))}")
    if indices.numel() == 0:
        raise ValueError("the parameter selection strategy selected no parameters")
    host = indices.detach().to("cpu", torch.int64)
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= params.numel:
        raise ValueError(f"parameter selection indices must lie in [0, {params.numel}); got [{low}, {high}]")
    if torch.unique(host).numel() != host.numel():
        raise ValueError("parameter selection indices must be distinct")
    plan = []
    for start, n in zip(params.offsets, params.splits):
        inside = ((host >= start) & (host < start + n)).nonzero().flatten()
        if inside.numel() == 0:
            plan.append(("none", None, None))
            continue
        local = host[inside] - start
        contiguous = bool((inside == torch.arange(inside[0], inside[0] + inside.numel())).all())
        if inside.numel() == n and contiguous and bool((local == torch.arange(n)).all()):
            plan.append(("whole", inside[:1].clone(), None))
        else:
            plan.append(("partial", inside.to(params.device), local.to(params.device)))
    return Selection(indices.to(device=params.device, dtype=torch.int64), plan)


# -- the Jacobian ----------------------------------------------------------------------------------
class ResidualJacobian:
    """``[J | r]`` of ``loss_fn.residuals(model(inputs), targets)`` with respect to the (selected)
    flat parameters, one row per residual (sample-major, as ``residuals.view(-1)``)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Any, params: FlatParameters, use_vmap: bool = True,
                 mode: str = "auto"):
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.use_vmap, self.mode = use_vmap, mode

    def forward(self, inputs: Any) -> Any:
        """The model's outputs at the current parameters (``functional_call``, as tlm's ``forward``)."""
        return functional_call(self.model, {**dict(self.model.named_parameters()),
                                            **dict(self.model.named_buffers())}, inputs)

    def _residual_fn(self, selection: Optional[Selection]) -> Callable:
        params, model, loss_fn = self.params, self.model, self.loss_fn
        buffers = dict(model.named_buffers())

        def tensors_of(theta: Tensor) -> Dict[str, Tensor]:
            if selection is None:
                return params.tensors(theta)
            out = {}
            for (kind, positions, local), name, shape, start, n in zip(
                    selection.plan, params.names, params.shapes, params.offsets, params.splits):
                if kind == "whole":
                    first = int(positions[0])
                    out[name] = theta[first:first + n].view(shape)
                elif kind == "none":  # a constant: no gradient flows into unselected tensors
                    out[name] = params.flat[start:start + n].view(shape)
                else:
                    base = params.flat[start:start + n]
                    out[name] = base.index_put((local,), theta.index_select(0, positions)).view(shape)
            return out

        def scaled_residuals(theta_and_scale: Tensor, inputs: Any, targets: Any) -> Tensor:
            theta, scale = theta_and_scale[:-1], theta_and_scale[-1]
            outputs = functional_call(model, {**tensors_of(theta), **buffers}, inputs)
            # d(scale * r)/d(scale) at scale = 1 is r: the Jacobian's last column holds the residuals.
            return loss_fn.residuals(outputs, targets) * scale

        return scaled_residuals

    def __call__(self, inputs: Any, targets: Any, selection: Optional[Selection], residuals_per_sample: int) -> Tensor:
        theta = self.params.flat if selection is None else self.params.flat[selection.indices]
        augmented = torch.cat([theta, theta.new_ones(1)])
        fn = self._residual_fn(selection)
        columns = augmented.numel()
        forward_mode = self.mode == "jacfwd" or (self.mode == "auto" and residuals_per_sample > columns)
        jac = jacfwd if forward_mode else jacrev
        if self.use_vmap:
            # One sample at a time, seen as a batch of 1 (inputs unsqueezed), as tlm does.
            jacobian = vmap(jac(fn), in_dims=(None, 0, 0), randomness="different")(
                augmented, tree_unsqueeze(inputs, 1), tree_unsqueeze(targets, 1))
        else:
            jacobian = jac(lambda a: fn(a, inputs, targets))(augmented)
        return jacobian.reshape(-1, columns)


# -- the normal equations --------------------------------------------------------------------------
@dataclass
class NormalEquations:
    """One step's Gauss-Newton system.

    Overdetermined: ``matrix`` = J^T J / B (P x P), ``rhs`` = J^T r / B, ``jacobian`` None.
    Underdetermined: ``matrix`` = J J^T / B (N x N), ``rhs`` = r / B, ``jacobian`` = J (N x P).
    ``matrix`` holds its lower triangle (views into the products' output); ``diagonal`` is a copy of
    the undamped diagonal, which attempts overwrite.
    """
    overdetermined: bool
    matrix: Tensor
    rhs: Tensor
    diagonal: Tensor
    jacobian: Optional[Tensor]
    backend: str


def normal_equations(jacobian_fn: ResidualJacobian, inputs: Any, targets: Any, *, batch_size: int, rows: int,
                     num_residuals: int, overdetermined: bool, max_batch_size: Optional[int],
                     selection: Optional[Selection], backend: str) -> NormalEquations:
    """Build the system from ``[J | r]`` of the ``rows`` samples of the batch, in slices of
    ``max_batch_size`` samples (None: one slice).

    ``batch_size`` is the B of the 1/B normalisation and of the slice starts (the first batch's,
    for the tlm-compatible module, which may differ from ``rows``).
    """
    params = jacobian_fn.params
    per_sample = max(1, num_residuals // max(1, batch_size))
    if max_batch_size is None:
        slices = [(0, rows)]
    else:
        slices = [(s, min(s + max_batch_size, rows)) for s in range(0, batch_size, max_batch_size) if s < rows]
    columns = (selection.size if selection is not None else params.numel)
    op = "jacobian_products"
    backend_name = backends.resolve(op, params.device, params.dtype, backend)
    products = backends.implementation(op, backend_name)
    scale = 1.0 / batch_size

    def jacobian_of(start, end):
        if len(slices) == 1 and end == rows:
            return jacobian_fn(inputs, targets, selection, per_sample)
        return jacobian_fn(tree_slice(inputs, start, end), tree_slice(targets, start, end), selection, per_sample)

    if overdetermined:
        gram = torch.zeros(columns + 1, columns + 1, dtype=params.dtype, device=params.device)
        for start, end in slices:
            products(jacobian_of(start, end), gram, scale=scale)
        matrix, rhs = gram[:columns, :columns], gram[columns, :columns]
        return NormalEquations(True, matrix, rhs, matrix.diagonal().clone(), None, backend_name)
    pieces = [jacobian_of(start, end) for start, end in slices]
    augmented = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    del pieces
    jacobian, residuals = augmented[:, :columns], augmented[:, columns]
    rows = jacobian.shape[0]
    gram = torch.zeros(rows, rows, dtype=params.dtype, device=params.device)
    products(jacobian.t(), gram, scale=scale)
    return NormalEquations(False, gram, residuals * scale, gram.diagonal().clone(), jacobian, backend_name)


# -- solving for one damping value after another ----------------------------------------------------
def _cholesky_failure(info: int) -> SolveFailed:
    return SolveFailed("linalg.cholesky: The factorization could not be completed because the input is not "
                       f"positive-definite (the leading minor of order {info} is not positive-definite).")


class DampedSolver:
    """Solves ``(matrix + damping) x = rhs`` for successive dampings of one step.

    ``solve_diagonal(shift)`` takes the damping as a vector added to the diagonal (the standard
    strategy's ``damping_diagonal``); ``solve_matrix(damped)`` takes a full damped matrix (custom
    ``apply``). Methods, as torch-levenberg-marquardt's ``_solve``: 'cholesky' (LAPACK potrf on the
    lower triangle, no copy to symmetrise), 'qr' (Householder QR; Q is applied, never formed),
    'solve' (LU with partial pivoting). A matrix that is not positive definite (cholesky) or is
    singular (solve) raises :class:`SolveFailed`; with ``fallback`` ('qr', 'solve' or 'lstsq')
    that method solves the same damped system instead.

    ``eigh`` mode (``reuse="eigh"``): one eigendecomposition of the undamped (for fletcher,
    diagonally scaled) matrix per step, then each damping costs two matrix-vector products:
    ``x = V (V^T rhs) / (w + lambda)``. Measured on this project's CPU (MKL, P = 2048 fp32),
    ``torch.linalg.eigh`` took ~100x a Cholesky, so ``reuse="auto"`` does not use it there.
    """

    def __init__(self, equations: NormalEquations, method: str, fallback: Optional[str] = None):
        self.eq, self.method, self.fallback = equations, method, fallback
        self._full: Optional[Tensor] = None
        self._spectral: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None

    # -- matrices -------------------------------------------------------------------------------
    def undamped_full(self) -> Tensor:
        """The full symmetric undamped matrix (a new tensor)."""
        self.eq.matrix.diagonal().copy_(self.eq.diagonal)
        return symmetrize_lower(self.eq.matrix)

    def _damped_in_place(self, shift: Tensor, full: bool) -> Tensor:
        if full:
            if self._full is None:
                self._full = self.undamped_full()
            target = self._full
        else:
            target = self.eq.matrix
        target.diagonal().copy_(self.eq.diagonal + shift)
        return target

    # -- solves ---------------------------------------------------------------------------------
    def solve_diagonal(self, shift: Tensor) -> Tensor:
        return self._solve(self._damped_in_place(shift, full=self.method != "cholesky"), self.method)

    def solve_matrix(self, damped: Tensor) -> Tensor:
        return self._solve(damped, self.method)

    def _solve(self, matrix: Tensor, method: str) -> Tensor:
        rhs = self.eq.rhs.unsqueeze(1)
        try:
            return _solve_with(matrix, rhs, method).squeeze(1)
        except SolveFailed:
            if self.fallback is None:
                raise
            full = matrix if method != "cholesky" else symmetrize_lower(matrix)
            logger.debug("fastopt.lm: %s failed; solving with %s", method, self.fallback)
            return _solve_with(full, rhs, self.fallback).squeeze(1)

    def solve_spectral(self, damping: float, mode: str) -> Tensor:
        """``reuse="eigh"``: the solution for ``damping`` (lambda) under ``mode`` from one
        eigendecomposition per step. Raises SolveFailed where the damped matrix is not positive
        definite (where a Cholesky would fail)."""
        if self._spectral is None:
            self._spectral = self._decompose(mode)
        w, v, scale = self._spectral
        d = self.eq.diagonal
        if mode == "adaptive":
            lam = damping * d.abs().max()
        else:
            lam = torch.as_tensor(damping, dtype=w.dtype, device=w.device)
        denom = w + lam
        if not bool((denom > 0).all()):
            raise SolveFailed("the damped matrix is not positive definite at this damping")
        rhs = self.eq.rhs if scale is None else self.eq.rhs * scale
        x = v @ ((v.t() @ rhs) / denom)
        return x if scale is None else x * scale

    def _decompose(self, mode: str):
        self.eq.matrix.diagonal().copy_(self.eq.diagonal)
        if mode == "fletcher":
            d = self.eq.diagonal
            if not bool((d > 0).all()):
                raise SolveFailed("fletcher damping with a zero diagonal entry has no scaled eigendecomposition")
            scale = d.rsqrt()
            w, v = torch.linalg.eigh(self.eq.matrix * scale[:, None] * scale[None, :])
            return w, v, scale
        w, v = torch.linalg.eigh(self.eq.matrix)
        return w, v, None


def _solve_with(matrix: Tensor, rhs: Tensor, method: str) -> Tensor:
    if method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) != 0:
            raise _cholesky_failure(int(info))
        return torch.cholesky_solve(rhs, factor)
    if method == "qr":
        a, tau = torch.geqrf(matrix)
        y = torch.ormqr(a, tau, rhs, left=True, transpose=True)
        return torch.linalg.solve_triangular(a, y, upper=True)
    if method == "solve":
        x, info = torch.linalg.solve_ex(matrix, rhs)
        if int(info) != 0:
            raise SolveFailed("torch.linalg.solve: The solver failed because the input matrix is singular.")
        return x
    if method == "lstsq":
        return torch.linalg.lstsq(matrix, rhs).solution
    raise ValueError(f"Invalid solve_method: {method!r}. Choose from: {SOLVE_METHODS}")
