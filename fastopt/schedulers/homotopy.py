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
"""
from __future__ import annotations

import copy
import math
import statistics
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..optim import _validation as v
from ._plotting import save_line_plot
from .curvature import CurvatureEstimator


# -- shared pieces -------------------------------------------------------------------------------
def _check_optimizer(optimizer: Any, name: str = "optimizer") -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def _positive(name: str, value: Any) -> None:
    v.finite(name, value)
    if not value > 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0)")


def _check_estimator(estimator: Any) -> None:
    if not isinstance(estimator, CurvatureEstimator):
        raise TypeError(f"estimator must be a CurvatureEstimator, got {type(estimator).__name__}")


def _set_lr(group: Dict[str, Any], lr: float) -> None:
    if torch.is_tensor(group["lr"]):  # capturable / fused optimizers keep lr as a tensor
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _warn_non_finite(owner: str, kappa: float) -> None:
    warnings.warn(f"{owner}: non-finite curvature estimate {kappa}; the learning rate keeps its previous value",
                  RuntimeWarning, stacklevel=3)


def homotopy_scale(curvature: float, target: float, alpha: float) -> float:
    r""":math:`1 / (1 + \alpha \max(0, \kappa/\kappa_{target} - 1))`, the factor on the base rate."""
    return 1.0 / (1.0 + alpha * max(0.0, curvature / target - 1.0))


class _Histories:
    """Histories and their plots: ``curvature_steps`` / ``curvature_history`` (raw estimates) and,
    where there is one, ``smoothed_curvature_history``; ``lr_history`` (the rate of each group
    after each step)."""

    def _init_histories(self) -> None:
        self.curvature_steps: List[int] = []
        self.curvature_history: List[float] = []
        self.smoothed_curvature_history: List[float] = []
        self.lr_history: List[List[float]] = []

    def plot_curvature_history(self, path: Optional[str] = None) -> str:
        """Write the curvature estimates against the step to a PNG; returns its path
        (default ``<ClassName>_curvature.png`` in the working directory)."""
        path = path or f"{type(self).__name__}_curvature.png"
        series = [(self.curvature_steps, self.curvature_history, "estimate")]
        if self.smoothed_curvature_history:
            series.append((self.curvature_steps, self.smoothed_curvature_history, "smoothed"))
        return save_line_plot(path, series, title=f"{type(self).__name__}: curvature", xlabel="step",
                              ylabel="kappa = ||H|| / ||g||^2", what="plot_curvature_history")

    def plot_lr_history(self, path: Optional[str] = None) -> str:
        """Write each group's learning rate against the step to a PNG; returns its path
        (default ``<ClassName>_lr.png``)."""
        path = path or f"{type(self).__name__}_lr.png"
        n_groups = max((len(lrs) for lrs in self.lr_history), default=0)
        steps = list(range(len(self.lr_history)))
        series = [(steps, [lrs[i] for lrs in self.lr_history], f"group {i}") for i in range(n_groups)]
        return save_line_plot(path, series, title=f"{type(self).__name__}: learning rate", xlabel="step",
                              ylabel="learning rate", what="plot_lr_history", log_y=False)


class _SchedulerState:
    """state_dict / load_state_dict of a scheduler that holds an estimator (and maybe an optimizer):
    every attribute but those two, deep-copied, plus the estimator's own state."""

    _NOT_STATE = ("optimizer", "estimator")

    def state_dict(self) -> Dict[str, Any]:
        state = {k: copy.deepcopy(val) for k, val in self.__dict__.items() if k not in self._NOT_STATE}
        state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        if "estimator" not in state:
            raise KeyError(f"{type(self).__name__}.load_state_dict: the state_dict has no 'estimator' entry; "
                           "pass a dict returned by state_dict()")
        estimator_state = state.pop("estimator")
        unknown = set(state) - set(self.__dict__)
        if unknown:
            raise KeyError(f"{type(self).__name__}.load_state_dict: unexpected keys {sorted(unknown)}")
        self.estimator.load_state_dict(estimator_state)
        self.__dict__.update(copy.deepcopy(state))


def _check_base_lr(base_lr: Optional[float]) -> Optional[float]:
    if base_lr is None:
        return None
    v.at_least(0.0)("base_lr", base_lr)
    v.finite("base_lr", base_lr)
    return float(base_lr)


