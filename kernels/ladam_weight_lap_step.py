"""LAdam step, mode ``weight_lap``: a plain AdamW step, then weight-space diffusion of the
parameter, every tensor of a (device, dtype) group in ONE launch.

Math: fastopt/reference/ladam.py::ladam_weight_lap_step_reference. Per element, in fp32:

    q = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)      (m, v: Adam's EMAs)
    p <- q + c2 lap(q)                                       (p <- q without use_lap)

q at the neighbours needs their old p, m, v and g (their Adam direction with reciprocal bias
corrections: see kernels/_adam.py::direction_at): p, m and v are all read at neighbours and
updated in place, so all three go through the border protocol of kernels/_multi_tensor.py
(3 stashed values per border element).
"""

import triton
import triton.language as tl

from ._adam import adam_direction, adam_launcher, adam_tile, direction_args, direction_at
from ._border import store_shared
from ._stencil import has_stencil, laplacian
from ._tile import learning_rate, offsets


@triton.jit
def _adamw_at(flat, mask, args):
    """This step's plain AdamW parameter q at elements ``flat``, from old p, m, v and g."""
    p_ptr, p_layout, p_strided, lr, decay, adam_args = args
    p_at = flat
    if p_strided:
        p_at = offsets(flat, p_layout)
    p = tl.load(p_ptr + p_at, mask=mask, other=0.0).to(tl.float32)
    return p * decay - lr * direction_at(flat, mask, adam_args)


@triton.jit
def _ladam_weight_lap_step_kernel(
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
    p = p * decay - lr * adam_direction(m, v, bias1, bias2, eps)
    if has_stencil(geo):
        adam_args = direction_args(
            pointers, g_layout, g_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps
        )
        args = (p_ptr, p_layout, tl.load(p_layout) != 0, lr, decay, adam_args)
        p = p + c2 * laplacian(_adamw_at, args, p, elem, geo[2], geo[3], STENCIL)
    store_shared(
        (p, m, v), (p_ptr, m_ptr, v_ptr), geo, elem, p_at, p_layout, stash, counters, STENCIL, 3, True, BORDER_LANES
    )


ladam_weight_lap_step_triton = adam_launcher(_ladam_weight_lap_step_kernel, 3, "ladam_weight_lap_step")
