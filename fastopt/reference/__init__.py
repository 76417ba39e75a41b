"""Eager torch implementations: the executable spec every fastopt backend is tested against.

Checked against the ``ladam`` package (tests/test_reference_vs_ladam.py); the ``torch`` backend
runs these functions directly.
"""
from .ladam import (ladam_step_reference, ladam_update_lap_step_reference, ladam_wave_step_reference,
                    ladam_weight_lap_step_reference)
from .laplacian import STENCILS, laplacian, smooth, stencil_layout
from ._precision import math_dtype
from .siblings import ladagrad_step_reference, lrmsprop_step_reference

__all__ = [
    "STENCILS", "laplacian", "smooth", "stencil_layout", "math_dtype",
    "ladam_step_reference", "ladam_update_lap_step_reference", "ladam_weight_lap_step_reference",
    "ladam_wave_step_reference", "ladagrad_step_reference", "lrmsprop_step_reference",
]
