"""LAdam step, mode ``variance_lap``: moment EMAs, the Laplacian-smoothed bias-corrected second
moment and the parameter update of every tensor of a (device, dtype) group in ONE launch.

Math: fastopt/reference/ladam.py::ladam_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)          (t: the tensor's step count)
    v_s = max(v_hat + c2 lap(v_hat), eps) if use_lap else v_hat
    p <- p - lr m_hat / (sqrt(v_s) + eps)

One pass over memory: p, g, m, v read once, p, m, v written once (28 bytes per fp32 element,
the roofline). The Laplacian needs this step's v at the neighbours, which each program recomputes
from old v and g (its halo, mostly L1/L2 hits; v is the accumulator of kernels/_accumulator.py with
keep = b2, gain = 1 - b2), so it never reads a neighbour's result. It is taken of v and divided by
1 - b2^t once (lap(v_hat) = lap(v) / (1 - b2^t)): one IEEE division per element instead of nine
(the reference divides first; the results differ in rounding only, far below the fp32 tolerance
once scaled by c2). v is the only array read at neighbours and updated in place, so v alone goes
through the border protocol of kernels/_multi_tensor.py (1 stashed value per border element).
Parameters without a Laplacian take the same kernel as plain AdamW (the branch on the tensor's
Laplacian mode is uniform per program).
"""

import triton
import triton.language as tl

from ._accumulator import accumulated
from ._adam import adam_launcher, adam_tile
from ._multi_tensor import learning_rate, smoothed, store, store_shared


@triton.jit
def _ladam_step_kernel(
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
    p_ptr, g_ptr, m_ptr, v_ptr = pointers[0], pointers[1], pointers[2], pointers[3]
    args = (v_ptr, g_ptr, g_layout, tl.load(g_layout) != 0, g_factor, beta2, one_minus_beta2)
    v_hat = smoothed(accumulated, args, v, geo, elem, bias2, c2, eps, STENCIL, True)
    p = p * decay - lr * tl.div_rn(tl.div_rn(m, bias1), tl.sqrt_rn(v_hat) + eps)
    store(p_ptr + p_at, p, elem[3])
    store(m_ptr + elem[2], m, elem[3])
    store_shared((v,), (v_ptr,), geo, elem, p_at, p_layout, stash, counters, STENCIL, 1, False, BORDER_LANES)


ladam_step_triton = adam_launcher(_ladam_step_kernel, 1, "ladam_step")
