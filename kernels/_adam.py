"""What the LAdam modes with Adam's moment EMAs share (variance_lap, update_lap, weight_lap).

Math: fastopt/reference/ladam.py::_adam_step. ``m <- b1 m + (1 - b1) g``,
``v <- b2 v + (1 - b2) g^2``, bias corrections ``1 - b^t`` per tensor from its step count, the
Adam direction ``m_hat / (sqrt(v_hat) + eps)``.
"""

import math

import triton
import triton.language as tl

from ._launch import launch
from ._table import stencil_code, table_for
from ._tile import load_tile, offsets, one_minus_powers, step_of


@triton.jit
def adam_tile(
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
    TILE: tl.constexpr,
    IDX: tl.constexpr,
):
    """:func:`load_tile`, then m and v loaded and updated and the bias corrections ``1 - b^t``.

    Returns ``(geo, elem, pointers, p_layout, g_layout, p_at, (p, g, m, v), (bias1, bias2), g_factor)``:
    pointers = (param, grad, m, v, third state), values in fp32, m and v already this step's.
    """
    geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor = load_tile(
        tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE, IDX
    )
    flat, valid = elem[2], elem[3]
    m = tl.load(pointers[2] + flat, mask=valid, other=0.0).to(tl.float32) * beta1 + one_minus_beta1 * g
    v = tl.load(pointers[3] + flat, mask=valid, other=0.0).to(tl.float32) * beta2 + one_minus_beta2 * g * g
    bias = one_minus_powers(one_minus_beta1, one_minus_beta2, step_of(geo))
    return geo, elem, pointers, p_layout, g_layout, p_at, (p, g, m, v), bias, g_factor


@triton.jit
def adam_direction(m, v, bias1, bias2, eps):
    """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` from this step's m and v."""
    return tl.div_rn(tl.div_rn(m, bias1), tl.sqrt_rn(tl.div_rn(v, bias2)) + eps)


@triton.jit
def direction_at(flat, mask, args):
    """This step's Adam direction at elements ``flat`` (a halo's), from old m, v and g (a field of
    :func:`laplacian`); ``args`` = (m_ptr, v_ptr, g_ptr, g_layout, g_strided, g_factor, hyper), ``hyper`` =
    (beta1, 1 - beta1, beta2, 1 - beta2, 1 / (1 - b1^t), 1 / (1 - b2^t), eps).

    Halo values only enter ``c2 lap(.)``: multiplying by the reciprocal bias corrections (1 ulp
    off the reference's divisions) saves two IEEE divisions per neighbour, 16 per element.
    """
    m_ptr, v_ptr, g_ptr, g_layout, g_strided, g_factor, hyper = args
    g_at = flat
    if g_strided:
        g_at = offsets(flat, g_layout)
    g = tl.load(g_ptr + g_at, mask=mask, other=0.0).to(tl.float32) * g_factor
    m = tl.load(m_ptr + flat, mask=mask, other=0.0).to(tl.float32) * hyper[0] + hyper[1] * g
    v = tl.load(v_ptr + flat, mask=mask, other=0.0).to(tl.float32) * hyper[2] + hyper[3] * g * g
    return tl.div_rn(m * hyper[4], tl.sqrt_rn(v * hyper[5]) + hyper[6])


@triton.jit
def direction_args(pointers, g_layout, g_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps):
    """The ``args`` of :func:`direction_at` for the tile :func:`adam_tile` loaded."""
    hyper = (beta1, one_minus_beta1, beta2, one_minus_beta2, tl.div_rn(1.0, bias1), tl.div_rn(1.0, bias2), eps)
    return (pointers[2], pointers[3], pointers[1], g_layout, tl.load(g_layout) != 0, g_factor, hyper)


def _log(beta: float) -> float:
    """ln(beta) in fp64 (-inf for beta = 0, whose bias correction 1 - 0**t is 1)."""
    return math.log(beta) if beta > 0 else -math.inf


def adam_launcher(kernel, stashed: int, op: str, vectorized: bool = False):
    """The launcher of one of the EMA-mode kernels (they share arguments), with the signature of
    ``fastopt.reference.<op>_reference``; ``stashed``: how many of p, m, v the mode reads at
    neighbours (see kernels/_multi_tensor.py). A ``vectorized`` kernel has the vector path of
    kernels/_vector_tile.py and takes ``ln(beta1), ln(beta2)`` after the other scalars."""

    def launcher(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        use_laps,
        *,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        c2,
        stencil,
        grad_scale=None,
        found_inf=None,
    ) -> None:
        if not params:
            return
        code = stencil_code(stencil)
        table = table_for(params, (exp_avgs, exp_avg_sqs), steps, use_laps, stashed=stashed)
        args: tuple = (beta1, 1 - beta1, beta2, 1 - beta2, eps, c2)
        if vectorized:
            args += (_log(beta1), _log(beta2))
        launch(kernel, table, grads, lr, weight_decay, args, grad_scale, found_inf, vectorized, STENCIL=code)

    launcher.__name__ = launcher.__qualname__ = f"{op}_triton"
    launcher.__doc__ = (
        f"fastopt.reference.{op}_reference in one Triton launch (same signature and results).\n\n"
        "``steps``: 0-dim float32 tensors on the params' device, already incremented; read in-kernel.\n"
        "``lr``: a float, or a 1-element float32 tensor on the params' device, read in-kernel."
    )
    return launcher
