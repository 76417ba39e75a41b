"""The circular Laplacian of a field computed at the neighbours (fastopt.reference.laplacian's
sums in its order) and the smoothed, clamped value of fastopt.reference.smooth."""

import triton
import triton.language as tl

from ._table import LAP_OFF, LAP_STENCIL, LAPLACIAN


@triton.jit
def laplacian(field: tl.constexpr, args, center, elem, rows, cols, STENCIL: tl.constexpr):
    """The circular Laplacian of the field ``field(flat, mask, args)`` at each lane, whose own value
    is ``center``: fastopt.reference.laplacian's sums in its order, 1-D ``L + R - 2C`` (rows == 1),
    5-point ``N + S + W + E - 4C``, 9-point ``(4 (N + S + W + E) + NW + NE + SW + SE - 20 C) / 6``.

    ``field`` computes this step's value at the neighbours from old state and the gradient (see
    the module docstring): never from a neighbour program's result.
    """
    r, c, mask = elem[0], elem[1], elem[3]
    c_prev = tl.where(c == 0, cols - 1, c - 1)
    c_next = tl.where(c == cols - 1, 0, c + 1)
    here = r * cols
    left = field(here + c_prev, mask, args)
    right = field(here + c_next, mask, args)
    if rows == 1:
        lap = left + right - 2.0 * center
    else:
        up = tl.where(r == 0, rows - 1, r - 1) * cols
        down = tl.where(r == rows - 1, 0, r + 1) * cols
        faces = field(up + c, mask, args) + field(down + c, mask, args) + left + right
        if STENCIL == 5:
            lap = faces - 4.0 * center
        else:
            corners = (
                field(up + c_prev, mask, args)
                + field(up + c_next, mask, args)
                + field(down + c_prev, mask, args)
                + field(down + c_next, mask, args)
            )
            lap = tl.div_rn(4.0 * faces + corners - 20.0 * center, 6.0)
    return lap


@triton.jit
def smoothed(field: tl.constexpr, args, x, geo, elem, scale, c2, floor, STENCIL: tl.constexpr, SCALED: tl.constexpr):
    """fastopt.reference.smooth of ``y = x / scale`` (``y = x`` without SCALED) where the tensor uses
    the Laplacian, else ``y``: ``clamp(y + c2 lap(y), min=floor)`` (NaN-propagating as
    torch.clamp), the Laplacian 0 where the tensor's layout has no stencil (the clamp stays, as in
    the reference). ``lap(x / scale)`` is taken as ``lap(x) / scale``: one division instead of nine.
    ``field``, ``args``: see :func:`laplacian`."""
    mode = tl.load(geo[1] + LAPLACIAN)
    out = x
    if SCALED:
        out = tl.div_rn(x, scale)
    if mode != LAP_OFF:
        lap = tl.zeros_like(x)
        if mode == LAP_STENCIL:
            lap = laplacian(field, args, x, elem, geo[2], geo[3], STENCIL)
            if SCALED:
                lap = tl.div_rn(lap, scale)
        out = tl.maximum(out + c2 * lap, floor, propagate_nan=tl.PropagateNan.ALL)
    return out


@triton.jit
def has_stencil(geo):
    """Whether this tensor's Laplacian is a stencil (use_lap and a stencil_layout): the modes that
    add ``c2 lap(.)`` without a clamp need nothing else (use_lap on a tensor without a layout adds
    ``c2 * 0``)."""
    return tl.load(geo[1] + LAPLACIAN) == LAP_STENCIL
