"""What the curvature-driven schedulers share: argument checks, setting a group's rate, the
warning for a non-finite estimate, histories with their plots, and state_dict."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional

import torch

from .. import _validation as v
from ._plotting import save_line_plot
from .curvature import CurvatureEstimator

check_estimator = v.instance_of(CurvatureEstimator, "a CurvatureEstimator")


def training_grads(estimator: CurvatureEstimator) -> Optional[List[Optional[torch.Tensor]]]:
    """The measured parameters' ``.grad`` where the estimator uses the training gradient (the
    gradient-only methods: secant, secant_same_batch, amortized_power; ``use_grad=True``), else
    None. Schedulers call their estimator after ``loss.backward()`` on the batch they pass, so
    ``.grad`` is the gradient there; a ``.grad`` that is None or all zeros makes the estimator
    compute its own."""
    return [p.grad for p in estimator.params] if estimator.wants_grad else None


def check_base_lr(base_lr: Optional[float]) -> Optional[float]:
    """``base_lr`` as a float: finite and >= 0, or None (each group's own rate)."""
    v.optional(v.at_least(0.0, finite=True))("base_lr", base_lr)
    return None if base_lr is None else float(base_lr)


def set_lr(group: Dict[str, Any], lr: float) -> None:
    """Set a param group's rate; a tensor rate (capturable / fused optimizers) is filled in place."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def warn_non_finite(owner: str, kappa: float) -> None:
    warnings.warn(
        f"{owner}: non-finite curvature estimate {kappa}; the learning rate keeps its previous value",
        RuntimeWarning,
        stacklevel=3,
    )


class Histories:
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
        return save_line_plot(
            path,
            series,
            title=f"{type(self).__name__}: curvature",
            xlabel="step",
            ylabel="kappa = ||H|| / ||g||^2",
            what="plot_curvature_history",
        )

    def plot_lr_history(self, path: Optional[str] = None) -> str:
        """Write each group's learning rate against the step to a PNG; returns its path
        (default ``<ClassName>_lr.png``)."""
        path = path or f"{type(self).__name__}_lr.png"
        n_groups = max((len(lrs) for lrs in self.lr_history), default=0)
        steps = list(range(len(self.lr_history)))
        series = [(steps, [lrs[i] for lrs in self.lr_history], f"group {i}") for i in range(n_groups)]
        return save_line_plot(
            path,
            series,
            title=f"{type(self).__name__}: learning rate",
            xlabel="step",
            ylabel="learning rate",
            what="plot_lr_history",
            log_y=False,
        )


class SchedulerState:
    """state_dict / load_state_dict of a scheduler that holds an estimator (and maybe an optimizer):
    every attribute but those two, deep-copied, plus the estimator's own state."""

    _NOT_STATE = ("optimizer", "estimator")
    estimator: CurvatureEstimator  # set by the scheduler's __init__

    def state_dict(self) -> Dict[str, Any]:
        state = {k: copy.deepcopy(val) for k, val in self.__dict__.items() if k not in self._NOT_STATE}
        state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        if "estimator" not in state:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: the state_dict has no 'estimator' entry; "
                "pass a dict returned by state_dict()"
            )
        estimator_state = state.pop("estimator")
        unknown = set(state) - set(self.__dict__)
        if unknown:
            raise KeyError(f"{type(self).__name__}.load_state_dict: unexpected keys {sorted(unknown)}")
        self.estimator.load_state_dict(estimator_state)
        self.__dict__.update(copy.deepcopy(state))
