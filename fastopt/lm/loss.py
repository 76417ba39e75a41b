"""Losses for Levenberg-Marquardt: a loss value and the residuals whose squares it sums.

Levenberg-Marquardt minimises ``sum_i r_i^2``. MSE's residuals are ``y_pred - y_true``; any other
loss that is never negative is handled with the square-root trick, ``r_i = sqrt(l_i)`` where
``l_i`` is the unreduced loss of element (or sample) i, so ``sum_i r_i^2`` is the summed loss
(torch-levenberg-marquardt's ``loss.py``; same classes, same arguments, same values).

Custom residuals: subclass :class:`Loss` and define ``forward`` (the reported loss) and
``residuals`` (any shape whose first dimension is the batch)::

    class LogCoshLoss(fastopt.lm.Loss):
        def forward(self, y_pred, y_true):
            return torch.log(torch.cosh(y_pred - y_true)).mean()

        def residuals(self, y_pred, y_true):
            return torch.sqrt(torch.log(torch.cosh(y_pred - y_true)))

:func:`as_residual_loss` turns the matching ``torch.nn`` losses (``nn.MSELoss()``, ...) into these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Loss",
    "MSELoss",
    "LossWrapper",
    "L1Loss",
    "HuberLoss",
    "CrossEntropyLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "as_residual_loss",
]


def _check_same_shape(name: str, y_pred: Tensor, y_true: Tensor) -> None:
    # Broadcasting (B, 1) against (B,) silently makes B x B residuals: refuse it.
    if isinstance(y_pred, Tensor) and isinstance(y_true, Tensor) and y_pred.shape != y_true.shape:
        raise ValueError(
            f"{name}: predictions of shape {tuple(y_pred.shape)} and targets of shape "
            f"{tuple(y_true.shape)} differ; the loss is elementwise, reshape the targets "
            f"(e.g. targets.view_as(outputs))"
        )


class Loss(torch.nn.Module, ABC):
    """Base class of Levenberg-Marquardt losses: ``forward`` gives the loss, ``residuals`` the r_i."""

    @abstractmethod
    def forward(self, y_pred: Any, y_true: Any) -> Tensor:
        """The loss value (a 0-dim tensor) that accepts or rejects a step."""

    @abstractmethod
    def residuals(self, y_pred: Any, y_true: Any) -> Tensor:
        """Residuals r with ``sum(r**2)`` proportional to the loss; first dimension = batch."""


# ATen's mse_loss op: (y_pred - y_true)^2 and its mean in one call, the same values bit for bit as
# the three ops (tests/test_lm_small_solve.py checks dtypes, shapes and strides). The three cost
# ~5-8 us on this project's CPU against ~4 for the one, and a sinc step evaluates the loss 3 times.
# Looked up once; where a torch lacks it, the three ops run.
_ATEN_MSE_LOSS = getattr(getattr(torch._C, "_nn", None), "mse_loss", None)
_MEAN = 1  # the op's reduction code for "mean"


class MSELoss(Loss):
    """Mean squared error: loss ``mean((y_pred - y_true)^2)``, residuals ``y_pred - y_true``."""

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        _check_same_shape("MSELoss", y_pred, y_true)
        if (
            _ATEN_MSE_LOSS is not None
            and isinstance(y_pred, Tensor)
            and isinstance(y_true, Tensor)
            and y_pred.dtype == y_true.dtype
            and not (y_pred.requires_grad or y_true.requires_grad)  # a backward keeps the package's graph
        ):
            return _ATEN_MSE_LOSS(y_pred, y_true, _MEAN)
        return (y_pred - y_true).square().mean()

    def residuals(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        _check_same_shape("MSELoss", y_pred, y_true)
        return y_pred - y_true


class LossWrapper(Loss):
    """A torch functional loss ``fn(input, target, reduction=...)`` with square-root residuals:
    loss ``fn(..., reduction='mean')``, residuals ``sqrt(fn(..., reduction='none'))``."""

    elementwise = True  # predictions and targets must have one shape (False for cross-entropy)

    def __init__(self, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def _check(self, y_pred, y_true) -> None:
        if self.elementwise:
            _check_same_shape(type(self).__name__, y_pred, y_true)

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        self._check(y_pred, y_true)
        return self.loss_fn(y_pred, y_true, reduction="mean")

    def residuals(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        self._check(y_pred, y_true)
        return torch.sqrt(self.loss_fn(y_pred, y_true, reduction="none"))


class L1Loss(LossWrapper):
    """Mean absolute error; residuals ``sqrt(|y_pred - y_true|)``."""

    def __init__(self) -> None:
        super().__init__(F.l1_loss)


class HuberLoss(LossWrapper):
    """Huber loss (``delta`` = 1 as in torch-levenberg-marquardt); residuals ``sqrt(huber)``."""

    def __init__(self, delta: float = 1.0) -> None:
        if not delta > 0:
            raise ValueError(f"Invalid delta: {delta}. It must be > 0")
        super().__init__(F.huber_loss if delta == 1.0 else _huber_with(delta))
        self.delta = delta


def _huber_with(delta: float):
    def huber(input, target, reduction="mean"):
        return F.huber_loss(input, target, reduction=reduction, delta=delta)

    return huber


class CrossEntropyLoss(LossWrapper):
    """Cross-entropy of logits (B, C, ...) against class indices (B, ...) or probabilities;
    residuals ``sqrt(CE_i)``, one per sample."""

    elementwise = False

    def __init__(self) -> None:
        super().__init__(F.cross_entropy)


class BCELoss(LossWrapper):
    """Binary cross-entropy of probabilities; residuals ``sqrt(BCE_i)``."""

    def __init__(self) -> None:
        super().__init__(F.binary_cross_entropy)


class BCEWithLogitsLoss(LossWrapper):
    """Binary cross-entropy of logits; residuals ``sqrt(BCE_i)``."""

    def __init__(self) -> None:
        super().__init__(F.binary_cross_entropy_with_logits)


def _defaults_only(loss: torch.nn.Module, attributes) -> None:
    """Refuse torch losses configured beyond what the residual form reproduces."""
    if getattr(loss, "reduction", "mean") != "mean":
        raise ValueError(
            f"{type(loss).__name__}(reduction={loss.reduction!r}) is not supported: Levenberg-"
            "Marquardt compares mean losses; use reduction='mean'"
        )
    for name, default in attributes.items():
        value = getattr(loss, name, default)
        same = value is None if default is None else (value == default)
        if not same:
            raise ValueError(
                f"{type(loss).__name__}({name}={value!r}) is not supported by the built-in "
                f"residuals; subclass fastopt.lm.Loss to define residuals for it"
            )


def as_residual_loss(loss_fn: Any) -> Any:
    """A Levenberg-Marquardt loss for ``loss_fn``.

    Anything with a ``residuals`` method (a :class:`Loss`, or torch-levenberg-marquardt's) is
    returned as is; ``torch.nn.MSELoss/L1Loss/HuberLoss/CrossEntropyLoss/BCELoss/BCEWithLogitsLoss``
    with default settings map to the classes here; anything else raises a TypeError saying how to
    define residuals.
    """
    if loss_fn is None:
        return MSELoss()
    if callable(getattr(loss_fn, "residuals", None)):
        return loss_fn
    nn = torch.nn
    if isinstance(loss_fn, nn.MSELoss):
        _defaults_only(loss_fn, {})
        return MSELoss()
    if isinstance(loss_fn, nn.L1Loss):
        _defaults_only(loss_fn, {})
        return L1Loss()
    if isinstance(loss_fn, nn.HuberLoss):
        _defaults_only(loss_fn, {})
        return HuberLoss(delta=loss_fn.delta)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        _defaults_only(loss_fn, {"weight": None, "ignore_index": -100, "label_smoothing": 0.0})
        return CrossEntropyLoss()
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        _defaults_only(loss_fn, {"weight": None, "pos_weight": None})
        return BCEWithLogitsLoss()
    if isinstance(loss_fn, nn.BCELoss):
        _defaults_only(loss_fn, {"weight": None})
        return BCELoss()
    supported = "MSELoss, L1Loss, HuberLoss, CrossEntropyLoss, BCELoss, BCEWithLogitsLoss"
    raise TypeError(
        f"Unsupported loss_fn: {loss_fn!r}. Levenberg-Marquardt needs residuals: pass a "
        f"fastopt.lm loss ({supported}), the torch.nn loss of the same name, or subclass "
        "fastopt.lm.Loss and define forward(y_pred, y_true) and residuals(y_pred, y_true)"
    )