class _ScaledRate(_SchedulerState, _Histories, LRScheduler):
    """A torch scheduler whose rate is ``base x lr_scale()``: ``base_lr`` for every group, or each
    group's initial rate when ``base_lr`` is None. Subclasses define ``lr_scale`` and count
    ``step_count`` / ``estimation_freq``."""

    @property
    def will_estimate(self) -> bool:
        """Whether the next training step estimates the curvature."""
        return self.step_count % self.estimation_freq == 0

    def lr_scale(self) -> float:
        raise NotImplementedError

    def get_lr(self) -> List[float]:
        """The rate of each group for the current state (no side effects)."""
        scale = self.lr_scale()
        bases = self.base_lrs if self.base_lr is None else [self.base_lr] * len(self.base_lrs)
        return [float(b) * scale for b in bases]

    def step(self, epoch: Optional[int] = None) -> None:
        super().step(epoch)
        self.lr_history.append([float(lr) for lr in self.get_last_lr()])


# -- HomotopyLR ------------------------------------------------------------------------------------
class HomotopyLR(_ScaledRate):
    r"""Learning rate from the loss landscape's curvature:
    :math:`\eta = \eta_{base} / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`.

    :meth:`update_curvature` (call it every step, before ``optimizer.step()``) estimates
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
        estimation_freq (int): estimate every this many steps. Default: 10.
        smoothing (float): :math:`s \in [0, 1)`. Default: 0.9.

    Keyword Args:
        estimator (CurvatureEstimator or None): a configured estimator (method, probes, engine,
            sub-batch); default ``CurvatureEstimator(model, loss_fn)``.
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

    def __init__(self, optimizer: Optimizer, model: Optional[nn.Module], loss_fn: Optional[Callable],
                 base_lr: Optional[float] = 0.01, curvature_target: float = 1e4, alpha: float = 1.0,
                 estimation_freq: int = 10, smoothing: float = 0.9, *,
                 estimator: Optional[CurvatureEstimator] = None, last_epoch: int = -1):
        _check_optimizer(optimizer)
        base_lr = _check_base_lr(base_lr)
        _positive("curvature_target", curvature_target)
        v.at_least(0.0)("alpha", alpha)
        v.finite("alpha", alpha)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        v.in_interval(0.0, 1.0, high_inclusive=False)("smoothing", smoothing)
        if estimator is None:
            estimator = CurvatureEstimator(model, loss_fn)
        _check_estimator(estimator)
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

    def update_curvature(self, inputs: Any, targets: Any = None) -> None:
        """Count a training step; estimate the curvature on ``inputs``/``targets`` if it is due."""
        if self.will_estimate:
            self._observe(self.estimator.estimate(inputs, targets))
        self.step_count += 1

    def _observe(self, kappa: float) -> None:
        if not math.isfinite(kappa):
            _warn_non_finite(type(self).__name__, kappa)
            return
        first = not self.curvature_history
        self.current_curvature = kappa if first else self.smoothing * self.current_curvature + (1 - self.smoothing) * kappa
        self.curvature_steps.append(self.step_count)
        self.curvature_history.append(kappa)
        self.smoothed_curvature_history.append(self.current_curvature)

    def lr_scale(self) -> float:
        r""":math:`1 / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`."""
        return homotopy_scale(self.current_curvature, self.curvature_target, self.alpha)


class CurvatureAdaptiveLR(HomotopyLR):
    r"""The seed's user-facing scheduler: ``scheduler.step(loss)`` estimates the curvature from the
    training step's own loss graph and sets the rate for the coming ``optimizer.step()``.

    Same rule as :class:`HomotopyLR` with :math:`s = 1 -` ``adaptation_rate``:
    :math:`\bar\kappa \leftarrow (1 - r)\bar\kappa + r\kappa`,
    :math:`\eta = \eta_{base} / (1 + \alpha \max(0, \bar\kappa/\kappa_{target} - 1))`.

    **How it gets the graph.** No second forward pass: the Hessian-vector products differentiate
    ``loss``'s graph twice (reverse-over-reverse; the gradient graph is built once, the probes go
    through it in one batched backward). The graph must still be alive, so on estimation steps call
    ``loss.backward(retain_graph=True)`` (``scheduler.will_estimate`` says which steps those are),
    and call ``scheduler.step(loss)`` *before* ``optimizer.step()`` (which changes the parameters
    the graph saved). Ops without double backward (fused attention kernels: run the model's
    attention on the math kernel) cannot be measured this way; :class:`HomotopyLR` can, with
    finite differences on ``(inputs, targets)``.

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
        method (str): ``'hutchinson'`` or ``'power'``. Default: ``'hutchinson'``.
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

    def __init__(self, optimizer: Optimizer, model: nn.Module, base_lr: Optional[float] = 1e-4,
                 curvature_target: float = 1e3, adaptation_rate: float = 0.1, *, alpha: float = 1.0,
                 estimation_freq: int = 10, method: str = "hutchinson", n_samples: int = 5,
                 estimator: Optional[CurvatureEstimator] = None, last_epoch: int = -1):
        v.in_interval(0.0, 1.0, high_inclusive=True)("adaptation_rate", adaptation_rate)
        if adaptation_rate == 0:
            raise ValueError("Invalid adaptation_rate: 0 (must be in (0, 1]; 0 would never adapt)")
        if estimator is None:
            estimator = CurvatureEstimator(model, None, method, n_samples=n_samples)
        self.adaptation_rate = float(adaptation_rate)
        super().__init__(optimizer, model, None, base_lr, curvature_target, alpha, estimation_freq,
                         1.0 - adaptation_rate, estimator=estimator, last_epoch=last_epoch)

    def update_curvature(self, inputs: Any, targets: Any = None) -> None:
        raise TypeError("CurvatureAdaptiveLR estimates from the loss graph: call scheduler.step(loss); "
                        "HomotopyLR.update_curvature(inputs, targets) re-evaluates the loss instead")

    def step(self, loss: Optional[Tensor] = None) -> None:
        """Count a training step, estimate from ``loss``'s graph when due, set the rates.

        ``step()`` without a loss only re-applies the rates (no step is counted).
        """
        if loss is not None:
            if self.will_estimate:
                self._observe(self._estimate(loss))
            self.step_count += 1
        # Not LRScheduler.step: this scheduler runs before optimizer.step() by design, which
        # LRScheduler.step would warn about.
        self._step_count += 1
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            _set_lr(group, lr)
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.lr_history.append(list(self._last_lr))

    def _estimate(self, loss: Tensor) -> float:
        try:
            return self.estimator.estimate_from_loss(loss)
        except RuntimeError as err:
            text = str(err) + str(err.__cause__ or "")
            if "second time" in text or "already been freed" in text:
                raise RuntimeError("CurvatureAdaptiveLR.step(loss) differentiates loss's graph, which "
                                   "loss.backward() freed: on estimation steps call "
                                   "loss.backward(retain_graph=scheduler.will_estimate)") from err
            if "modified by an inplace operation" in text:
                raise RuntimeError("CurvatureAdaptiveLR.step(loss): the parameters changed since loss was "
                                   "computed; call scheduler.step(loss) before optimizer.step()") from err
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

    def __init__(self, optimizer: Optimizer, model: Optional[nn.Module], loss_fn: Optional[Callable],
                 base_lr: Optional[float] = 0.01, warmup_steps: int = 1000, adaptation_rate: float = 0.01, *,
                 alpha: float = 1.0, percentile: float = 75.0, window: int = 100, estimation_freq: int = 1,
                 estimator: Optional[CurvatureEstimator] = None, last_epoch: int = -1):
        _check_optimizer(optimizer)
        base_lr = _check_base_lr(base_lr)
        v.int_at_least(1)("warmup_steps", warmup_steps)
        v.in_interval(0.0, 1.0, high_inclusive=True)("adaptation_rate", adaptation_rate)
        v.at_least(0.0)("alpha", alpha)
        v.finite("alpha", alpha)
        v.in_interval(0.0, 100.0, high_inclusive=True)("percentile", percentile)
        v.int_at_least(1)("window", window)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        if estimator is None:
            estimator = CurvatureEstimator(model, loss_fn)
        _check_estimator(estimator)
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
            kappa = self.estimator.estimate(inputs, targets)
            if math.isfinite(kappa):
                self.curvature_steps.append(self.step_count)
                self.curvature_history.append(kappa)
                estimated = True
            else:
                _warn_non_finite(type(self).__name__, kappa)
        self.step_count += 1
        if self.curvature_target is None:
            if self.step_count >= self.warmup_steps and self.curvature_history:
                self.curvature_target = self._percentile(self.curvature_history)
                self.target_history.append(self.curvature_target)
        elif estimated:
            recent = self._percentile(self.curvature_history[-self.window:])
            self.curvature_target = (1 - self.adaptation_rate) * self.curvature_target + self.adaptation_rate * recent
            self.target_history.append(self.curvature_target)

    def lr_scale(self) -> float:
        r"""Warmup: :math:`\min(1, (t + 1)/W)`; then the homotopy factor of the latest estimate."""
        if self.curvature_target is None:
            return min(1.0, (self.step_count + 1) / self.warmup_steps)
        if self.curvature_target <= 0:
            return 1.0
        return homotopy_scale(self.curvature_history[-1], self.curvature_target, self.alpha)


