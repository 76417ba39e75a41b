"""Learning-rate schedulers driven by the loss landscape.

Curvature-adaptive (the HomotopyLR family): :class:`CurvatureEstimator` measures
:math:`\\kappa = \\|\\nabla^2 L\\| / \\|\\nabla L\\|^2` from batched Hessian-vector products;
:class:`HomotopyLR`, :class:`AdaptiveHomotopyLR`, :class:`CurvatureAdaptiveLR`,
:class:`PerLayerHomotopyLR`, :class:`CurvatureWarmup`, :class:`HomotopyAdam` and
:func:`curvature_aware_clip` turn it into learning rates and clipping bounds.
"""

from .clipping import curvature_aware_clip
from .curvature import CurvatureEstimator, CurvatureMeasurement, GroupMeasurement
from .homotopy import AdaptiveHomotopyLR, CurvatureAdaptiveLR, HomotopyLR, homotopy_scale
from .homotopy_adam import HomotopyAdam
from .per_layer import PerLayerHomotopyLR
from .warmup import CurvatureWarmup

__all__ = [
    "CurvatureEstimator",
    "CurvatureMeasurement",
    "GroupMeasurement",
    "HomotopyLR",
    "AdaptiveHomotopyLR",
    "CurvatureAdaptiveLR",
    "PerLayerHomotopyLR",
    "CurvatureWarmup",
    "HomotopyAdam",
    "curvature_aware_clip",
    "homotopy_scale",
]
