r"""Curvature-adaptive learning rates: the HomotopyLR family of the seed design.

The rule shared by :class:`HomotopyLR` and :class:`CurvatureAdaptiveLR`, with :math:`\bar\kappa`
an exponential moving average of the curvature :math:`\kappa = \|\nabla^2 L\| / \|\nabla L\|^2`
(:class:`~fastopt.schedulers.CurvatureEstimator`):

.. math::
    \eta = \frac{\eta_{base}}{1 + \alpha \max(0,\ \bar\kappa / \kappa_{target} - 1)}

so the rate is :math:`\eta_{base}` while :math:`\bar\kappa \le \kappa_{target}` and falls as
:math:`\eta_{base} \kappa_{target} / (\alpha \bar\kappa)` above it. Warmup emerges where the
curvature starts high and decays. Near a minimum :math:`\|\nabla L\| \to 0`, so
:math:`\kappa \to \infty` and the rate decays too (see bench/results/curvature_experiment1.md).

Every scheduler keeps histories and draws them with ``plot_curvature_history()`` and
``plot_lr_history()`` (PNG files, matplotlib needed). A non-finite estimate (a NaN loss, say) is
recorded in the estimator's history but does not move the learning rate; a warning says so.

The rest of the curvature-driven family lives beside this module: :mod:`.per_layer`
(PerLayerHomotopyLR), :mod:`.warmup` (CurvatureWarmup), :mod:`.clipping` (curvature_aware_clip),
:mod:`.homotopy_adam` (HomotopyAdam); what they share in :mod:`._common`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .. import _validation as v
from ._common import (
    Histories,
    SchedulerState,
    check_base_lr,
    check_estimator,
    set_lr,
    training_grads,
    warn_non_finite,
)
from .curvature import DEFAULT_METHOD, CurvatureEstimator


def homotopy_scale(curvature: float, target: float, alpha: float) -> float:
    r""":math:`1 / (1 + \alpha \max(0, \kappa/\kappa_{target} - 1))`, the factor on the base rate."""
    return 1.0 / (1.0 + alpha * max(0.0, curvature / target - 1.0))


class _ScaledRate(SchedulerState, Histories, LRScheduler):
    """A torch scheduler whose rate is ``base x lr_scale()``: ``base_lr`` for every group, or each
    group's initial rate when ``base_lr`` is None. Subclasses define ``lr_scale`` and count
    ``step_count`` / ``estimation_freq``."""

    base_lr: Optional[float]  # set by the subclasses' __init__, as are the two below
    step_count: int
    estimation_freq: int

    @property
    def will_estimate(self) -> bool:
        """Whether the next training step estimates the curvature."""
        return self.step_count % self.estimation_freq == 0

    def lr_scale(self) -> float:
        raise NotImplementedError

    # Floats only; LRScheduler declares list[float | Tensor], and list is invariant.
    def get_lr(self) -> List[float]:  # type: ignore[override]
        """The rate of each group for the current state (no side effects)."""
        scale = self.lr_scale()
        bases = self.base_lrs if self.base_lr is None else [self.base_lr] * len(self.base_lrs)
        return [float(b) * scale for b in bases]

    def step(self, epoch: Optional[int] = None) -> None:
        super().step(epoch)
        self.lr_history.append([float(lr) for lr in self.get_last_lr()])


class _SmoothedHomotopyRate(_ScaledRate):
    """What :class:`HomotopyLR` and :class:`CurvatureAdaptiveLR` share: the homotopy factor of an
    exponential moving average of the estimates (:meth:`_observe`). They differ in where an
    estimate comes from (re-evaluating the loss on a batch, or the training step's own loss graph)
    and so in when the rate is set (after ``optimizer.step()``, or before it).

    ``default_estimator()`` builds the estimator when ``estimator`` is None.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        default_estimator: Callable[[], CurvatureEstimator],
        base_lr: Optional[float],
        curvature_target: float,
        alpha: float,
        estimation_freq: int,
        smoothing: float,
        estimator: Optional[CurvatureEstimator],
        last_epoch: int,
    ):
        v.torch_optimizer("optimizer", optimizer)
        base_lr = check_base_lr(base_lr)
        v.finite_positive("curvature_target", curvature_target)
        v.at_least(0.0, finite=True)("alpha", alpha)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        v.in_interval(0.0, 1.0, high_inclusive=False)("smoothing", smoothing)
        if estimator is None:
            estimator = default_estimator()
        check_estimator("estimator", estimator)
        self.base_lr = base_lr
        self.curvature_target = float(curvature_target)
        self.alpha = float(alpha)
        self.estimation_freq = estimation_freq
        self.smoothing = float(smoothing)
        self.estimator = estimator
        self.current_curvature = self.curvature_target
        self.step_count = 0
        self._init_histories()
        super().__init__(optimizer, last_epoch)

    def _observe(self, kappa: float) -> None:
        if not math.isfinite(kappa):
            warn_non_finite(type(self).__name__, kappa)
            return
        first = not self.curvature_history
        self.current_curvature = (
            kappa if first else self.smoothing * self.current_curvature + (1 - self.smoothing) * kappa
        )
        self.curvature_steps.append(self.step_count)
        self.curvature_history.append(kappa)
        self.smoothed_curvature_history.append(self.current_curvature)

    def lr_scale(self) -> float:
        r""":math:`1 / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`."""
        return homotopy_scale(self.current_curvature, self.curvature_target, self.alpha)


