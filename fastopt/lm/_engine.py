"""The computations of a Levenberg-Marquardt step, shared by both fronts of :mod:`fastopt.lm`.

* :class:`FlatParameters`: the trainable parameters as one flat vector (the model's parameters
  become views into it, as in torch-levenberg-marquardt), with a backup for rejected attempts.
* :class:`ResidualJacobian`: ``[J | r]`` for a batch slice, J = dr/dtheta over the selected
  parameters. Layer stacks (``nn.Sequential`` of Linear/Conv2d and sample-wise modules) go
  layer by layer (:mod:`fastopt.lm._layerwise`), straight into a kept buffer; anything else
  through torch.func: per-sample ``vmap`` of ``jacrev`` (``jacfwd`` when a sample has more
  residuals than there are parameters), where the residual column comes out of the same pass:
  the function is ``s * r(theta)`` at ``s = 1``, whose derivative in ``s`` is r.
* :func:`normal_equations`: ``J^T J / B`` and ``J^T r / B`` (overdetermined) or ``J J^T / B`` and
  ``r / B`` (underdetermined), through the ``jacobian_products`` op chosen by
  :func:`fastopt.backends.select`, slice by slice (at most ``max_batch_size`` samples, and at
  most :func:`chunk_samples` per Jacobian call), the lower triangle only.
* :class:`DampedSolver`: the damped system for one damping value after another. The undamped
  matrix stays in place; an attempt rewrites only its diagonal (O(P)), since every factorization
  copies the matrix anyway. ``reuse="eigh"`` factors once per step instead (see its doc).
* :class:`Workspace`: the big buffers, kept from step to step.
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
from ._layerwise import LayerwiseJacobian, unsupported_reason
from .tree import tree_slice, tree_unsqueeze

logger = logging.getLogger("fastopt.lm")

SOLVE_METHODS = ("qr", "cholesky", "solve")
JACOBIAN_MODES = ("auto", "layerwise", "jacrev", "jacfwd")
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
        self.parameters = [p for _, p in named]

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
    """The columns of a step's Jacobian: flat indices (in the order given), and how to rebuild each
    parameter tensor from the vector of selected values.

    ``sizes`` splits that vector into one piece per selected tensor (indices sorted ascending), or
    is one piece (any other order). ``plan`` has per parameter tensor (kind, piece, positions,
    local): 'whole' (the piece is the tensor), 'part' (the piece holds the entries ``local``),
    'gather' (entries ``local`` from ``positions`` of the single piece) or 'none' (a constant).
    """
    indices: Tensor
    sizes: List[int]
    plan: List[Tuple[str, int, Optional[Tensor], Optional[Tensor]]]

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
    ascending = host.numel() == 1 or bool((host[1:] > host[:-1]).all())
    plan, sizes = [], []
    for start, n in zip(params.offsets, params.splits):
        inside = ((host >= start) & (host < start + n)).nonzero().flatten()
        if inside.numel() == 0:
            plan.append(("none", -1, None, None))
            continue
        local = (host[inside] - start).to(params.device)
        if not ascending:
            plan.append(("gather", 0, inside.to(params.device), local))
            continue
        # Sorted indices: this tensor's entries are one contiguous piece of the selected values.
        plan.append(("whole" if inside.numel() == n else "part", len(sizes), None, local))
        sizes.append(inside.numel())
    if not ascending:
        sizes = [host.numel()]
    return Selection(indices.to(device=params.device, dtype=torch.int64), sizes, plan)


# -- the Jacobian ----------------------------------------------------------------------------------
def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, else ``model(inputs)``: how ``functional_call`` passes
    arguments, without its cost of swapping every parameter in and out."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


class ResidualJacobian:
    """``[J | r]`` of ``loss_fn.residuals(model(inputs), targets)`` with respect to the (selected)
    flat parameters, one row per residual (sample-major, as ``residuals.view(-1)``).

    The differentiated vector is ``[theta | s]`` and the function ``s * r(theta)``: at s = 1 its
    derivative in s is r, so the residuals come out as the last column of the same Jacobian. The
    vector is cut with one ``torch.split`` (not slices: the backward of a slice allocates and adds
    a zero tensor of the full Jacobian's size, which measured 0.85 s of a 1.75 s Jacobian at
    8000 x 4353), whose backward writes the rows of ``[J | r]`` in one ``cat``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, params: FlatParameters, use_vmap: bool = True,
                 mode: str = "auto"):
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.use_vmap, self.mode = use_vmap, mode
        self._layerwise: Optional[LayerwiseJacobian] = None
        self.last_layerwise_outputs: Optional[Tensor] = None

    def forward(self, inputs: Any) -> Any:
        """The model's outputs at the current parameters."""
        return call_model(self.model, inputs)

    def _residual_fn(self, selection: Optional[Selection]) -> Tuple[Callable, List[int]]:
        params, model, loss_fn = self.params, self.model, self.loss_fn
        buffers = dict(model.named_buffers())
        names, shapes = params.names, params.shapes

        if selection is None:
            sizes = list(params.splits)

            def tensors_of(pieces):
                return {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}
        else:
            sizes = list(selection.sizes)
            constants = [params.flat[start:start + n] for start, n in zip(params.offsets, params.splits)]

            def tensors_of(pieces):
                out = {}
                for (kind, piece, positions, local), name, shape, base in zip(selection.plan, names, shapes, constants):
                    if kind == "whole":
                        out[name] = pieces[piece].view(shape)
                    elif kind == "part":
                        out[name] = base.index_put((local,), pieces[piece]).view(shape)
                    elif kind == "gather":
                        out[name] = base.index_put((local,), pieces[0].index_select(0, positions)).view(shape)
                    else:  # not selected: a constant, no gradient flows into it
                        out[name] = base.view(shape)
                return out

        def scaled_residuals(theta_and_scale: Tensor, inputs: Any, targets: Any) -> Tensor:
            pieces = torch.split(theta_and_scale, sizes + [1])
            outputs = functional_call(model, {**tensors_of(pieces[:-1]), **buffers}, inputs)
            return loss_fn.residuals(outputs, targets) * pieces[-1]

        return scaled_residuals, sizes

    def layerwise_reason(self, inputs: Any, selection: Optional[Selection]) -> Optional[str]:
        """Why the layer-by-layer Jacobian (fastopt.lm._layerwise) cannot serve this call; None if it can."""
        if selection is not None:
            return "a parameter selection is active"
        if not self.use_vmap:
            return "use_vmap=False asks for one jacrev of the whole batch"
        if not isinstance(inputs, Tensor):
            return "the inputs are not one tensor"
        return unsupported_reason(self.model)

    def __call__(self, inputs: Any, targets: Any, selection: Optional[Selection], residuals_per_sample: int,
                 out: Optional[Tensor] = None) -> Tensor:
        """``[J | r]`` of the batch: written into ``out`` (rows x (P + 1)) when the layer-by-layer
        path runs, else a new tensor from torch.func."""
        columns = (selection.size if selection is not None else self.params.numel) + 1
        self.last_layerwise_outputs = None
        if self.mode in ("auto", "layerwise") and out is not None:
            reason = self.layerwise_reason(inputs, selection)
            if reason is None:
                if self._layerwise is None:
                    offsets = {id(p): start for p, start in zip(self.params.parameters, self.params.offsets)}
                    self._layerwise = LayerwiseJacobian(self.model, offsets)
                result = self._layerwise(inputs, targets, self.loss_fn, out)
                self.last_layerwise_outputs = self._layerwise.last_outputs
                return result
            if self.mode == "layerwise":
                raise ValueError(f"jacobian='layerwise' cannot differentiate this model: {reason}; use jacobian='auto'")
        theta = self.params.flat if selection is None else self.params.flat[selection.indices]
        augmented = torch.cat([theta, theta.new_ones(1)])
        fn, _ = self._residual_fn(selection)
        forward_mode = self.mode == "jacfwd" or (self.mode == "auto" and residuals_per_sample > columns)
        jac = jacfwd if forward_mode else jacrev
        if self.use_vmap:
            # One sample at a time, seen as a batch of 1 (inputs unsqueezed), as tlm does.
            jacobian = vmap(jac(fn), in_dims=(None, 0, 0), randomness="different")(
                augmented, tree_unsqueeze(inputs, 1), tree_unsqueeze(targets, 1))
        else:
            jacobian = jac(lambda a: fn(a, inputs, targets))(augmented)
        return jacobian.reshape(-1, columns)


