"""Learning-rate schedulers driven by the loss landscape.

Curvature-adaptive (the HomotopyLR family): :class:`CurvatureEstimator` measures
:math:`\\kappa = \\|\\nabla^2 L\\| / \\|\\nabla L\\|^2` from batched Hessian-vector products;
:class:`HomotopyLR`, :class:`AdaptiveHomotopyLR`, :class:`CurvatureAdaptiveLR`,
:class:`PerLayerHomotopyLR`, :class:`CurvatureWarmup`, :class:`HomotopyAdam` and
:func:`curvature_aware_clip` turn it into learning rates and clipping bounds.
"""
from .curvature import CurvatureEstimator, CurvatureMeasurement, GroupMeasurement
from .homotopy import (AdaptiveHomotopyLR, CurvatureAdaptiveLR, CurvatureWarmup, HomotopyAdam, HomotopyLR,
                       PerLayerHomotopyLR, curvature_aware_clip, homotopy_scale)

__all__ = ["CurvatureEstimator", "CurvatureMeasurement", "GroupMeasurement", "HomotopyLR", "AdaptiveHomotopyLR",
           "CurvatureAdaptiveLR", "PerLayerHomotopyLR", "CurvatureWarmup", "HomotopyAdam", "curvature_aware_clip",
           "homotopy_scale"]
