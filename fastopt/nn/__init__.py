"""Layers and weight transforms from ladam 0.4.1 beside its optimizers: the normalization layers
:class:`WaveNorm`, :class:`WaveNormDamped`, :class:`ChiNorm`, and the neuron reordering
:func:`compute_neuron_order` / :func:`reorder_linear_layer`."""

from .normalization import ChiNorm, WaveNorm, WaveNormDamped
from .reorder import compute_neuron_order, reorder_linear_layer

__all__ = ["WaveNorm", "WaveNormDamped", "ChiNorm", "compute_neuron_order", "reorder_linear_layer"]
