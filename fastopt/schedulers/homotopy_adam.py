"""Adam with a curvature-driven rate: :class:`HomotopyAdam`."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar, overload

import torch

from .. import _validation as v
from ._common import check_estimator, set_lr, training_grads, warn_non_finite
from .curvature import CurvatureEstimator

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

_Loss = TypeVar("_Loss")  # whatever the closure returns (the loss)


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

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        curvature_estimator: Optional[CurvatureEstimator] = None,
        *,
        curvature_scale: float = 1e4,
        **kwargs: Any,
    ):
        v.optional(check_estimator)("curvature_estimator", curvature_estimator)
        v.finite_positive("curvature_scale", curvature_scale)
        super().__init__(params, lr=lr, **kwargs)
        self.curvature_estimator = curvature_estimator
        self.curvature_scale = float(curvature_scale)
        self.curvature_history: List[float] = []
        self.lr_history: List[List[float]] = []

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", float(group["lr"]))

    @overload
    def step(self, closure: None = None, inputs: Any = None, targets: Any = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], _Loss], inputs: Any = None, targets: Any = None) -> _Loss: ...

    def step(
        self, closure: Optional[Callable[[], _Loss]] = None, inputs: Any = None, targets: Any = None
    ) -> Optional[_Loss]:
        """Estimate the curvature on ``inputs``/``targets`` (when given), set the rates, then Adam's step."""
        if self.curvature_estimator is not None and inputs is not None:
            kappa = self.curvature_estimator.estimate(inputs, targets, grads=training_grads(self.curvature_estimator))
            self.curvature_history.append(kappa)
            if math.isfinite(kappa):
                for group in self.param_groups:
                    set_lr(group, group["base_lr"] / (1.0 + kappa / self.curvature_scale))
            else:
                warn_non_finite(type(self).__name__, kappa)
            self.lr_history.append([float(g["lr"]) for g in self.param_groups])
        return super().step(closure)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["homotopy"] = {
            "curvature_history": list(self.curvature_history),
            "lr_history": copy.deepcopy(self.lr_history),
            "estimator": None if self.curvature_estimator is None else self.curvature_estimator.state_dict(),
        }
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
