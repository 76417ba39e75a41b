"""Vector tiles: the fast path of a step kernel, for tensors whose memory allows 128-bit accesses.

The generic path (kernels/_multi_tensor.py: ``locate``, ``load_tile``) maps lane ``i`` of a tile to
its element through run-time shifts by the tile width and addresses memory through a layout row
that may hold strides: the compiler can prove neither contiguity nor alignment, and every global
access moves 32 bits (16 for bf16) per lane. Here the tile is a 2-D block ``[TILE // TW, TW]``
with ``TW`` constexpr (the launch settings' tile width), the pointers are hinted 16-byte aligned
right where they are made and the stencil row length a multiple of ``VEC`` (16 bytes of elements):
loads and stores of p, g, m, v and the north/south neighbours compile to 128-bit accesses
(east/west and diagonal neighbours are one element off and stay scalar).

The hints are promises the host keeps (TensorTable's VECTOR column, the launch's ``VECTOR``
constexpr): param and state contiguous and 16-byte aligned, grads contiguous and 16-byte aligned,
``cols % VEC == 0``, and the tensor's tiles ``TW`` wide (2-D stencil grids) or ``TILE`` long (flat
rows: tensors without a 2-D stencil). Other tensors take the generic path in the same launch. The
geometry is the generic path's own (same tiles, same lanes, same border protocol), so both paths
may serve tensors of one launch.
"""

import triton
import triton.language as tl

from ._border import _extent, arrive
from ._table import (
    COLS,
    FIRST_TILE,
    LAP_OFF,
    LAP_STENCIL,
    LAPLACIAN,
    META_FIELDS,
    PARAM,
    ROWS,
    STASH_SLOTS,
    STATE0,
    STATE1,
    TILE_COLS,
    TILE_ROWS,
)
from ._tile import store


@triton.jit
def vector_tile(tiles, meta, TILE: tl.constexpr, TW: tl.constexpr, VEC: tl.constexpr, IDX: tl.constexpr):
    """``(geo, elem)`` of this program's tile as :func:`locate` gives them, as ``[TILE // TW, TW]``
    blocks: ``elem`` = (r, c, flat, valid, lr, lc). A flat row (``rows == 1``: no 2-D stencil) has
    ``TILE``-long tiles: block element ``(i, j)`` is lane ``i TW + j`` of the row."""
    TH: tl.constexpr = TILE // TW
    pid = tl.program_id(0)
    t = tl.load(tiles + pid)
    row = meta + t.to(tl.int64) * META_FIELDS
    rows = tl.load(row + ROWS).to(IDX)
    cols = tl.multiple_of(tl.load(row + COLS).to(IDX), VEC)  # the host checked cols % VEC == 0
    tile_rows = tl.load(row + TILE_ROWS).to(tl.int32)
    tile_cols = tl.load(row + TILE_COLS).to(tl.int32)
    first = tl.load(row + FIRST_TILE).to(tl.int32)
    slots = tl.load(row + STASH_SLOTS).to(tl.int32)
    tr = (pid - first) // tile_cols
    tc = (pid - first) - tr * tile_cols
    i = tl.arange(0, TH)[:, None]
    j = tl.arange(0, TW)[None, :]
    lane = i * TW + j
    flat_row = rows == 1
    lr = tl.where(flat_row, 0, i)  # [TH, 1]: the border's row tests run once per row a thread holds
    lc = tl.where(flat_row, lane, j)
    r = tl.where(flat_row, 0, tr.to(IDX) * TH + i)
    c = tl.where(flat_row, tc.to(IDX) * TILE + lane, tc.to(IDX) * TW + j)
    height = tl.where(flat_row, 1, TH)
    width = tl.where(flat_row, TILE, TW)
    geo = (t, row, rows, cols, first, tile_rows, tile_cols, tr, tc, height, width, slots)
    return geo, (r, c, r * cols + c, (r < rows) & (c < cols), lr, lc)


