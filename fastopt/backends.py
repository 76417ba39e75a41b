"""The one place that decides which implementation of an op runs.

Backends, each a module exposing functions named ``<op>_<suffix>`` with the shared signature of
``fastopt.reference.<op>_reference``:

========  ==========================================================  ======================
name      runs on                                                     module
========  ==========================================================  ======================
triton    CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1``       ``fastopt.kernels``
cuda      CUDA tensors                                                ``fastopt.extension``
cpu       CPU tensors                                                 ``fastopt.extension``
torch     anything                                                    ``fastopt.reference``
========  ==========================================================  ======================

Each module also maps op -> supported dtypes in a ``DTYPES`` dict, and may name backends it cannot
serve here, with the reason, in an ``UNAVAILABLE`` dict.

``backend="auto"`` tries, for CUDA tensors, triton then cuda then torch, and for CPU tensors cpu
then torch, taking the first that implements the op for the tensors' dtype. The environment
variable ``FASTOPT_BACKEND`` replaces "auto" with a named backend. A backend asked for by name
that cannot run raises :class:`BackendUnavailableError` saying what is missing and how to get it.

The entry is :func:`choose`: ``choose(op, device, dtype, backend)`` returns a
:class:`ChosenBackend` with the chosen backend's name, its function of the op and the backend's
traits (whether the optimizer keeps step counts on the device, whether a step can be captured,
whether torch.compile fuses the op with the code around it), read from the one table here, so
that no caller decides them from a name. :func:`select` (the function) and :func:`resolve` (the
name) are its two views.

Backend modules are imported lazily, on first use, and an import failure is kept as the reason
reported for that backend; nothing here rebinds module globals, so every backend that can run
stays callable in one process (one test or benchmark run compares them all).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union, cast

import torch

from . import _validation as v

__all__ = [
    "BACKENDS",
    "CHOICES",
    "OPS",
    "BackendUnavailableError",
    "ChosenBackend",
    "available",
    "why_not",
    "choose",
    "resolve",
    "select",
    "validate_backend_name",
    "why_not_capturable",
    "ENV_VAR",
]

ENV_VAR = "FASTOPT_BACKEND"

OPS = (
    "ladam_step",  # LAdam mode variance_lap
    "ladam_update_lap_step",  # LAdam mode update_lap
    "ladam_weight_lap_step",  # LAdam mode weight_lap
    "ladam_wave_step",  # LAdam mode wave_variance
    "ladagrad_step",
    "lrmsprop_step",
    "batched_gram",  # J^T J and J^T r of many small least-squares problems (fastopt.lm.least_squares)
    "jacobian_products",  # Levenberg-Marquardt: lower(scale * A^T A) accumulated, A = [J | r] or J^T
    "lsq_propose",  # least_squares: damped step and trial point of many small problems
    "lsq_update",  # least_squares: accept/reject, damping, stopping tests of many small problems
    "conv2d_per_sample_grads",  # LM layer by layer: a convolution's per-sample weight gradients into [J | r]
    "conv2d_input_delta",  # LM layer by layer: a convolution's input delta times the activation's derivative
    "lm_small_solve",  # LM, small P: one attempt's damped system by Householder QR in one call
)


@dataclass(frozen=True)
class _Spec:
    module: str
    suffix: str  # functions are named f"{op}_{suffix}"
    devices: FrozenSet[str]  # device types it runs on (cpu for triton: see _device_reason)
    device_steps: bool  # keeps per-tensor step counts on the parameters' device
    needs: str  # what an ImportError of ``module`` means, and how to fix it
    capturable: bool = False  # its GPU steps read lr and steps in-kernel, with no host work to capture
    fuses_reduce: bool = False  # plain torch code: torch.compile fuses its op with the code making the inputs


# Each module also declares DTYPES: {op: frozenset of the dtypes its implementation takes}.
# Fused GPU backends read step counts in-kernel, so the optimizer keeps them on the device (as
# torch.optim.Adam(fused=True) does); the others read them on the host. Only their GPU steps can
# be captured into a CUDA graph (see why_not_capturable). The torch backend's ops are eager torch
# code, which torch.compile traces and fuses with what produces their inputs (least_squares'
# compiled evaluation computes J^T J inside the Jacobian's kernel); the others' kernels are called
# on inputs the compiled code writes out.
_SPECS: Dict[str, _Spec] = {
    "triton": _Spec(
        "fastopt.kernels",
        "triton",
        frozenset({"cuda", "cpu"}),
        True,
        'the triton package: pip install "fastopt[triton]"',
        capturable=True,
    ),
    "cuda": _Spec(
        "fastopt.extension",
        "cuda",
        frozenset({"cuda"}),
        True,
        "the C++/CUDA extension fastopt._C built with CUDA: reinstall with "
        "pip install --no-build-isolation . where torch has CUDA and nvcc is on PATH",
        capturable=True,
    ),
    "cpu": _Spec(
        "fastopt.extension",
        "cpu",
        frozenset({"cpu"}),
        False,
        "the C++ extension fastopt._C: reinstall with pip install --no-build-isolation . "
        "(needs a C++ compiler), or install ninja so that it builds on first use",
    ),
    "torch": _Spec(
        "fastopt.reference",
        "reference",
        frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        False,
        "torch",
        fuses_reduce=True,
    ),
}

BACKENDS: Tuple[str, ...] = tuple(_SPECS)
CHOICES: Tuple[str, ...] = ("auto",) + BACKENDS
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend named by the user cannot run here; the message says why and what to do."""


