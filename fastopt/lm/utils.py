"""torch-levenberg-marquardt's ``utils`` names: ``fit`` and, with pytorch_lightning, ``CustomLightningModule``."""
from .fit import fit

__all__ = ["fit", "CustomLightningModule"]


def __getattr__(name):
    if name == "CustomLightningModule":
        from .lightning import CustomLightningModule
        return CustomLightningModule
    raise AttributeError(f"module 'fastopt.lm.utils' has no attribute {name!r}")
