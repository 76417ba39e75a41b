"""Where a launch runs: the interpreter or the GPU, the current CUDA device, graph capture, and the
AMP inputs the kernels read (defaults made once per device)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def _check_mode(kernel, device: torch.device) -> None:
    """The kernels run compiled on CUDA tensors and interpreted on CPU tensors; which one triton
    built was fixed by TRITON_INTERPRET when fastopt.kernels was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "backend='triton' runs on CPU tensors only in Triton's interpreter, but fastopt.kernels "
            "was imported without TRITON_INTERPRET=1: set it before importing fastopt.kernels"
        )
    if device.type != "cpu" and interpreted:
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors, but TRITON_INTERPRET=1 was set when "
            "fastopt.kernels was imported (the interpreter runs on CPU tensors only): unset it"
        )


_AMP_DEFAULTS: dict = {}


def _amp_input(t: Optional[torch.Tensor], default: float, name: str, device: torch.device) -> torch.Tensor:
    """An AMP input as the kernels read it: the caller's 0-dim float32 tensor on ``device``, or a
    cached constant (1 for grad_scale, 0 for found_inf) when the step has none."""
    if t is None:
        key = (device, default)
        if key not in _AMP_DEFAULTS:
            _AMP_DEFAULTS[key] = torch.full((), default, dtype=torch.float32, device=device)
        return _AMP_DEFAULTS[key]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        raise ValueError(
            f"{name} must be a 1-element float32 tensor on {device} (the params' device); got "
            f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '-')}"
        )
    return t


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one for the launch (as
    torch's fused optimizers do); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
