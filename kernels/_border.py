"""The border protocol that makes an in-place stencil race-free (explained in
kernels/_multi_tensor.py): a tile's border values go to the stash, each program arrives at
the tiles it read, the last reader of a tile commits its stash. The vector path
(kernels/_vector_tile.py) leaves its border unchanged instead and its last reader recomputes the
border's new accumulator values from old state and grad (:func:`_commit_accumulator`)."""

import triton
import triton.language as tl

from ._table import STASH_START
from ._tile import offsets, store


@triton.jit
def _border(lr, lc, height, width, tile_rows, tile_cols, tile_h, tile_w):
    """(is a border element, its stash slot) of tile elements ``(lr, lc)`` of a tile with
    ``height x width`` valid elements. Slots: the first row, the last row (when there are several
    tile rows), then the first and the last column without the corners (several tile columns)."""
    # Conditions on the tile grid pick what the lanes compare with (-1 matches no lane): the
    # interpreter mis-types `scalar_bool & block_bool`.
    first_row = lr == tl.where(tile_rows > 1, 0, -1)
    last_row = (lr == tl.where(tile_rows > 1, height - 1, -1)) & (lr != 0)
    side = ((lc == tl.where(tile_cols > 1, 0, -1)) | (lc == tl.where(tile_cols > 1, width - 1, -1))) & ~(
        first_row | last_row
    )
    row_slots = tl.where(tile_rows > 1, 2 * tile_w, 0)
    slot = tl.where(first_row, lc, tl.where(last_row, tile_w + lc, row_slots + tl.where(lc == 0, lr, tile_h + lr)))
    return first_row | last_row | side, slot


@triton.jit
def _extent(geo, tr, tc):
    """(first row, first column, rows, columns) of tile (tr, tc) of the tensor of ``geo``."""
    rows, cols, tile_h, tile_w = geo[2], geo[3], geo[9], geo[10]
    r0 = tr.to(rows.dtype) * tile_h
    c0 = tc.to(cols.dtype) * tile_w
    return r0, c0, tl.minimum(rows - r0, tile_h), tl.minimum(cols - c0, tile_w)


@triton.jit
def store_shared(
    values,
    arrays,
    geo,
    elem,
    p_at,
    p_layout,
    stash,
    counters,
    STENCIL: tl.constexpr,
    STASHED: tl.constexpr,
    PARAM_FIRST: tl.constexpr,
    BORDER_LANES: tl.constexpr,
):
    """Store this tile's new ``values`` (fp32, rounded here to the arrays' dtype) of the ``arrays``
    that the op reads at neighbouring elements, without a race (see the module docstring):

    after a barrier (every thread of this program has done its neighbour reads), in place where no
    other program reads, to the stash on the tile's border, then :func:`arrive`. A tensor of one
    tile has no border and skips the protocol. With PARAM_FIRST, ``arrays[0]`` is the parameter,
    at offsets ``p_at`` (layout row ``p_layout``).
    """
    flat, valid = elem[2], elem[3]
    tl.debug_barrier()
    if geo[11] > 0:
        tile_rows, tile_cols, tr, tc, tile_h, tile_w, slots = geo[5], geo[6], geo[7], geo[8], geo[9], geo[10], geo[11]
        r0, c0, height, width = _extent(geo, tr, tc)
        border, slot = _border(elem[4], elem[5], height, width, tile_rows, tile_cols, tile_h, tile_w)
        tile = tr * tile_cols + tc
        base = stash + tl.load(geo[1] + STASH_START) + tile.to(tl.int64) * (STASHED * slots) + slot
        for a in tl.static_range(STASHED):
            if PARAM_FIRST and a == 0:
                store(arrays[a] + p_at, values[a], mask=valid & ~border)
            else:
                store(arrays[a] + flat, values[a], mask=valid & ~border)
            store(base + a * slots, values[a], mask=valid & border)
        arrive(geo, counters, stash, arrays, p_layout, STENCIL, STASHED, PARAM_FIRST, BORDER_LANES, False, (stash,))
    else:
        for a in tl.static_range(STASHED):
            if PARAM_FIRST and a == 0:
                store(arrays[a] + p_at, values[a], mask=valid)
            else:
                store(arrays[a] + flat, values[a], mask=valid)


@triton.jit
def _border_lanes(geo, tr, tc, BORDER_LANES: tl.constexpr):
    """``(s, flat, ok)``: lane s serves stash slot s of tile ``(tr, tc)`` (the inverse of
    :func:`_border`, checked by mapping back); ``flat`` is its element, ``ok`` whether it exists."""
    cols, tile_rows, tile_h, tile_w = geo[3], geo[5], geo[9], geo[10]
    r0, c0, height, width = _extent(geo, tr, tc)
    s = tl.arange(0, BORDER_LANES)
    row_slots = tl.where(tile_rows > 1, 2 * tile_w, 0)
    k = s - row_slots
    in_rows = s < row_slots
    lr = tl.where(in_rows, tl.where(s < tile_w, 0, height - 1), tl.where(k < tile_h, k, k - tile_h))
    lc = tl.where(in_rows, tl.where(s < tile_w, s, s - tile_w), tl.where(k < tile_h, 0, width - 1))
    border, slot = _border(lr, lc, height, width, tile_rows, geo[6], tile_h, tile_w)
    ok = border & (slot == s) & (lr >= 0) & (lr < height) & (lc >= 0) & (lc < width)
    return s, (r0 + lr) * cols + (c0 + lc), ok


