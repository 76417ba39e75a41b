"""The Gauss-Newton system of a step: :func:`normal_equations` builds ``J^T J / B`` and ``J^T r / B``
(or ``J J^T / B`` and ``r / B``) from ``[J | r]`` slice by slice, through the ``jacobian_products``
op :func:`fastopt.backends.choose` picks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ... import backends
from ..tree import tree_slice
from .jacobian import ResidualJacobian
from .parameters import Selection
from .workspace import Workspace

# Rows of [J | r] per Jacobian call. torch.func returns a new tensor each call: up to ~16 MB, so
# that its transient tensors come from the allocator's reusable heap rather than fresh
# page-faulted mappings (glibc maps blocks above its 32 MB ceiling afresh each time). The
# layer-by-layer path writes into a buffer kept between steps: up to ~64 MB, as fewer, taller
# slices ran faster (8000 x 4354 fp32, 2 threads on the loaded 2-core machine: 3.9 s in 4 slices
# of 2000 rows against 5.0 s in 9 of 963). At least 512 rows, so that each accumulation into the
# Gram matrix stays a well-shaped gemm.
_CHUNK_BYTES = {False: 16 << 20, True: 64 << 20}
_MIN_CHUNK_ROWS = 512


# backends.choose's answer per (op, device, dtype, backend name, FASTOPT_BACKEND): asking it each
# step cost ~10 us of the ~0.5 ms step of a 61-parameter model (its availability checks).
_CHOSEN: Dict[Tuple[str, torch.device, torch.dtype, str, Optional[str]], backends.ChosenBackend] = {}


def chosen_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str) -> backends.ChosenBackend:
    """:func:`fastopt.backends.choose` for ``op``, asked once per key and remembered."""
    key = (op, device, dtype, backend, os.environ.get(backends.ENV_VAR))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = backends.choose(op, device, dtype, backend)
    return chosen


def chunk_samples(columns: int, element_size: int, residuals_per_sample: int, persistent: bool = False) -> int:
    """Samples per Jacobian call for ``columns`` columns (see _CHUNK_BYTES)."""
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES[persistent] // max(1, columns * element_size))
    return max(1, rows // max(1, residuals_per_sample))


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


def normal_equations(
    jacobian_fn: ResidualJacobian,
    inputs: Any,
    targets: Any,
    *,
    batch_size: int,
    rows: int,
    num_residuals: int,
    overdetermined: bool,
    max_batch_size: Optional[int],
    selection: Optional[Selection],
    backend: str,
    workspace: Workspace,
    scale: Optional[float] = None,
) -> NormalEquations:
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
    chosen = chosen_backend("jacobian_products", params.device, params.dtype, backend)
    products = chosen.fn
    if scale is None:
        scale = 1.0 / batch_size

    def jacobian_of(start, end, out):
        if start == 0 and end == rows:
            return jacobian_fn(inputs, targets, selection, per_sample, out, layerwise=layerwise)
        return jacobian_fn(
            tree_slice(inputs, start, end), tree_slice(targets, start, end), selection, per_sample, out, layerwise
        )

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
        return NormalEquations(
            True, matrix, rhs, matrix.diagonal().clone(), None, chosen.name, workspace, whole_batch_outputs(), gram
        )
    augmented = workspace.get("jacobian", (rows * per_sample, columns + 1), params.dtype, params.device)
    filled = 0
    for start, end in pieces:
        out = augmented[filled : filled + (end - start) * per_sample]
        part = jacobian_of(start, end, out)
        if part.shape[0] != out.shape[0]:
            raise ValueError(
                f"samples {start}..{end} gave {part.shape[0]} residuals, expected {out.shape[0]} "
                f"({per_sample} per sample, as in the first batch)"
            )
        if part is not out:
            out.copy_(part)
        filled += part.shape[0]
    jacobian, residuals = augmented[:, :columns], augmented[:, columns]
    gram = workspace.matrix("gram", filled, filled, params.dtype, params.device).zero_()
    products(jacobian.t(), gram, scale=scale)
    return NormalEquations(
        False, gram, residuals * scale, gram.diagonal().clone(), jacobian, chosen.name, workspace, whole_batch_outputs()
    )
