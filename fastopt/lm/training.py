"""Levenberg-Marquardt training: the torch-levenberg-marquardt-compatible module.

:class:`LevenbergMarquardtModule` takes torch-levenberg-marquardt 1.2.3's constructor arguments and
``training_step(inputs, targets) -> (outputs, loss, stop_training, logs)`` and takes the same steps
(tests/test_lm_parity.py checks this against the package itself), quirks included:

* the batch size B (the 1/B normalisation and the slicing) and the residual count (the over- or
  underdetermined choice) are fixed by the first batch;
* when every attempt fails, the last computed update is applied anyway and the backup is not
  refreshed, so the next rejected attempt restores the parameters from before that update;
* a solver failure (Cholesky of a matrix that is not positive definite, a singular LU) is logged
  and counts as a rejected attempt: lambda grows.

Each step (P = selected parameters, N = residuals)::

    [J | r] over slices of max_batch_size samples          (torch.func, fastopt.lm._engine)
    N >= P:  A = J^T J / B,  g = J^T r / B                 (jacobian_products op, lower triangle)
    N <  P:  A = J J^T / B,  g = r / B
    repeat: solve (A + damping) x = g;  x <- J^T x if N < P;  theta -= lr x
            accept if loss(theta) < loss, else restore theta and raise lambda

What differs from the package, by design: arguments are validated when the module is built
(``solve_method``, ``max_batch_size``, ...), elementwise losses refuse predictions and targets of
different shapes instead of broadcasting them, and a batch larger than the first one with
``max_batch_size`` raises (the package drops its extra rows from J but not from the loss).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as v
from .. import backends
from ._data_parallel import DataParallel, check_process_group
from ._engine import (
    FALLBACKS,
    JACOBIAN_MODES,
    REUSE_MODES,
    SOLVE_METHODS,
    DampedSolver,
    FlatParameters,
    NormalEquations,
    ResidualJacobian,
    Selection,
    Workspace,
    logger,
    make_selection,
    normal_equations,
)
from .damping import DampingStrategy, StandardDampingStrategy
from .loss import Loss, MSELoss, as_residual_loss
from .selection import ParamSelectionStrategy

# torch-levenberg-marquardt's training module exposes these helpers and classes too.
from .tree import batch_size_of, tree_cat, tree_first_tensor, tree_slice, tree_unsqueeze

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

__all__ = [
    "TrainingModule",
    "LevenbergMarquardtModule",
    "OptimizerModule",
    "Loss",
    "MSELoss",
    "DampingStrategy",
    "StandardDampingStrategy",
    "ParamSelectionStrategy",
    "tree_cat",
    "tree_first_tensor",
    "tree_slice",
    "tree_unsqueeze",
]


class TrainingModule(ABC):
    """What the fit loop and the Lightning helper drive: ``training_step``, ``model``, ``device``."""

    @abstractmethod
    def training_step(self, inputs: Any, targets: Any) -> Tuple[Any, Tensor, bool, dict]:
        """One training step: (outputs, loss, stop_training, logs)."""

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The model being trained."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device of the model's parameters."""


