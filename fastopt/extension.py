"""Backends ``cpu`` and ``cuda``: the C++/CUDA extension ``fastopt._C`` (sources in csrc/).

The extension registers ``torch.ops.fastopt.ladam_step`` (LAdam variance_lap),
``ladam_update_lap_step``, ``ladam_weight_lap_step``, ``ladam_wave_step`` (the other LAdam modes),
``ladagrad_step``, ``lrmsprop_step``
and the Gram-matrix ops ``jacobian_products`` and ``batched_gram`` (schemas with TORCH_LIBRARY,
kernels per dispatch key: CPU, and CUDA where it was built with CUDA). This module wraps them in
functions with the signatures of :mod:`fastopt.reference` (``ladam_step_cpu``,
``ladam_step_cuda``, ...) and registers their fake implementations, so that torch.compile can
trace through an optimizer step. Every step op takes the optional AMP inputs ``grad_scale`` and
``found_inf`` (:mod:`fastopt.reference._amp`) and an ``lr`` that may be a device tensor
(capturable steps: read in-kernel on CUDA).

Loading, once per process:

1. ``import fastopt._C``: the build made by ``pip install --no-build-isolation .``;
2. else, unless ``FASTOPT_JIT_BUILD=0``, compile csrc/ with ``torch.utils.cpp_extension.load``
   and setup.py's sources and flags (:mod:`fastopt._extension_build`; needs ninja and a C++
   compiler; cached under ``TORCH_EXTENSIONS_DIR``, so only the first process pays for the build);
3. else raise ImportError saying why, after a one-line warning: :mod:`fastopt.backends` then
   reports the reason for backends "cpu" and "cuda", and ``backend="auto"`` uses "torch".
"""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _extension_build as build
from .reference._amp import check_lr
from .reference.batched_lsq import check_gram_inputs
from .reference.lm import check_jacobian_products_args

__all__ = [
    "DTYPES",
    "UNAVAILABLE",
    "BUILD",
    "ladam_step_cpu",
    "ladam_step_cuda",
    "ladam_update_lap_step_cpu",
    "ladam_update_lap_step_cuda",
    "ladam_weight_lap_step_cpu",
    "ladam_weight_lap_step_cuda",
    "ladam_wave_step_cpu",
    "ladam_wave_step_cuda",
    "ladagrad_step_cpu",
    "ladagrad_step_cuda",
    "lrmsprop_step_cpu",
    "lrmsprop_step_cuda",
    "jacobian_products_cpu",
    "jacobian_products_cuda",
    "batched_gram_cpu",
    "batched_gram_cuda",
]

JIT_ENV = "FASTOPT_JIT_BUILD"
_JIT_NAME = "fastopt_C"


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _put_pip_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; pip's ninja package lives in the environment's bin/,
    which is not on PATH when Python is run without activating its virtualenv."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _jit_build() -> str:
    """Compile csrc/ and load the library; returns where it came from, raises on failure."""
    from torch.utils import cpp_extension

    cpp, cu = build.sources()
    if not cpp:
        raise ImportError(f"no C++ sources in {build.CSRC} to build from (install from a source checkout)")
    with_cuda, _ = build.cuda_buildable(cu)
    flags = build.config()
    _put_pip_ninja_on_path()
    warnings.warn(
        f"fastopt: fastopt._C is not built; building it from {build.CSRC} with "
        "torch.utils.cpp_extension.load (once: cached under TORCH_EXTENSIONS_DIR)"
        + (f". {flags.note}" if flags.note else ""),
        stacklevel=3,
    )
    cpp_extension.load(
        name=_JIT_NAME,
        sources=cpp + (cu if with_cuda else []),
        extra_include_paths=[build.CSRC],
        extra_cflags=flags.cxx_flags + ([f"-D{build.CUDA_MACRO}"] if with_cuda else []),
        extra_cuda_cflags=build.NVCC_FLAGS + [f"-D{build.CUDA_MACRO}"],
        extra_ldflags=flags.ld_flags,
        is_python_module=False,
        verbose=False,
    )
    return "built at run time from csrc/"


