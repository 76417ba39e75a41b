"""In-kernel tile helpers of the generic path: where a program works, loading its param and grad
(strided layouts included), rounding stores, lr and the bias corrections. On the GPU these are
inlined; in the interpreter each call of a @triton.jit helper costs ~1 ms (it re-patches
triton.language), so per-element paths call few of them."""

import os

import triton
import triton.language as tl

from ._table import (
    COLS,
    FIRST_TILE,
    LAYOUT_FIELDS,
    MAX_DIMS,
    META_FIELDS,
    PARAM,
    ROWS,
    STASH_SLOTS,
    STATE0,
    STATE1,
    STATE2,
    STEP,
    TILE_COLS,
    TILE_ROWS,
    TILE_WIDTH_LOG2,
)


@triton.jit
def locate(tiles, meta, TILE: tl.constexpr, IDX: tl.constexpr):
    """Where this program works: ``(geo, elem)``.

    ``geo`` = (tensor index, table row, rows, cols, first tile, tile rows, tile cols, tile row,
    tile col, tile height, tile width, stash slots per tile): the tensor's stencil grid and tile
    grid and this tile's place in it. ``elem`` = (r, c, flat, valid, lr, lc): each lane's grid row
    and column, its flat logical index ``r * cols + c`` (type IDX: int64 where a tensor may exceed
    2**31 elements), whether it is inside the tensor, and its row and column in the tile.
    """
    pid = tl.program_id(0)
    t = tl.load(tiles + pid)
    row = meta + t.to(tl.int64) * META_FIELDS
    rows = tl.load(row + ROWS).to(IDX)
    cols = tl.load(row + COLS).to(IDX)
    tile_rows = tl.load(row + TILE_ROWS).to(tl.int32)
    tile_cols = tl.load(row + TILE_COLS).to(tl.int32)
    width_log2 = tl.load(row + TILE_WIDTH_LOG2).to(tl.int32)
    first = tl.load(row + FIRST_TILE).to(tl.int32)
    slots = tl.load(row + STASH_SLOTS).to(tl.int32)
    tr = (pid - first) // tile_cols
    tc = (pid - first) - tr * tile_cols
    height = TILE >> width_log2
    width = 1 << width_log2
    lanes = tl.arange(0, TILE)
    lr = lanes >> width_log2
    lc = lanes & (width - 1)
    r = tr.to(IDX) * height + lr
    c = tc.to(IDX) * width + lc
    geo = (t, row, rows, cols, first, tile_rows, tile_cols, tr, tc, height, width, slots)
    return geo, (r, c, r * cols + c, (r < rows) & (c < cols), lr, lc)


@triton.jit
def load_tile(tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE: tl.constexpr, IDX: tl.constexpr):
    """Locate this program's tile (:func:`locate`) and load its param and grad, in fp32, the grad
    unscaled (AMP: times ``g_factor``, GradScaler.unscale_'s float32(1 / grad_scale); 1 without).

    Returns ``(geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor)``: pointers =
    (param, grad, state 0, state 1, state 2) of the tensor (unused state columns hold 0), the layout
    rows of its param and grad (:func:`offsets`), the param's memory offsets at the lanes.
    """
    geo, elem = locate(tiles, meta, TILE, IDX)
    t, row, flat, valid = geo[0], geo[1], elem[2], elem[3]
    ptr = tl.pointer_type(stash.dtype.element_ty)
    pointers = (
        tl.load(row + PARAM).to(ptr),
        tl.load(g_ptrs + t).to(ptr),
        tl.load(row + STATE0).to(ptr),
        tl.load(row + STATE1).to(ptr),
        tl.load(row + STATE2).to(ptr),
    )
    p_layout = p_layouts + t.to(tl.int64) * LAYOUT_FIELDS
    g_layout = g_layouts + t.to(tl.int64) * LAYOUT_FIELDS
    p_at = offsets(flat, p_layout)
    p = tl.load(pointers[0] + p_at, mask=valid, other=0.0).to(tl.float32)
    g_factor = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)  # fp64 division: IEEE-exact
    g = tl.load(pointers[1] + offsets(flat, g_layout), mask=valid, other=0.0).to(tl.float32) * g_factor
    return geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor


