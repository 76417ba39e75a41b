"""Argument checks for the whole package, with errors that name the argument, show its value and
say what is allowed.

One exception type per kind of mistake: ``TypeError`` for a value of the wrong type (a str where a
number belongs, a float where an int belongs, an object of the wrong class), ``ValueError`` for a
value of the right type that is not allowed (a negative rate, nan, an unknown choice).

A *check* is ``check(name, value) -> None``. The checks with parameters are built by calling them
(``at_least(0.0)("lr", lr)``), so an optimizer keeps a table ``{name: check}`` for its param
groups (:func:`check_all`). Numbers are real numbers (not bools) or one-element real
floating-point tensors (a tensor lr that a scheduler updates in place).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type, Union

import torch

Check = Callable[[str, Any], None]


# -- numbers ---------------------------------------------------------------------------------------
def real(name: str, value: Any) -> float:
    """``value`` as a float: a real number or a one-element real tensor (TypeError otherwise), not
    nan (ValueError)."""
    if torch.is_tensor(value):
        # A one-element real tensor (e.g. a tensor lr that a scheduler updates in place) is read
        # on the host.
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise TypeError(
                f"{name} as a tensor must hold one real floating-point value, got "
                f"shape {tuple(value.shape)} {value.dtype}"
            )
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: nan")
    return value


def finite(name: str, value: Any) -> None:
    """A finite real number."""
    if not math.isfinite(real(name, value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")


def _bound(test: Callable[[float], bool], allowed: str, must_be_finite: bool) -> Check:
    """A check for a real number ``x`` with ``test(x)``; ``allowed`` says what that means."""

    def check(name: str, value: Any) -> None:
        x = real(name, value)
        if must_be_finite and not math.isfinite(x):
            raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
        if not test(x):
            raise ValueError(f"Invalid {name}: {value!r} (must be {allowed})")

    return check


def at_least(low: float, *, finite: bool = False) -> Check:
    """A real number >= ``low`` (and finite, with ``finite=True``)."""
    return _bound(lambda x: x >= low, f">= {low}", finite)


def greater_than(low: float, *, finite: bool = False) -> Check:
    """A real number > ``low`` (and finite, with ``finite=True``)."""
    return _bound(lambda x: x > low, f"> {low:g}", finite)


def positive(name: str, value: Any) -> None:
    """A real number > 0; inf passes (a factor or bound that may be unlimited)."""
    greater_than(0.0)(name, value)


def finite_positive(name: str, value: Any) -> None:
    """A finite real number > 0 (a rate, a scale, a target)."""
    greater_than(0.0, finite=True)(name, value)


def in_interval(low: float, high: float, *, high_inclusive: bool, low_inclusive: bool = True) -> Check:
    """A real number in ``[low, high)``, ``[low, high]``, ``(low, high)`` or ``(low, high]``."""
    allowed = f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    return _bound(
        lambda x: (low <= x if low_inclusive else low < x) and (x <= high if high_inclusive else x < high),
        allowed,
        False,
    )


def integer(name: str, value: Any) -> numbers.Integral:
    """``value`` if it is an integer (not a bool), else TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return value


def int_at_least(low: int) -> Check:
    """An integer >= ``low``."""

    def check(name: str, value: Any) -> None:
        if integer(name, value) < low:
            raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")

    return check


def betas(name: str, value: Any) -> None:
    """Adam's (beta1, beta2), each in [0, 1) (torch's wording)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(value):
        real(f"{name}[{i}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")


def e0_or_auto(name: str, value: Any) -> None:
    """wave_E0: a real >= 0, or "auto" (same as 0: the level is taken from the first gradient)."""
    if value == "auto":
        return
    at_least(0.0)(name, value)


# -- everything else -------------------------------------------------------------------------------
def flag(name: str, value: Any) -> None:
    """A bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")


def one_of(choices: Sequence[Any], *, otherwise: Optional[str] = None) -> Check:
    """One of ``choices`` (ladam's wording), of any type: strings, None, numbers. A value matches a
    choice it is, or equals while being an instance of the choice's type (so 1.0 is not "1" and an
    array is never compared elementwise). ``otherwise`` names what else is allowed, for the message
    ("pass a callable")."""
    choices = tuple(choices)
    also = f" or {otherwise}" if otherwise else ""

    def check(name: str, value: Any) -> None:
        if not any(value is c or (c is not None and isinstance(value, type(c)) and value == c) for c in choices):
            raise ValueError(f"Invalid {name}: {value!r}. Choose from: {choices}{also}")

    return check


def instance_of(types: Union[Type, Tuple[Type, ...]], description: str) -> Check:
    """An instance of ``types``; ``description`` is what the message says it must be
    ("a torch.optim.Optimizer")."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, types):
            raise TypeError(f"{name} must be {description}, got {type(value).__name__}")

    return check


def nn_module(name: str, value: Any) -> None:
    """A ``torch.nn.Module``."""
    instance_of(torch.nn.Module, "a torch.nn.Module")(name, value)


def torch_optimizer(name: str, value: Any) -> None:
    """A ``torch.optim.Optimizer``."""
    instance_of(torch.optim.Optimizer, "a torch.optim.Optimizer")(name, value)


def optional(check: Check) -> Check:
    """None, or what ``check`` takes."""

    def optional_check(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    return optional_check


def check_all(checks: Dict[str, Check], group: Dict[str, Any]) -> None:
    """Run each check on the group's value of its name."""
    for name, check in checks.items():
        if name not in group:
            raise ValueError(f"parameter group is missing the hyperparameter {name!r}")
        check(name, group[name])