def _load_library() -> str:
    """Make torch.ops.fastopt available; returns where the library came from."""
    try:
        # The compiled extension has no stub (mypy reads no .so); importing it registers the ops.
        from . import _C  # type: ignore[attr-defined]  # noqa: F401

        return "fastopt._C"
    except ImportError as err:
        installed = _short(err)
    if os.environ.get(JIT_ENV, "1") == "0":
        reason = f"fastopt._C is not built ({installed}) and {JIT_ENV}=0 forbids building it at run time"
    else:
        try:
            return _jit_build()
        except Exception as err:  # a missing compiler or ninja, a compile error: all mean "unavailable"
            reason = f"fastopt._C is not built ({installed}) and building it failed ({_short(err)})"
    warnings.warn(f"fastopt: C++ extension unavailable, backend 'auto' uses 'torch' on CPU: {reason}", stacklevel=3)
    raise ImportError(reason)


BUILD = _load_library()
_OPS = torch.ops.fastopt
_INFO: str = _OPS.build_info()

_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
# What fastopt.backends reads: the dtypes of each op (the same on CPU and CUDA).
_STEP_OPS = ("ladam_step", "ladagrad_step", "lrmsprop_step")
# The other LAdam modes.
_MODE_STEP_OPS = ("ladam_update_lap_step", "ladam_weight_lap_step", "ladam_wave_step")
DTYPES = {op: _DTYPES for op in _STEP_OPS + _MODE_STEP_OPS + ("jacobian_products", "batched_gram")}
# least_squares' step ops (CPU only, csrc/lsq_step_cpu.cpp), where this build has them.
_LSQ_OPS = tuple(op for op in ("lsq_propose", "lsq_update") if hasattr(_OPS, op))
DTYPES.update({op: frozenset({torch.float32, torch.float64}) for op in _LSQ_OPS})
# The layer-by-layer LM Jacobian's convolution op (CPU only, csrc/lm_conv_cpu.cpp), where this build has it.
_CONV_OPS = tuple(op for op in ("conv2d_per_sample_grads", "conv2d_input_delta") if hasattr(_OPS, op))
DTYPES.update({op: frozenset({torch.float32, torch.float64}) for op in _CONV_OPS})
# The small-P LM solve (CPU only, csrc/lm_small_solve_cpu.cpp), where this build has it.
_SMALL_SOLVE_OPS = tuple(op for op in ("lm_small_solve",) if hasattr(_OPS, op))
DTYPES.update({op: frozenset({torch.float32, torch.float64}) for op in _SMALL_SOLVE_OPS})
# Backends this build cannot serve, and why (fastopt.backends reports it).
UNAVAILABLE = (
    {}
    if "cuda" in _INFO.split()
    else {
        "cuda": f"this build of the extension has no CUDA kernels ({_INFO}): torch had no CUDA or nvcc was "
        "missing when it was compiled"
    }
)


def _lr_args(lr, device: torch.device) -> dict:
    """The C++ ops' ``lr`` and ``lr_tensor`` for an op's ``lr``: a float, or a 1-element float32
    tensor on the params' device (:func:`fastopt.reference._amp.check_lr`), which the CUDA kernels
    read in-kernel and the CPU ones on the host. With a tensor, ``lr`` is NaN: unused, and visible
    if it ever were."""
    check_lr(lr, device)
    return dict(lr=float("nan"), lr_tensor=lr) if isinstance(lr, Tensor) else dict(lr=float(lr), lr_tensor=None)


