"""LAdaGrad and LRMSProp steps, eager torch: the executable spec of every backend.

Math of ladam 0.4.1's ``LAdaGrad.step`` and ``LRMSProp.step``; same conventions as
:mod:`fastopt.reference.ladam` (fp32 math, state in the parameter's dtype, one signature for all
backends, AMP inputs). The smoothed accumulator is floored at 0, not eps, as in ladam.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._amp import amp_step
from ._precision import step_values, upcast, write_back
from .ladam import decay_weights
from .laplacian import smooth

__all__ = ["ladagrad_step_reference", "lrmsprop_step_reference"]


def _smoothed_denominators(accumulators, use_laps, c2, stencil, eps):
    """``sqrt(clamp(a + c2 lap(a), min=0)) + eps`` where use_lap, else ``sqrt(a) + eps``."""
    smoothed = [smooth(a, c2, stencil, 0.0) if lap else a for a, lap in zip(accumulators, use_laps)]
    denom = torch._foreach_sqrt(smoothed)
    torch._foreach_add_(denom, eps)
    return denom


@amp_step
def ladagrad_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
) -> None:
    """LAdaGrad: ``sum += g^2``; ``clr = lr / (1 + (t - 1) lr_decay)``;
    ``p -= clr * g / (sqrt(max(sum + c2 lap(sum), 0)) + eps)`` (no Laplacian without use_lap)."""
    if not params:
        return
    p, g, s = upcast(params), upcast(grads), upcast(state_sums)
    decay_weights(p, lr, weight_decay)
    torch._foreach_addcmul_(s, g, g, value=1)
    neg_clrs = [-lr / (1 + (t - 1) * lr_decay) for t in step_values(steps)]
    # While torch.compile traces, step_values gives 0-dim tensors, which the traced op takes as
    # scalars; the stubs admit numbers only.
    torch._foreach_addcdiv_(p, g, _smoothed_denominators(s, use_laps, c2, stencil, eps), neg_clrs)  # type: ignore[arg-type]
    write_back((params, p), (state_sums, s))


@amp_step
def lrmsprop_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Tensor]],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    c2: float,
    stencil: str,
) -> None:
    """LRMSProp: ``a = alpha a + (1 - alpha) g^2``; ``d = sqrt(max(a + c2 lap(a), 0)) + eps``;
    with momentum ``buf = momentum buf + g / d; p -= lr buf``, else ``p -= lr g / d``.
    ``momentum_buffers`` is None when momentum is 0. ``steps`` is unused by the math (kept for the
    shared signature)."""
    if not params:
        return
    p, g, a = upcast(params), upcast(grads), upcast(square_avgs)
    decay_weights(p, lr, weight_decay)
    torch._foreach_mul_(a, alpha)
    torch._foreach_addcmul_(a, g, g, value=1 - alpha)
    denom = _smoothed_denominators(a, use_laps, c2, stencil, eps)
    if momentum > 0:
        assert momentum_buffers is not None  # None only when momentum is 0 (see above)
        buf = upcast(momentum_buffers)
        torch._foreach_mul_(buf, momentum)
        torch._foreach_addcdiv_(buf, g, denom)
        torch._foreach_add_(p, buf, alpha=-lr)
        write_back((momentum_buffers, buf))
    else:
        torch._foreach_addcdiv_(p, g, denom, value=-lr)
    write_back((params, p), (square_avgs, a))