@triton.jit
def one_minus_power(log_beta, step):
    """``1 - beta**step`` from ``ln(beta)`` (the host's, in fp64, rounded to fp32), as
    ``-expm1(step ln(beta))``: a Taylor polynomial where ``|x| <= 1/2`` (truncated after x**9,
    < 1e-9 relative), ``1 - exp(x)`` below (>= 0.39: no cancellation). A few ulps, like the
    square-and-multiply of :func:`one_minus_powers`, in ~25 instructions instead of ~8 per bit of
    the step count."""
    x = step * log_beta
    small = x > -0.5
    y = tl.where(small, x, 0.0)
    poly = 1.0 / 362880.0  # Horner over 1/k!, k = 9 .. 1
    poly = poly * y + 1.0 / 40320.0
    poly = poly * y + 1.0 / 5040.0
    poly = poly * y + 1.0 / 720.0
    poly = poly * y + 1.0 / 120.0
    poly = poly * y + 1.0 / 24.0
    poly = poly * y + 1.0 / 6.0
    poly = poly * y + 0.5
    poly = (poly * y + 1.0) * y
    return tl.where(small, -poly, 1.0 - tl.exp(x))


@triton.jit
def accumulator_laplacian(acc_ptr, g_ptr, keep, gain, center, elem, rows, cols, mode, STENCIL: tl.constexpr):
    """The circular Laplacian (fastopt.reference.laplacian's weights) of this step's accumulator
    ``a = keep a_old + gain g**2`` (``g`` already unscaled: ``gain`` carries AMP's factor squared),
    whose value at the lanes is ``center``; 0 where the tensor has no stencil (``mode``).

    The accumulator is linear in ``a_old`` and ``g**2``, so the neighbours' old values and squared
    gradients are summed apart and combined once (``keep S_a + gain S_g2``): 3 operations per
    neighbour instead of 6. The sums run in another order than the reference's (rounding of the
    Laplacian term only, which enters scaled by c2).

    The east/west and diagonal neighbours are one element off the lanes and load 32 (16) bits
    each. Taking them from the lanes beside instead (``tl.gather`` along the row, a warp shuffle,
    with only the halo columns loaded) was tried: bench/kernel_model.py gave 8.97 instead of 8.12
    warp-instructions per element (fp32) and 8.92 instead of 8.05 (bf16), the gather's layout
    conversions costing more than the loads they save.
    """
    r, c, mask = elem[0], elem[1], elem[3]
    lap = tl.zeros_like(center)
    if mode == LAP_STENCIL:
        c_prev = tl.where(c == 0, cols - 1, c - 1)
        c_next = tl.where(c == cols - 1, 0, c + 1)
        here = r * cols
        a_w = tl.load(acc_ptr + here + c_prev, mask=mask, other=0.0).to(tl.float32)
        a_e = tl.load(acc_ptr + here + c_next, mask=mask, other=0.0).to(tl.float32)
        g_w = tl.load(g_ptr + here + c_prev, mask=mask, other=0.0).to(tl.float32)
        g_e = tl.load(g_ptr + here + c_next, mask=mask, other=0.0).to(tl.float32)
        if rows == 1:
            lap = keep * (a_w + a_e) + gain * (g_w * g_w + g_e * g_e) - 2.0 * center
        else:
            up = tl.where(r == 0, rows - 1, r - 1) * cols
            down = tl.where(r == rows - 1, 0, r + 1) * cols
            a_n = tl.load(acc_ptr + up + c, mask=mask, other=0.0).to(tl.float32)
            a_s = tl.load(acc_ptr + down + c, mask=mask, other=0.0).to(tl.float32)
            g_n = tl.load(g_ptr + up + c, mask=mask, other=0.0).to(tl.float32)
            g_s = tl.load(g_ptr + down + c, mask=mask, other=0.0).to(tl.float32)
            faces_a = (a_n + a_s) + (a_w + a_e)
            faces_g = (g_n * g_n + g_s * g_s) + (g_w * g_w + g_e * g_e)
            if STENCIL == 5:
                lap = keep * faces_a + gain * faces_g - 4.0 * center
            else:
                corners_a = tl.zeros_like(center)
                corners_g = tl.zeros_like(center)
                for k in tl.static_range(4):
                    at = tl.where(k < 2, up, down) + tl.where(k % 2 == 0, c_prev, c_next)
                    a = tl.load(acc_ptr + at, mask=mask, other=0.0).to(tl.float32)
                    g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
                    corners_a += a
                    corners_g += g * g
                # / 6 as * (1 / 6): an ulp of the Laplacian term, one instruction instead of ~11
                lap = (keep * (4.0 * faces_a + corners_a) + gain * (4.0 * faces_g + corners_g) - 20.0 * center) * (
                    1.0 / 6.0
                )
    return lap


