"""Launching a kernel over every tile of a table: the table arrays, this step's grads, the stash,
the AMP inputs, lr (a float or a device tensor) and the op's scalars and constexprs."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import triton.language as tl

from fastopt.reference._amp import check_lr

from ._device import _amp_input, _check_mode, on_device
from ._table import TensorTable, forget_table


def _lr_and_decay(lr, weight_decay: float, device: torch.device) -> Tuple[Any, float, bool]:
    """The kernels' ``lr`` and ``decay`` arguments and their ``LR_ON_DEVICE`` flag (see
    :func:`learning_rate`) for an op's ``lr``: a float, or a 1-element float32 tensor on the
    params' device that the kernel reads (so a step under CUDA-graph capture never reads it on the
    host, and a replay sees the value written into it since)."""
    if not isinstance(lr, torch.Tensor):
        return lr, 1 - lr * weight_decay, False
    check_lr(lr, device)
    return lr, weight_decay, True


def launch(
    kernel,
    table: TensorTable,
    grads,
    lr,
    weight_decay: float,
    args: tuple,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    vectorized: bool = False,
    **constexprs,
) -> None:
    """Launch ``kernel`` once over every tile of ``table``: the table arrays, this step's grads, the
    stash, the AMP inputs (read in-kernel, see fastopt/reference/_amp.py: ``g * (1 / grad_scale)``,
    nothing written where ``found_inf`` is nonzero), ``lr`` and ``decay`` (:func:`learning_rate`:
    ``lr`` a float, or a device tensor read in-kernel, constexpr ``LR_ON_DEVICE``), then ``args``
    (the op's other scalars) and the op's constexprs; ``vectorized`` kernels also get ``VECTOR``
    (:meth:`TensorTable.vector_mode`), ``TW`` (the tile width) and ``VEC`` (elements in 16 bytes)."""
    if table.n_tiles == 0:
        return
    lr, decay, lr_on_device = _lr_and_decay(lr, weight_decay, table.device)
    grad_scale = _amp_input(grad_scale, 1.0, "grad_scale", table.device)
    found_inf = _amp_input(found_inf, 0.0, "found_inf", table.device)
    _check_mode(kernel, table.device)
    grad_ptrs, grad_layouts, index_64 = table.grads(grads)
    s = table.settings
    if vectorized:
        constexprs.update(VECTOR=table.vector_mode(), TW=s.tile_width, VEC=16 // table.dtype.itemsize)
    try:
        with on_device(table.device):
            kernel[(table.n_tiles,)](
                table.tiles,
                table.meta,
                table.p_layouts,
                grad_ptrs,
                grad_layouts,
                table.counters,
                table.tensor_counters,
                table.stash(),
                grad_scale,
                found_inf,
                lr,
                decay,
                *args,
                TILE=s.tile,
                BORDER_LANES=s.border_lanes,
                IDX=tl.int64 if index_64 else tl.int32,
                LR_ON_DEVICE=lr_on_device,
                **constexprs,
                num_warps=s.warps(table.dtype.itemsize, constexprs.get("VECTOR", 0)),
                enable_fp_fusion=False,
            )
    except BaseException:
        forget_table(table)  # a launch that failed part-way may leave counters off 0
        raise
