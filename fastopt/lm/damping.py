"""Damping strategies: how lambda changes between attempts and what it adds to the Gauss-Newton matrix.

Same interface and arithmetic as torch-levenberg-marquardt's ``damping.py``: lambda and the factors
read as 0-dim tensors of torch's default dtype and lambda follows the same float32 sequence, bit for
bit, though the strategy computes it with Python floats (see ``StandardDampingStrategy``):

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

import math
import struct
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as v

__all__ = ["DampingStrategy", "StandardDampingStrategy", "DAMPING_MODES"]

DAMPING_MODES = ("standard", "adaptive", "fletcher")


_FLOAT32 = struct.Struct("f")


def _round(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` once (round to nearest even), as a Python float."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return value
    if dtype == torch.float32:
        try:
            return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
        except OverflowError:  # beyond float32's range, where the tensor product is +-inf
            return math.copysign(math.inf, value)
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    # torch.promote_types goes through the dispatcher (~1 us); the dtypes are nearly always equal.
    return a if a is b else torch.promote_types(a, b)


def _extreme(a: Tuple[float, torch.dtype], b: Tuple[float, torch.dtype], pick) -> Tuple[float, torch.dtype]:
    """torch.maximum / torch.minimum of two 0-dim tensors (given as value and dtype): both in the
    promoted dtype, NaN propagating."""
    dtype = _promote(a[1], b[1])
    x, y = _round(a[0], dtype), _round(b[0], dtype)
    return (x if math.isnan(x) else y if math.isnan(y) else pick(x, y)), dtype


class _Scalar:
    """An attribute that reads as a 0-dim tensor, as the package's, and is held as (float, dtype)
    in the owner's ``__dict__`` under ``_<name>``; the tensor is built on first read after each
    change. Assigning a tensor (a subclass's ``self.damping_factor = torch.max(...)``) or a number
    (a tensor of torch's default dtype, as ``torch.tensor(number)``) both work. The tensor read is
    a copy of the value: changing it in place does not change the strategy; assign instead."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, owner: Any, cls: Optional[type] = None) -> Any:
        if owner is None:
            return self
        cached = owner.__dict__.get("_tensor_" + self.name)
        if cached is None:
            value, dtype = owner.__dict__["_" + self.name]
            cached = owner.__dict__["_tensor_" + self.name] = torch.tensor(value, dtype=dtype)
        return cached

    def __set__(self, owner: Any, value: Any) -> None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{self.name} must hold one number; got a tensor of shape {tuple(value.shape)}")
            number, dtype = value.item(), value.dtype
        else:
            number = value
            dtype = torch.tensor(value).dtype if isinstance(value, (bool, int)) else owner._dtype
        owner.__dict__["_" + self.name] = (_round(float(number), dtype), dtype)
        owner.__dict__.pop("_tensor_" + self.name, None)


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
        self._dtype = torch.get_default_dtype()
        self.starting_value = starting_value
        self.dec_factor = dec_factor
        self.inc_factor = inc_factor
        self.min_value = min_value
        self.max_value = max_value
        self.damping_mode = damping_mode
        self.conditional_stopping = conditional_stopping
        self.auto_reset = auto_reset
        self.damping_factor = starting_value

    # lambda, the factors and the bounds are 0-dim tensors to the user (as in the package), held as
    # Python floats rounded to their tensor's dtype: the package's 0-dim tensor arithmetic costs
    # ~2-5 us per op and an attempt made four of them (multiply, min, two compares read back),
    # against well under 1 us for the float arithmetic, which rounds identically (below).
    damping_factor = _Scalar("damping_factor")
    starting_value = _Scalar("starting_value")
    dec_factor = _Scalar("dec_factor")
    inc_factor = _Scalar("inc_factor")
    min_value = _Scalar("min_value")
    max_value = _Scalar("max_value")

    def reset(self) -> None:
        """Resets lambda to the starting value."""
        self._set("damping_factor", *self._get("starting_value"))

    def get_current_damping(self) -> Tensor:
        return self.damping_factor

    def current_damping_value(self) -> float:
        """lambda as a Python float (the value :meth:`get_current_damping` holds)."""
        return self._get("damping_factor")[0]

    def initialize_step(self, loss: Tensor) -> None:
        pass

    def on_successful_update(self, loss: Tensor) -> None:
        """lambda = max(lambda * dec_factor, min_value)."""
        product = self._product("damping_factor", "dec_factor")
        self._set("damping_factor", *_extreme(product, self._get("min_value"), max))

    def on_unsuccessful_update(self, loss: Tensor) -> None:
        """lambda = min(lambda * inc_factor, max_value)."""
        product = self._product("damping_factor", "inc_factor")
        self._set("damping_factor", *_extreme(product, self._get("max_value"), min))

    def stop_attempts(self, loss: Tensor) -> bool:
        """lambda >= max_value (then resets lambda if ``auto_reset``)."""
        lam, bound = self._get("damping_factor"), self._get("max_value")
        dtype = _promote(lam[1], bound[1])
        should_stop = _round(lam[0], dtype) >= _round(bound[0], dtype)
        if self.auto_reset and should_stop:
            self.reset()
        return should_stop

    def stop_training(self, loss: Tensor) -> bool:
        """``stop_attempts(loss) and conditional_stopping`` (calling ``stop_attempts`` again, as
        torch-levenberg-marquardt does: with ``auto_reset`` the second call sees the reset lambda)."""
        return self.stop_attempts(loss) and self.conditional_stopping

    # -- the float form of the 0-dim tensors -------------------------------------------------------
    def _get(self, name: str) -> Tuple[float, torch.dtype]:
        return self.__dict__["_" + name]

    def _set(self, name: str, value: float, dtype: torch.dtype) -> None:
        self.__dict__["_" + name] = (value, dtype)
        self.__dict__.pop("_tensor_" + name, None)

    def _product(self, a: str, b: str) -> Tuple[float, torch.dtype]:
        """``a * b`` as the package's 0-dim tensor product rounds it: in the promoted dtype. The
        product of two float32 (or narrower) numbers is exact in a double, so rounding it once to
        float32 gives the float32 product bit for bit; float64 products are Python's own."""
        (x, dx), (y, dy) = self._get(a), self._get(b)
        dtype = _promote(dx, dy)
        return _round(x * y, dtype), dtype

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