# -- HomotopyLR ------------------------------------------------------------------------------------
class HomotopyLR(_SmoothedHomotopyRate):
    r"""Learning rate from the loss landscape's curvature:
    :math:`\eta = \eta_{base} / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`.

    :meth:`update_curvature` (call it every step, after ``loss.backward()`` on the same
    ``inputs``/``targets`` and before ``optimizer.step()``; the default estimator reads the training
    gradient from ``.grad``) estimates
    :math:`\kappa` on steps 1, 1 + ``estimation_freq``, 1 + 2 ``estimation_freq``, ... and smooths it,
    :math:`\bar\kappa \leftarrow s \bar\kappa + (1 - s) \kappa` (the first estimate initialises
    :math:`\bar\kappa`; before it, :math:`\bar\kappa = \kappa_{target}`). :meth:`step` (after
    ``optimizer.step()``, as for every torch scheduler) sets the rate for the next step.

    Args:
        optimizer: any torch optimizer (``fastopt.LAdam`` too).
        model (nn.Module): the model, for the estimator.
        loss_fn (callable or None): ``loss_fn(model(inputs), targets)``; see
            :class:`~fastopt.schedulers.CurvatureEstimator`.
        base_lr (float or None): :math:`\eta_{base}` for every group; None: each group's own
            initial rate. Default: 0.01.
        curvature_target (float): :math:`\kappa_{target} > 0`. Default: 1e4.
        alpha (float): :math:`\alpha \ge 0`, how hard the rate falls above the target. Default: 1.
        estimation_freq (int): estimate every this many steps. Default: 20: an estimate of the
            default estimator costs about one training step (one gradient), so 20 adds about 5% to
            training and 10 about 10% (bench/results/curvature_methods.md), with the same agreement
            with the exact-Hessian kappa (curvature_accuracy.md).
        smoothing (float): :math:`s \in [0, 1)`. Default: 0.9.

    Keyword Args:
        estimator (CurvatureEstimator or None): a configured estimator (method, probes, engine,
            sub-batch); default ``CurvatureEstimator(model, loss_fn)``. Construct it (or the
            scheduler) before the training loop: the gradient-only methods record the generator
            state of each training forward to replay its dropout masks.
        last_epoch (int): as for torch schedulers. Default: -1.

    Attributes:
        current_curvature (float): :math:`\bar\kappa`.
        step_count (int): calls of :meth:`update_curvature` so far.
        will_estimate (bool): whether the next :meth:`update_curvature` call estimates.

    Example::

        >>> scheduler = HomotopyLR(optimizer, model, nn.CrossEntropyLoss(), base_lr=0.1, curvature_target=1e4)
        >>> for x, y in loader:
        ...     optimizer.zero_grad(); loss_fn(model(x), y).backward()
        ...     scheduler.update_curvature(x, y)
        ...     optimizer.step(); scheduler.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: Optional[nn.Module],
        loss_fn: Optional[Callable],
        base_lr: Optional[float] = 0.01,
        curvature_target: float = 1e4,
        alpha: float = 1.0,
        estimation_freq: int = 20,  # chosen by measurement: see the docstring
        smoothing: float = 0.9,
        *,
        estimator: Optional[CurvatureEstimator] = None,
        last_epoch: int = -1,
    ):
        # A None model reaches CurvatureEstimator's own check (TypeError) unless estimator is given.
        super().__init__(
            optimizer,
            lambda: CurvatureEstimator(cast(nn.Module, model), loss_fn),
            base_lr,
            curvature_target,
            alpha,
            estimation_freq,
            smoothing,
            estimator,
            last_epoch,
        )

    def update_curvature(self, inputs: Any, targets: Any = None) -> None:
        """Count a training step; estimate the curvature on ``inputs``/``targets`` if it is due."""
        if self.will_estimate:
            self._observe(self.estimator.estimate(inputs, targets, grads=training_grads(self.estimator)))
        self.step_count += 1


class CurvatureAdaptiveLR(_SmoothedHomotopyRate):
    r"""The seed's user-facing scheduler: ``scheduler.step(loss)`` estimates the curvature from the
    training step's own loss graph and sets the rate for the coming ``optimizer.step()``.

    Same rule as :class:`HomotopyLR` with :math:`s = 1 -` ``adaptation_rate``:
    :math:`\bar\kappa \leftarrow (1 - r)\bar\kappa + r\kappa`,
    :math:`\eta = \eta_{base} / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`.

    **The default estimator** (``'amortized_power'``) takes one Hessian-vector product per estimate
    through ``loss``'s graph (one power iteration, its vector kept between estimates), so keep the
    graph on estimation steps as below. ``method='secant'`` instead pairs the gradient in ``.grad``
    (call ``step(loss)`` after ``loss.backward()``) with the previous estimate's: no pass of its own
    after its first estimate, which takes one product through the graph.

    **How it gets the graph.** No second forward pass:
    the Hessian-vector products differentiate ``loss``'s graph twice (reverse-over-reverse; the
    gradient graph is built once, the probes go through it in one batched backward). The graph
    must still be alive, so on estimation steps call ``loss.backward(retain_graph=True)``
    (``scheduler.will_estimate`` says which steps those are), and call ``scheduler.step(loss)``
    *before* ``optimizer.step()`` (which changes the parameters the graph saved). Ops without
    double backward (fused attention kernels: run the model's attention on the math kernel) cannot
    be measured this way; :class:`HomotopyLR` can, with finite differences on ``(inputs, targets)``.

    Args:
        optimizer: any torch optimizer (``fastopt.LAdam`` too).
        model (nn.Module): the model whose trainable parameters span the Hessian.
        base_lr (float or None): :math:`\eta_{base}`. Default: 1e-4.
        curvature_target (float): :math:`\kappa_{target}`. Default: 1e3.
        adaptation_rate (float): :math:`r \in (0, 1]`, how fast :math:`\bar\kappa` follows new
            estimates. Default: 0.1.

    Keyword Args:
        alpha (float): Default: 1.
        estimation_freq (int): estimate on calls 1, 1 + freq, ... Default: 10.
        method (str): one of :data:`~fastopt.schedulers.curvature.METHODS` but ``'secant_same_batch'``
            (a loss carries no batch). Default: ``'amortized_power'``.
        n_samples (int): probes per estimate. Default: 5.
        estimator (CurvatureEstimator or None): overrides ``method`` and ``n_samples``.

    Example::

        >>> scheduler = CurvatureAdaptiveLR(optimizer, model, base_lr=1e-4, curvature_target=1e3, adaptation_rate=0.1)
        >>> for batch in loader:
        ...     optimizer.zero_grad()
        ...     loss = model(batch)
        ...     loss.backward(retain_graph=scheduler.will_estimate)
        ...     scheduler.step(loss)
        ...     optimizer.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        base_lr: Optional[float] = 1e-4,
        curvature_target: float = 1e3,
        adaptation_rate: float = 0.1,
        *,
        alpha: float = 1.0,
        estimation_freq: int = 10,
        method: str = DEFAULT_METHOD,
        n_samples: int = 5,
        estimator: Optional[CurvatureEstimator] = None,
        last_epoch: int = -1,
    ):
        v.in_interval(0.0, 1.0, low_inclusive=False, high_inclusive=True)("adaptation_rate", adaptation_rate)
        self.adaptation_rate = float(adaptation_rate)
        super().__init__(
            optimizer,
            lambda: CurvatureEstimator(model, None, method, n_samples=n_samples),
            base_lr,
            curvature_target,
            alpha,
            estimation_freq,
            1.0 - adaptation_rate,
            estimator,
            last_epoch,
        )

    def update_curvature(self, inputs: Any, targets: Any = None) -> None:
        """HomotopyLR's call, answered with a pointer: this scheduler estimates in ``step(loss)``."""
        raise TypeError(
            "CurvatureAdaptiveLR estimates from the loss graph: call scheduler.step(loss); "
            "HomotopyLR.update_curvature(inputs, targets) re-evaluates the loss instead"
        )

    # step(loss) by design (the seed's API, called before optimizer.step()); LRScheduler.step takes an epoch.
    def step(self, loss: Optional[Tensor] = None) -> None:  # type: ignore[override]
        """Count a training step, estimate from ``loss``'s graph when due, set the rates.

        ``step()`` without a loss only re-applies the rates (no step is counted).
        """
        if loss is not None:
            if self.will_estimate:
                self._observe(self._estimate(loss))
            self.step_count += 1
        # Not LRScheduler.step: this scheduler runs before optimizer.step() by design, which
        # LRScheduler.step would warn about; the same update, without the check.
        self._step_count += 1
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            set_lr(group, lr)
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.lr_history.append([float(lr) for lr in self._last_lr])  # floats already; typed float | Tensor

    def _estimate(self, loss: Tensor) -> float:
        try:
            return self.estimator.estimate_from_loss(loss, grads=training_grads(self.estimator))
        except RuntimeError as err:
            text = str(err) + str(err.__cause__ or "")
            if "second time" in text or "already been freed" in text:
                raise RuntimeError(
                    "CurvatureAdaptiveLR.step(loss) differentiates loss's graph, which "
                    "loss.backward() freed: on estimation steps call "
                    "loss.backward(retain_graph=scheduler.will_estimate)"
                ) from err
            if "modified by an inplace operation" in text:
                raise RuntimeError(
                    "CurvatureAdaptiveLR.step(loss): the parameters changed since loss was "
                    "computed; call scheduler.step(loss) before optimizer.step()"
                ) from err
            raise


