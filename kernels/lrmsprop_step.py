"""LRMSProp step (with or without momentum): running average of g^2, Laplacian-smoothed
denominator, momentum buffer and parameter update of every tensor of a (device, dtype) group in
ONE launch.

Math: fastopt/reference/siblings.py::lrmsprop_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  a <- alpha a + (1 - alpha) g^2;  d = sqrt(max(a + c2 lap(a), 0)) + eps
    momentum > 0:  b <- momentum b + g / d;  p <- p - lr b
    else:          p <- p - lr g / d

One pass over memory. a is read at the neighbours and updated in place, so it goes through the
border protocol of kernels/_multi_tensor.py; the momentum buffer is element-wise. Contiguous,
aligned tensors take the vector path (kernels/_vector_tile.py: 128-bit accesses, no stash), the
others the generic one, in the same launch (constexpr VECTOR, as kernels/ladam_step.py).
"""

import triton
import triton.language as tl

from ._accumulator import smoothed_accumulator
from ._border import store_shared
from ._launch import launch
from ._table import META_FIELDS, stencil_code, table_for
from ._table import VECTOR as VECTOR_COL
from ._tile import learning_rate, load_tile, store
from ._vector_tile import store_accumulator_shared, vector_accumulator


@triton.jit
def _lrmsprop_step_kernel(
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
    alpha,
    one_minus_alpha,
    eps,
    momentum,
    c2,
    STENCIL: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    MOMENTUM: tl.constexpr,
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
        geo, elem, ptrs, p, g, a, a_old, g_factor, denom = vector_accumulator(
            tiles, meta, g_ptrs, stash, grad_scale, alpha, one_minus_alpha, eps, c2, STENCIL, TILE, TW, VEC, IDX
        )
        flat, valid = elem[2], elem[3]
        if MOMENTUM:
            buf = tl.load(ptrs[3] + flat, mask=valid, other=0.0).to(tl.float32) * momentum + g / denom
            store(ptrs[3] + flat, buf, valid)
            p = p * decay - lr * buf
        else:
            p = p * decay - lr * (g / denom)
        store(ptrs[0] + flat, p, valid)
        recompute = (ptrs[2], ptrs[1], g_factor, alpha, one_minus_alpha)
        store_accumulator_shared(a, a_old, recompute, geo, elem, stash, counters, STENCIL, BORDER_LANES)
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
            alpha,
            one_minus_alpha,
            eps,
            momentum,
            c2,
            STENCIL,
            MOMENTUM,
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
    alpha,
    one_minus_alpha,
    eps,
    momentum,
    c2,
    STENCIL: tl.constexpr,
    MOMENTUM: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
):
    """The step of a tensor on the generic path (any layout)."""
    geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor = load_tile(
        tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE, IDX
    )
    p_ptr, g_ptr, a_ptr, buf_ptr = pointers[0], pointers[1], pointers[2], pointers[3]
    flat, valid = elem[2], elem[3]
    a, denom = smoothed_accumulator(
        geo, elem, a_ptr, g, g_ptr, g_layout, g_factor, alpha, one_minus_alpha, eps, c2, STENCIL
    )
    if MOMENTUM:
        buf = tl.load(buf_ptr + flat, mask=valid, other=0.0).to(tl.float32) * momentum + tl.div_rn(g, denom)
        store(buf_ptr + flat, buf, valid)
        p = p * decay - lr * buf
    else:
        p = p * decay - lr * tl.div_rn(g, denom)
    store(p_ptr + p_at, p, valid)
    store_shared((a,), (a_ptr,), geo, elem, p_at, p_layout, stash, counters, STENCIL, 1, False, BORDER_LANES)


def lrmsprop_step_triton(
    params,
    grads,
    square_avgs,
    momentum_buffers,
    steps,
    use_laps,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    c2,
    stencil,
    grad_scale=None,
    found_inf=None,
) -> None:
    """fastopt.reference.lrmsprop_step_reference in one Triton launch (same signature and results).

    ``momentum_buffers`` is None when momentum is 0; ``steps`` are unused by the math; ``lr``: a
    float, or a 1-element float32 tensor on the params' device, read in-kernel.
    """
    if not params:
        return
    code = stencil_code(stencil)
    with_momentum = momentum > 0
    if with_momentum and momentum_buffers is None:
        raise ValueError(f"momentum={momentum} needs momentum_buffers (got None)")
    states = (square_avgs, momentum_buffers) if with_momentum else (square_avgs,)
    table = table_for(params, states, steps, use_laps, stashed=1)
    launch(
        _lrmsprop_step_kernel,
        table,
        grads,
        lr,
        weight_decay,
        (alpha, 1 - alpha, eps, momentum, c2),
        grad_scale,
        found_inf,
        vectorized=True,
        STENCIL=code,
        MOMENTUM=with_momentum,
    )
