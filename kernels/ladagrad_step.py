"""LAdaGrad step: accumulator, Laplacian-smoothed denominator and parameter update of every tensor of
a (device, dtype) group in ONE launch.

Math: fastopt/reference/siblings.py::ladagrad_step_reference. Per element, in fp32:

    p <- p (1 - lr wd);  s <- s + g^2;  clr = lr / (1 + (t - 1) lr_decay)
    p <- p - clr g / (sqrt(max(s + c2 lap(s), 0)) + eps)      (sqrt(s) + eps without use_lap)

One pass over memory (p, g, s read; p, s written). s is read at the neighbours and updated in
place, so it goes through the border protocol of kernels/_multi_tensor.py.
"""

import triton
import triton.language as tl

from ._accumulator import smoothed_accumulator
from ._border import store_shared
from ._launch import launch
from ._table import stencil_code, table_for
from ._tile import learning_rate, load_tile, step_of, store


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
):
    if tl.load(found_inf) != 0:
        return  # AMP: some gradient is inf/NaN, the step is a no-op (every program returns here)
    lr, decay = learning_rate(lr, decay, LR_ON_DEVICE)
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
        _ladagrad_step_kernel, table, grads, lr, weight_decay, (lr_decay, eps, c2), grad_scale, found_inf, STENCIL=code
    )