class AdaptiveHomotopyLR(_ScaledRate):
    r"""HomotopyLR whose target is learned: linear warmup, then
    :math:`\kappa_{target}` = the ``percentile``-th percentile of the estimates so far, adapted at each
    later estimate :math:`\kappa_{target} \leftarrow (1 - r)\kappa_{target} + r\, P_{75}(\text{last }
    \texttt{window}\text{ estimates})`; the rate is then
    :math:`\eta_{base} / (1 + \alpha \max(0, \kappa_t / \kappa_{target} - 1))` with the latest raw
    estimate :math:`\kappa_t`.

    During warmup the rate for the step after ``t`` calls of :meth:`update_curvature` is
    :math:`\eta_{base} \min(1, (t + 1) / W)` (the first step runs at :math:`\eta_{base}/W`, not 0);
    the target is set when ``t`` reaches :math:`W` = ``warmup_steps``.

    Args:
        optimizer, model, loss_fn: as :class:`HomotopyLR`.
        base_lr (float or None): Default: 0.01.
        warmup_steps (int): :math:`W \ge 1`. Default: 1000.
        adaptation_rate (float): :math:`r \in [0, 1]`. Default: 0.01.

    Keyword Args:
        alpha (float): Default: 1 (the seed's fixed value).
        percentile (float): in [0, 100]. Default: 75.
        window (int): estimates the adapted percentile looks back on. Default: 100.
        estimation_freq (int): estimate every this many calls. Default: 1 (the seed estimates every step).
        estimator (CurvatureEstimator or None): Default ``CurvatureEstimator(model, loss_fn)``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: Optional[nn.Module],
        loss_fn: Optional[Callable],
        base_lr: Optional[float] = 0.01,
        warmup_steps: int = 1000,
        adaptation_rate: float = 0.01,
        *,
        alpha: float = 1.0,
        percentile: float = 75.0,
        window: int = 100,
        estimation_freq: int = 1,
        estimator: Optional[CurvatureEstimator] = None,
        last_epoch: int = -1,
    ):
        v.torch_optimizer("optimizer", optimizer)
        base_lr = check_base_lr(base_lr)
        v.int_at_least(1)("warmup_steps", warmup_steps)
        v.in_interval(0.0, 1.0, high_inclusive=True)("adaptation_rate", adaptation_rate)
        v.at_least(0.0, finite=True)("alpha", alpha)
        v.in_interval(0.0, 100.0, high_inclusive=True)("percentile", percentile)
        v.int_at_least(1)("window", window)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        if estimator is None:  # a None model reaches CurvatureEstimator's own check (TypeError)
            estimator = CurvatureEstimator(cast(nn.Module, model), loss_fn)
        check_estimator("estimator", estimator)
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.adaptation_rate = float(adaptation_rate)
        self.alpha = float(alpha)
        self.percentile = float(percentile)
        self.window = window
        self.estimation_freq = estimation_freq
        self.estimator = estimator
        self.curvature_target: Optional[float] = None
        self.target_history: List[float] = []
        self.step_count = 0
        self._init_histories()
        super().__init__(optimizer, last_epoch)

    def _percentile(self, values: Sequence[float]) -> float:
        # Linear interpolation between order statistics: numpy.percentile's default.
        return float(torch.tensor(values, dtype=torch.float64).quantile(self.percentile / 100.0))

    def update_curvature(self, inputs: Any, targets: Any = None) -> None:
        """Count a training step, estimate when due, set or adapt the target."""
        estimated = False
        if self.will_estimate:
            kappa = self.estimator.estimate(inputs, targets, grads=training_grads(self.estimator))
            if math.isfinite(kappa):
                self.curvature_steps.append(self.step_count)
                self.curvature_history.append(kappa)
                estimated = True
            else:
                warn_non_finite(type(self).__name__, kappa)
        self.step_count += 1
        if self.curvature_target is None:
            if self.step_count >= self.warmup_steps and self.curvature_history:
                self.curvature_target = self._percentile(self.curvature_history)
                self.target_history.append(self.curvature_target)
        elif estimated:
            recent = self._percentile(self.curvature_history[-self.window :])
            self.curvature_target = (1 - self.adaptation_rate) * self.curvature_target + self.adaptation_rate * recent
            self.target_history.append(self.curvature_target)

    def lr_scale(self) -> float:
        r"""Warmup: :math:`\min(1, (t + 1)/W)`; then the homotopy factor of the latest estimate."""
        if self.curvature_target is None:
            return min(1.0, (self.step_count + 1) / self.warmup_steps)
        if self.curvature_target <= 0:
            return 1.0
        return homotopy_scale(self.curvature_history[-1], self.curvature_target, self.alpha)
