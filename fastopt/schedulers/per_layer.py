"""Per-layer learning rates from per-layer curvature: :class:`PerLayerHomotopyLR`."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, List, Optional, cast

from torch import Tensor, nn
from torch.optim import Optimizer

from .. import _validation as v
from ._common import Histories, SchedulerState, check_estimator, set_lr, training_grads, warn_non_finite
from ._plotting import save_line_plot
from .curvature import DEFAULT_METHOD, CurvatureEstimator


class PerLayerHomotopyLR(SchedulerState, Histories):
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
        method (str), n_samples (int): for the default estimator. Defaults: ``'amortized_power'``, 10.
        estimator (CurvatureEstimator or None): must have ``groups``; its groups are the layers.

    Attributes:
        layer_curvatures (dict): latest :math:`\kappa_l` per layer (1.0 before any estimate).
        layer_lrs (dict): latest :math:`\eta_l` per layer.
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        loss_fn: Optional[Callable],
        base_lr: float = 0.01,
        *,
        optimizer: Optional[Optimizer] = None,
        estimation_freq: int = 1,
        method: str = DEFAULT_METHOD,
        n_samples: int = 10,
        estimator: Optional[CurvatureEstimator] = None,
    ):
        v.at_least(0.0, finite=True)("base_lr", base_lr)
        v.int_at_least(1)("estimation_freq", estimation_freq)
        if estimator is None:  # a None model reaches CurvatureEstimator's own check (TypeError)
            estimator = CurvatureEstimator(
                cast(nn.Module, model), loss_fn, method, n_samples=n_samples, groups="layers"
            )
        check_estimator("estimator", estimator)
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
        v.torch_optimizer("optimizer", optimizer)
        layer_of = {}
        for layer, idx in self.estimator.groups.items():
            for i in idx:
                layer_of[id(self.estimator.params[i])] = layer
        out = []
        for i, group in enumerate(optimizer.param_groups):
            layers = sorted({layer_of[id(p)] for p in group["params"] if id(p) in layer_of})
            if len(layers) > 1:
                raise ValueError(
                    f"optimizer.param_groups[{i}] holds parameters of several layers {layers}; "
                    "build the optimizer from PerLayerHomotopyLR.param_groups(model)"
                )
            out.append(layers[0] if layers else None)  # None: a group of unmeasured parameters, left alone
        return out

    def get_per_layer_lr(self, inputs: Any, targets: Any = None) -> Dict[str, float]:
        """Estimate every layer's curvature and return the rate of each layer."""
        curvatures = self.estimator.estimate_per_group(inputs, targets, grads=training_grads(self.estimator))
        finite = {k: c for k, c in curvatures.items() if math.isfinite(c)}
        if len(finite) < len(curvatures):
            warn_non_finite(type(self).__name__, [c for c in curvatures.values() if not math.isfinite(c)][0])
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
                    set_lr(group, self.layer_lrs[layer])
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
        return save_line_plot(
            path,
            series,
            title="per-layer curvature",
            xlabel="estimate",
            ylabel="kappa_l",
            what="plot_layer_curvature_history",
        )