# -- per layer, warmup, clipping, Adam -----------------------------------------------------------
class PerLayerHomotopyLR(_SchedulerState, _Histories):
    r"""A rate per layer from per-layer curvature:
    :math:`\eta_l = \eta_{base} / (1 + \kappa_l / \mathrm{median}_m \kappa_m)`, with
    :math:`\kappa_l = \|H_{ll}\| / \|g_l\|^2` of the diagonal Hessian block of layer :math:`l`.

    One estimate per call measures every layer at once (the per-group figures of
    :class:`~fastopt.schedulers.CurvatureEstimator`), not one estimator per layer. Layers are
    the modules that own parameters directly, keyed by module name (``''`` for the root).

    Args:
        model (nn.Module), loss_fn (callable or None): as :class:`HomotopyLR`.
        base_lr (float): :math:`\eta_{base}`. Default: 0.01.

    Keyword Args:
        optimizer (Optimizer or None): if given, :meth:`step` sets the rate of each of its param
            groups to that of the layer its parameters belong to; every group must lie within one
            layer (build them with :meth:`param_groups`).
        estimation_freq (int): :meth:`step` estimates every this many calls. Default: 1.
        method (str), n_samples (int): for the default estimator. Defaults: ``'hutchinson'``, 10.
        estimator (CurvatureEstimator or None): must have ``groups``; its groups are the layers.

    Attributes:
        layer_curvatures (dict): latest :math:`\kappa_l` per layer (1.0 before any estimate).
        layer_lrs (dict): latest :math:`\eta_l` per layer.
    """

    def __init__(self, model: Optional[nn.Module], loss_fn: Optional[Callable], base_lr: float = 0.01, *,
                 optimizer: Optional[Optimizer] = None, estimation_freq: int = 1, method: str = "hutchinson",
                 n_samples: int = 10, estimator: Optional[CurvatureEstimator] = None):
        v.finite("base_lr", base_lr)
        v.at_least(0.0)("base_lr", base_lr)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        if estimator is None:
            estimator = CurvatureEstimator(model, loss_fn, method, n_samples=n_samples, groups="layers")
        _check_estimator(estimator)
        if not estimator.groups:
            raise ValueError("PerLayerHomotopyLR needs an estimator with groups (e.g. groups='layers')")
        self.estimator = estimator
        self.base_lr = float(base_lr)
        self.estimation_freq = estimation_freq
        self.layer_curvatures: Dict[str, float] = {name: 1.0 for name in estimator.groups}
        self.layer_lrs: Dict[str, float] = {name: self.base_lr / 2 for name in estimator.groups}
        self.layer_curvature_history: Dict[str, List[float]] = {name: [] for name in estimator.groups}
        self.step_count = 0
        self._init_histories()
        self.optimizer = optimizer
        self._group_layers = self._layers_of_groups(optimizer) if optimizer is not None else []

    @staticmethod
    def param_groups(model: nn.Module, **options: Any) -> List[Dict[str, Any]]:
        """One optimizer param group per layer (module owning trainable parameters), each with a
        ``'name'`` entry; ``options`` (``weight_decay=...``) are copied into every group."""
        groups: Dict[str, List[Tensor]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.rpartition(".")[0], []).append(p)
        return [{"params": ps, "name": layer, **options} for layer, ps in groups.items()]

    def _layers_of_groups(self, optimizer: Optimizer) -> List[Optional[str]]:
        _check_optimizer(optimizer)
        layer_of = {}
        for layer, idx in self.estimator.groups.items():
            for i in idx:
                layer_of[id(self.estimator.params[i])] = layer
        out = []
        for i, group in enumerate(optimizer.param_groups):
            layers = sorted({layer_of[id(p)] for p in group["params"] if id(p) in layer_of})
            if len(layers) > 1:
                raise ValueError(f"optimizer.param_groups[{i}] holds parameters of several layers {layers}; "
                                 "build the optimizer from PerLayerHomotopyLR.param_groups(model)")
            out.append(layers[0] if layers else None)  # None: a group of unmeasured parameters, left alone
        return out

    def get_per_layer_lr(self, inputs: Any, targets: Any = None) -> Dict[str, float]:
        """Estimate every layer's curvature and return the rate of each layer."""
        curvatures = self.estimator.estimate_per_group(inputs, targets)
        finite = {k: c for k, c in curvatures.items() if math.isfinite(c)}
        if len(finite) < len(curvatures):
            _warn_non_finite(type(self).__name__, [c for c in curvatures.values() if not math.isfinite(c)][0])
        self.layer_curvatures.update(finite)
        for name, c in finite.items():
            self.layer_curvature_history[name].append(c)
        self.curvature_steps.append(self.step_count)
        self.curvature_history.append(self.estimator.curvature_history[-1])
        median = statistics.median(self.layer_curvatures.values())
        lrs = {}
        for name, kappa in self.layer_curvatures.items():
            ratio = kappa / median if median > 0 else (0.0 if kappa == 0 else math.inf)
            lrs[name] = self.base_lr / (1.0 + ratio)
        self.layer_lrs = lrs
        return dict(lrs)

    def step(self, inputs: Any, targets: Any = None) -> Dict[str, float]:
        """Estimate (every ``estimation_freq`` calls) and, with an optimizer, set its groups' rates."""
        if self.step_count % self.estimation_freq == 0:
            self.get_per_layer_lr(inputs, targets)
        self.step_count += 1
        if self.optimizer is not None:
            for group, layer in zip(self.optimizer.param_groups, self._group_layers):
                if layer is not None:
                    _set_lr(group, self.layer_lrs[layer])
            self.lr_history.append(self.get_last_lr())
        else:
            self.lr_history.append([self.layer_lrs[k] for k in self.layer_lrs])
        return dict(self.layer_lrs)

    def get_last_lr(self) -> List[float]:
        """The rate of each optimizer group (with an optimizer), else of each layer."""
        if self.optimizer is None:
            return [self.layer_lrs[k] for k in self.layer_lrs]
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def plot_layer_curvature_history(self, path: Optional[str] = None) -> str:
        """Write each layer's curvature against the estimate index to a PNG; returns its path."""
        path = path or f"{type(self).__name__}_layer_curvature.png"
        series = [(list(range(len(h))), h, name or "(root)") for name, h in self.layer_curvature_history.items()]
        return save_line_plot(path, series, title="per-layer curvature", xlabel="estimate",
                              ylabel="kappa_l", what="plot_layer_curvature_history")