def validate_backend_name(backend: object, argument: str = "backend") -> str:
    """Return ``backend`` if it is one of :data:`CHOICES`, else raise a ValueError naming ``argument``."""
    v.one_of(CHOICES)(argument, backend)
    return cast(str, backend)  # one of CHOICES: one_of raised otherwise


@functools.lru_cache(maxsize=None)
def _load(backend: str):
    """(module, None) or (None, reason). Import errors are kept, not raised: see the module doc."""
    spec = _SPECS[backend]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:  # a missing optional dependency or an unbuilt extension
        return None, f"backend={backend!r} needs {spec.needs} ({type(err).__name__}: {err})"
    # A module serving several backends may lack one (an extension built without CUDA).
    missing = getattr(module, "UNAVAILABLE", {}).get(backend)
    if missing:
        return None, f"backend={backend!r} needs {spec.needs} ({missing})"
    return module, None


def _device_reason(backend: str, device_type: str) -> Optional[str]:
    spec = _SPECS[backend]
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available here (torch.cuda.is_available() is False)"
    if backend == "triton" and device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "backend='triton' runs on CUDA tensors; CPU tensors need Triton's interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported; slow, meant for tests)"
            )
        return None
    if device_type not in spec.devices:
        where = " or ".join(sorted(spec.devices))
        return f"backend={backend!r} runs on {where} tensors; got {device_type} tensors"
    return None


