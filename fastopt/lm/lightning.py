"""PyTorch Lightning: train a Levenberg-Marquardt module with ``Trainer.fit`` (needs pytorch_lightning).

    trainer = pytorch_lightning.Trainer(max_epochs=50)
    trainer.fit(fastopt.lm.LightningLM(fastopt.LM(model, torch.nn.MSELoss())), loader)

Lightning's automatic optimisation is switched off; each ``training_step`` runs one
Levenberg-Marquardt step, logs the loss, damping and attempts, and stops the trainer when the
step says so (damping at its maximum). ``CustomLightningModule`` is the same class under
torch-levenberg-marquardt's name.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

try:
    import pytorch_lightning as pl
except ImportError as err:  # fastopt.lm imports this module lazily; say what to install
    raise ImportError("fastopt.lm.LightningLM needs pytorch_lightning: pip install 'fastopt[lightning]'") from err

__all__ = ["LightningLM", "CustomLightningModule"]


class LightningLM(pl.LightningModule):
    """A LightningModule that trains with ``training_module.training_step`` (an LM or a
    LevenbergMarquardtModule); ``metrics``: name -> torchmetrics.Metric (or callable) logged per step."""

    def __init__(self, training_module: Any, metrics: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if not callable(getattr(training_module, "training_step", None)):
            raise TypeError(
                f"training_module must have training_step(inputs, targets); got {type(training_module).__name__}"
            )
        # The model is not registered as a submodule: Lightning would move it to its device, which
        # replaces the parameters' storage and unbinds them from the module's flat vector. Build
        # the LM on the model where it will train, as with torch-levenberg-marquardt.
        self.training_module = training_module
        self.metrics = dict(metrics or {})
        self.automatic_optimization = False

    def on_fit_start(self) -> None:
        for metric in self.metrics.values():
            if hasattr(metric, "to"):
                metric.to(self.device)

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        inputs, targets = batch
        outputs, loss, stop_training, logs = self.training_module.training_step(inputs, targets)
        values = {k: (v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v))) for k, v in logs.items()}
        for name, metric in self.metrics.items():
            values[name] = torch.as_tensor(metric(outputs, targets)).detach().float()
        self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict(values, on_step=True, on_epoch=False, prog_bar=True)
        if stop_training:
            self.trainer.should_stop = True
        return loss

    def configure_optimizers(self) -> List[torch.optim.Optimizer]:
        return []  # the Levenberg-Marquardt step updates the parameters itself

    def forward(self, x: Any) -> Any:
        return self.training_module.model(x)


CustomLightningModule = LightningLM
