"""A training loop with a tqdm progress bar, metrics and early stopping (torch-levenberg-marquardt's
``utils.fit``), returning a record per epoch."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sized

from torch import Tensor

from .._validation import flag, int_at_least
from .loader import iterate_batches
from .tree import tree_to_device

__all__ = ["fit"]


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value
    return value


def _to_device(tree: Any, device: Any) -> Any:
    """``tree_to_device``; a tensor (the usual batch) without the pytree walk, ~10 us a batch."""
    return tree.to(device) if isinstance(tree, Tensor) else tree_to_device(tree, device)


def _format(value: Any) -> str:
    value = _scalar(value)
    return f"{value:.4e}" if isinstance(value, float) else str(value)


def _progress_bar_class():
    """tqdm's bar (the notebook one in Jupyter); imported only when a bar is shown."""
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "fastopt.lm.fit's progress bar needs tqdm: pip install 'fastopt[progress]' (or pass progress=False)"
        ) from err
    return tqdm


class _NoBar:
    """What fit calls on a bar, doing nothing: ``progress=False`` needs no tqdm."""

    leave = False

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, values: Dict[str, Any], refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Meter:
    """One entry of ``metrics``: a torchmetrics ``Metric`` (anything with ``compute``) shows its
    running value over the epoch, as the package shows it; a plain callable shows its value on the
    batch, and the epoch's record gets the mean over the epoch's batches."""

    def __init__(self, metric: Any, device: Any) -> None:
        self.metric = metric.to(device) if callable(getattr(metric, "to", None)) else metric
        self.accumulates = callable(getattr(self.metric, "compute", None))
        self._sum, self._count = 0.0, 0

    def __call__(self, outputs: Any, targets: Any) -> Any:
        value = self.metric(outputs, targets)
        if self.accumulates:
            return self.metric.compute().item()
        value = _scalar(value)
        if isinstance(value, numbers.Real):
            self._sum, self._count = self._sum + float(value), self._count + 1
        return value

    def epoch_value(self) -> Any:
        if self.accumulates:
            value = self.metric.compute() if self._updated() else None
            return _scalar(value)
        return self._sum / self._count if self._count else None

    def _updated(self) -> bool:
        # torchmetrics warns (and returns its default) on compute() before any update.
        return getattr(self.metric, "update_count", 1) > 0

    def reset(self) -> None:
        if callable(getattr(self.metric, "reset", None)):
            self.metric.reset()
        self._sum, self._count = 0.0, 0


def fit(
    training_module: Any,
    dataloader: Iterable,
    epochs: int,
    metrics: Optional[Dict[str, Callable]] = None,
    overwrite_progress_bar: bool = True,
    update_every_n_steps: int = 1,
    progress: bool = True,
) -> List[Dict[str, Any]]:
    """Train for ``epochs`` passes over ``dataloader`` (batches of ``(inputs, targets)``).

    Args (torch-levenberg-marquardt's ``utils.fit``, same meanings):
        training_module: a :class:`fastopt.LM`, a :class:`fastopt.lm.LevenbergMarquardtModule`, an
            :class:`fastopt.lm.training.OptimizerModule`, or anything with ``training_step(inputs,
            targets) -> (outputs, loss, stop_training, logs)`` and ``device``.
        dataloader: any iterable of batches. A plain ``DataLoader`` over a ``TensorDataset`` is
            iterated without collating samples (same batches, same random draws; see
            :mod:`fastopt.lm.loader`); so is a :class:`fastopt.lm.utils.FastDataLoader`.
        epochs: passes over the loader.
        metrics: name -> a ``torchmetrics.Metric`` (shown as its running value over the epoch and
            reset at the epoch's end, as the package does) or a callable(outputs, targets).
        overwrite_progress_bar: one bar line rewritten each epoch (True) or one kept per epoch.
        update_every_n_steps: refresh the bar every n steps.
        progress: fastopt's addition: False runs without a bar and without printing (and without
            tqdm installed).

    The bar shows the loss, the metrics and the step's logs (damping, attempts). Training stops
    when a step reports ``stop_training`` (the damping reached its maximum).

    Returns one record per epoch: ``{'epoch', 'loss' (mean over its steps), 'steps', 'stopped',
    **last step's logs, **metric values over the epoch}``.
    """
    int_at_least(0)("epochs", epochs)
    int_at_least(1)("update_every_n_steps", update_every_n_steps)
    flag("overwrite_progress_bar", overwrite_progress_bar)
    flag("progress", progress)
    if not callable(getattr(training_module, "training_step", None)):
        raise TypeError(
            f"training_module must have training_step(inputs, targets); got {type(training_module).__name__}"
        )
    if metrics is not None and not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> metric, got {type(metrics).__name__}")
    for name, metric in (metrics or {}).items():
        if not callable(metric):
            raise TypeError(f"metrics[{name!r}] must be callable(outputs, targets), got {type(metric).__name__}")
    bar_class = _progress_bar_class() if progress else None

    device = training_module.device
    meters = {name: _Meter(metric, device) for name, metric in (metrics or {}).items()}
    history: List[Dict[str, Any]] = []
    for epoch in range(epochs):
        total = len(dataloader) if isinstance(dataloader, Sized) else None
        bar = (
            bar_class(
                total=total, desc=f"Epoch {epoch + 1}/{epochs}", leave=not overwrite_progress_bar, dynamic_ncols=True
            )
            if bar_class is not None
            else _NoBar()
        )
        loss_sum, steps, pending, stop, logs = 0.0, 0, 0, False, {}
        for inputs, targets in iterate_batches(dataloader):
            inputs, targets = _to_device(inputs, device), _to_device(targets, device)
            outputs, loss, stop, logs = training_module.training_step(inputs, targets)
            loss_value = loss.detach().item() if isinstance(loss, Tensor) else float(loss)
            loss_sum += loss_value
            steps += 1
            pending += 1
            shown: Dict[str, Any] = {"loss": f"{loss_value:.4e}"}
            for name, meter in meters.items():
                shown[name] = meter(outputs, targets)
            shown.update((key, _format(value)) for key, value in logs.items())
            if pending == update_every_n_steps or steps == total or stop:
                bar.update(pending)
                # Redrawn at tqdm's rate (update() after mininterval) and at the epoch's last step,
                # not at every step: a redraw per step cost ~50-110 us (measured, tqdm to a pipe),
                # a tenth of a step of the sinc example's 61-parameter network.
                bar.set_postfix(shown, refresh=steps == total or stop)
                pending = 0
            if stop:
                bar.leave = True
                break
        if pending:
            bar.update(pending)
            bar.set_postfix(shown)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(steps, 1),
            "steps": steps,
            "stopped": stop,
            **{k: _scalar(v) for k, v in logs.items()},
            **{name: meter.epoch_value() for name, meter in meters.items()},
        }
        history.append(record)
        for meter in meters.values():
            meter.reset()
        if overwrite_progress_bar:
            bar.set_postfix({"epoch_avg_loss": f"{record['loss']:.4e}"})
        else:
            bar.write(f"Epoch {epoch + 1} complete. Average loss: {record['loss']:.4e}")
        if stop or epoch == epochs - 1:
            bar.leave = True
        bar.close()
        if stop:
            break
    if progress and overwrite_progress_bar and history:
        print(f"Training complete. Final epoch average loss: {history[-1]['loss']:.4e}")
    return history