@triton.jit
def vector_accumulator(
    tiles,
    meta,
    g_ptrs,
    stash,
    grad_scale,
    keep,
    gain,
    eps,
    c2,
    STENCIL: tl.constexpr,
    TILE: tl.constexpr,
    TW: tl.constexpr,
    VEC: tl.constexpr,
    IDX: tl.constexpr,
):
    """The vector path of the accumulator kernels (LAdaGrad: keep = gain = 1; LRMSProp: alpha,
    1 - alpha): this program's tile, its param and unscaled grad, the accumulator
    ``a = keep a_old + gain g**2`` and the denominator ``sqrt(max(a + c2 lap(a), 0)) + eps``
    (``sqrt(a) + eps`` without use_lap), as kernels/_accumulator.py's ``smoothed_accumulator``.

    Returns ``(geo, elem, pointers, p, g, a, a_old, g_factor, denom)``, pointers = (param, grad,
    accumulator, state 1), 16-byte aligned (the host checked).
    """
    geo, elem = vector_tile(tiles, meta, TILE, TW, VEC, IDX)
    t, row, flat, valid = geo[0], geo[1], elem[2], elem[3]
    ptr = tl.pointer_type(stash.dtype.element_ty)
    p_ptr = tl.multiple_of(tl.load(row + PARAM).to(ptr), 16)
    g_ptr = tl.multiple_of(tl.load(g_ptrs + t).to(ptr), 16)
    a_ptr = tl.multiple_of(tl.load(row + STATE0).to(ptr), 16)
    s_ptr = tl.multiple_of(tl.load(row + STATE1).to(ptr), 16)  # 0 where the op has one state
    g_factor = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)  # fp64 division: IEEE-exact
    p = tl.load(p_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + flat, mask=valid, other=0.0).to(tl.float32) * g_factor
    a_old = tl.load(a_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    a = a_old * keep + gain * g * g
    mode = tl.load(row + LAPLACIAN)
    y = a
    if mode != LAP_OFF:
        lap = accumulator_laplacian(
            a_ptr, g_ptr, keep, gain * (g_factor * g_factor), a, elem, geo[2], geo[3], mode, STENCIL
        )
        y = tl.maximum(a + c2 * lap, 0.0, propagate_nan=tl.PropagateNan.ALL)
    denom = tl.sqrt(y) + eps  # sqrt.approx: an ulp or two (kernels/ladam_step.py)
    return geo, elem, (p_ptr, g_ptr, a_ptr, s_ptr), p, g, a, a_old, g_factor, denom


@triton.jit
def store_accumulator_shared(
    new, old, recompute, geo, elem, stash, counters, STENCIL: tl.constexpr, BORDER_LANES: tl.constexpr
):
    """Store this tile's new accumulator ``new`` (fp32) in place, race-free, with the in-place
    store kept 128 bits wide and no stash: every valid lane stores, border lanes their ``old``
    value (the bits other programs may still be reading: writing what is already there changes
    nothing they can see); once every reader of the tile has arrived, the last one recomputes the
    border (kernels/_border.py, :func:`_commit_accumulator`; ``recompute`` = (accumulator, grad,
    grad factor, keep, gain)). No stash moves through L2 and no lane computes a stash slot."""
    flat, valid = elem[2], elem[3]
    array = recompute[0]
    tl.debug_barrier()  # every thread of this program has done its neighbour reads
    if geo[11] > 0:
        tile_rows, tile_cols, tr, tc = geo[5], geo[6], geo[7], geo[8]
        r0, c0, height, width = _extent(geo, tr, tc)
        lr, lc = elem[4], elem[5]
        # the tile's border (see _border): -1 matches no lane where the grid has one tile that way
        border = (lr == tl.where(tile_rows > 1, 0, -1)) | (lr == tl.where(tile_rows > 1, height - 1, -1))
        border = border | (lc == tl.where(tile_cols > 1, 0, -1)) | (lc == tl.where(tile_cols > 1, width - 1, -1))
        store(array + flat, tl.where(border, old, new), mask=valid)
        arrive(geo, counters, stash, (array,), stash, STENCIL, 1, False, BORDER_LANES, True, recompute)
    else:
        store(array + flat, new, mask=valid)
