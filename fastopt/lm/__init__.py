"""Levenberg-Marquardt training for any ``torch.nn.Module``.

Two fronts on one engine:

* a drop-in for torch-levenberg-marquardt 1.2.3: :class:`LevenbergMarquardtModule` with its
  losses, damping and selection strategies, same arguments, same ``training_step`` and the same
  steps, and the rest of the package's public names (switching is changing the import: ``import
  fastopt.lm as tlm`` then ``tlm.training`` (with ``OptimizerModule``), ``tlm.loss``,
  ``tlm.damping``, ``tlm.selection``, ``tlm.tree`` and ``tlm.utils`` (``fit``,
  ``FastDataLoader``, ``CustomLightningModule``) work as the package's; ``fit`` iterates a plain
  ``DataLoader`` over a ``TensorDataset`` without collating samples, see :mod:`fastopt.lm.loader`);
* :class:`LM` (also ``fastopt.LM``): ``lm.step(inputs, targets) -> StepResult`` and :func:`fit`;

and batched nonlinear least squares: :func:`least_squares` and :func:`curve_fit` solve thousands
of independent small problems at once on one device, with scipy.optimize's meanings.

The Gauss-Newton products run through the ``jacobian_products`` op of :mod:`fastopt.backends`
(Triton on CUDA; on CPU the C++ op of fastopt._C, else eager torch), the lower triangle only.
``LightningLM`` (alias ``CustomLightningModule``) needs pytorch_lightning and loads on first use.
"""

from . import damping, loss, selection, training, tree, utils
from .curve_fitting import OptimizeWarning, curve_fit
from .damping import DAMPING_MODES, DampingStrategy, StandardDampingStrategy
from .fit import fit
from .front import LM, StepResult
from .loader import FastDataLoader, iterate_batches
from .loss import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    L1Loss,
    Loss,
    LossWrapper,
    MSELoss,
    as_residual_loss,
)
from .nonlinear_lsq import TERMINATION_MESSAGES, LeastSquaresResult, least_squares
from .selection import LayerSelectionStrategy, ParamSelectionStrategy, RandomSelectionStrategy
from .training import LevenbergMarquardtModule, OptimizerModule, TrainingModule

__all__ = [
    "LM",
    "StepResult",
    "fit",
    "LevenbergMarquardtModule",
    "TrainingModule",
    "OptimizerModule",
    "FastDataLoader",
    "iterate_batches",
    "Loss",
    "LossWrapper",
    "MSELoss",
    "L1Loss",
    "HuberLoss",
    "CrossEntropyLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "as_residual_loss",
    "DampingStrategy",
    "StandardDampingStrategy",
    "DAMPING_MODES",
    "ParamSelectionStrategy",
    "RandomSelectionStrategy",
    "LayerSelectionStrategy",
    "LightningLM",
    "CustomLightningModule",
    "damping",
    "loss",
    "selection",
    "training",
    "tree",
    "utils",
    "least_squares",
    "curve_fit",
    "LeastSquaresResult",
    "OptimizeWarning",
    "TERMINATION_MESSAGES",
]


def __getattr__(name):
    if name in ("LightningLM", "CustomLightningModule"):
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'fastopt.lm' has no attribute {name!r}")
