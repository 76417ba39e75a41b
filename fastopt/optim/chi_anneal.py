"""ChiAnnealScheduler and suggest_c2, as ladam 0.4.1 has them."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch.optim import Optimizer

from .. import _validation as v

# c2 per architecture, ladam 0.4.1's recommendations (its README gives the sweeps behind them).
_C2_BY_ARCHITECTURE = {
    "pinn": 1e-5,
    "transformer": 1e-4,
    "mlp": 5e-4,
    "cnn": 0.0,
    "cnn_denoise": 1e-3,
    "auto": 1e-4,
}


def suggest_c2(architecture: str = "auto") -> float:
    """Suggested Laplacian coupling ``c2`` for an architecture (ladam 0.4.1's table).

    Args:
        architecture: one of ``'pinn'`` (1e-5), ``'transformer'`` (1e-4), ``'mlp'`` (5e-4),
            ``'cnn'`` (0: no benefit measured on classification), ``'cnn_denoise'`` (1e-3) or
            ``'auto'`` (1e-4); case-insensitive.
    """
    if not isinstance(architecture, str):
        raise TypeError(f"architecture must be a str, got {type(architecture).__name__}")
    arch = architecture.lower()
    if arch not in _C2_BY_ARCHITECTURE:
        raise ValueError(f"Unknown architecture: {arch}. Choose from: {list(_C2_BY_ARCHITECTURE)}")
    return _C2_BY_ARCHITECTURE[arch]


class ChiAnnealScheduler:
    r"""Linear warmup, constant phase, then cosine-squared decay (ladam 0.4.1's scheduler).

    At scheduler step :math:`t` (1 after the first call of :meth:`step`), with
    ``W = int(total_steps * warmup_frac)`` and ``S = int(total_steps * (1 - settle_frac))``:

    .. math::
        lr_t = \begin{cases} lr_0\, t / \max(W, 1) & t \le W \\ lr_0 & W < t < S \\
        lr_0 \left(\tfrac{1 + \cos(\pi (t - S) / \max(T - S, 1))}{2}\right)^2 & t \ge S \end{cases}

    Like ladam's, it does not touch the learning rates until the first :meth:`step`.

    Args:
        optimizer: any torch optimizer.
        total_steps (int): total number of scheduler steps, > 0.
        warmup_frac (float): fraction of steps of linear warmup, in [0, 1). Default: 0.05.
        settle_frac (float): fraction of steps of cosine-squared decay, in [0, 1). Default: 0.30.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_frac: float = 0.05, settle_frac: float = 0.30):
        v.torch_optimizer("optimizer", optimizer)
        v.int_at_least(1)("total_steps", total_steps)
        v.in_interval(0.0, 1.0, high_inclusive=False)("warmup_frac", warmup_frac)
        v.in_interval(0.0, 1.0, high_inclusive=False)("settle_frac", settle_frac)
        if warmup_frac + settle_frac > 1.0:
            raise ValueError(
                f"warmup_frac + settle_frac must be <= 1.0, got {warmup_frac} + {settle_frac} "
                f"= {warmup_frac + settle_frac}"
            )
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = int(total_steps * warmup_frac)
        self.settle_start = int(total_steps * (1.0 - settle_frac))
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0

    def lr_at(self, t: int, base_lr: float) -> float:
        """The learning rate at scheduler step ``t`` for a group whose base rate is ``base_lr``."""
        if t <= self.warmup_steps:
            return base_lr * t / max(self.warmup_steps, 1)
        if t < self.settle_start:
            return base_lr
        progress = (t - self.settle_start) / max(self.total_steps - self.settle_start, 1)
        return base_lr * (0.5 * (1 + math.cos(math.pi * progress))) ** 2

    def step(self) -> None:
        """Advance one step and set each group's learning rate."""
        self.step_count += 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            lr = self.lr_at(self.step_count, base_lr)
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # in place: a capturable step (or a captured graph) reads this tensor
            else:
                group["lr"] = lr

    def get_last_lr(self) -> List[float]:
        """The learning rate of each parameter group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.step_count = state_dict["step_count"]
        self.base_lrs = list(state_dict["base_lrs"])
