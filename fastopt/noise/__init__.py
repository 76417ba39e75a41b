"""Noise-adaptive learning rates: estimate gradient noise, smooth the loss, adapt the rate.

* :mod:`fastopt.noise.core`: :class:`NoiseEstimator`, :class:`NoiseStatistics`,
  :class:`LossSmoother`, :class:`NoiseAdaptiveLR` (NumPy arrays and torch tensors alike);
* :mod:`fastopt.noise.utils`: :func:`create_noisy_landscape`, :func:`compute_gradient_variance`,
  :func:`visualize_landscape`, :func:`plot_training_curves`;
* :mod:`fastopt.noise.torch_integration`: :class:`NoiseAdaptiveOptimizer`, a wrapper that adapts the
  learning rate of any torch optimizer from micro-batch or per-sample gradients;
* ``python -m fastopt.noise.demo``: fixed against noise-adaptive rates on noisy landscapes.
"""

from .core import LossSmoother, NoiseAdaptiveLR, NoiseEstimator, NoiseStatistics
from .torch_integration import NoiseAdaptiveOptimizer, per_sample_gradient_statistics
from .utils import (
    NoisyLandscape,
    compute_gradient_variance,
    create_noisy_landscape,
    plot_training_curves,
    visualize_landscape,
)

__all__ = [
    "NoiseEstimator",
    "NoiseStatistics",
    "LossSmoother",
    "NoiseAdaptiveLR",
    "NoiseAdaptiveOptimizer",
    "per_sample_gradient_statistics",
    "NoisyLandscape",
    "create_noisy_landscape",
    "compute_gradient_variance",
    "visualize_landscape",
    "plot_training_curves",
]
