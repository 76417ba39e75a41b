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

Two paths, chosen per tensor on the host (constexpr ``VECTOR``, see kernels/_vector_tile.py): the
vector path for contiguous, aligned tensors (128-bit accesses; bias corrections from ln(beta) in
~25 instructions; reciprocal bias corrections, so one IEEE division per element; the halo summed
through the accumulator's linearity) and the generic path for the rest (strided layouts, odd row
lengths). Both give the reference's results to rounding.
"""

import triton
import triton.language as tl

from ._accumulator import accumulated
from ._adam import adam_launcher, adam_tile
from ._border import store_shared
from ._stencil import smoothed
from ._table import LAP_OFF, LAPLACIAN, META_FIELDS, PARAM, STATE0, STATE1, STEP
from ._table import VECTOR as VECTOR_COL
from ._tile import learning_rate, store
from ._vector_tile import (
    accumulator_laplacian,
    one_minus_power,
    store_accumulator_shared,
    vector_tile,
)


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
    log_beta1,
    log_beta2,
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
        _vector_step(
            tiles,
            meta,
            p_layouts,
            g_ptrs,
            counters,
            stash,
            grad_scale,
            lr,
            decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            c2,
            log_beta1,
            log_beta2,
            STENCIL,
            TILE,
            BORDER_LANES,
            IDX,
            TW,
            VEC,
        )
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
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            c2,
            STENCIL,
            TILE,
            BORDER_LANES,
            IDX,
        )


@triton.jit
def _vector_step(
    tiles,
    meta,
    p_layouts,
    g_ptrs,
    counters,
    stash,
    grad_scale,
    lr,
    decay,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    c2,
    log_beta1,
    log_beta2,
    STENCIL: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
    TW: tl.constexpr,
    VEC: tl.constexpr,
):
    """The step of a tensor on the vector path (kernels/_vector_tile.py)."""
    geo, elem = vector_tile(tiles, meta, TILE, TW, VEC, IDX)
    t, row, flat, valid = geo[0], geo[1], elem[2], elem[3]
    ptr = tl.pointer_type(stash.dtype.element_ty)
    # 16-byte aligned: the host checked (TensorTable's VECTOR column, the launch's VECTOR).
    p_ptr = tl.multiple_of(tl.load(row + PARAM).to(ptr), 16)
    g_ptr = tl.multiple_of(tl.load(g_ptrs + t).to(ptr), 16)
    m_ptr = tl.multiple_of(tl.load(row + STATE0).to(ptr), 16)
    v_ptr = tl.multiple_of(tl.load(row + STATE1).to(ptr), 16)
    step = tl.load(tl.load(row + STEP).to(tl.pointer_type(tl.float32)))
    inv_bias1 = tl.div_rn(1.0, one_minus_power(log_beta1, step))
    inv_bias2 = tl.div_rn(1.0, one_minus_power(log_beta2, step))
    g_factor = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)  # fp64 division: IEEE-exact
    p = tl.load(p_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + flat, mask=valid, other=0.0).to(tl.float32) * g_factor
    m = tl.load(m_ptr + flat, mask=valid, other=0.0).to(tl.float32) * beta1 + one_minus_beta1 * g
    v_old = tl.load(v_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    v = v_old * beta2 + one_minus_beta2 * g * g
    mode = tl.load(row + LAPLACIAN)
    v_hat = v * inv_bias2
    if mode != LAP_OFF:
        gain = one_minus_beta2 * (g_factor * g_factor)
        lap = accumulator_laplacian(v_ptr, g_ptr, beta2, gain, v, elem, geo[2], geo[3], mode, STENCIL)
        v_hat = tl.maximum(v_hat + (c2 * inv_bias2) * lap, eps, propagate_nan=tl.PropagateNan.ALL)
    # sqrt.approx and div.full (~1-2 ulp, 2 and 3 instructions) instead of the IEEE sqrt and
    # division (~10 each with their slow-path tests): an ulp or two of the update, as the
    # reciprocal bias corrections above
    p = p * decay - lr * ((m * inv_bias1) / (tl.sqrt(v_hat) + eps))
    store(p_ptr + flat, p, valid)
    store(m_ptr + flat, m, valid)
    recompute = (v_ptr, g_ptr, g_factor, beta2, one_minus_beta2)
    store_accumulator_shared(v, v_old, recompute, geo, elem, stash, counters, STENCIL, BORDER_LANES)


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
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    c2,
    STENCIL: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
):
    """The step of a tensor on the generic path (any layout)."""
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


ladam_step_triton = adam_launcher(_ladam_step_kernel, 1, "ladam_step", vectorized=True)
