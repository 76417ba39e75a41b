"""torch-levenberg-marquardt's ``utils`` names: ``fit``, ``FastDataLoader``, the tree helpers it
exposes and, with pytorch_lightning, ``CustomLightningModule``."""

from .fit import fit
from .loader import FastDataLoader
from .training import TrainingModule
from .tree import tree_indices, tree_to_device

# CustomLightningModule loads lazily (pytorch_lightning), through __getattr__ below.
__all__ = [
    "fit",
    "FastDataLoader",
    "CustomLightningModule",  # noqa: F822
    "TrainingModule",
    "tree_indices",
    "tree_to_device",
]


def __getattr__(name):
    if name == "CustomLightningModule":
        from .lightning import CustomLightningModule

        return CustomLightningModule
    raise AttributeError(f"module 'fastopt.lm.utils' has no attribute {name!r}")
