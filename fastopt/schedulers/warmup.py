"""Curvature-gated warmup: :class:`CurvatureWarmup`."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, cast

from torch import nn
from torch.optim import Optimizer

from .. import _validation as v
from ._common import Histories, SchedulerState, check_estimator, set_lr, training_grads
from .curvature import CurvatureEstimator


class CurvatureWarmup(SchedulerState, Histories):
    r"""Warmup that raises the rate only while the curvature is manageable.

    The rate starts at ``start_factor`` x ``target_lr``; each :meth:`step` estimates
    :math:`\kappa` and, if :math:`\kappa <` ``curvature_threshold``, multiplies the rate by
    :math:`g = (1/\texttt{start\_factor})^{1/W}` (so ``warmup_steps`` = :math:`W` unblocked steps
    reach ``target_lr``); otherwise the rate holds. Once at ``target_lr`` it stops estimating.
    The seed multiplies by a fixed 1.01 (463 steps from 1% whatever ``warmup_steps`` says); here
    ``warmup_steps`` sets the pace.

    Args:
        optimizer: any torch optimizer; every group's rate is set to ``factor`` x its target.
        model (nn.Module), loss_fn (callable or None): for the estimator.
        target_lr (float or None): the rate after warmup; None: each group's initial rate.
        warmup_steps (int): Default: 1000.

    Keyword Args:
        curvature_threshold (float): Default: 1e6 (the seed's).
        start_factor (float): in (0, 1]. Default: 0.01 (the seed's 1/100).
        estimator (CurvatureEstimator or None): Default ``CurvatureEstimator(model, loss_fn)``.

    Attributes:
        current_lr (float): the rate of the first group (``target_lr`` x factor).
        held_steps (int): steps where the curvature blocked the increase.
        done (bool): the rate has reached its target.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: Optional[nn.Module],
        loss_fn: Optional[Callable],
        target_lr: Optional[float],
        warmup_steps: int = 1000,
        *,
        curvature_threshold: float = 1e6,
        start_factor: float = 0.01,
        estimator: Optional[CurvatureEstimator] = None,
    ):
        v.torch_optimizer("optimizer", optimizer)
        v.optional(v.at_least(0.0, finite=True))("target_lr", target_lr)
        v.int_at_least(1)("warmup_steps", warmup_steps)
        v.finite_positive("curvature_threshold", curvature_threshold)
        v.in_interval(0.0, 1.0, low_inclusive=False, high_inclusive=True)("start_factor", start_factor)
        if estimator is None:  # a None model reaches CurvatureEstimator's own check (TypeError)
            estimator = CurvatureEstimator(cast(nn.Module, model), loss_fn)
        check_estimator("estimator", estimator)
        self.optimizer = optimizer
        self.estimator = estimator
        self.target_lrs = [float(g["lr"]) if target_lr is None else float(target_lr) for g in optimizer.param_groups]
        self.target_lr = self.target_lrs[0]
        self.warmup_steps = warmup_steps
        self.curvature_threshold = float(curvature_threshold)
        self.start_factor = float(start_factor)
        self.growth = (1.0 / start_factor) ** (1.0 / warmup_steps)
        self.increases = 0
        self.held_steps = 0
        self.step_count = 0
        self._init_histories()
        self._apply()

    @property
    def factor(self) -> float:
        if self.increases >= self.warmup_steps:
            return 1.0
        return min(1.0, self.start_factor * self.growth**self.increases)

    @property
    def done(self) -> bool:
        return self.factor >= 1.0

    @property
    def current_lr(self) -> float:
        return self.target_lr * self.factor

    def _apply(self) -> None:
        for group, target in zip(self.optimizer.param_groups, self.target_lrs):
            set_lr(group, target * self.factor)
        self.lr_history.append(self.get_last_lr())

    def step(self, inputs: Any, targets: Any = None) -> float:
        """Estimate (until done) and raise the rate if the curvature allows; returns ``current_lr``."""
        if not self.done:
            kappa = self.estimator.estimate(inputs, targets, grads=training_grads(self.estimator))
            self.curvature_steps.append(self.step_count)
            self.curvature_history.append(kappa)
            if math.isfinite(kappa) and kappa < self.curvature_threshold:
                self.increases += 1
            else:
                self.held_steps += 1
        self.step_count += 1
        self._apply()
        return self.current_lr

    def get_last_lr(self) -> List[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]
