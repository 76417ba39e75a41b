"""Normal equations of many small least-squares problems at once, eager torch: the executable
spec of the ``batched_gram`` op (kernels/batched_gram.py is tested against it).

For problem ``b`` with Jacobian ``J_b`` (N x P) and residuals ``r_b`` (N)::

    jtj[b] = J_b^T J_b        (P x P, symmetric positive semi-definite)
    jtr[b] = J_b^T r_b        (P)

Math in fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 (:func:`fastopt.reference.math_dtype`),
results rounded once to the input dtype. fp32 products are IEEE fp32 on every device: a CUDA
caller that enabled TF32 matmuls gets them switched off for this op, because TF32's 10-bit
mantissa would make J^T J singular for the ill-conditioned problems LM is used on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
from torch import Tensor

from ._precision import math_dtype

__all__ = ["batched_gram_reference", "check_gram_inputs"]


def check_gram_inputs(jac: Tensor, res: Tensor) -> None:
    """Shapes and dtypes every implementation of ``batched_gram`` takes."""
    if jac.dim() != 3:
        raise ValueError(f"batched_gram: jac must have shape (B, N, P), got {tuple(jac.shape)}")
    if res.shape != jac.shape[:2]:
        raise ValueError(f"batched_gram: res must have shape (B, N) = {tuple(jac.shape[:2])}, got {tuple(res.shape)}")
    if res.dtype != jac.dtype or res.device != jac.device:
        raise ValueError(
            f"batched_gram: jac and res must share dtype and device, got {jac.dtype} on {jac.device} "
            f"and {res.dtype} on {res.device}"
        )


@contextlib.contextmanager
def _ieee_fp32(t: Tensor) -> Iterator[None]:
    """IEEE fp32 matmuls on CUDA for the duration (TF32 off), the caller's setting restored after."""
    if t.device.type != "cuda" or t.dtype != torch.float32:
        yield
        return
    # The fp32_precision API: reading and restoring it also works after the legacy allow_tf32 /
    # set_float32_matmul_precision calls, whereas reading allow_tf32 after the new API raises.
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def batched_gram_reference(jac: Tensor, res: Tensor) -> Tuple[Tensor, Tensor]:
    """``(J^T J, J^T r)`` per problem: ``jac`` (B, N, P), ``res`` (B, N) -> (B, P, P), (B, P).

    Any strides; the outputs are new contiguous tensors in the inputs' dtype.
    """
    check_gram_inputs(jac, res)
    dtype = math_dtype(jac.dtype)
    j, r = jac.to(dtype), res.to(dtype)
    jt = j.transpose(1, 2)
    with _ieee_fp32(j):
        jtj = torch.bmm(jt, j)
        jtr = torch.bmm(jt, r.unsqueeze(-1)).squeeze(-1)
    return jtj.to(jac.dtype), jtr.to(jac.dtype)