@triton.jit
def step_of(geo):
    """This tensor's step count (fp32, already incremented for this step)."""
    return tl.load(tl.load(geo[1] + STEP).to(tl.pointer_type(tl.float32)))


@triton.jit
def offsets(flat, layout):
    """Memory offsets of logical elements ``flat`` of a tensor with this layout row
    (LAYOUT_FIELDS): ``flat`` if contiguous, else the multi-index dotted with the strides."""
    offset = flat
    ndim = tl.load(layout)
    if ndim != 0:
        offset = tl.zeros_like(flat)
        rest = flat
        for d in range(ndim):
            size = tl.load(layout + 1 + d).to(flat.dtype)
            stride = tl.load(layout + 1 + MAX_DIMS + d).to(flat.dtype)
            quotient = rest // size
            offset += (rest - quotient * size) * stride
            rest = quotient
    return offset


# Triton's interpreter truncates fp32 -> bf16 where the GPU's cvt.rn rounds to nearest even: the
# interpreter rounds by hand (fixed when the kernels are decorated: TRITON_INTERPRET is read then).
ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def store(ptrs, x, mask):
    """Store fp32 ``x`` at ``ptrs``, rounded once to nearest (ties to even) in their dtype, as
    torch rounds. bf16: the GPU converts with cvt.rn (1 instruction per 2 values); the interpreter,
    which truncates, with the same rounding in bit arithmetic (6 instructions a value had the GPU
    run it: bench/kernel_model.py counted 0.6 warp-instructions per element of ladam_step)."""
    dtype: tl.constexpr = ptrs.dtype.element_ty
    if dtype == tl.bfloat16 and ROUND_BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        half = tl.where(x != x, (bits >> 16) | 0x40, nearest)  # NaN stays a (quiet) NaN
        tl.store(ptrs, half.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(dtype), mask=mask)


@triton.jit
def learning_rate(lr, decay, LR_ON_DEVICE: tl.constexpr):
    """``(lr, 1 - lr wd)`` as the kernel uses them. The launch passes both (:func:`_lr_and_decay`),
    or, with ``LR_ON_DEVICE``, a pointer to lr and wd itself in ``decay``: the product is then
    formed here, in fp32 (the host forms it in fp64: they may differ by an ulp of ``decay``)."""
    if LR_ON_DEVICE:
        lr = tl.load(lr).to(tl.float32)
        decay = 1.0 - lr * decay
    return lr, decay


@triton.jit
def one_minus_powers(delta1, delta2, step):
    """``(1 - (1 - delta1)**step, 1 - (1 - delta2)**step)`` for a whole step count, to a few ulps,
    without the cancellation of ``1 - beta**t`` in fp32 (Adam's bias corrections: 1 - 0.999 in
    fp32 keeps 4 digits fewer than the reference's fp64 value rounded to fp32).

    Square-and-multiply over the bits of ``step`` on pairs ``(a, b) = (beta**n, 1 - beta**n)``:
    doubling ``b <- b (2 - b)``, ``a <- a**2``; increment ``b <- b + delta a``, ``a <- a - delta a``.
    """
    n = step.to(tl.int32)
    bits = ((step.to(tl.int32, bitcast=True) >> 23) & 255) - 126  # floor(log2(step)) + 1, step >= 1
    a1 = step * 0.0 + 1.0
    a2 = a1
    b1 = step * 0.0
    b2 = b1
    for i in range(bits):
        odd = ((n >> (bits - 1 - i)) & 1) == 1
        b1 = b1 * (2.0 - b1)
        a1 = a1 * a1
        b1 = tl.where(odd, b1 + delta1 * a1, b1)
        a1 = tl.where(odd, a1 - delta1 * a1, a1)
        b2 = b2 * (2.0 - b2)
        a2 = a2 * a2
        b2 = tl.where(odd, b2 + delta2 * a2, b2)
        a2 = tl.where(odd, a2 - delta2 * a2, a2)
    return b1, b2