class OptimizerModule(TrainingModule):
    """A training step with any ``torch.optim.Optimizer`` (Adam, SGD, fastopt.LAdam, ...), so that
    the same :func:`fastopt.lm.fit` loop and Lightning helper train with first-order methods
    (torch-levenberg-marquardt's ``training.OptimizerModule``, same arguments and steps).

    Args:
        model: the ``torch.nn.Module`` to train.
        optimizer: an optimizer over the model's parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor`` (e.g. ``torch.nn.MSELoss()``).

    ``training_step(inputs, targets)``: forward, ``zero_grad``, ``backward``, ``step``; returns
    ``(outputs, loss, False, {})``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any) -> None:
        v.nn_module("model", model)
        if not (callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (step() and zero_grad()); got {type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(outputs, targets); got {type(loss_fn).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError("model has no parameters to train")
        self._model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn

    def training_step(self, inputs: Any, targets: Any) -> Tuple[Any, Tensor, bool, dict]:
        outputs = self._model(inputs)
        loss = self.loss_fn(outputs, targets)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return outputs, loss, False, {}

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device


@dataclass
class _System:
    """What a step builds before its attempts: the system, the selected columns (None: all), the
    model's outputs and the loss at the current parameters, and the batch's sample count."""

    equations: NormalEquations
    selection: Optional[Selection]
    outputs: Any
    loss: Tensor
    rows: int


@dataclass
class _StepOutcome:
    outputs: Any
    loss: Tensor
    stop_training: bool
    attempts: int
    accepted: bool
    equations: NormalEquations
    solver_failures: int


def _uses_standard_apply(strategy: Any) -> TypeGuard[StandardDampingStrategy]:
    """Whether ``strategy.apply`` is :class:`StandardDampingStrategy`'s own (then the damping is a
    diagonal, added in place); a subclass overriding ``apply`` gets the full matrix."""
    return isinstance(strategy, StandardDampingStrategy) and type(strategy).apply is StandardDampingStrategy.apply


def _plain_standard_damping(strategy: StandardDampingStrategy) -> bool:
    """Whether the damping is lambda I with lambda the strategy's own (mode 'standard', neither
    ``damping_diagonal`` nor ``get_current_damping`` overridden): then lambda is passed as a float."""
    cls = type(strategy)
    return (
        strategy.damping_mode == "standard"
        and cls.damping_diagonal is StandardDampingStrategy.damping_diagonal
        and cls.get_current_damping is StandardDampingStrategy.get_current_damping
    )


def _all_finite(x: Tensor) -> bool:
    """``bool(torch.isfinite(x).all())``, mostly in one reduction and one read: a finite sum has no
    inf or NaN among its terms (either would make it inf or NaN); a sum that is not finite may only
    have overflowed, so it is checked element by element."""
    if math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


class _LevenbergMarquardtBase(TrainingModule):
    """Construction, validation and the step loop that both fronts share."""

    # A solve that fails (not positive definite, singular) is logged, as tlm logs it, and counted.
    _failure_log_level = logging.WARNING
    # Data-parallel: the 1/B of every step is the first step's B over all ranks (tlm's quirk), or
    # each step's own (False, fastopt.LM).
    _first_batch_fixes_scale = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Any = None,
        damping_strategy: Optional[DampingStrategy] = None,
        learning_rate: float = 1.0,
        attempts_per_step: int = 10,
        solve_method: str = "qr",
        param_selection_strategy: Any = None,
        use_vmap: bool = True,
        max_batch_size: Optional[int] = None,
        *,
        backend: str = "auto",
        jacobian: str = "auto",
        reuse_factorization: str = "auto",
        fallback: Optional[str] = None,
        process_group: Any = None,
        min_attempts: int = 0,
    ) -> None:
        v.nn_module("model", model)
        v.one_of(SOLVE_METHODS)("solve_method", solve_method)
        v.one_of(JACOBIAN_MODES)("jacobian", jacobian)
        v.one_of(REUSE_MODES)("reuse_factorization", reuse_factorization)
        v.one_of(FALLBACKS)("fallback", fallback)
        backends.validate_backend_name(backend)
        v.positive("learning_rate", learning_rate)
        v.int_at_least(min_attempts)("attempts_per_step", attempts_per_step)
        v.optional(v.int_at_least(1))("max_batch_size", max_batch_size)
        for name in (
            "reset",
            "get_current_damping",
            "initialize_step",
            "on_successful_update",
            "on_unsuccessful_update",
            "stop_attempts",
            "stop_training",
            "apply",
        ):
            if damping_strategy is not None and not callable(getattr(damping_strategy, name, None)):
                raise TypeError(
                    f"damping_strategy must implement DampingStrategy; {type(damping_strategy).__name__} "
                    f"has no method {name}()"
                )
        if param_selection_strategy is not None and not callable(
            getattr(param_selection_strategy, "select_parameters", None)
        ):
            raise TypeError(
                "param_selection_strategy must have a select_parameters() method; got "
                f"{type(param_selection_strategy).__name__}"
            )
        process_group = check_process_group(process_group)

        self._model = model
        self.loss_fn = as_residual_loss(loss_fn)
        self.damping_strategy = damping_strategy if damping_strategy is not None else StandardDampingStrategy()
        self.learning_rate = learning_rate
        self.attempts_per_step = attempts_per_step
        self.solve_method = solve_method
        self.param_selection_strategy = param_selection_strategy
        self.use_vmap = use_vmap
        self.max_batch_size = max_batch_size
        self.backend = backend
        self.jacobian = jacobian
        self.reuse_factorization = reuse_factorization
        self.fallback = fallback

        self._flat = FlatParameters(model)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._num_params = self._flat.numel
        self._splits = list(self._flat.splits)
        self._jacobian_fn = ResidualJacobian(model, self.loss_fn, self._flat, use_vmap, jacobian)
        self._workspace = Workspace()
        self._batch_size: Optional[int] = None
        self._num_residuals: Optional[int] = None
        self.process_group = process_group
        self._data_parallel: Optional[DataParallel] = None
        self._global_batch_size: Optional[int] = None  # data-parallel: the B of 1/B, all ranks' samples
        if process_group is not None:
            self._data_parallel = DataParallel(process_group, self._flat.device, self._flat.dtype, self._workspace)
            self._data_parallel.broadcast_parameters(self._flat.flat)
            self._flat.save()

    # -- torch-levenberg-marquardt's attributes and helpers ---------------------------------------
    @property
    def flat_params(self) -> Tensor:
        """All trainable parameters as one vector; the model's parameters are views into it."""
        return self._flat.flat

    @property
    def _flat_params_backup(self) -> Tensor:
        return self._flat.backup

    # No torch.no_grad() on these two (nor on FlatParameters' copies): the flat vector needs no
    # grad, so a copy into it records nothing, and the decorator cost ~2 us a call, 2-3 calls a step.
    def backup_parameters(self) -> None:
        """Copies the current parameters into the backup."""
        self._flat.save()

    def restore_parameters(self) -> None:
        """Copies the backup into the parameters."""
        self._flat.restore()

    @torch.no_grad()
    def reset(self) -> None:
        """Forgets the first batch's sizes and resets the damping strategy."""
        self._batch_size = None
        self._num_residuals = None
        self._global_batch_size = None
        self.damping_strategy.reset()

    def forward(self, inputs: Any) -> Any:
        """The model's outputs at the current parameters."""
        return self._jacobian_fn.forward(inputs)

    def release_buffers(self) -> None:
        """Frees the buffers kept between steps (the Gauss-Newton matrix, its factor, Jacobian
        chunks: about 3 P^2 numbers); the next step allocates them again."""
        self._workspace.clear()

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._flat.device

    # -- one step ---------------------------------------------------------------------------------
    def _solve_update(self, solver: DampedSolver, selection) -> Tensor:
        """The parameter update for the strategy's current damping (raises on a failed solve)."""
        strategy = self.damping_strategy
        eq = solver.eq
        if _uses_standard_apply(strategy):
            if self._reuse_eigh():
                x = solver.solve_spectral(float(strategy.get_current_damping()), strategy.damping_mode)
            elif _plain_standard_damping(strategy):
                # lambda I: the float, added to the diagonal as the package's 0-dim tensor would be.
                x = solver.solve_diagonal(strategy.current_damping_value())
            else:
                x = solver.solve_diagonal(strategy.damping_diagonal(eq.diagonal))
        else:
            x = solver.solve_matrix(strategy.apply(solver.undamped_full()))
        if not eq.overdetermined:
            assert eq.jacobian is not None  # an underdetermined system keeps J
            x = eq.jacobian.t().matmul(x)
        x = x.reshape(-1)
        if selection is not None:
            full = torch.zeros(self._num_params, device=x.device, dtype=x.dtype)
            full[selection.indices] = x
            x = full
        return x

    def _reuse_eigh(self) -> bool:
        # "auto": never, by measurement on this project's CPU (see DampedSolver); GPU unmeasured.
        return self.reuse_factorization == "eigh"

    def _run_step(
        self,
        inputs: Any,
        targets: Any,
        outputs: Any,
        *,
        batch_size: int,
        num_residuals: int,
        apply_last_attempt: bool,
        require_finite: bool = False,
    ) -> _StepOutcome:
        """One step from the current parameters (both fronts call it under ``torch.no_grad()``, so it
        has no decorator of its own); ``outputs`` (the model's on ``inputs``) may be None,
        then they come from building the system when it gives them, else from a forward pass."""
        system = self._build_system(
            inputs, targets, outputs, batch_size=batch_size, num_residuals=num_residuals, require_finite=require_finite
        )
        return self._attempt_updates(system, inputs, targets, apply_last_attempt)

    def _build_system(
        self, inputs: Any, targets: Any, outputs: Any, *, batch_size: int, num_residuals: int, require_finite: bool
    ) -> _System:
        """The step's Gauss-Newton system at the current parameters and the loss there; changes no
        parameter (data-parallel: the system and the loss summed over the ranks)."""
        self._jacobian_fn.loss_fn = self.loss_fn
        self._jacobian_fn.use_vmap = self.use_vmap
        selection = None
        num_params = self._num_params
        data_parallel = self._data_parallel
        if self.param_selection_strategy is not None:
            indices = self.param_selection_strategy.select_parameters()
            if data_parallel is not None:
                indices = data_parallel.broadcast_indices(indices)
            selection = make_selection(self._flat, indices)
            num_params = selection.size
        # Data-parallel: always J^T J, the form that sums over ranks; the global count is checked below.
        overdetermined = num_residuals >= num_params or data_parallel is not None
        rows = batch_size_of(inputs)
        sliced = self.max_batch_size is not None and self.max_batch_size < batch_size
        if sliced and rows > batch_size:
            raise ValueError(
                f"a batch of {rows} samples is larger than the first batch ({batch_size}), which fixes "
                "the slicing; call reset() before changing the batch size"
            )
        equations = normal_equations(
            self._jacobian_fn,
            inputs,
            targets,
            batch_size=batch_size,
            rows=rows,
            num_residuals=num_residuals,
            overdetermined=overdetermined,
            max_batch_size=self.max_batch_size if sliced else None,
            selection=selection,
            backend=self.backend,
            workspace=self._workspace,
            scale=1.0 if data_parallel is not None else None,
        )
        if outputs is None:
            outputs = equations.outputs if equations.outputs is not None else self.forward(inputs)
        loss = self.loss_fn(outputs, targets)
        if data_parallel is not None:
            assert equations.products is not None  # data-parallel systems are overdetermined: they keep the products
            loss, global_rows, global_residuals = data_parallel.reduce_system(
                equations.products,
                loss,
                rows,
                num_residuals,
                batch_size=self._global_batch_size if self._first_batch_fixes_scale else None,
            )
            if self._first_batch_fixes_scale and self._global_batch_size is None:
                self._global_batch_size = global_rows
            if global_residuals < num_params:
                raise ValueError(
                    f"process_group: data-parallel Levenberg-Marquardt sums J^T J over the ranks, which needs at "
                    f"least as many residuals as parameters; the ranks' batches hold {global_residuals} residuals "
                    f"for {num_params} parameters, and the J J^T form of an underdetermined step couples samples "
                    "across ranks. Use a larger batch, a param_selection, or process_group=None (the parameters "
                    "were not changed)"
                )
            equations.diagonal.copy_(equations.matrix.diagonal())
        if require_finite and not bool(torch.isfinite(loss)):
            residuals = self.loss_fn.residuals(outputs, targets)
            bad = int((~torch.isfinite(residuals)).sum())
            raise ValueError(
                f"{bad} of {residuals.numel()} residuals are not finite at the current parameters; "
                "check the inputs and targets (the parameters were not changed)"
            )
        return _System(equations, selection, outputs, loss, rows)

    def _attempt_updates(self, system: _System, inputs: Any, targets: Any, apply_last_attempt: bool) -> _StepOutcome:
        """Solve for one damping value after another until the loss falls (accept), the damping
        strategy stops the attempts, or ``attempts_per_step`` run out (then the last update stays
        applied with ``apply_last_attempt``, tlm's quirk, else the parameters stay as they were)."""
        solver = DampedSolver(system.equations, self.solve_method, self.fallback, self.backend)
        strategy = self.damping_strategy
        data_parallel = self._data_parallel
        loss = system.loss

        flat = self._flat.flat
        learning_rate = self.learning_rate
        # The comparisons read the losses once each: a float compares as the tensors do (same value).
        loss_value: Optional[float] = None

        stop_training = False
        accepted = False
        attempt = 0
        failures = 0
        strategy.initialize_step(loss)
        while True:
            if attempt >= self.attempts_per_step and not apply_last_attempt:
                break  # nothing left to try: keep the parameters as they are
            params_updated = False
            try:
                updates = self._solve_update(solver, system.selection)
                if _all_finite(updates):
                    params_updated = True
                    if learning_rate == 1.0:
                        flat.sub_(updates)  # the same rounding as adding -1 * updates
                    else:
                        flat.add_(-learning_rate * updates)  # not add_(alpha=): that one may fuse (FMA)
            except RuntimeError as err:  # SolveFailed, LinAlgError: a rejected attempt, as in tlm
                failures += 1
                logger.log(self._failure_log_level, f"An exception occurred: {err}")
            if attempt < self.attempts_per_step:
                attempt += 1
                if data_parallel is not None:
                    # Every rank joins, whatever its solve did: one loss, one decision everywhere.
                    local = self.loss_fn(self.forward(inputs), targets) if params_updated else None
                    new_loss = data_parallel.trial_loss(local, system.rows)
                    if new_loss is None and params_updated:
                        self.restore_parameters()
                    params_updated = new_loss is not None
                elif params_updated:
                    new_loss = self.loss_fn(self.forward(inputs), targets)
                if params_updated:
                    assert new_loss is not None  # params_updated: this attempt computed it
                    if loss_value is None:
                        loss_value = float(loss)
                    new_value = float(new_loss)
                    if new_value < loss_value:
                        loss = new_loss
                        accepted = True
                        strategy.on_successful_update(loss)
                        self.backup_parameters()
                        break
                    self.restore_parameters()
                strategy.on_unsuccessful_update(loss)
                stop_attempts = strategy.stop_attempts(loss)
                stop_training = strategy.stop_training(loss)
                if stop_training or stop_attempts:
                    break
            else:
                break
        return _StepOutcome(system.outputs, loss, stop_training, attempt, accepted, system.equations, failures)