def why_not(
    backend: str,
    op: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device`` and ``dtype``; None if it can.

    Every argument after ``backend`` is optional: ``why_not("triton")`` only asks whether the
    backend can be loaded on this machine.
    """
    validate_backend_name(backend)
    if backend == "auto":
        return None
    if op is not None and op not in OPS:
        raise ValueError(f"Invalid op: {op!r}. Choose from: {OPS}")
    spec = _SPECS[backend]
    if device is not None:
        reason = _device_reason(backend, torch.device(device).type)
        if reason:
            return reason
    module, reason = _load(backend)
    if module is None:
        return reason
    if op is None:
        return None
    if not callable(getattr(module, f"{op}_{spec.suffix}", None)):
        return f"backend={backend!r} has no implementation of {op!r} yet; use backend='torch'"
    dtypes = getattr(module, "DTYPES", {}).get(op, frozenset())
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(sorted(_dtype_name(d) for d in dtypes))
        return f"backend={backend!r} runs {op!r} on {names}; got {_dtype_name(dtype)}"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def why_not_capturable(backend: str, device: Union[str, torch.device]) -> Optional[str]:
    """Why a step of ``backend`` on ``device`` cannot be captured into a CUDA graph; None if it can.

    Capturable steps (``capturable=True``) read the learning rate and step counts on the device and
    upload nothing once their tile tables exist (both are cached by the tensors' addresses): the
    triton and cuda backends. The torch backend reads step counts on the host. On the CPU there
    are no graphs to capture: every backend takes ``capturable=True`` and reads a tensor lr on the
    host (triton in its interpreter reads it in-kernel).
    """
    if torch.device(device).type == "cpu" or _SPECS[backend].capturable:
        return None
    able = [name for name, spec in _SPECS.items() if spec.capturable]
    return (
        f"backend={backend!r} cannot be captured into a CUDA graph (it reads step counts on the host); use "
        + " or ".join(f"backend={name!r}" for name in able)
    )


def available(
    backend: str,
    op: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> bool:
    """True if :func:`why_not` finds nothing in the way."""
    return why_not(backend, op, device, dtype) is None


@dataclass(frozen=True)
class ChosenBackend:
    """What :func:`choose` chose for an op: the backend's ``name``, its function ``fn`` of the op,
    and the backend's traits from the table."""

    op: str
    name: str
    fn: Callable = field(repr=False)
    device_steps: bool  # the optimizer keeps per-tensor step counts on the parameters' device
    capturable: bool  # its GPU steps can be captured into a CUDA graph (see why_not_capturable)
    fuses_reduce: bool  # eager torch code: torch.compile fuses the op with the code making its inputs


def choose(op: str, device: Union[str, torch.device], dtype: torch.dtype, backend: str = "auto") -> ChosenBackend:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype``, with its function and traits.

    "auto" (unless ``FASTOPT_BACKEND`` names a backend) takes the first backend of the device's
    preference order that can run; a named backend that cannot run raises
    :class:`BackendUnavailableError`.
    """
    name = _resolve(op, device, dtype, backend)
    spec = _SPECS[name]
    return ChosenBackend(op, name, implementation(op, name), spec.device_steps, spec.capturable, spec.fuses_reduce)


def _resolve(op: str, device: Union[str, torch.device], dtype: torch.dtype, backend: str) -> str:
    validate_backend_name(backend)
    if backend == "auto" and os.environ.get(ENV_VAR):
        backend = validate_backend_name(os.environ[ENV_VAR], argument=f"environment variable {ENV_VAR}")
    device_type = torch.device(device).type
    if backend != "auto":
        reason = why_not(backend, op, device_type, dtype)
        if reason:
            raise BackendUnavailableError(reason)
        return backend
    reasons = []
    for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
        reason = why_not(candidate, op, device_type, dtype)
        if reason is None:
            return candidate
        reasons.append(reason)
    raise BackendUnavailableError(f"no backend can run {op!r} on {device_type} {dtype}: " + "; ".join(reasons))


def resolve(op: str, device: Union[str, torch.device], dtype: torch.dtype, backend: str = "auto") -> str:
    """The name of the backend :func:`choose` chooses."""
    return choose(op, device, dtype, backend).name


def select(op: str, device: Union[str, torch.device], dtype: torch.dtype, backend: str = "auto") -> Callable:
    """The function of the backend :func:`choose` chooses."""
    return choose(op, device, dtype, backend).fn


def implementation(op: str, backend: str) -> Callable:
    """The function of a backend already chosen (no checks: for benchmarks that call each backend
    :func:`choose` can run; everything else uses :func:`choose`)."""
    module, _ = _load(backend)
    return getattr(module, f"{op}_{_SPECS[backend].suffix}")
