"""LAdaGrad step: accumulator, Laplacian-smoothed denominator and parameter update of every tensor of
a (device, dtype) group in ONE launch.

Math: fastopt/reference/siblings.py::ladagrad_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  s <- s + g^2;  clr = lr / (1 + (t - 1) lr_decay)
    p <- p - clr g / (sqrt(max(s + c2 lap(s), 0)) + eps)      (sqrt(s) + eps without use_lap)

One pass over memory (p, g, s read; p, s written). s is read at the neighbours and updated in
place, so it goes through the border protocol of kernels/_multi_tensor.py. Contiguous, aligned
tensors take the vector path (kernels/_vector_tile.py: 128-bit accesses, no stash), the others
the generic one, in the same launch (constexpr VECTOR, as kernels/ladam_step.py).
"""

import triton
import triton.language as tl

from ._accumulator import smoothed_accumulator
from ._border import store_shared
from ._launch import launch
from ._table import META_FIELDS, stencil_code, table_for
from ._table import VECTOR as VECTOR_COL
from ._tile import learning_rate, load_tile, step_of, store
from ._vector_tile import store_accumulator_shared, vector_accumulator


@triton.jit
def _ladagrad_step_kernel(
    tiles,
    meta,
    p_layouts,
    g_ptrs,
    g_layouts,
    counters,
    tensor_counters,
    stash,
    grad_scale,
    found_inf,
    lr,
    decay,
    lr_decay,
    eps,
    c2,
    STENCIL: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
    VECTOR: tl.constexpr,
    TW: tl.constexpr,
    VEC: tl.constexpr,
):
    if tl.load(found_inf) != 0:
        return  # AMP: some gradient is inf/NaN, the step is a no-op (every program returns here)
    lr, decay = learning_rate(lr, decay, LR_ON_DEVICE)
    vector = VECTOR == 1
    if VECTOR == 2:
        vector = tl.load(meta + tl.load(tiles + tl.program_id(0)).to(tl.int64) * META_FIELDS + VECTOR_COL) != 0
    if vector:
        geo, elem, ptrs, p, g, s, s_old, g_factor, denom = vector_accumulator(
            tiles, meta, g_ptrs, stash, grad_scale, 1.0, 1.0, eps, c2, STENCIL, TILE, TW, VEC, IDX
        )
        clr = tl.div_rn(lr, 1.0 + (step_of(geo) - 1.0) * lr_decay)
        store(ptrs[0] + elem[2], p * decay - clr * (g / denom), elem[3])
        recompute = (ptrs[2], ptrs[1], g_factor, 1.0, 1.0)
        store_accumulator_shared(s, s_old, recompute, geo, elem, stash, counters, STENCIL, BORDER_LANES)
    else:  # each path in its own helper: Triton merges names bound in both branches, and the
        # two paths' blocks have other shapes ([TILE // TW, TW] against [TILE])
        _generic_step(
            tiles,
            meta,
            p_layouts,
            g_ptrs,
            g_layouts,
            counters,
            stash,
            grad_scale,
            lr,
            decay,
            lr_decay,
            eps,
            c2,
            STENCIL,
            TILE,
            BORDER_LANES,
            IDX,
        )


@triton.jit
def _generic_step(
    tiles,
    meta,
    p_layouts,
    g_ptrs,
    g_layouts,
    counters,
    stash,
    grad_scale,
    lr,
    decay,
    lr_decay,
    eps,
    c2,
    STENCIL: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
):
    """The step of a tensor on the generic path (any layout)."""
    geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor = load_tile(
        tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE, IDX
    )
    p_ptr, g_ptr, s_ptr = pointers[0], pointers[1], pointers[2]
    s, denom = smoothed_accumulator(geo, elem, s_ptr, g, g_ptr, g_layout, g_factor, 1.0, 1.0, eps, c2, STENCIL)
    clr = tl.div_rn(lr, 1.0 + (step_of(geo) - 1.0) * lr_decay)
    p = p * decay - clr * tl.div_rn(g, denom)
    store(p_ptr + p_at, p, elem[3])
    store_shared((s,), (s_ptr,), geo, elem, p_at, p_layout, stash, counters, STENCIL, 1, False, BORDER_LANES)


def ladagrad_step_triton(
    params,
    grads,
    state_sums,
    steps,
    use_laps,
    *,
    lr,
    lr_decay,
    eps,
    weight_decay,
    c2,
    stencil,
    grad_scale=None,
    found_inf=None,
) -> None:
    """fastopt.reference.ladagrad_step_reference in one Triton launch (same signature and results).

    ``steps``: 0-dim float32 tensors on the params' device, already incremented; read in-kernel.
    ``lr``: a float, or a 1-element float32 tensor on the params' device, read in-kernel.
    """
    if not params:
        return
    code = stencil_code(stencil)
    table = table_for(params, (state_sums,), steps, use_laps, stashed=1)
    launch(
        _ladagrad_step_kernel,
        table,
        grads,
        lr,
        weight_decay,
        (lr_decay, eps, c2),
        grad_scale,
        found_inf,
        vectorized=True,
        STENCIL=code,
    )
