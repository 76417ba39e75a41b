"""fastopt: fast, trustworthy Laplacian-smoothed adaptive optimizers for PyTorch.

``fastopt.LAdam`` (alias ``LAdamW``), ``LAdaGrad`` and ``LRMSProp`` behave like the ``ladam``
package's optimizers and run on the fastest backend available (see :mod:`fastopt.backends`);
:mod:`fastopt.reference` holds the eager implementations every backend is tested against.
"""
from . import backends, reference
from .optim import ChiAnnealScheduler, LAdaGrad, LAdam, LAdamW, LRMSProp, suggest_c2
from . import lm
from .lm import LM

__version__ = "0.1.0"

__all__ = ["LAdam", "LAdamW", "LAdaGrad", "LRMSProp", "ChiAnnealScheduler", "suggest_c2",
           "backends", "reference", "__version__", "lm", "LM"]
