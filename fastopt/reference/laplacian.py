"""The discrete Laplacian that the LAdam family applies, with ladam 0.4.1's boundary rules.

Every backend implements exactly this; kernels take the same ``stencil_layout`` so that the
decision of which tensors get which stencil lives in one place.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

STENCILS = ("9point", "5point")


def stencil_layout(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The (rows, cols) grid the Laplacian runs on for a tensor of ``shape``, or None if it gets none.

    ladam 0.4.1's rules:

    * 1-D with n >= 4 elements: a circular 1-D stencil [1, -2, 1]; returned as ``(1, n)``.
    * 1-D with n < 4: no Laplacian.
    * 2-D and up: the tensor is viewed as ``(shape[0], numel // shape[0])`` in logical
      (row-major) order; if either side is below 3 there is no Laplacian, else the 2-D stencil
      runs with circular boundaries on that grid.
    * 0-D (scalars): no Laplacian (ladam raises on them; they never reach it with default
      ``min_spatial_size``).

    ``rows == 1`` therefore always means "1-D stencil": a tensor of 2 or more dimensions with a
    single row gets None.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return None
    if len(shape) == 1:
        return (1, shape[0]) if shape[0] >= 4 else None
    rows = shape[0]
    numel = 1
    for s in shape:
        numel *= s
    cols = numel // rows if rows else 0
    if rows < 3 or cols < 3:
        return None
    return (rows, cols)


def laplacian(x: torch.Tensor, stencil: str = "9point") -> torch.Tensor:
    """Circular discrete Laplacian of ``x`` on its :func:`stencil_layout` grid, in ``x``'s dtype.

    9-point: ``(4 * (N + S + E + W) + (NE + NW + SE + SW) - 20 * C) / 6``, the isotropic stencil
    ``[[1, 4, 1], [4, -20, 4], [1, 4, 1]] / 6``; 5-point: ``N + S + E + W - 4 * C``;
    1-D: ``L + R - 2 * C``. Row 0 neighbours the last row, column 0 the last column.
    Returns zeros where the layout gives no Laplacian. The result is contiguous, in x's shape.
    """
    if stencil not in STENCILS:
        raise ValueError(f"Invalid stencil: {stencil!r}. Choose from: {STENCILS}")
    layout = stencil_layout(x.shape)
    if layout is None:
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    rows, cols = layout
    grid = x.reshape(rows, cols)
    left, right = torch.roll(grid, 1, dims=1), torch.roll(grid, -1, dims=1)
    if rows == 1:
        lap = left + right - 2 * grid
    else:
        up, down = torch.roll(grid, 1, dims=0), torch.roll(grid, -1, dims=0)
        faces = up + down + left + right
        if stencil == "5point":
            lap = faces - 4 * grid
        else:
            # Corners: the up/down neighbours' left/right neighbours.
            corners = (
                torch.roll(up, 1, dims=1)
                + torch.roll(up, -1, dims=1)
                + torch.roll(down, 1, dims=1)
                + torch.roll(down, -1, dims=1)
            )
            lap = (4 * faces + corners - 20 * grid) / 6
    return lap.reshape(x.shape)


def smooth(x: torch.Tensor, c2: float, stencil: str, floor: float) -> torch.Tensor:
    """``clamp(x + c2 * laplacian(x), min=floor)``: the smoothed second moment of the LAdam family.

    LAdam floors at eps, LAdaGrad and LRMSProp at 0, as ladam 0.4.1 does.
    """
    return (x + c2 * laplacian(x, stencil)).clamp(min=floor)
