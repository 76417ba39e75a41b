"""In-step AMP for the reference ops: ``grad_scale`` and ``found_inf`` as torch.amp.GradScaler
hands them to an optimizer whose ``_step_supports_amp_scaling`` is True (as torch's fused Adam).

Every LAdam-family op takes two optional keyword arguments, the same on every backend:

* ``grad_scale``: a 0-dim float32 tensor, the factor the loss (so the gradients) was scaled by.
  The op reads ``g * inv`` with ``inv = float32(1 / float64(grad_scale))``, the factor
  ``GradScaler.unscale_`` multiplies by, in the math dtype and without writing the gradients back
  (they stay scaled, as with torch's fused Adam). So a step unscaled in the op equals the step the
  scaler's own unscale would give, bit for bit on fp32 and fp64 gradients; on bf16/fp16 gradients
  the op is the more exact of the two (unscale_ rounds the unscaled gradient to the grad dtype).
  torch's fused Adam divides by the scale instead: the same numbers whenever the scale is a power
  of two, which GradScaler's default schedule keeps it.
* ``found_inf``: a 0-dim float32 tensor; nonzero means some gradient was inf/NaN and the whole
  step is a no-op: parameters and state are not touched. The step counts were already incremented
  by the optimizer, which takes ``found_inf`` off them afterwards (as torch's fused Adam does).

The reference runs eagerly and may read both on the host; the fused backends read them in-kernel.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ._precision import upcast

__all__ = ["grad_factor", "amp_step", "check_lr", "host_lr"]


def check_lr(lr, device: torch.device) -> None:
    """An op's ``lr``: a float, or (capturable steps) a 1-element float32 tensor on the params'
    device, which the triton backend reads in-kernel and the others read on the host."""
    if isinstance(lr, Tensor) and (lr.dtype != torch.float32 or lr.numel() != 1 or lr.device != device):
        raise ValueError(
            f"lr as a tensor must be a 1-element float32 tensor on {device} (the params' device); got "
            f"shape {tuple(lr.shape)} {lr.dtype} on {lr.device}"
        )


def host_lr(lr, device: torch.device) -> float:
    """``lr`` (see :func:`check_lr`) read on the host."""
    check_lr(lr, device)
    return float(lr)


def grad_factor(grad_scale: Tensor) -> Tensor:
    """What gradients are multiplied by to unscale them: ``GradScaler.unscale_``'s factor."""
    return grad_scale.double().reciprocal().float()


def _unscaled(grads: Sequence[Tensor], grad_scale: Tensor) -> Sequence[Tensor]:
    # New tensors, in the math dtype: the caller's gradients stay as they are.
    factor = grad_factor(grad_scale.to(grads[0].device))
    return torch._foreach_mul(upcast(grads), factor)


def amp_step(step: Callable) -> Callable:
    """Give a reference op (params and grads first) the keywords ``grad_scale`` and ``found_inf``,
    and an ``lr`` that may be a tensor (:func:`check_lr`; read on the host)."""

    @functools.wraps(step)
    def with_amp(
        params, grads, *args, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, **kwargs
    ) -> None:
        if len(params) and "lr" in kwargs:
            kwargs["lr"] = host_lr(kwargs["lr"], params[0].device)
        if found_inf is not None and bool(found_inf != 0):
            return
        if grad_scale is not None and len(grads):
            grads = _unscaled(grads, grad_scale)
        step(params, grads, *args, **kwargs)

    return with_amp
