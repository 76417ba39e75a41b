"""``fastopt.LM``: Levenberg-Marquardt with a PyTorch-style interface.

    lm = fastopt.LM(model, torch.nn.MSELoss())
    for x, y in loader:
        result = lm.step(x, y)            # result.loss, .damping, .attempts, .accepted
        if result.stop_training:
            break

The same engine and the same arithmetic as :class:`fastopt.lm.LevenbergMarquardtModule`, with
these differences in behaviour:

* every batch is taken as it is (B and the residual count are not frozen by the first batch);
* when no attempt lowers the loss the parameters stay where the step found them
  (``accepted=False``), instead of taking the last computed update;
* non-finite residuals at the current parameters raise a ValueError, before anything is changed;
* the default solver is 'cholesky' (the package's is 'qr'), and ``damping`` takes a number (the
  starting lambda) as well as a strategy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union, cast

import torch
from torch import Tensor

from .damping import DampingStrategy, StandardDampingStrategy
from .loss import CrossEntropyLoss, LossWrapper, MSELoss
from .training import _LevenbergMarquardtBase
from .tree import batch_size_of

__all__ = ["LM", "StepResult"]


@dataclass
class StepResult:
    """What one :meth:`LM.step` did.

    loss: the loss after the step (the accepted loss, or the loss at the unchanged parameters);
    damping: lambda after the step; attempts: damping values tried; accepted: whether the
    parameters moved; stop_training: lambda reached its maximum (with conditional stopping);
    outputs: the model's outputs at the parameters the step started from; solver_failures:
    attempts whose damped system could not be solved (each raised lambda, as a rejection does).
    """

    loss: Tensor
    damping: float
    attempts: int
    accepted: bool
    stop_training: bool
    outputs: Any
    solver_failures: int = 0

    def logs(self) -> Dict[str, Any]:
        return {"damping": self.damping, "attempts": self.attempts, "accepted": self.accepted}


def _residual_count(loss_fn: Any, targets: Any) -> Optional[int]:
    """How many residuals the built-in losses give for ``targets`` (None: ask the loss): as many
    as targets for the elementwise ones (their residuals check the shapes) and for cross-entropy
    with class indices."""
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        return None
    if type(loss_fn) is MSELoss or (
        isinstance(loss_fn, LossWrapper) and loss_fn.elementwise and type(loss_fn).residuals is LossWrapper.residuals
    ):
        return targets.numel()
    if type(loss_fn) is CrossEntropyLoss and not targets.is_floating_point():
        return targets.numel()
    return None


class LM(_LevenbergMarquardtBase):
    """Levenberg-Marquardt training of ``model`` on ``loss_fn``, one :meth:`step` per batch.

    A damped system that cannot be solved counts as a rejected attempt (lambda grows), is logged
    at DEBUG level on the ``fastopt.lm`` logger and counted in ``StepResult.solver_failures``;
    ``fallback='lstsq'`` solves it by least squares instead.

    Each step solves ``(J^T J / B + lambda D) x = J^T r / B`` (``J J^T`` form when there are fewer
    residuals than parameters), tries ``theta - learning_rate x`` and accepts it if the loss falls,
    else raises lambda and retries, up to ``attempts_per_step`` times.

    Args:
        model: the module to train (float32 or float64 parameters, one device).
        loss_fn: a :mod:`fastopt.lm.loss` loss, a custom :class:`fastopt.lm.Loss`, or one of
            ``torch.nn.MSELoss/L1Loss/HuberLoss/CrossEntropyLoss/BCELoss/BCEWithLogitsLoss()``
            (default MSE).
        damping: the starting lambda (a number) or a damping strategy (default
            ``StandardDampingStrategy()``, lambda = 1e-3, 'standard' mode).
        learning_rate, attempts_per_step (>= 1), solve_method ('cholesky', 'qr', 'solve'),
        param_selection, use_vmap, max_batch_size: as in :class:`~fastopt.lm.LevenbergMarquardtModule`.
        backend, jacobian, reuse_factorization, fallback: fastopt's keywords, ditto.
        process_group: None (one process), or a ``torch.distributed`` group (e.g.
            ``torch.distributed.group.WORLD``) for data-parallel training: each rank passes its
            own shard of the batch to :meth:`step` and all ranks take the same step.

    Data-parallel training (``process_group``): each rank builds ``[J | r]^T [J | r]`` (so
    ``J^T J``, ``J^T r``) from its shard, and one all-reduce per step adds the ranks' systems,
    losses and sample counts, scaled by 1/B with B the samples of all shards together (shards
    may be uneven, or empty). Every rank solves the same system; each attempt's trial loss is
    all-reduced too (a small second all-reduce), so every rank accepts or rejects alike and
    follows the same damping path: the steps are those of one process on the concatenated
    batch, to round-off. The reported loss is the sample-weighted mean of the shards' losses
    (the whole batch's loss for the built-in losses, which are means); ``outputs`` are the
    rank's own. Rank 0's parameters are broadcast to the others on construction, as DDP does.
    Not supported: fewer residuals than parameters over all ranks (the ``J J^T`` form couples
    samples across ranks): that step raises a ValueError naming ``process_group``. With
    torchrun (``torchrun --nproc-per-node 2 train.py``)::

        torch.distributed.init_process_group("gloo")     # "nccl" on GPUs
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        lm = fastopt.LM(model, torch.nn.MSELoss(), process_group=torch.distributed.group.WORLD)
        for x, y in loader:                              # the same global batches on every rank
            result = lm.step(x[rank::world], y[rank::world])

    See bench/lm_data_parallel_example.py.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Any = None,
        *,
        damping: Union[None, float, DampingStrategy] = None,
        learning_rate: float = 1.0,
        attempts_per_step: int = 10,
        solve_method: str = "cholesky",
        param_selection: Any = None,
        use_vmap: bool = True,
        max_batch_size: Optional[int] = None,
        backend: str = "auto",
        jacobian: str = "auto",
        reuse_factorization: str = "auto",
        fallback: Optional[str] = None,
        process_group: Any = None,
    ) -> None:
        if isinstance(damping, (int, float)) and not isinstance(damping, bool):
            damping = StandardDampingStrategy(starting_value=float(damping))
        elif (
            damping is not None
            and not isinstance(damping, DampingStrategy)
            and not callable(getattr(damping, "apply", None))
        ):
            raise TypeError(
                f"damping must be a number (the starting lambda) or a DampingStrategy; got {type(damping).__name__}"
            )
        # A number became a StandardDampingStrategy above and anything else without apply() raised
        # (a bool too): what is left is a DampingStrategy, or an object with its methods, which the
        # base class checks.
        super().__init__(
            model,
            loss_fn,
            cast(Optional[DampingStrategy], damping),
            learning_rate,
            attempts_per_step,
            solve_method,
            param_selection,
            use_vmap,
            max_batch_size,
            backend=backend,
            jacobian=jacobian,
            reuse_factorization=reuse_factorization,
            fallback=fallback,
            process_group=process_group,
            min_attempts=1,
        )
        self.steps = 0

    _failure_log_level = logging.DEBUG
    _first_batch_fixes_scale = False  # data-parallel: each step's 1/B is its own global batch's

    @torch.no_grad()
    def step(self, inputs: Any, targets: Any) -> StepResult:
        """One Levenberg-Marquardt step on the batch ``(inputs, targets)``."""
        rows = batch_size_of(inputs)
        count = _residual_count(self.loss_fn, targets)
        outputs = None
        if count is None:  # a custom loss: its residuals tell how many there are
            outputs = self.forward(inputs)
            residuals = self.loss_fn.residuals(outputs, targets)
            if residuals.dim() == 0:
                raise ValueError(
                    "loss_fn.residuals must return one residual or more per sample (first dimension = "
                    "batch); got a 0-dim tensor"
                )
            if residuals.shape[0] != rows:
                raise ValueError(
                    f"inputs hold {rows} samples but the residuals {residuals.shape[0]} (residuals of "
                    f"shape {tuple(residuals.shape)}): outputs and targets must share the batch dimension"
                )
            count = residuals.numel()
        self._flat.save()  # restore() must return to this step's start, whatever happened before
        outcome = self._run_step(
            inputs,
            targets,
            outputs,
            batch_size=rows,
            num_residuals=count,
            apply_last_attempt=False,
            require_finite=True,
        )
        self.steps += 1
        return StepResult(
            outcome.loss,
            float(self.damping_strategy.get_current_damping()),
            outcome.attempts,
            outcome.accepted,
            outcome.stop_training,
            outcome.outputs,
            outcome.solver_failures,
        )

    def training_step(self, inputs: Any, targets: Any) -> Tuple[Any, Tensor, bool, dict]:
        """:meth:`step` in torch-levenberg-marquardt's form, for :func:`fastopt.lm.fit` and Lightning."""
        r = self.step(inputs, targets)
        return r.outputs, r.loss, r.stop_training, r.logs()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The step count and the damping strategy's state (if it has ``state_dict``); the model's
        parameters are in ``model.state_dict()``."""
        strategy_state = getattr(self.damping_strategy, "state_dict", None)  # not part of DampingStrategy
        damping = strategy_state() if callable(strategy_state) else None
        return {"steps": self.steps, "damping": damping}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "steps" not in state:
            raise KeyError("LM.load_state_dict: expected a dict from LM.state_dict() with key 'steps'")
        if state.get("damping") is not None:
            load_strategy_state = getattr(self.damping_strategy, "load_state_dict", None)  # optional, as state_dict
            if not callable(load_strategy_state):
                raise TypeError(f"the damping strategy {type(self.damping_strategy).__name__} has no load_state_dict")
            load_strategy_state(state["damping"])
        self.steps = int(state["steps"])