class CurvatureWarmup(_SchedulerState, _Histories):
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

    def __init__(self, optimizer: Optimizer, model: Optional[nn.Module], loss_fn: Optional[Callable],
                 target_lr: Optional[float], warmup_steps: int = 1000, *, curvature_threshold: float = 1e6,
                 start_factor: float = 0.01, estimator: Optional[CurvatureEstimator] = None):
        _check_optimizer(optimizer)
        if target_lr is not None:
            v.finite("target_lr", target_lr)
            v.at_least(0.0)("target_lr", target_lr)
        v.int_at_least(1)("warmup_steps", warmup_steps)
        _positive("curvature_threshold", curvature_threshold)
        v.in_interval(0.0, 1.0, high_inclusive=True)("start_factor", start_factor)
        if start_factor == 0:
            raise ValueError("Invalid start_factor: 0 (must be in (0, 1]; a rate of 0 cannot grow)")
        if estimator is None:
            estimator = CurvatureEstimator(model, loss_fn)
        _check_estimator(estimator)
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
        return min(1.0, self.start_factor * self.growth ** self.increases)

    @property
    def done(self) -> bool:
        return self.factor >= 1.0

    @property
    def current_lr(self) -> float:
        return self.target_lr * self.factor

    def _apply(self) -> None:
        for group, target in zip(self.optimizer.param_groups, self.target_lrs):
            _set_lr(group, target * self.factor)
        self.lr_history.append(self.get_last_lr())

    def step(self, inputs: Any, targets: Any = None) -> float:
        """Estimate (until done) and raise the rate if the curvature allows; returns ``current_lr``."""
        if not self.done:
            kappa = self.estimator.estimate(inputs, targets)
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


