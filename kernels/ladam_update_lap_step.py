"""LAdam step, mode ``update_lap``: Adam's update smoothed by the Laplacian, every tensor of a
(device, dtype) group in ONE launch.

Math: fastopt/reference/ladam.py::ladam_update_lap_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  m, v: Adam's EMAs;  u = m_hat / (sqrt(v_hat) + eps)
    p <- p - lr (u + c2 lap(u))                  (p - lr u without use_lap)

u at the neighbours needs their new m and v, recomputed from old m, v and g (with reciprocal
bias corrections: see kernels/_adam.py::direction_at): both are read at neighbours and updated in
place, so both go through the border protocol of kernels/_multi_tensor.py (2 stashed values per
border element).
"""

import triton
import triton.language as tl

from ._adam import adam_direction, adam_launcher, adam_tile, direction_args, direction_at
from ._border import store_shared
from ._stencil import has_stencil, laplacian
from ._tile import learning_rate, store


@triton.jit
def _ladam_update_lap_step_kernel(
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
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    c2,
    STENCIL: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
):
    if tl.load(found_inf) != 0:
        return  # AMP: some gradient is inf/NaN, the step is a no-op (every program returns here)
    lr, decay = learning_rate(lr, decay, LR_ON_DEVICE)
    geo, elem, pointers, p_layout, g_layout, p_at, values, bias, g_factor = adam_tile(
        tiles,
        meta,
        p_layouts,
        g_ptrs,
        g_layouts,
        stash,
        grad_scale,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        TILE,
        IDX,
    )
    p, g, m, v = values  # flat unpacking only: triton 3.6 cannot hash nested assignment targets
    bias1, bias2 = bias
    p_ptr, m_ptr, v_ptr = pointers[0], pointers[2], pointers[3]
    u = adam_direction(m, v, bias1, bias2, eps)
    if has_stencil(geo):
        args = direction_args(
            pointers, g_layout, g_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps
        )
        u = u + c2 * laplacian(direction_at, args, u, elem, geo[2], geo[3], STENCIL)
    p = p * decay - lr * u
    store(p_ptr + p_at, p, elem[3])
    store_shared((m, v), (m_ptr, v_ptr), geo, elem, p_at, p_layout, stash, counters, STENCIL, 2, False, BORDER_LANES)


ladam_update_lap_step_triton = adam_launcher(_ladam_update_lap_step_kernel, 2, "ladam_update_lap_step")