@triton.jit
def _commit(
    geo, tr, tc, stash, arrays, p_layout, STASHED: tl.constexpr, PARAM_FIRST: tl.constexpr, BORDER_LANES: tl.constexpr
):
    """Copy tile ``(tr, tc)``'s stashed border into place in each stashed array (its readers are
    done)."""
    s, flat, ok = _border_lanes(geo, tr, tc, BORDER_LANES)
    tile = tr * geo[6] + tc
    base = stash + tl.load(geo[1] + STASH_START) + tile.to(tl.int64) * (STASHED * geo[11]) + s
    for a in tl.static_range(STASHED):
        value = tl.load(base + a * geo[11], mask=ok, cache_modifier=".cg")  # (L2: another SM wrote it)
        if PARAM_FIRST and a == 0:
            tl.store(arrays[a] + offsets(flat, p_layout), value, mask=ok)
        else:
            tl.store(arrays[a] + flat, value, mask=ok)


@triton.jit
def _commit_accumulator(geo, tr, tc, recompute, BORDER_LANES: tl.constexpr):
    """Write tile ``(tr, tc)``'s border of an accumulator ``a <- keep a + gain' g**2`` (its readers
    are done), recomputed from the old values its owner left in place and the grad, with the
    owner's own operations (``recompute`` = (a, g, g_factor, keep, 1 - keep)), so a border element
    gets the bits an interior one would."""
    acc_ptr, g_ptr, g_factor, keep, gain = recompute
    s, flat, ok = _border_lanes(geo, tr, tc, BORDER_LANES)
    g = tl.load(g_ptr + flat, mask=ok, other=0.0).to(tl.float32) * g_factor
    old = tl.load(acc_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    store(acc_ptr + flat, old * keep + gain * g * g, mask=ok)


@triton.jit
def _neighbour_tile(k, geo, n_dr, n_dc, STENCIL: tl.constexpr):
    """(tile row, tile column) of the k-th tile whose border this tile reads (k < readers; scalar or vector k): tiles
    ``(tr + dr, tc + dc)`` mod the tile grid, dr and dc in (0, +1, -1)[:n_dr] and [:n_dc], all
    pairs for the 9-point stencil, no diagonals for the 5-point one (its halo has no corners)."""
    tile_rows, tile_cols, tr, tc = geo[5], geo[6], geo[7], geo[8]
    if STENCIL == 5:
        i = tl.where(k < n_dr, k, 0)
        j = tl.where(k < n_dr, 0, k - n_dr + 1)
    else:  # k // n_dc and k % n_dc for k < 3 n_dc, without an integer division (~20 instructions)
        i = tl.where(k >= 2 * n_dc, 2, tl.where(k >= n_dc, 1, 0))
        j = k - i * n_dc
    # (tr + di) mod tile_rows for di in [0, tile_rows): one conditional subtraction
    ytr = tr + tl.where(i == 2, tile_rows - 1, i)
    ytr = tl.where(ytr >= tile_rows, ytr - tile_rows, ytr)
    ytc = tc + tl.where(j == 2, tile_cols - 1, j)
    ytc = tl.where(ytc >= tile_cols, ytc - tile_cols, ytc)
    return ytr, ytc


@triton.jit
def arrive(
    geo,
    counters,
    stash,
    arrays,
    p_layout,
    STENCIL: tl.constexpr,
    STASHED: tl.constexpr,
    PARAM_FIRST: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    recompute,
):
    """Tell each tile whose border this program read (and its own) that it is done reading; commit
    the stash of every tile for which this is the last arrival (with RECOMPUTE: recompute its
    border, :func:`_commit_accumulator`), and reset that tile's counter.

    Neighbours along a side of 1 or 2 tiles are counted once, so this program arrives at exactly
    the tiles that arrive at it, ``readers`` of them (see :func:`_neighbour_tile`). The arrivals
    are one vector of atomics (one round trip to L2, not one per neighbour).
    """
    first, tile_rows, tile_cols = geo[4], geo[5], geo[6]
    tl.debug_barrier()  # every thread of this program has read all it needs and written its stash
    n_dr = 1 + (tile_rows >= 2).to(tl.int32) + (tile_rows >= 3).to(tl.int32)
    n_dc = 1 + (tile_cols >= 2).to(tl.int32) + (tile_cols >= 3).to(tl.int32)
    if STENCIL == 5:
        readers = n_dr + n_dc - 1
    else:
        readers = n_dr * n_dc
    k = tl.arange(0, 16)
    reading = k < readers
    rows_k, cols_k = _neighbour_tile(k, geo, n_dr, n_dc, STENCIL)
    arrived = tl.atomic_add(counters + first + rows_k * tile_cols + cols_k, 1, mask=reading, sem="acq_rel", scope="gpu")
    last = tl.sum(tl.where(reading & (arrived == readers - 1), 1 << k, 0), axis=0)  # bit k: tile k is complete
    tl.debug_barrier()  # every thread acts on what the atomics acquired
    while last != 0:  # once per completed tile (one on average), not once per reader
        lowest = last & -last
        n = ((lowest.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127  # log2 of a power of 2
        last = last ^ lowest
        ytr, ytc = _neighbour_tile(n, geo, n_dr, n_dc, STENCIL)
        tl.store(counters + first + ytr * tile_cols + ytc, 0)
        if RECOMPUTE:
            _commit_accumulator(geo, ytr, ytc, recompute, BORDER_LANES)
        else:
            _commit(geo, ytr, ytc, stash, arrays, p_layout, STASHED, PARAM_FIRST, BORDER_LANES)
