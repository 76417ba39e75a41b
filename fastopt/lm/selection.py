"""Parameter selection: which entries of the flat parameter vector a step updates.

Same classes, arguments and random draws as torch-levenberg-marquardt's ``selection.py`` (so that
with the same seed both pick the same parameters). A strategy returns indices into the flat vector
of trainable parameters (in ``model.named_parameters()`` order); the Jacobian then has one column
per selected index, in the order returned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, List, Tuple

import torch
from torch import Tensor

from .. import _validation as v

__all__ = ["ParamSelectionStrategy", "RandomSelectionStrategy", "LayerSelectionStrategy", "LAYER_MODES"]

LAYER_MODES = ("random", "cyclic")


class ParamSelectionStrategy(ABC):
    """Base class: ``select_parameters()`` returns the flat indices to update this step."""

    @abstractmethod
    def select_parameters(self) -> Tensor:
        """Indices (int64) of the selected entries of the flat parameter vector."""


class RandomSelectionStrategy(ParamSelectionStrategy):
    """``subset_size`` entries drawn uniformly without replacement each step (sorted).

    Draws ``torch.randperm(total, device=...)`` as torch-levenberg-marquardt does.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], subset_size: int) -> None:
        self.params = list(params)
        self.total_num_params = sum(p.numel() for p in self.params)
        v.int_at_least(1)("subset_size", subset_size)
        if subset_size > self.total_num_params:
            raise ValueError(
                f"subset_size ({subset_size}) cannot exceed the total number of parameters ({self.total_num_params})."
            )
        self.subset_size = subset_size
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def select_parameters(self) -> Tensor:
        param_indices = torch.randperm(self.total_num_params, device=self.device)
        return param_indices[: self.subset_size].sort().values


class LayerSelectionStrategy(ParamSelectionStrategy):
    """All entries of one parameter tensor per step, picked at random or in turn ('cyclic')."""

    def __init__(self, params: Iterable[torch.nn.Parameter], mode: str = "random") -> None:
        v.one_of(LAYER_MODES)("mode", mode)
        self.params = list(params)
        self.mode = mode
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.param_slices: List[Tuple[int, int]] = []
        start = 0
        for p in self.params:
            self.param_slices.append((start, start + p.numel()))
            start += p.numel()
        self.current_param_idx = 0

    def select_parameters(self) -> Tensor:
        if not self.params:
            return torch.tensor([], dtype=torch.long, device=self.device)
        if self.mode == "random":
            param_idx = int(torch.randint(low=0, high=len(self.params), size=(1,)).item())
        else:
            param_idx = self.current_param_idx
            self.current_param_idx = (self.current_param_idx + 1) % len(self.params)
        start, end = self.param_slices[param_idx]
        return torch.arange(start, end, device=self.device, dtype=torch.long)
