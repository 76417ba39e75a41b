"""Levenberg-Marquardt's Jacobian products: ``out[lower] += scale * a^T a`` (+ a diagonal shift), one launch.

Math: fastopt/reference/lm.py::jacobian_products_reference. With ``a = [J | r]`` one pass gives
``J^T J / B``, ``J^T r / B`` and ``r^T r / B``; with ``a = J^T`` (a transposed view) ``J J^T / B``.

One program per tile on or below the diagonal of the (M, M) output: tile (ti, tj), tj <= ti,
loops over the rows of ``a`` in BLOCK_K chunks and accumulates ``a[:, ti]^T a[:, tj]`` in fp32
(fp64 for fp64 inputs) with an explicit IEEE dot (no TF32), then reads the output tile once, adds
``scale * acc`` (and the shift on the diagonal) and writes back only the entries on or below the
diagonal: the strict upper triangle of ``out`` is never touched. Tiles above the diagonal are never
launched, so the work is (nt + 1) / (2 nt) of the full product for nt tiles per side.
"""

import torch
import triton
import triton.language as tl

from fastopt.reference.lm import check_jacobian_products_args

from ._device import on_device

# bf16/fp16 inputs accumulate into an fp32 output; fp32 and fp64 into their own dtype.
JACOBIAN_PRODUCTS_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@triton.jit
def _jacobian_products_kernel(
    a_ptr,
    out_ptr,
    shift_ptr,
    scale_ptr,
    K,
    M,
    stride_ak,
    stride_am,
    stride_oi,
    stride_oj,
    HAS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Lower-triangular tile order: pid = ti (ti + 1) / 2 + tj with 0 <= tj <= ti. The float square
    # root can be one off for large pid; the two corrections make the mapping exact.
    ti = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    tj = pid - ti * (ti + 1) // 2

    # 64-bit offsets: K * M may pass 2**31 elements.
    rows_i = ti.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = tj.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_i = rows_i < M
    in_j = rows_j < M
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks.to(tl.int64)
        in_k = k < K
        # (BLOCK_K, BLOCK_M) panels of a's columns ti and tj; out-of-range entries read as 0.
        a_i = tl.load(
            a_ptr + k[:, None] * stride_ak + rows_i[None, :] * stride_am, mask=in_k[:, None] & in_i[None, :], other=0.0
        )
        a_j = tl.load(
            a_ptr + k[:, None] * stride_ak + rows_j[None, :] * stride_am, mask=in_k[:, None] & in_j[None, :], other=0.0
        )
        # Half inputs are widened before the dot: a product of two bf16/fp16 values is exact in
        # fp32, so the result is what a half-input fp32-accumulating dot gives, and Triton's
        # interpreter (the CPU test path) gets bf16 dots wrong (checked with Triton 3.9).
        a_i = a_i.to(out_ptr.dtype.element_ty)
        a_j = a_j.to(out_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision="ieee", out_dtype=out_ptr.dtype.element_ty)

    keep = in_i[:, None] & in_j[None, :] & (rows_j[None, :] <= rows_i[:, None])
    out_ptrs = out_ptr + rows_i[:, None] * stride_oi + rows_j[None, :] * stride_oj
    # scale is read from memory in out's dtype: a Python float argument would arrive as fp32 and
    # round 1/B for fp64 outputs.
    scale = tl.load(scale_ptr)
    result = tl.load(out_ptrs, mask=keep, other=0.0) + scale * acc
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + rows_i, mask=in_i, other=0.0).to(result.dtype)
        result = tl.where(rows_i[:, None] == rows_j[None, :], result + shift[:, None], result)
    tl.store(out_ptrs, result, mask=keep)


def _launch_settings(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_K, num_warps) for an input dtype. Untuned: no GPU was at hand to measure;
    64x64 fp32 tiles with 32-deep K steps are the usual starting point of Triton's matmul tutorial,
    fp64 halves the tile to keep the accumulator's registers the same."""
    if dtype == torch.float64:
        return 32, 16, 4
    return 64, 32, 4


def jacobian_products_triton(a: torch.Tensor, out: torch.Tensor, *, scale: float, shift=None) -> torch.Tensor:
    """``out[lower] += scale * a^T a`` (then ``diag(out) += shift``); see the module doc. Returns ``out``."""
    check_jacobian_products_args(a, out, shift, scale)
    K, M = a.shape
    if M == 0:
        return out
    block_m, block_k, num_warps = _launch_settings(a.dtype)
    tiles = triton.cdiv(M, block_m)
    shift_arg = shift.to(out.dtype).contiguous() if shift is not None else out  # unused when HAS_SHIFT=False
    scale_arg = torch.full((1,), scale, dtype=out.dtype, device=out.device)
    grid = (tiles * (tiles + 1) // 2,)
    with on_device(a.device):
        _jacobian_products_kernel[grid](
            a,
            out,
            shift_arg,
            scale_arg,
            K,
            M,
            a.stride(0),
            a.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_SHIFT=shift is not None,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
    return out