class Workspace:
    """Buffers kept from step to step. On this project's VM a fresh 139 MB tensor costs ~0.25 s of
    page faults the first time it is written, against 0.04 s to fill it again (measured): the
    Gram matrix, the Cholesky factor and the like are allocated once and reused."""

    def __init__(self):
        self._buffers: Dict[str, Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, the same memory as last time when it fits."""
        numel = 1
        for n in shape:
            numel *= n
        return self._memory(name, numel, dtype, device)[:numel].view(shape)

    def matrix(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised (rows, cols) matrix whose rows start on 64-byte boundaries: gemms that
        write into it ran ~1.45x faster than with rows at an odd stride (fastopt/reference/lm.py)."""
        per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
        stride = -(-cols // per_line) * per_line
        return self._memory(name, rows * stride, dtype, device)[:rows * stride].view(rows, stride)[:, :cols]

    def _memory(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()


# Rows of [J | r] per Jacobian call. torch.func returns a new tensor each call: up to ~16 MB, so
# that its transient tensors come from the allocator's reusable heap rather than fresh
# page-faulted mappings (glibc maps blocks above its 32 MB ceiling afresh each time). The
# layer-by-layer path writes into a buffer kept between steps: up to ~64 MB, as fewer, taller
# slices ran faster (8000 x 4354 fp32, 2 threads on the loaded 2-core machine: 3.9 s in 4 slices
# of 2000 rows against 5.0 s in 9 of 963). At least 512 rows, so that each accumulation into the
# Gram matrix stays a well-shaped gemm.
_CHUNK_BYTES = {False: 16 << 20, True: 64 << 20}
_MIN_CHUNK_ROWS = 512


def chunk_samples(columns: int, element_size: int, residuals_per_sample: int, persistent: bool = False) -> int:
    """Samples per Jacobian call for ``columns`` columns (see _CHUNK_BYTES)."""
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES[persistent] // max(1, columns * element_size))
    return max(1, rows // max(1, residuals_per_sample))


# -- the normal equations --------------------------------------------------------------------------
@dataclass
class NormalEquations:
    """One step's Gauss-Newton system.

    Overdetermined: ``matrix`` = J^T J / B (P x P), ``rhs`` = J^T r / B, ``jacobian`` None.
    Underdetermined: ``matrix`` = J J^T / B (N x N), ``rhs`` = r / B, ``jacobian`` = J (N x P).
    ``matrix`` holds its lower triangle (a view into the products' output); ``diagonal`` is a copy
    of the undamped diagonal, which attempts overwrite.
    """
    overdetermined: bool
    matrix: Tensor
    rhs: Tensor
    diagonal: Tensor
    jacobian: Optional[Tensor]
    backend: str
    workspace: Workspace
    outputs: Any = None  # the model's outputs on the whole batch, when building the system gave them
    products: Optional[Tensor] = None  # overdetermined: all of [J | r]^T [J | r] (lower), matrix and rhs are views


def normal_equations(jacobian_fn: ResidualJacobian, inputs: Any, targets: Any, *, batch_size: int, rows: int,
                     num_residuals: int, overdetermined: bool, max_batch_size: Optional[int],
                     selection: Optional[Selection], backend: str, workspace: Workspace,
                     scale: Optional[float] = None) -> NormalEquations:
    """Build the system from ``[J | r]`` of the ``rows`` samples of the batch, in slices of
    ``max_batch_size`` samples (None: one slice), each computed in chunks (:func:`chunk_samples`).

    ``batch_size`` is the B of the 1/B normalisation and of the slice starts (the first batch's,
    for the tlm-compatible module, which may differ from ``rows``); ``scale`` replaces that 1/B
    (data-parallel LM builds the unscaled sum and scales it after the all-reduce).
    """
    params = jacobian_fn.params
    per_sample = max(1, num_residuals // max(1, batch_size))
    columns = selection.size if selection is not None else params.numel
    if max_batch_size is None:
        slices = [(0, rows)]
    else:
        slices = [(s, min(s + max_batch_size, rows)) for s in range(0, batch_size, max_batch_size) if s < rows]
    layerwise = jacobian_fn.mode in ("auto", "layerwise") and jacobian_fn.layerwise_reason(inputs, selection) is None
    chunk = chunk_samples(columns + 1, params.flat.element_size(), per_sample, persistent=layerwise)
    pieces = [(s, min(s + chunk, end)) for start, end in slices for s in range(start, end, chunk)]
    op = "jacobian_products"
    backend_name = backends.resolve(op, params.device, params.dtype, backend)
    products = backends.implementation(op, backend_name)
    if scale is None:
        scale = 1.0 / batch_size

    def jacobian_of(start, end, out):
        if start == 0 and end == rows:
            return jacobian_fn(inputs, targets, selection, per_sample, out)
        return jacobian_fn(tree_slice(inputs, start, end), tree_slice(targets, start, end), selection, per_sample, out)

    def whole_batch_outputs():
        # One piece through the layer-by-layer path: its forward was the model's on the batch.
        layerwise = jacobian_fn.last_layerwise_outputs
        return layerwise if len(pieces) == 1 and pieces[0] == (0, rows) else None

    if overdetermined:
        gram = workspace.matrix("gram", columns + 1, columns + 1, params.dtype, params.device).zero_()
        for start, end in pieces:
            out = workspace.get("chunk", ((end - start) * per_sample, columns + 1), params.dtype, params.device)
            products(jacobian_of(start, end, out), gram, scale=scale)
        matrix, rhs = gram[:columns, :columns], gram[columns, :columns]
        return NormalEquations(True, matrix, rhs, matrix.diagonal().clone(), None, backend_name, workspace,
                               whole_batch_outputs(), gram)
    augmented = workspace.get("jacobian", (rows * per_sample, columns + 1), params.dtype, params.device)
    filled = 0
    for start, end in pieces:
        out = augmented[filled:filled + (end - start) * per_sample]
        part = jacobian_of(start, end, out)
        if part.shape[0] != out.shape[0]:
            raise ValueError(f"samples {start}..{end} gave {part.shape[0]} residuals, expected {out.shape[0]} "
                             f"({per_sample} per sample, as in the first batch)")
        if part is not out:
            out.copy_(part)
        filled += part.shape[0]
    jacobian, residuals = augmented[:, :columns], augmented[:, columns]
    gram = workspace.matrix("gram", filled, filled, params.dtype, params.device).zero_()
    products(jacobian.t(), gram, scale=scale)
    return NormalEquations(False, gram, residuals * scale, gram.diagonal().clone(), jacobian, backend_name, workspace,
                           whole_batch_outputs())


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
    that method solves the same damped system instead. Factors go to the workspace's buffers.

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

    def _full_matrix(self) -> Tensor:
        """The full symmetric matrix in a workspace buffer, built once per step."""
        if self._full is None:
            m = self.eq.matrix
            full = self.eq.workspace.matrix("full", m.shape[0], m.shape[1], m.dtype, m.device)
            torch.tril(m, out=full)
            full += m.tril(-1).transpose(0, 1)
            self._full = full
        return self._full

    # -- solves ---------------------------------------------------------------------------------
    def solve_diagonal(self, shift: Tensor) -> Tensor:
        target = self.eq.matrix if self.method == "cholesky" else self._full_matrix()
        target.diagonal().copy_(self.eq.diagonal + shift)
        return self._solve(target, self.method)

    def solve_matrix(self, damped: Tensor) -> Tensor:
        return self._solve(damped, self.method)

    def _solve(self, matrix: Tensor, method: str) -> Tensor:
        rhs = self.eq.rhs.unsqueeze(1)
        try:
            return _solve_with(matrix, rhs, method, self.eq.workspace).squeeze(1)
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


def _solve_with(matrix: Tensor, rhs: Tensor, method: str, workspace: Workspace) -> Tensor:
    n = matrix.shape[0]
    if method == "cholesky":
        factor = workspace.get("factor", (n, n), matrix.dtype, matrix.device)
        info = workspace.get("info", (), torch.int32, matrix.device)
        torch.linalg.cholesky_ex(matrix, out=(factor, info))
        if int(info) != 0:
            raise _cholesky_failure(int(info))
        return torch.cholesky_solve(rhs, factor)
    if method == "qr":
        a, tau = torch.geqrf(matrix, out=(workspace.get("factor", (n, n), matrix.dtype, matrix.device),
                                          workspace.get("tau", (n,), matrix.dtype, matrix.device)))
        y = torch.ormqr(a, tau, rhs, left=True, transpose=True)
        return torch.linalg.solve_triangular(a, y, upper=True)
    if method == "solve":
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix, out=(
            workspace.get("factor", (n, n), matrix.dtype, matrix.device),
            workspace.get("pivots", (n,), torch.int32, matrix.device),
            workspace.get("info", (), torch.int32, matrix.device)))
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
