"""fastopt: fast, trustworthy Laplacian-smoothed adaptive optimizers for PyTorch.

``fastopt.LAdam`` (alias ``LAdamW``), ``LAdaGrad`` and ``LRMSProp`` behave like the ``ladam``
package's optimizers and run on the fastest backend available (see :mod:`fastopt.backends`);
:mod:`fastopt.reference` holds the eager implementations every backend is tested against;
:mod:`fastopt.schedulers` the curvature-adaptive learning rates (HomotopyLR and its family);
:mod:`fastopt.lm` Levenberg-Marquardt training (``fastopt.LM``) and batched least squares;
:mod:`fastopt.noise` the noise-adaptive learning rate.
"""
from . import backends, lm, reference, schedulers
from .lm import LM
from .optim import ChiAnnealScheduler, LAdaGrad, LAdam, LAdamW, LRMSProp, suggest_c2

__version__ = "0.1.0"

__all__ = ["LAdam", "LAdamW", "LAdaGrad", "LRMSProp", "ChiAnnealScheduler", "suggest_c2",
           "backends", "reference", "schedulers", "lm", "LM", "__version__"]
