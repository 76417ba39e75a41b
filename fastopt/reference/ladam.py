"""LAdam (Laplacian AdamW) steps, eager torch: the executable spec of every backend.

Math of ladam 0.4.1's ``LAdamW.step``, one function per mode, vectorised over tensors with
``torch._foreach_*`` (each foreach op is the per-tensor op ladam runs, so fp32 results agree with
ladam to round-off). Arithmetic runs in fp32 (fp64 for fp64 tensors); state and parameters keep
their dtype. All functions share one signature: lists of tensors of one device and dtype, the
per-tensor step counts (0-dim tensors, already incremented for this step) and ``use_laps`` (the
per-tensor Laplacian switch, frozen at each tensor's first step), then the group's
hyperparameters as keywords, then the optional AMP inputs ``grad_scale`` and ``found_inf``
(:mod:`fastopt.reference._amp`).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from ._amp import amp_step
from ._precision import step_values, upcast, write_back
from .laplacian import laplacian, smooth

__all__ = [
    "ladam_step_reference",
    "ladam_update_lap_step_reference",
    "ladam_weight_lap_step_reference",
    "ladam_wave_step_reference",
]


def decay_weights(params: List[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled (AdamW-style) weight decay, applied first: ``p *= 1 - lr * weight_decay``."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def _adam_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2) -> None:
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _bias_corrected(tensors, steps, beta):
    return torch._foreach_div(tensors, [1 - beta**t for t in step_values(steps)])


def _sqrt_plus(tensors, eps):
    denom = torch._foreach_sqrt(tensors)
    torch._foreach_add_(denom, eps)
    return denom


def _adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, update_params):
    """What the three EMA modes share: weight decay, moments, bias correction in the math dtype,
    then ``update_params(p, m_hat, v_hat)`` (the mode's own part), then the write-back."""
    if not params:
        return
    p, g, m, v = upcast(params), upcast(grads), upcast(exp_avgs), upcast(exp_avg_sqs)
    decay_weights(p, lr, weight_decay)
    _adam_moments(g, m, v, beta1, beta2)
    update_params(p, _bias_corrected(m, steps, beta1), _bias_corrected(v, steps, beta2))
    write_back((params, p), (exp_avgs, m), (exp_avg_sqs, v))


@amp_step
def ladam_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
) -> None:
    """Mode ``variance_lap`` (the default):

    .. math::
        m &\\leftarrow \\beta_1 m + (1-\\beta_1) g, \\quad v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\\\
        \\hat m &= m / (1-\\beta_1^t), \\quad \\hat v = v / (1-\\beta_2^t) \\\\
        \\tilde v &= \\max(\\hat v + c_2 \\nabla^2 \\hat v, \\epsilon) \\text{ if use\\_lap else } \\hat v \\\\
        p &\\leftarrow p - lr\\, \\hat m / (\\sqrt{\\tilde v} + \\epsilon)
    """

    def update_params(p, m_hat, v_hat):
        v_smooth = [smooth(x, c2, stencil, eps) if lap else x for x, lap in zip(v_hat, use_laps)]
        torch._foreach_addcdiv_(p, m_hat, _sqrt_plus(v_smooth, eps), value=-lr)

    _adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, update_params)


@amp_step
def ladam_update_lap_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
) -> None:
    """Mode ``update_lap``: Adam's update ``u = m_hat / (sqrt(v_hat) + eps)`` is smoothed,
    ``u += c2 * lap(u)`` where use_lap, then ``p -= lr * u``."""

    def update_params(p, m_hat, v_hat):
        update = torch._foreach_div(m_hat, _sqrt_plus(v_hat, eps))
        update = [u + c2 * laplacian(u, stencil) if lap else u for u, lap in zip(update, use_laps)]
        torch._foreach_add_(p, update, alpha=-lr)

    _adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, update_params)


@amp_step
def ladam_weight_lap_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
) -> None:
    """Mode ``weight_lap``: a plain Adam step, then weight-space diffusion ``p += c2 * lap(p)``
    where use_lap."""

    def update_params(p, m_hat, v_hat):
        torch._foreach_addcdiv_(p, m_hat, _sqrt_plus(v_hat, eps), value=-lr)
        for x, lap in zip(p, use_laps):
            if lap:
                x.add_(laplacian(x, stencil), alpha=c2)

    _adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, update_params)


@amp_step
def ladam_wave_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    prev_exp_avg_sqs: Sequence[Tensor],
    wave_e0_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
    wave_dt: float,
    wave_kappa: float,
    wave_E0: float,
    wave_damping: float,
) -> None:
    """Mode ``wave_variance``: v follows a damped leapfrog wave equation instead of an EMA.

    Step 1 seeds ``v = v_prev = max(g^2, eps)`` and, when ``wave_E0 == 0``, records the
    background level ``e0_sq = mean(g^2)`` in ``wave_e0_sqs`` (0-dim tensors). Later steps:

    .. math::
        a &= c_2 \\nabla^2 v - \\kappa (g^2 - E_0^2) \\quad (\\text{no Laplacian term without use\\_lap}) \\\\
        v_{next} &= \\max((2-d) v - (1-d) v_{prev} + dt^2 a, \\epsilon), \\quad v_{prev} \\leftarrow v,
        \\quad v \\leftarrow v_{next}

    with ``E0^2 = wave_E0**2`` if ``wave_E0 != 0`` else the recorded ``e0_sq``. Only m is bias
    corrected: ``p -= lr * m_hat / (sqrt(v) + eps)``.
    """
    if not params:
        return
    p, g, m, v = upcast(params), upcast(grads), upcast(exp_avgs), upcast(exp_avg_sqs)
    v_prev, e0_sqs = upcast(prev_exp_avg_sqs), upcast(wave_e0_sqs)
    decay_weights(p, lr, weight_decay)
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g, alpha=1 - beta1)
    d = wave_damping
    for gi, vi, vpi, e0i, t, lap in zip(g, v, v_prev, e0_sqs, step_values(steps), use_laps):
        g_sq = gi * gi
        if t == 1:
            vi.copy_(g_sq.clamp(min=eps))
            vpi.copy_(vi)
            if wave_E0 == 0:
                e0i.copy_(g_sq.mean())
            continue
        e0_sq = wave_E0 * wave_E0 if wave_E0 != 0 else e0i
        source = wave_kappa * (g_sq - e0_sq)
        accel = c2 * laplacian(vi, stencil) - source if lap else -source
        v_next = (2 - d) * vi - (1 - d) * vpi + wave_dt * wave_dt * accel
        v_next.clamp_(min=eps)
        vpi.copy_(vi)
        vi.copy_(v_next)
    m_hat = _bias_corrected(m, steps, beta1)
    torch._foreach_addcdiv_(p, m_hat, _sqrt_plus(v, eps), value=-lr)
    write_back((params, p), (exp_avgs, m), (exp_avg_sqs, v), (prev_exp_avg_sqs, v_prev), (wave_e0_sqs, e0_sqs))
