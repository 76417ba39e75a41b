"""Eager torch implementations: the executable spec every fastopt backend is tested against.

Checked against the ``ladam`` package (tests/test_reference_vs_ladam.py); the ``torch`` backend
runs these functions directly.
"""

import torch

from ._precision import math_dtype
from .batched_lsq import batched_gram_reference, lsq_propose_reference, lsq_update_reference
from .conv_grads import conv2d_input_delta_reference, conv2d_per_sample_grads_reference
from .ladam import (
    ladam_step_reference,
    ladam_update_lap_step_reference,
    ladam_wave_step_reference,
    ladam_weight_lap_step_reference,
)
from .laplacian import STENCILS, laplacian, smooth, stencil_layout
from .lm import jacobian_products_reference
from .lm_small_solve import lm_small_solve_reference
from .siblings import ladagrad_step_reference, lrmsprop_step_reference

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# What fastopt.backends reads: the dtypes each op takes (the reference takes every float dtype).
DTYPES = {
    op: _FLOATS
    for op in (
        "ladam_step",
        "ladam_update_lap_step",
        "ladam_weight_lap_step",
        "ladam_wave_step",
        "ladagrad_step",
        "lrmsprop_step",
    )
}
DTYPES["batched_gram"] = _FLOATS
DTYPES["jacobian_products"] = _FLOATS  # inputs of any float dtype; fp32 (fp64 for fp64) accumulation
DTYPES["lsq_propose"] = DTYPES["lsq_update"] = frozenset({torch.float32, torch.float64})  # least_squares' dtypes
DTYPES["conv2d_per_sample_grads"] = _FLOATS  # the layer-by-layer LM Jacobian of convolutions
DTYPES["conv2d_input_delta"] = _FLOATS  # its chain rule through a convolution and the activation before it
DTYPES["lm_small_solve"] = frozenset({torch.float32, torch.float64})  # LAPACK's QR dtypes

__all__ = [
    "STENCILS",
    "laplacian",
    "smooth",
    "stencil_layout",
    "math_dtype",
    "ladam_step_reference",
    "ladam_update_lap_step_reference",
    "ladam_weight_lap_step_reference",
    "ladam_wave_step_reference",
    "ladagrad_step_reference",
    "lrmsprop_step_reference",
    "batched_gram_reference",
    "jacobian_products_reference",
    "lsq_propose_reference",
    "lsq_update_reference",
    "conv2d_input_delta_reference",
    "conv2d_per_sample_grads_reference",
    "lm_small_solve_reference",
]
