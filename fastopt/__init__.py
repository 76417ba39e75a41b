"""fastopt: fast, trustworthy Laplacian-smoothed adaptive optimizers for PyTorch.

``fastopt.LAdam`` (alias ``LAdamW``), ``LAdaGrad`` and ``LRMSProp`` behave like the ``ladam``
package's optimizers and run on the fastest backend available (see :mod:`fastopt.backends`);
:mod:`fastopt.reference` holds the eager implementations every backend is tested against;
:mod:`fastopt.schedulers` the curvature-adaptive learning rates (HomotopyLR and its family);
:mod:`fastopt.lm` Levenberg-Marquardt training (``fastopt.LM``) and batched least squares;
:mod:`fastopt.noise` the noise-adaptive learning rate;
:mod:`fastopt.nn` ladam's normalization layers (``WaveNorm``, ``WaveNormDamped``, ``ChiNorm``) and
neuron reordering; :mod:`fastopt.auto` ladam's per-layer-type configuration (``auto_configure``).
"""

from . import auto, backends, lm, nn, reference, schedulers  # noqa: F401  (nn: kept out of __all__)
from ._version import __version__
from .lm import LM
from .nn import ChiNorm, WaveNorm, WaveNormDamped, compute_neuron_order, reorder_linear_layer
from .optim import ChiAnnealScheduler, LAdaGrad, LAdam, LAdamW, LRMSProp, WaveAdam, suggest_c2

# ``nn`` (fastopt.nn) stays out of __all__: ``from fastopt import *`` would shadow ``torch.nn``.

__all__ = [
    "LAdam",
    "LAdamW",
    "WaveAdam",
    "LAdaGrad",
    "LRMSProp",
    "ChiAnnealScheduler",
    "suggest_c2",
    "WaveNorm",
    "WaveNormDamped",
    "ChiNorm",
    "compute_neuron_order",
    "reorder_linear_layer",
    "auto",
    "backends",
    "reference",
    "schedulers",
    "lm",
    "LM",
    "__version__",
]
