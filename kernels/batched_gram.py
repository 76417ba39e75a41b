"""Normal equations of many small least-squares problems: ``J_b^T J_b`` and ``J_b^T r_b`` for every
problem ``b`` of a batch, one program per problem (and per BLOCK_P x BLOCK_P tile of J^T J when
P > BLOCK_P). Math: fastopt/reference/batched_lsq.py::batched_gram_reference.

Each program streams its problem's N x P Jacobian through registers once, BLOCK_N rows at a time,
and accumulates in the input dtype (fp32 or fp64). The fp32 products use ``tl.dot`` with
``input_precision="ieee"``: no TF32, whose 10-bit mantissa would make J^T J of the ill-conditioned
problems LM is used on singular.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastopt.reference.batched_lsq import check_gram_inputs

from ._device import on_device

__all__ = ["batched_gram_triton", "BATCHED_GRAM_DTYPES"]

BATCHED_GRAM_DTYPES = frozenset({torch.float32, torch.float64})


@triton.jit
def _batched_gram_kernel(
    j_ptr,
    r_ptr,
    a_ptr,
    g_ptr,
    N,
    P,
    stride_jb,
    stride_jn,
    stride_jp,
    stride_rb,
    stride_rn,
    stride_ab,
    stride_ap,
    stride_aq,
    stride_gb,
    stride_gp,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # 64-bit offsets: B * N * P passes 2**31 at a few million problems, and with any strides (a
    # view whose batch dimension is not outermost) so can n * stride_jn and rows * stride_jp.
    b = tl.program_id(0).to(tl.int64)
    tile_i = tl.program_id(1)
    tile_j = tl.program_id(2)
    rows = tile_i.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tile_j.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    j_base = j_ptr + b * stride_jb
    r_base = r_ptr + b * stride_rb
    acc_dtype = j_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_P, BLOCK_P), dtype=acc_dtype)
    acc_g = tl.zeros((BLOCK_P,), dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < N
        j_rows = tl.load(
            j_base + n[:, None] * stride_jn + rows[None, :] * stride_jp,
            mask=n_ok[:, None] & (rows[None, :] < P),
            other=0.0,
        )
        j_cols = tl.load(
            j_base + n[:, None] * stride_jn + cols[None, :] * stride_jp,
            mask=n_ok[:, None] & (cols[None, :] < P),
            other=0.0,
        )
        # out_dtype named: triton 3.6 defaults it to float32 and refuses an fp64 accumulator.
        acc = tl.dot(tl.trans(j_rows), j_cols, acc, input_precision="ieee", out_dtype=acc_dtype)
        if tile_j == 0:
            r = tl.load(r_base + n * stride_rn, mask=n_ok, other=0.0)
            acc_g += tl.sum(j_rows * r[:, None], axis=0)
    a_mask = (rows[:, None] < P) & (cols[None, :] < P)
    tl.store(a_ptr + b * stride_ab + rows[:, None] * stride_ap + cols[None, :] * stride_aq, acc, mask=a_mask)
    if tile_j == 0:
        tl.store(g_ptr + b * stride_gb + rows * stride_gp, acc_g, mask=rows < P)


def _launch_settings(n: int, p: int) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_P). tl.dot needs every tile side >= 16 on GPUs; P above 32 is tiled over the
    grid instead of growing the tile, which keeps the fp64 accumulator at 32 x 32 registers' worth."""
    block_p = min(32, max(16, triton.next_power_of_2(p)))
    block_n = min(64, max(16, triton.next_power_of_2(max(n, 1))))
    return block_n, block_p


def batched_gram_triton(jac: torch.Tensor, res: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(J^T J, J^T r)`` per problem: ``jac`` (B, N, P), ``res`` (B, N), any strides, fp32 or fp64
    -> new contiguous (B, P, P) and (B, P) tensors of the same dtype."""
    check_gram_inputs(jac, res)
    if jac.dtype not in BATCHED_GRAM_DTYPES:
        raise ValueError(f"batched_gram_triton takes float32 or float64, got {jac.dtype}")
    batch, n, p = jac.shape
    jtj = torch.empty((batch, p, p), dtype=jac.dtype, device=jac.device)
    jtr = torch.empty((batch, p), dtype=jac.dtype, device=jac.device)
    if batch == 0 or p == 0:
        return jtj, jtr
    block_n, block_p = _launch_settings(n, p)
    tiles = triton.cdiv(p, block_p)
    with on_device(jac.device):
        _batched_gram_kernel[(batch, tiles, tiles)](
            jac,
            res,
            jtj,
            jtr,
            n,
            p,
            jac.stride(0),
            jac.stride(1),
            jac.stride(2),
            res.stride(0),
            res.stride(1),
            jtj.stride(0),
            jtj.stride(1),
            jtj.stride(2),
            jtr.stride(0),
            jtr.stride(1),
            BLOCK_N=block_n,
            BLOCK_P=block_p,
            num_warps=2,
        )
    return jtj, jtr
