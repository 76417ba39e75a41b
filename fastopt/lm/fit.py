"""A training loop for Levenberg-Marquardt with a tqdm progress bar and early stopping."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from ._tree import tree_to_device

__all__ = ["fit"]


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value
    return value


def _format(value: Any) -> str:
    value = _scalar(value)
    return f"{value:.4e}" if isinstance(value, float) else str(value)


def fit(training_module: Any, dataloader: Iterable, epochs: int, metrics: Optional[Dict[str, Callable]] = None,
        overwrite_progress_bar: bool = True, update_every_n_steps: int = 1, progress: bool = True) -> List[Dict[str, Any]]:
    """Train for ``epochs`` passes over ``dataloader`` (batches of ``(inputs, targets)``).

    ``training_module`` is a :class:`fastopt.LM`, a :class:`fastopt.lm.LevenbergMarquardtModule`
    or anything with ``training_step(inputs, targets) -> (outputs, loss, stop_training, logs)``
    and ``device``. The progress bar shows the loss, the damping and the attempts of the last step
    (and ``metrics``: name -> callable(outputs, targets), e.g. torchmetrics). Training stops early
    when a step reports ``stop_training`` (the damping reached its maximum).

    Returns one record per epoch: ``{'epoch', 'loss' (mean over its steps), 'steps', 'stopped',
    **last step's logs}``. Arguments as torch-levenberg-marquardt's ``utils.fit``, plus
    ``progress=False`` to run without a bar.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"Invalid epochs: {epochs!r}. It must be an integer >= 0")
    if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int) or update_every_n_steps < 1:
        raise ValueError(f"Invalid update_every_n_steps: {update_every_n_steps!r}. It must be an integer >= 1")
    if not callable(getattr(training_module, "training_step", None)):
        raise TypeError(f"training_module must have training_step(inputs, targets); got {type(training_module).__name__}")
    from tqdm.auto import tqdm

    device = training_module.device
    metrics = {name: (m.to(device) if hasattr(m, "to") else m) for name, m in (metrics or {}).items()}
    history: List[Dict[str, Any]] = []
    for epoch in range(epochs):
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(total=total, desc=f"Epoch {epoch + 1}/{epochs}", leave=not overwrite_progress_bar,
                   dynamic_ncols=True, disable=not progress)
        loss_sum, steps, pending, stop, logs = 0.0, 0, 0, False, {}
        for inputs, targets in dataloader:
            inputs, targets = tree_to_device(inputs, device), tree_to_device(targets, device)
            outputs, loss, stop, logs = training_module.training_step(inputs, targets)
            loss_sum += float(loss)
            steps += 1
            pending += 1
            shown = {"loss": f"{float(loss):.4e}", **{k: _format(v) for k, v in logs.items()}}
            for name, metric in metrics.items():
                shown[name] = _format(metric(outputs, targets))
            if pending == update_every_n_steps or stop:
                bar.update(pending)
                bar.set_postfix(shown)
                pending = 0
            if stop:
                break
        if pending:
            bar.update(pending)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(steps, 1), "steps": steps, "stopped": stop,
                  **{k: _scalar(v) for k, v in logs.items()}}
        history.append(record)
        for metric in metrics.values():
            if callable(getattr(metric, "reset", None)):
                metric.reset()
        bar.set_postfix({"epoch_avg_loss": f"{record['loss']:.4e}"})
        if stop or epoch == epochs - 1:
            bar.leave = True
        bar.close()
        if stop:
            break
    return history
