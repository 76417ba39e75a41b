"""LAdam step, mode ``wave_variance``: v follows a damped leapfrog wave equation, every tensor of a
(device, dtype) group in ONE launch (the first step's background level included).

Math: fastopt/reference/ladam.py::ladam_wave_step_reference. Per element, in fp32, after
``p <- p (1 - lr wd)`` and ``m <- b1 m + (1 - b1) g``:

    t = 1:  v = v_prev = max(g^2, eps); with wave_E0 == 0, e0_sq = mean(g^2) (per tensor)
    t > 1:  a = c2 lap(v) - kappa (g^2 - E0^2)              (no c2 lap(v) term without use_lap)
            v, v_prev <- max((2 - d) v - (1 - d) v_prev + dt^2 a, eps), v
    p <- p - lr m_hat / (sqrt(v) + eps)

E0^2 is wave_E0**2, or the tensor's recorded e0_sq when wave_E0 == 0. The Laplacian is of the
OLD v, which is updated in place: v goes through the border protocol of
kernels/_multi_tensor.py. The mean at t = 1 is a per-tensor reduction in the same launch: each
tile stores its partial sum of g^2, and the tile that completes the tensor's count (an atomic
counter, as in the border protocol) adds the partial sums in tile order (deterministic).
"""

import torch
import triton
import triton.language as tl

from ._border import store_shared
from ._launch import launch
from ._stencil import has_stencil, laplacian
from ._table import NUMEL, SCALAR, stencil_code, table_for
from ._tile import learning_rate, load_tile, one_minus_powers, step_of, store

_REDUCE_LANES = tl.constexpr(1024)


@triton.jit
def _old_v(flat, mask, v_ptr):
    """v at elements ``flat`` as the step found it."""
    return tl.load(v_ptr + flat, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _record_mean(geo, elem, g_sq, partials, tensor_counters, dtype):
    """Write mean(g^2) of this tensor to its 0-dim scalar, once every tile has added its part."""
    t, row, tile_rows, tile_cols = geo[0], geo[1], geo[5], geo[6]
    n_tiles = tile_rows * tile_cols
    first = geo[4]
    tl.store(partials + tl.program_id(0), tl.sum(tl.where(elem[3], g_sq, 0.0), axis=0))
    tl.debug_barrier()
    done = tl.atomic_add(tensor_counters + t, 1, sem="acq_rel", scope="gpu")
    if done == n_tiles - 1:
        tl.store(tensor_counters + t, 0)
        tl.debug_barrier()
        total = tl.zeros((), dtype=tl.float32)
        for start in range(0, n_tiles, _REDUCE_LANES):
            index = start + tl.arange(0, _REDUCE_LANES)
            total += tl.sum(
                tl.load(partials + first + index, mask=index < n_tiles, other=0.0, cache_modifier=".cg"), axis=0
            )
        mean = tl.div_rn(total, tl.load(row + NUMEL).to(tl.float32))
        store(tl.load(row + SCALAR).to(tl.pointer_type(dtype)), mean, True)


@triton.jit
def _ladam_wave_step_kernel(
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
    partials,
    beta1,
    one_minus_beta1,
    eps,
    c2,
    dt_sq,
    kappa,
    fixed_e0_sq,
    keep,
    recall,
    STENCIL: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    E0_FROM_GRADS: tl.constexpr,
    TILE: tl.constexpr,
    BORDER_LANES: tl.constexpr,
    IDX: tl.constexpr,
):
    if tl.load(found_inf) != 0:
        return  # AMP: some gradient is inf/NaN, the step is a no-op (every program returns here)
    lr, decay = learning_rate(lr, decay, LR_ON_DEVICE)
    geo, elem, pointers, p_layout, g_layout, p_at, p, g, _ = load_tile(
        tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE, IDX
    )
    p_ptr, g_ptr, m_ptr, v_ptr, prev_ptr = pointers  # flat: triton 3.6 cannot hash nested assignment targets
    flat, valid = elem[2], elem[3]
    dtype = stash.dtype.element_ty
    step = step_of(geo)
    m = tl.load(m_ptr + flat, mask=valid, other=0.0).to(tl.float32) * beta1 + one_minus_beta1 * g
    g_sq = g * g
    if step == 1.0:
        v = tl.maximum(g_sq, eps, propagate_nan=tl.PropagateNan.ALL)
        store(prev_ptr + flat, v, valid)
        store(v_ptr + flat, v, valid)  # nobody reads v at neighbours on step 1
        if E0_FROM_GRADS:
            _record_mean(geo, elem, g_sq, partials, tensor_counters, dtype)
    else:
        v_old = tl.load(v_ptr + flat, mask=valid, other=0.0).to(tl.float32)
        if E0_FROM_GRADS:
            e0_sq = tl.load(tl.load(geo[1] + SCALAR).to(tl.pointer_type(dtype))).to(tl.float32)
        else:
            e0_sq = fixed_e0_sq
        source = kappa * (g_sq - e0_sq)
        accel = -source
        if has_stencil(geo):
            accel = c2 * laplacian(_old_v, v_ptr, v_old, elem, geo[2], geo[3], STENCIL) - source
        prev = tl.load(prev_ptr + flat, mask=valid, other=0.0).to(tl.float32)
        v = tl.maximum(keep * v_old - recall * prev + dt_sq * accel, eps, propagate_nan=tl.PropagateNan.ALL)
        store(prev_ptr + flat, v_old, valid)
        store_shared((v,), (v_ptr,), geo, elem, p_at, p_layout, stash, counters, STENCIL, 1, False, BORDER_LANES)
    bias1 = one_minus_powers(one_minus_beta1, one_minus_beta1, step)[0]
    p = p * decay - lr * tl.div_rn(tl.div_rn(m, bias1), tl.sqrt_rn(v) + eps)
    store(p_ptr + p_at, p, valid)
    store(m_ptr + flat, m, valid)


def ladam_wave_step_triton(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    prev_exp_avg_sqs,
    wave_e0_sqs,
    steps,
    use_laps,
    *,
    lr,
    beta1,
    eps,
    weight_decay,
    c2,
    stencil,
    wave_dt,
    wave_kappa,
    wave_E0,
    wave_damping,
    grad_scale=None,
    found_inf=None,
) -> None:
    """fastopt.reference.ladam_wave_step_reference in one Triton launch (same signature and
    results). ``steps``: 0-dim float32 tensors on the params' device, already incremented;
    ``wave_e0_sqs``: 0-dim tensors of the params' dtype and device; ``lr``: a float, or a 1-element
    float32 tensor on the params' device, read in-kernel."""
    if not params:
        return
    code = stencil_code(stencil)
    table = table_for(
        params, (exp_avgs, exp_avg_sqs, prev_exp_avg_sqs), steps, use_laps, scalars=wave_e0_sqs, stashed=1
    )
    partials = torch.empty(max(table.n_tiles, 1), dtype=torch.float32, device=table.device)
    d = wave_damping
    launch(
        _ladam_wave_step_kernel,
        table,
        grads,
        lr,
        weight_decay,
        (partials, beta1, 1 - beta1, eps, c2, wave_dt * wave_dt, wave_kappa, wave_E0 * wave_E0, 2 - d, 1 - d),
        grad_scale,
        found_inf,
        STENCIL=code,
        E0_FROM_GRADS=wave_E0 == 0,
    )
