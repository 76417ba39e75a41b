"""Where the reference does its arithmetic: fp32 for fp32/bf16/fp16 tensors, fp64 for fp64.

State and parameters stay in the parameter's dtype; low-precision tensors are read into fp32,
updated there and rounded once on the way back, as the fused kernels do (apex's MATH_T = float).
For fp32 and fp64 nothing is copied: the lists returned are the caller's own tensors.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors in their math dtype: the same objects where no conversion is needed."""
    return [t if t.dtype == math_dtype(t.dtype) else t.to(math_dtype(t.dtype)) for t in tensors]


def write_back(*pairs: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> None:
    """Store results computed on :func:`upcast` copies back: each pair is (originals, computed)."""
    for originals, computed in pairs:
        for original, result in zip(originals, computed):
            if result is not original:
                original.copy_(result)


def step_values(steps: Sequence[torch.Tensor]) -> List[Union[float, torch.Tensor]]:
    """Per-tensor step counts as Python floats (the reference runs on the host's schedule); the
    0-dim tensors themselves while torch.compile traces, so that the step stays in the graph
    (a host read would break it), as torch.optim's ``_get_value`` does. The arithmetic the
    reference does with them (``beta ** t``, ``1 + (t - 1) * d``) reads the same either way."""
    if torch.compiler.is_compiling():
        return list(steps)
    return [float(s) for s in steps]
