"""Damping strategies: how lambda changes between attempts and what it adds to the Gauss-Newton matrix.

Same interface and arithmetic as torch-levenberg-marquardt's ``damping.py`` (lambda and the factors
are 0-dim tensors of torch's default dtype, so lambda follows the same float32 sequence):

* ``standard``:  ``JJ + lambda I``
* ``adaptive``:  ``JJ + lambda max|diag(JJ)| I``
* ``fletcher``:  ``JJ + lambda diag(diag(JJ))``

After an accepted step ``lambda = max(lambda * dec_factor, min_value)``, after a rejected one
``lambda = min(lambda * inc_factor, max_value)``; reaching ``max_value`` stops the attempts (and
training, with ``conditional_stopping``). Custom strategies subclass :class:`DampingStrategy`, or
:class:`StandardDampingStrategy` and override any method; fastopt calls ``apply(JJ)`` with the
full matrix whenever ``apply`` is overridden, and otherwise adds :meth:`StandardDampingStrategy.damping_diagonal`
to the diagonal in place, which is the same sum without building two P x P matrices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict

import torch
from torch import Tensor

from .. import _validation as v

__all__ = ["DampingStrategy", "StandardDampingStrategy", "DAMPING_MODES"]

DAMPING_MODES = ("standard", "adaptive", "fletcher")


class DampingStrategy(ABC):
    """Base class for damping strategies in Levenberg-Marquardt optimization."""

    @abstractmethod
    def reset(self) -> None:
        """Resets any state to its initial value."""

    @abstractmethod
    def get_current_damping(self) -> Tensor:
        """Retrieves the current damping factor."""

    @abstractmethod
    def initialize_step(self, loss: Tensor) -> None:
        """Initializes any state before a training step."""

    @abstractmethod
    def on_successful_update(self, loss: Tensor) -> None:
        """Adjusts the damping factor after a successful update."""

    @abstractmethod
    def on_unsuccessful_update(self, loss: Tensor) -> None:
        """Adjusts the damping factor after an unsuccessful update."""

    @abstractmethod
    def stop_attempts(self, loss: Tensor) -> bool:
        """Whether the update should be accepted with no further attempts."""

    @abstractmethod
    def stop_training(self, loss: Tensor) -> bool:
        """Whether training should stop."""

    @abstractmethod
    def apply(self, JJ: Tensor) -> Tensor:
        """The damped Gauss-Newton matrix (a new tensor; ``JJ`` is left as it is)."""


class StandardDampingStrategy(DampingStrategy):
    """Standard Levenberg-Marquardt damping.

    Args:
        starting_value: initial lambda (and the value ``reset`` returns to).
        dec_factor: lambda *= dec_factor after an accepted step.
        inc_factor: lambda *= inc_factor after a rejected attempt.
        min_value, max_value: bounds of lambda; reaching ``max_value`` ends the attempts.
        damping_mode: 'standard' (lambda I), 'adaptive' (lambda max|diag(JJ)| I) or
            'fletcher' (lambda diag(JJ)).
        conditional_stopping: stop training when lambda reaches ``max_value``.
        auto_reset: reset lambda to ``starting_value`` when it reaches ``max_value``.
    """

    def __init__(
        self,
        starting_value: float = 1e-3,
        dec_factor: float = 0.1,
        inc_factor: float = 10.0,
        min_value: float = 1e-10,
        max_value: float = 1e10,
        damping_mode: str = "standard",
        conditional_stopping: bool = True,
        auto_reset: bool = False,
    ) -> None:
        for name, value in (
            ("starting_value", starting_value),
            ("dec_factor", dec_factor),
            ("inc_factor", inc_factor),
            ("min_value", min_value),
            ("max_value", max_value),
        ):
            v.positive(name, value)
        if not min_value <= max_value:
            raise ValueError(f"Invalid min_value/max_value: {min_value} > {max_value}")
        v.one_of(DAMPING_MODES)("damping_mode", damping_mode)
        self.starting_value = torch.tensor(starting_value)
        self.dec_factor = torch.tensor(dec_factor)
        self.inc_factor = torch.tensor(inc_factor)
        self.min_value = torch.tensor(min_value)
        self.max_value = torch.tensor(max_value)
        self.damping_mode = damping_mode
        self.conditional_stopping = conditional_stopping
        self.auto_reset = auto_reset
        self.damping_factor = torch.tensor(starting_value)

    def reset(self) -> None:
        """Resets lambda to the starting value."""
        self.damping_factor = self.starting_value

    def get_current_damping(self) -> Tensor:
        return self.damping_factor

    def initialize_step(self, loss: Tensor) -> None:
        pass

    def on_successful_update(self, loss: Tensor) -> None:
        """lambda = max(lambda * dec_factor, min_value)."""
        self.damping_factor = torch.max(self.damping_factor * self.dec_factor, self.min_value)

    def on_unsuccessful_update(self, loss: Tensor) -> None:
        """lambda = min(lambda * inc_factor, max_value)."""
        self.damping_factor = torch.min(self.damping_factor * self.inc_factor, self.max_value)

    def stop_attempts(self, loss: Tensor) -> bool:
        """lambda >= max_value (then resets lambda if ``auto_reset``)."""
        should_stop = bool((self.damping_factor >= self.max_value).item())
        if self.auto_reset and should_stop:
            self.reset()
        return should_stop

    def stop_training(self, loss: Tensor) -> bool:
        """``stop_attempts(loss) and conditional_stopping`` (calling ``stop_attempts`` again, as
        torch-levenberg-marquardt does: with ``auto_reset`` the second call sees the reset lambda)."""
        return self.stop_attempts(loss) and self.conditional_stopping

    def damping_diagonal(self, diagonal: Tensor) -> Tensor:
        """What ``apply`` adds to the diagonal, given ``diagonal = diag(JJ)`` (``apply`` adds
        nothing elsewhere): ``lambda * d`` with d = 1, max|diag| or diag (standard, adaptive,
        fletcher), as a tensor that broadcasts against ``diagonal`` (0-dim for the first two)."""
        if self.damping_mode == "standard":
            return self.damping_factor.to(diagonal.device)
        if self.damping_mode == "adaptive":
            return self.damping_factor * torch.abs(diagonal).max()
        if self.damping_mode == "fletcher":
            return self.damping_factor * diagonal
        raise ValueError(f"Invalid damping_mode: {self.damping_mode!r}. Choose from: {DAMPING_MODES}")

    def apply(self, JJ: Tensor) -> Tensor:
        """``JJ + lambda D`` (a new matrix), D by ``damping_mode``."""
        damped = JJ.clone()
        diagonal = damped.diagonal()
        diagonal.copy_(diagonal + self.damping_diagonal(diagonal))
        return damped

    # -- checkpoints -----------------------------------------------------------------------------
    _STATE = ("damping_factor", "starting_value", "dec_factor", "inc_factor", "min_value", "max_value")

    def state_dict(self) -> Dict[str, Any]:
        """lambda, the factors and bounds (tensors) and the flags."""
        state: Dict[str, Any] = {k: getattr(self, k).clone() for k in self._STATE}
        state.update(
            damping_mode=self.damping_mode, conditional_stopping=self.conditional_stopping, auto_reset=self.auto_reset
        )
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise KeyError(f"StandardDampingStrategy.load_state_dict: missing {missing}")
        mode = state.get("damping_mode", self.damping_mode)
        v.one_of(DAMPING_MODES)("damping_mode", mode)
        for k in self._STATE:
            setattr(self, k, torch.as_tensor(state[k]).clone())
        self.damping_mode = mode
        self.conditional_stopping = bool(state.get("conditional_stopping", self.conditional_stopping))
        self.auto_reset = bool(state.get("auto_reset", self.auto_reset))
