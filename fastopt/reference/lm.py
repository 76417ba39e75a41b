"""Jacobian products of Levenberg-Marquardt, eager torch: the executable spec of every backend.

One op, ``jacobian_products``: the lower triangle of a scaled Gram matrix, accumulated into an
output that persists across calls, with an optional diagonal shift::

    out[i, j] += scale * sum_k a[k, i] * a[k, j]        for j <= i
    out[i, i] += shift[i]                               (if shift is given)

Levenberg-Marquardt calls it with ``a = [J | r]`` (rows: residuals of one batch slice, columns: the
selected parameters, then the residual), ``scale = 1/B``, so that one pass over the slice gives
``J^T J / B`` (the leading P x P block), ``J^T r / B`` (row P) and ``r^T r / B`` (entry (P, P));
slice after slice accumulate into the same ``out`` (:mod:`fastopt.lm`). With ``a = J^T`` (a
transposed view) it gives ``J J^T / B``, the matrix of the underdetermined system. The shift adds
a damping diagonal in the same pass.

Only the lower triangle (diagonal included) of ``out`` is specified. Implementations compute whole
tiles on the diagonal, so entries above the diagonal may receive partial sums: consumers read the
lower triangle only (``torch.linalg.cholesky`` does; :func:`symmetrize_lower` builds the full
matrix for the others). Arithmetic runs in fp32 for fp32/bf16/fp16 inputs (``out`` is fp32) and
in fp64 for fp64; fp32 products are IEEE fp32, never TF32.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._precision import math_dtype

__all__ = ["jacobian_products_reference", "check_jacobian_products_args", "symmetrize_lower", "gram_column_blocks"]

# Column panels of the lower triangle: about M/8 columns wide (multiples of 64), 128 to 512.
# Measured on this project's 2-core AMD EPYC (MKL sgemm, one thread, out with 64-byte aligned
# rows): for a = 2000 x 4354, panels of 2177 / 1089 / 545 / 273 / 137 columns took 0.51 / 0.41 /
# 0.40 / 0.38 / 0.42x the time of a.T @ a; for a = J^T of J 1000 x 4354 (the underdetermined
# J J^T, M = 1000), 512 / 256 / 128 columns took 0.63 / 0.60 / 0.52x. With out's rows at an odd
# stride the same panels ran ~1.45x slower: callers that own the output (fastopt.lm) pad it.
_MIN_PANEL, _MAX_PANEL = 128, 512


def gram_column_blocks(m: int) -> List[Tuple[int, int]]:
    """The column panels ``[(start, end), ...]`` the reference splits an m-wide Gram into."""
    width = min(_MAX_PANEL, max(_MIN_PANEL, -(-m // 8 // 64) * 64))
    return [(s, min(s + width, m)) for s in range(0, m, width)]


def check_jacobian_products_args(a: Tensor, out: Tensor, shift: Optional[Tensor], scale: float) -> None:
    """The argument checks every implementation runs before it writes anything."""
    if not isinstance(a, Tensor) or a.dim() != 2:
        raise ValueError(
            f"jacobian_products: a must be a 2-D tensor (rows x columns); got "
            f"{type(a).__name__ if not isinstance(a, Tensor) else tuple(a.shape)}"
        )
    if not a.is_floating_point():
        raise TypeError(f"jacobian_products: a must be a floating-point tensor; got {a.dtype}")
    m = a.shape[1]
    if not isinstance(out, Tensor) or tuple(out.shape) != (m, m):
        raise ValueError(
            f"jacobian_products: out must be a ({m}, {m}) tensor for a of shape "
            f"{tuple(a.shape)}; got {tuple(out.shape) if isinstance(out, Tensor) else out!r}"
        )
    if out.dtype != math_dtype(a.dtype):
        raise TypeError(
            f"jacobian_products: out must be {math_dtype(a.dtype)} (the accumulation dtype of "
            f"{a.dtype} inputs); got {out.dtype}"
        )
    if out.device != a.device:
        raise ValueError(f"jacobian_products: a is on {a.device} but out on {out.device}")
    if shift is not None:
        if not isinstance(shift, Tensor) or tuple(shift.shape) != (m,):
            raise ValueError(
                f"jacobian_products: shift must be a ({m},) tensor; got "
                f"{tuple(shift.shape) if isinstance(shift, Tensor) else shift!r}"
            )
        if shift.device != a.device:
            raise ValueError(f"jacobian_products: shift is on {shift.device} but a on {a.device}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"jacobian_products: scale must be a Python number; got {type(scale).__name__}")


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """fp32 matmuls in IEEE fp32 while inside, whatever the user set (CUDA may otherwise use TF32)."""
    if device.type != "cuda":
        yield
        return
    settings = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision ("ieee" / "tf32"); older versions only allow_tf32.
    name, value = ("fp32_precision", "ieee") if hasattr(settings, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(settings, name)
    setattr(settings, name, value)
    try:
        yield
    finally:
        setattr(settings, name, previous)


def jacobian_products_reference(a: Tensor, out: Tensor, *, scale: float, shift: Optional[Tensor] = None) -> Tensor:
    """``out[lower] += scale * a^T a`` (then ``diag(out) += shift``), computing the lower triangle only.

    Args:
        a: (K, M) of any float dtype and any strides (e.g. ``[J | r]``, or ``J.t()``).
        out: (M, M), fp32 for fp32/bf16/fp16 ``a``, fp64 for fp64; updated in place.
        scale: the factor of the product (Levenberg-Marquardt's 1/B).
        shift: optional (M,) vector added to the diagonal after the product (the damping).

    Returns ``out``. The lower triangle is computed panel by panel: panel [s, e) of columns gives
    rows s..e of the output up to column e, ``a[:, s:e]^T @ a[:, :e]``, one gemm per panel of w
    columns (:func:`gram_column_blocks`): (1 + w/M)/2 of the flops of the full product.
    """
    check_jacobian_products_args(a, out, shift, scale)
    x = a if a.dtype == out.dtype else a.to(out.dtype)
    with torch.no_grad(), _ieee_fp32_matmul(out.device):
        for start, end in gram_column_blocks(x.shape[1]):
            out[start:end, :end].addmm_(x[:, start:end].t(), x[:, :end], alpha=scale)
        if shift is not None:
            out.diagonal().add_(shift.to(out.dtype))
    return out


def symmetrize_lower(lower: Tensor) -> Tensor:
    """The full symmetric matrix whose lower triangle (diagonal included) is ``lower``'s."""
    full = lower.tril()
    full += lower.tril(-1).transpose(0, 1)
    return full