def _ladam_ema_step(
    op: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """The LAdam modes with an EMA of g^2 (variance_lap, update_lap, weight_lap) take the same arguments."""
    if not params:  # the dispatcher needs a tensor to pick the kernel by; nothing to do anyway
        return
    getattr(_OPS, op)(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(steps),
        [bool(u) for u in use_laps],
        **_lr_args(lr, params[0].device),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        c2=float(c2),
        stencil=stencil,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def ladam_step(params: Sequence[Tensor], grads: Sequence[Tensor], *args: Any, **kwargs: Any) -> None:
    """LAdam step, mode variance_lap, fused: the math of
    :func:`fastopt.reference.ladam_step_reference` in one pass over each tensor (its arguments
    after ``grads``: exp_avgs, exp_avg_sqs, steps, use_laps, then lr, beta1, beta2, eps,
    weight_decay, c2, stencil, grad_scale, found_inf by keyword)."""
    _ladam_ema_step("ladam_step", params, grads, *args, **kwargs)


def ladam_update_lap_step(params: Sequence[Tensor], grads: Sequence[Tensor], *args: Any, **kwargs: Any) -> None:
    """LAdam step, mode update_lap, fused: the math of
    :func:`fastopt.reference.ladam_update_lap_step_reference` in one pass over each tensor."""
    _ladam_ema_step("ladam_update_lap_step", params, grads, *args, **kwargs)


def ladam_weight_lap_step(params: Sequence[Tensor], grads: Sequence[Tensor], *args: Any, **kwargs: Any) -> None:
    """LAdam step, mode weight_lap, fused: the math of
    :func:`fastopt.reference.ladam_weight_lap_step_reference` in one pass over each tensor."""
    _ladam_ema_step("ladam_weight_lap_step", params, grads, *args, **kwargs)


def ladam_wave_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    prev_exp_avg_sqs: Sequence[Tensor],
    wave_e0_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
    wave_dt: float,
    wave_kappa: float,
    wave_E0: float,
    wave_damping: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """LAdam step, mode wave_variance, fused: the math of
    :func:`fastopt.reference.ladam_wave_step_reference` in one pass over each tensor (plus, at a
    tensor's first step with ``wave_E0 == 0``, the mean of its g^2)."""
    if not params:
        return
    _OPS.ladam_wave_step(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(prev_exp_avg_sqs),
        list(wave_e0_sqs),
        list(steps),
        [bool(u) for u in use_laps],
        **_lr_args(lr, params[0].device),
        beta1=float(beta1),
        eps=float(eps),
        weight_decay=float(weight_decay),
        c2=float(c2),
        stencil=stencil,
        wave_dt=float(wave_dt),
        wave_kappa=float(wave_kappa),
        wave_E0=float(wave_E0),
        wave_damping=float(wave_damping),
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def ladagrad_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    c2: float,
    stencil: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """LAdaGrad step fused: the math of :func:`fastopt.reference.ladagrad_step_reference`."""
    if not params:
        return
    _OPS.ladagrad_step(
        list(params),
        list(grads),
        list(state_sums),
        list(steps),
        [bool(u) for u in use_laps],
        **_lr_args(lr, params[0].device),
        lr_decay=float(lr_decay),
        eps=float(eps),
        weight_decay=float(weight_decay),
        c2=float(c2),
        stencil=stencil,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def lrmsprop_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Tensor]],
    steps: Sequence[Tensor],
    use_laps: Sequence[bool],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    c2: float,
    stencil: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """LRMSProp step fused: the math of :func:`fastopt.reference.lrmsprop_step_reference`
    (``momentum_buffers`` is None, or ignored, when momentum is 0)."""
    if not params:
        return
    buffers: List[Tensor] = list(momentum_buffers) if momentum > 0 and momentum_buffers is not None else []
    _OPS.lrmsprop_step(
        list(params),
        list(grads),
        list(square_avgs),
        buffers,
        list(steps),
        [bool(u) for u in use_laps],
        **_lr_args(lr, params[0].device),
        alpha=float(alpha),
        eps=float(eps),
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        c2=float(c2),
        stencil=stencil,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def jacobian_products(a: Tensor, out: Tensor, *, scale: float, shift: Optional[Tensor] = None) -> Tensor:
    """``out[lower] += scale * a^T a`` (then ``diag(out) += shift``): the contract of
    :func:`fastopt.reference.jacobian_products_reference`. CPU: blocks of the lower triangle as
    gemms (csrc/gram_cpu.cpp); CUDA: a tiled lower-triangle kernel with fp32 FMAs (csrc/gram.cu).
    Returns ``out``."""
    check_jacobian_products_args(a, out, shift, scale)
    _OPS.jacobian_products(a, out, scale=float(scale), shift=shift)
    return out


def batched_gram(jac: Tensor, res: Tensor) -> Tuple[Tensor, Tensor]:
    """``(J^T J, J^T r)`` per problem, as :func:`fastopt.reference.batched_gram_reference`: one pass
    over each problem's ``[J | r]``, the lower triangle accumulated and mirrored."""
    check_gram_inputs(jac, res)
    return _OPS.batched_gram(jac, res)


def lsq_propose(*args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`fastopt.reference.lsq_propose_reference` on CPU tensors: one pass over each
    problem, its damped system factorised in registers (csrc/lsq_step_cpu.cpp)."""
    return _OPS.lsq_propose(*args, **kwargs)


def lsq_update(*args: Any, **kwargs: Any) -> Tuple[Tensor, ...]:
    """:func:`fastopt.reference.lsq_update_reference` on CPU tensors: one pass over each problem's
    state (csrc/lsq_step_cpu.cpp)."""
    return _OPS.lsq_update(*args, **kwargs)


def conv2d_per_sample_grads(*args: Any, **kwargs: Any) -> None:
    """:func:`fastopt.reference.conv2d_per_sample_grads_reference` on CPU tensors: each sample
    reduced at once from its input read in place, or unfolded into a per-thread buffer where its
    layout has no runs of 4 weights (csrc/lm_conv_cpu.cpp)."""
    _OPS.conv2d_per_sample_grads(*args, **kwargs)


if _CONV_OPS:  # absent from an extension built before csrc/lm_conv_cpu.cpp: backends then say so
    conv2d_per_sample_grads_cpu = conv2d_per_sample_grads


def conv2d_input_delta(*args: Any, **kwargs: Any) -> Tensor:
    """:func:`fastopt.reference.conv2d_input_delta_reference` on CPU tensors: each sample's input
    delta summed in a per-thread buffer and written out times the activation's derivative
    (csrc/lm_conv_delta_cpu.cpp)."""
    return _OPS.conv2d_input_delta(*args, **kwargs)


if "conv2d_input_delta" in _CONV_OPS:  # absent from an extension built before csrc/lm_conv_delta_cpu.cpp
    conv2d_input_delta_cpu = conv2d_input_delta


def lm_small_solve(matrix: Tensor, diagonal: Tensor, rhs: Tensor, *, shift: float) -> Tensor:
    """:func:`fastopt.reference.lm_small_solve_reference` on CPU tensors: the damped system built,
    factored and solved in one call, in one column-major scratch buffer (csrc/lm_small_solve_cpu.cpp)."""
    return _OPS.lm_small_solve(matrix, diagonal, rhs, shift=float(shift))


if _SMALL_SOLVE_OPS:  # absent from an extension built before csrc/lm_small_solve_cpu.cpp: backends then say so
    lm_small_solve_cpu = lm_small_solve


if _LSQ_OPS:  # absent from an extension built before csrc/lsq_step_cpu.cpp: backends then say so
    lsq_propose_cpu, lsq_update_cpu = lsq_propose, lsq_update

# One function per op serves both backends: the dispatcher picks the CPU or CUDA kernel from the
# tensors' device (fastopt.backends has already checked that the device is the backend's).
ladam_step_cpu = ladam_step_cuda = ladam_step
ladam_update_lap_step_cpu = ladam_update_lap_step_cuda = ladam_update_lap_step
ladam_weight_lap_step_cpu = ladam_weight_lap_step_cuda = ladam_weight_lap_step
ladam_wave_step_cpu = ladam_wave_step_cuda = ladam_wave_step
ladagrad_step_cpu = ladagrad_step_cuda = ladagrad_step
lrmsprop_step_cpu = lrmsprop_step_cuda = lrmsprop_step
jacobian_products_cpu = jacobian_products_cuda = jacobian_products
batched_gram_cpu = batched_gram_cuda = batched_gram


# Fake (meta) implementations for torch.compile: the step ops and jacobian_products only mutate
# their inputs in place; batched_gram returns new tensors.
def _register_fakes() -> None:
    def nothing(*args, **kwargs) -> None:
        return None

    def gram_outputs(jac: Tensor, res: Tensor) -> Tuple[Tensor, Tensor]:
        batch, _, p = jac.shape
        return jac.new_empty((batch, p, p)), jac.new_empty((batch, p))

    for op in _STEP_OPS + _MODE_STEP_OPS + ("jacobian_products",):
        torch.library.register_fake(f"fastopt::{op}")(nothing)
    torch.library.register_fake("fastopt::batched_gram")(gram_outputs)


_register_fakes()
