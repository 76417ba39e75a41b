"""Hyperparameter checks with errors that name the argument, show its value and the allowed range."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Sequence

import torch

Check = Callable[[str, Any], None]


def _real(name: str, value: Any) -> float:
    if torch.is_tensor(value):
        # A one-element real tensor (e.g. a tensor lr that a scheduler updates in place) is read
        # on the host at every step.
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name} as a tensor must hold one real floating-point value, got "
                            f"shape {tuple(value.shape)} {value.dtype}")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: nan")
    return value


def at_least(low: float) -> Check:
    """A check for a real number >= low."""
    def check(name: str, value: Any) -> None:
        if not _real(name, value) >= low:
            raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
    return check


def in_interval(low: float, high: float, *, high_inclusive: bool) -> Check:
    """A check for a real number in [low, high) or [low, high]."""
    bracket = "]" if high_inclusive else ")"

    def check(name: str, value: Any) -> None:
        v = _real(name, value)
        if not (low <= v and (v <= high if high_inclusive else v < high)):
            raise ValueError(f"Invalid {name}: {value!r} (must be in [{low}, {high}{bracket})")
    return check


def finite(name: str, value: Any) -> None:
    """A check for a finite real number."""
    if not math.isfinite(_real(name, value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")


def one_of(choices: Sequence[Any]) -> Check:
    """A check for one of ``choices`` (ladam's wording)."""
    choices = tuple(choices)

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"Invalid {name}: {value!r}. Choose from: {choices}")
    return check


def int_at_least(low: int) -> Check:
    """A check for an integer >= low."""
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if value < low:
            raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
    return check


def betas(name: str, value: Any) -> None:
    """A check for Adam's (beta1, beta2), each in [0, 1) (torch's wording)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(value):
        _real(f"{name}[{i}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")


def flag(name: str, value: Any) -> None:
    """A check for a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")


def e0_or_auto(name: str, value: Any) -> None:
    """wave_E0: a real >= 0, or "auto" (same as 0: the level is taken from the first gradient)."""
    if value == "auto":
        return
    at_least(0.0)(name, value)


def check_all(checks: Dict[str, Check], group: Dict[str, Any]) -> None:
    """Run each check on the group's value of its name."""
    for name, check in checks.items():
        if name not in group:
            raise ValueError(f"parameter group is missing the hyperparameter {name!r}")
        check(name, group[name])
