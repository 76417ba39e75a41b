"""The LAdam family as torch.optim.Optimizer subclasses."""

from .chi_anneal import ChiAnnealScheduler, suggest_c2
from .ladam import MODES, LAdam, LAdamW, WaveAdam
from .siblings import LAdaGrad, LRMSProp

__all__ = ["LAdam", "LAdamW", "WaveAdam", "LAdaGrad", "LRMSProp", "MODES", "ChiAnnealScheduler", "suggest_c2"]