def curvature_aware_clip(grads: Iterable[Optional[Tensor]], curvature: float, max_norm: float = 1.0, *,
                         curvature_scale: float = 1e4) -> List[Optional[Tensor]]:
    r"""Clip gradients harder in high-curvature regions.

    With :math:`m = \texttt{max\_norm} / (1 + \kappa / \texttt{curvature\_scale})` and the global norm
    :math:`\|g\| = \sqrt{\sum_i \|g_i\|^2}`: returns :math:`g_i \cdot m / \|g\|` when
    :math:`\|g\| > m`, else the gradients themselves. New tensors, nothing modified in place
    (``None`` entries are passed through).

    Args:
        grads: the gradients (e.g. ``[p.grad for p in model.parameters()]``).
        curvature (float): :math:`\kappa \ge 0`.
        max_norm (float): the norm bound at zero curvature, > 0. Default: 1.
        curvature_scale (float): the curvature that halves the bound, > 0. Default: 1e4 (the seed's).
    """
    grads = list(grads)
    v.at_least(0.0)("curvature", curvature)
    _positive("max_norm", max_norm)
    _positive("curvature_scale", curvature_scale)
    for i, g in enumerate(grads):
        if g is not None and not torch.is_tensor(g):
            raise TypeError(f"grads[{i}] must be a tensor or None, got {type(g).__name__}")
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    effective_max = max_norm / (1.0 + curvature / curvature_scale)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double()).cpu() for g in present]))
    if not bool(norm > effective_max):
        return grads
    scale = effective_max / float(norm)
    return [None if g is None else g * scale for g in grads]


