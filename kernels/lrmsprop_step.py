"""LRMSProp step (with or without momentum): running average of g^2, Laplacian-smoothed
denominator, momentum buffer and parameter update of every tensor of a (device, dtype) group in
ONE launch.

Math: fastopt/reference/siblings.py::lrmsprop_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  a <- alpha a + (1 - alpha) g^2;  d = sqrt(max(a + c2 lap(a), 0)) + eps
    momentum > 0:  b <- momentum b + g / d;  p <- p - lr b
    else:          p <- p - lr g / d

One pass over memory. a is read at the neighbours and updated in place, so it goes through the
border protocol of kernels/_multi_tensor.py; the momentum buffer is element-wise.
"""

import triton
import triton.language as tl

from ._accumulator import smoothed_accumulator
from ._border import store_shared
from ._launch import launch
from ._table import stencil_code, table_for
from ._tile import learning_rate, load_tile, store


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
):
    if tl.load(found_inf) != 0:
        return  # AMP: some gradient is inf/NaN, the step is a no-op (every program returns here)
    lr, decay = learning_rate(lr, decay, LR_ON_DEVICE)
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
        STENCIL=code,
        MOMENTUM=with_momentum,
    )