class LevenbergMarquardtModule(_LevenbergMarquardtBase):
    """Levenberg-Marquardt training module, a drop-in for torch-levenberg-marquardt's.

    Args (the package's, same defaults):
        model: the ``torch.nn.Module`` to train (float32 or float64 parameters).
        loss_fn: a :mod:`fastopt.lm.loss` loss (default ``MSELoss()``), or anything with
            ``residuals`` and ``__call__``; the matching ``torch.nn`` losses are converted.
        damping_strategy: default ``StandardDampingStrategy()``.
        learning_rate: ``theta -= learning_rate * update``.
        attempts_per_step: attempts (damping values) per step before the last update is taken.
        solve_method: 'qr', 'cholesky' or 'solve'.
        param_selection_strategy: a :mod:`fastopt.lm.selection` strategy, or None for all parameters.
        use_vmap: per-sample Jacobians with ``torch.func.vmap`` (True) or one ``jacrev`` of the batch.
        max_batch_size: build the system from slices of this many samples.

    fastopt's own keywords:
        backend: the backend of the ``jacobian_products`` op and, for 'qr' systems of up to
            ``fastopt.lm._engine.solve.SMALL_QR_COLUMNS`` columns, of the ``lm_small_solve`` op
            (:mod:`fastopt.backends`), default "auto".
        jacobian: 'auto' (jacrev, or jacfwd when a sample has more residuals than there are
            parameters), 'jacrev' or 'jacfwd'.
        reuse_factorization: 'auto' (currently the same as 'never'), 'never' (factor per attempt,
            as the package) or 'eigh' (one eigendecomposition per step, see ``DampedSolver``).
        fallback: None (a failed solve raises lambda, as the package) or 'qr', 'solve', 'lstsq'
            (solve the same damped system with that method instead).
        process_group: None, or a ``torch.distributed`` group for data-parallel training, as in
            :class:`fastopt.LM` (each rank passes its shard of the batch; 1/B uses the first step's
            samples over all ranks).
    """

    @torch.no_grad()
    def training_step(self, inputs: Any, targets: Any) -> Tuple[Any, Tensor, bool, dict]:
        """One step: (outputs, loss, stop_training, logs) with logs {'damping', 'attempts'}."""
        outputs = None
        if self._batch_size is None:
            outputs = self.forward(inputs)
            residuals = self.loss_fn.residuals(outputs, targets)
            self._batch_size = residuals.shape[0]
            self._num_residuals = residuals.numel()
        assert self._num_residuals is not None  # set with _batch_size, by the first batch
        outcome = self._run_step(
            inputs,
            targets,
            outputs,
            batch_size=self._batch_size,
            num_residuals=self._num_residuals,
            apply_last_attempt=True,
        )
        logs = {"damping": self.damping_strategy.get_current_damping(), "attempts": outcome.attempts}
        return outcome.outputs, outcome.loss, outcome.stop_training, logs
