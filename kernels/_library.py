"""The Triton launchers as torch.library custom ops, so that torch.compile sees each one as one
opaque op (``torch.ops.fastopt_triton.<op>``) instead of tracing into the launcher (a host-side
table cache, data pointers, a Triton launch: none of it traceable).

Schemas: those of the C++ ops (csrc/bindings.cpp), i.e. the signatures of fastopt.reference, with
the lists an op updates in place marked ``(a!)``; ``momentum_buffers`` is an empty list without
momentum (a schema list cannot be None). The fake implementations do nothing: the ops return
nothing and only write their inputs.

Eagerly the launchers run directly (a dispatcher round trip costs more than the launch overhead
they were written to avoid); while torch.compile traces, the same functions call the custom ops.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict

import torch

NAMESPACE = "fastopt_triton"

_ADAM_KEYWORDS = "float lr, float beta1, float beta2, float eps, float weight_decay, float c2, str stencil"
_AMP = "Tensor? grad_scale=None, Tensor? found_inf=None"
_EMA_MODE = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    f"Tensor[] steps, bool[] use_laps, *, {_ADAM_KEYWORDS}, {_AMP}) -> ()"
)
SCHEMAS: Dict[str, str] = {
    "ladam_step": _EMA_MODE,
    "ladam_update_lap_step": _EMA_MODE,
    "ladam_weight_lap_step": _EMA_MODE,
    "ladam_wave_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] prev_exp_avg_sqs, Tensor(e!)[] wave_e0_sqs, Tensor[] steps, bool[] use_laps, *, float lr, "
        "float beta1, float eps, float weight_decay, float c2, str stencil, float wave_dt, float wave_kappa, "
        f"float wave_E0, float wave_damping, {_AMP}) -> ()"
    ),
    "ladagrad_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor[] steps, bool[] use_laps, *, "
        f"float lr, float lr_decay, float eps, float weight_decay, float c2, str stencil, {_AMP}) -> ()"
    ),
    "lrmsprop_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] momentum_buffers, "
        "Tensor[] steps, bool[] use_laps, *, float lr, float alpha, float eps, float weight_decay, "
        f"float momentum, float c2, str stencil, {_AMP}) -> ()"
    ),
}

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")  # kept alive: dropping it unregisters the ops


def _no_output(*args, **kwargs) -> None:
    return None


def _lrmsprop_launch(launcher: Callable) -> Callable:
    # The schema's empty list back to the launchers' None ("no momentum buffers").
    def launch(params, grads, square_avgs, momentum_buffers, *args, **kwargs):
        return launcher(params, grads, square_avgs, list(momentum_buffers) or None, *args, **kwargs)

    return launch


def traceable(name: str, launcher: Callable) -> Callable:
    """Register ``launcher`` as ``torch.ops.fastopt_triton.<name>`` and return the function the
    backend exposes: the launcher itself eagerly, the custom op under torch.compile."""
    _LIBRARY.define(name + SCHEMAS[name])
    impl = _lrmsprop_launch(launcher) if name == "lrmsprop_step" else launcher
    # The interpreter runs the kernels on CPU tensors (tests), the compiled kernels on CUDA ones.
    for key in ("CPU", "CUDA"):
        _LIBRARY.impl(name, impl, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", _no_output, lib=_LIBRARY)
    op = getattr(getattr(torch.ops, NAMESPACE), name)

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return launcher(*args, **kwargs)
        if name == "lrmsprop_step" and args[3] is None:
            args = (*args[:3], [], *args[4:])
        return op(*args, **kwargs)

    return run