class HomotopyAdam(torch.optim.Adam):
    r"""Adam whose rate follows the curvature: before each step with ``inputs`` given,
    :math:`\kappa` is estimated and every group's rate set to
    :math:`\eta_{base} / (1 + \kappa / \texttt{curvature\_scale})` (its initial rate as
    :math:`\eta_{base}`, kept in the group as ``'base_lr'``).

    Args:
        params: as torch.optim.Adam.
        lr (float): the base rate. Default: 1e-3.
        curvature_estimator (CurvatureEstimator or None): None: plain Adam.

    Keyword Args:
        curvature_scale (float): Default: 1e4 (the seed's).
        **kwargs: torch.optim.Adam's (betas, eps, weight_decay, ...).

    ``curvature_history`` and ``lr_history`` record each estimate; ``state_dict()`` carries them
    and the estimator's state (key ``'homotopy'``) beside Adam's.
    """

    def __init__(self, params, lr: float = 1e-3, curvature_estimator: Optional[CurvatureEstimator] = None, *,
                 curvature_scale: float = 1e4, **kwargs: Any):
        if curvature_estimator is not None:
            _check_estimator(curvature_estimator)
        _positive("curvature_scale", curvature_scale)
        super().__init__(params, lr=lr, **kwargs)
        self.curvature_estimator = curvature_estimator
        self.curvature_scale = float(curvature_scale)
        self.base_lr = lr
        self.curvature_history: List[float] = []
        self.lr_history: List[List[float]] = []

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", float(group["lr"]))

    def step(self, closure: Optional[Callable] = None, inputs: Any = None, targets: Any = None):
        """Estimate the curvature on ``inputs``/``targets`` (when given), set the rates, then Adam's step."""
        if self.curvature_estimator is not None and inputs is not None:
            kappa = self.curvature_estimator.estimate(inputs, targets)
            self.curvature_history.append(kappa)
            if math.isfinite(kappa):
                for group in self.param_groups:
                    _set_lr(group, group["base_lr"] / (1.0 + kappa / self.curvature_scale))
            else:
                _warn_non_finite(type(self).__name__, kappa)
            self.lr_history.append([float(g["lr"]) for g in self.param_groups])
        return super().step(closure)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["homotopy"] = {"curvature_history": list(self.curvature_history),
                             "lr_history": copy.deepcopy(self.lr_history),
                             "estimator": None if self.curvature_estimator is None else self.curvature_estimator.state_dict()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        homotopy = state_dict.pop("homotopy", None)
        super().load_state_dict(state_dict)
        if homotopy is not None:
            self.curvature_history = list(homotopy["curvature_history"])
            self.lr_history = copy.deepcopy(homotopy["lr_history"])
            if homotopy["estimator"] is not None and self.curvature_estimator is not None:
                self.curvature_estimator.load_state_dict(homotopy["estimator"])
