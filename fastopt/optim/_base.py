"""What LAdam, LAdaGrad and LRMSProp share: validation, state, grouping and dispatch.

A step validates everything (hyperparameters, gradients, backend availability) for every group
before it touches any tensor, so bad input leaves parameters and state as they were. Then, per
(group, device, dtype) bucket, it creates missing state, increments the per-tensor step counts
and calls the one function :func:`fastopt.backends.choose` chose for that bucket.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, overload

import torch
from torch.optim import Optimizer

from .. import _validation as v
from .. import backends
from ..reference._amp import check_lr
from . import _sharded

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

_Loss = TypeVar("_Loss")  # whatever the closure returns (the loss)


def _bucket_by_device_and_dtype(
    params: List[torch.Tensor],
) -> Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]]:
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return buckets


def _host_value(value: Any) -> Any:
    """A hyperparameter as the ops take it: a one-element tensor (a tensor lr) as a Python float."""
    return float(value) if torch.is_tensor(value) else value


# (op, backend) -> the function that runs it: filled by _init_group, read by the traced step (a
# plain dict lookup, where backends.choose would check and import modules).
_IMPLEMENTATIONS: Dict[Tuple[str, str], Callable] = {}


class _AmpInputs:
    """What torch.amp.GradScaler handed to this step (``grad_scale``, ``found_inf``: 0-dim float32
    tensors, or None), moved once to each device that needs them, without a host sync."""

    def __init__(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._moved: Dict[torch.device, Dict[str, Optional[torch.Tensor]]] = {}

    def on(self, device: torch.device) -> Dict[str, Optional[torch.Tensor]]:
        """The op's keywords ``grad_scale`` and ``found_inf`` on ``device``."""
        if device not in self._moved:
            self._moved[device] = {
                key: None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)
                for key, t in (("grad_scale", self.grad_scale), ("found_inf", self.found_inf))
            }
        return self._moved[device]


class LaplacianOptimizer(Optimizer):
    """Base class of the LAdam family. Subclasses set:

    * ``_CHECKS``: hyperparameter name -> check (see :mod:`fastopt._validation`), besides
      ``capturable`` which every subclass has;
    * ``_LADAM_STATE_KEYS``: ladam's state key -> ours, for loading ladam checkpoints;
    * ``_op(group)``: the backend op of the group;
    * ``_init_state(state, p, group)``: create the missing state tensors of ``p``;
    * ``_state_keys(group)``: the state tensors the op takes, in the order of its signature;
    * ``_run(fn, group, params, grads, state_lists, steps, use_laps, amp)``: call the selected op
      (``**amp``: its ``grad_scale`` and ``found_inf`` keywords).
    """

    _CHECKS: Dict[str, v.Check] = {}
    _LADAM_STATE_KEYS: Dict[str, str] = {}
    _NAME = "LaplacianOptimizer"

    def __init__(self, params: ParamsT, defaults: Dict[str, Any], backend: str = "auto", capturable: bool = False):
        self.backend = backend
        super().__init__(params, {**defaults, "capturable": capturable})

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Check a group's hyperparameters. A capturable group's tensor lr is not read on the host
        (that would synchronize every step): its device and dtype are checked per bucket, in
        :meth:`_validate_groups`, its value is the user's business (as in torch's capturable Adam)."""
        checks = {"capturable": v.flag, **self._CHECKS}
        if group.get("capturable") is True and torch.is_tensor(group.get("lr")):
            checks.pop("lr")
        v.check_all(checks, group)

    # -- the backend is the optimizer's, not a group's: a checkpoint written on one backend must
    #    load on any other, and load_state_dict overwrites group entries with the saved ones.
    @property
    def backend(self) -> str:
        """Which implementation runs the step: one of :data:`fastopt.backends.CHOICES`."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        backends.validate_backend_name(name)
        if name != "auto":
            reason = backends.why_not(name)
            if reason:
                raise backends.BackendUnavailableError(reason)
        self._backend = name

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "_backend": self._backend}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Unpickling starts from an empty __dict__ (a pickle without the entry: "auto");
        # torch's load_state_dict also calls this, with state and groups only: keep the backend.
        if "_backend" not in state:
            state["_backend"] = self.__dict__.get("_backend", "auto")
        super().__setstate__(state)
        # Pickled before the option existed.
        self.defaults.setdefault("capturable", False)
        for group in self.param_groups:
            group.setdefault("capturable", False)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: val for k, val in param_group.items() if k != "params"}}
        self._check_group(merged)
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # sets: torch's own error below
            params = param_group["params"] = list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(
                    f"{self._NAME}: a parameter group lists the same tensor twice; "
                    "each parameter must appear once (it would be stepped twice)"
                )
        super().add_param_group(param_group)

    # -- step ------------------------------------------------------------------------------------
    # torch.amp.GradScaler.step sees this and, instead of unscaling the gradients itself, sets
    # ``self.grad_scale`` and ``self.found_inf`` for the step to use in its kernels (as torch's
    # fused Adam): see :mod:`fastopt.reference._amp` for what every backend does with them.
    _step_supports_amp_scaling = True

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], _Loss]) -> _Loss: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], _Loss]] = None) -> Optional[_Loss]:
        """Perform one optimization step.

        Under ``torch.amp.GradScaler`` the gradients arrive scaled and are unscaled inside the
        step; a step whose gradients hold inf/NaN leaves parameters, state and step counts as
        they were. Traceable by torch.compile (``fullgraph=True``): see :meth:`_init_group`.

        Args:
            closure (callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpInputs(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        plans = []
        for group in self.param_groups:
            params: List[torch.Tensor] = []
            grads: List[torch.Tensor] = []
            steps: List[torch.Tensor] = []
            use_laps: List[bool] = []
            s0: List[torch.Tensor] = []
            s1: List[torch.Tensor] = []
            s2: List[torch.Tensor] = []
            s3: List[torch.Tensor] = []
            buckets = self._init_group(group, params, grads, steps, use_laps, s0, s1, s2, s3)
            plans.append((group, buckets, params, grads, steps, use_laps, (s0, s1, s2, s3)))
        for group, buckets, params, grads, steps, use_laps, states in plans:
            keep_lr = group["capturable"] and not torch.compiler.is_compiling()  # a tensor lr: read in-kernel
            hyper = {
                key: val if key == "lr" and keep_lr else _host_value(val)
                for key, val in group.items()
                if key != "params"
            }
            for op, backend, start, end, new in buckets:
                self._step_bucket(
                    op,
                    backend,
                    hyper,
                    params[start:end],
                    grads[start:end],
                    steps[start:end],
                    use_laps[start:end],
                    [s[start:end] for s in states if s],
                    amp,
                    new,
                )
        return loss

    def _init_group(self, group, params, grads, steps, use_laps, *state_lists) -> Tuple[Tuple, ...]:
        """Validate ``group``, create missing state and fill the (empty) lists with the tensors of
        its parameters that have gradients, grouped by (device, dtype): ``state_lists`` get the
        op's state tensors in the order of its signature (:meth:`_state_keys`). Returns one
        ``(op, backend, start, end, new)`` per bucket: its slice of the lists and the indices, in
        the bucket, of the parameters whose state was created now.

        The first group's call validates every group, so bad input anywhere fails before any state
        changes. Under torch.compile, dynamo runs this method eagerly while tracing and guards on
        the state it leaves (as for torch.optim's optimizers, whose method of this name it
        special-cases): validation, backend choice and state creation stay out of the graph, which
        holds the step counts' increments and the backend's op calls.
        """
        if group is self.param_groups[0]:
            self._chosen = self._validate_groups()
        op = self._op(group)
        keys = self._state_keys(group)
        buckets = []
        with_grads = [p for p in group["params"] if p.grad is not None]
        for (device, dtype), bucket in _bucket_by_device_and_dtype(with_grads).items():
            chosen = self._chosen[(id(group), device, dtype)]
            backend = chosen.name
            _IMPLEMENTATIONS[(op, backend)] = chosen.fn
            step_device = device if chosen.device_steps else torch.device("cpu")
            new = tuple(i for i, p in enumerate(bucket) if len(self.state[p]) == 0)
            start = len(params)
            for p in bucket:
                state = self._state_of(p, group, step_device)
                params.append(p)
                grads.append(p.grad)
                steps.append(state["step"])
                use_laps.append(state["use_lap"])
                for key, out in zip(keys, state_lists):
                    out.append(state[key])
            buckets.append((op, backend, start, len(params), new))
        return tuple(buckets)

    def _validate_groups(self) -> Dict[Tuple[int, torch.device, torch.dtype], backends.ChosenBackend]:
        """Check every group; return the backend chosen for each (id(group), device, dtype) bucket,
        which :meth:`_init_group` uses (choosing there again would repeat the work every step)."""
        chosen = {}
        for group in self.param_groups:
            self._check_group(group)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_param_and_grad(p)
            if group["capturable"] and any(_sharded.is_dtensor(p) for p in params):
                raise ValueError(
                    f"{self._NAME}: capturable=True does not take FSDP2-sharded (DTensor) parameters: "
                    "their halo exchange runs collectives and host reads in the step"
                )
            for device, dtype in _bucket_by_device_and_dtype(params):
                choice = backends.choose(self._op(group), device, dtype, self._backend)
                if group["capturable"]:
                    reason = backends.why_not_capturable(choice.name, device)
                    if reason:
                        raise ValueError(f"{self._NAME}: capturable=True: {reason}")
                    check_lr(group["lr"], device)
                chosen[(id(group), device, dtype)] = choice
        return chosen

    def _check_param_and_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        assert g is not None  # callers pass only parameters that have a gradient
        if g.is_sparse:
            raise RuntimeError(f"{self._NAME} does not support sparse gradients")
        if not p.is_floating_point():
            raise TypeError(
                f"{self._NAME} optimizes real floating-point parameters; got a parameter of "
                f"dtype {p.dtype} (view complex parameters with torch.view_as_real)"
            )
        if _sharded.is_dtensor(p):
            _sharded.row_group(p)  # raises for placements the halo exchange does not handle
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"{self._NAME}: a gradient does not match its parameter: grad "
                f"{tuple(g.shape)} {g.dtype} on {g.device}, parameter {tuple(p.shape)} "
                f"{p.dtype} on {p.device}"
            )

    def _step_bucket(
        self,
        op: str,
        backend: str,
        group: Dict[str, Any],
        params: List[torch.Tensor],
        grads: List[torch.Tensor],
        steps: List[torch.Tensor],
        use_laps: List[bool],
        state_lists: List[List[torch.Tensor]],
        amp: "_AmpInputs",
        new: Tuple[int, ...],
    ) -> None:
        fn = _IMPLEMENTATIONS[(op, backend)]
        torch._foreach_add_(steps, 1)
        kernel_amp = amp.on(params[0].device)
        if torch.compiler.is_compiling():
            # Traced: the ops validate while tracing (their fake implementations) or raise at run
            # time; there is no bookkeeping to put back in a graph.
            self._run(fn, group, params, grads, state_lists, steps, use_laps, kernel_amp)
        else:
            try:
                if any(_sharded.is_dtensor(p) for p in params):
                    self._step_sharded(fn, group, params, grads, amp=kernel_amp)
                else:
                    self._run(fn, group, params, grads, state_lists, steps, use_laps, kernel_amp)
            except BaseException:
                # Put the bookkeeping back; the implementations validate before they write.
                torch._foreach_sub_(steps, 1)
                for i in new:
                    del self.state[params[i]]
                raise
        if amp.found_inf is not None:
            # The op skipped a step with non-finite gradients: take it off the counts too,
            # without reading found_inf on the host (as torch's fused Adam does).
            found_inf = amp.on(steps[0].device)["found_inf"]
            assert found_inf is not None  # moved from amp.found_inf, which is not None
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _step_sharded(self, fn: Callable, group: Dict[str, Any], params, grads, amp: Dict[str, Any]) -> None:
        """FSDP2: run on the local shards, halo-extended where the Laplacian crosses shards."""
        states = [self.state[p] for p in params]
        local_params, local_grads, local_states, *rest = _sharded.shard_views(params, grads, states)
        lists = [[s[key] for s in local_states] for key in self._state_keys(group)]
        self._run(
            fn,
            group,
            local_params,
            local_grads,
            lists,
            [s["step"] for s in local_states],
            [s["use_lap"] for s in local_states],
            amp,
        )
        _sharded.finish(*rest)
        self._after_sharded_step(group, params, grads, states, amp)

    def _state_of(self, p: torch.Tensor, group: Dict[str, Any], step_device: torch.device) -> Dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            # A float32 scalar, on the CPU as torch.optim.Adam keeps it unless fused or capturable,
            # on the parameter's device for backends that read it in their kernels.
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        elif state["step"].device != step_device:  # another backend wrote it (a checkpoint, a switch)
            state["step"] = state["step"].to(step_device)
        if "use_lap" not in state:
            # Decided at the parameter's first step and then frozen (ladam's rule).
            state["use_lap"] = bool(group["c2"] > 0 and p.numel() >= group["min_spatial_size"])
        self._init_state(state, p, group)
        return state

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        # Contiguous in logical order whatever p's layout: the stencil walks that order.
        return torch.zeros_like(p, memory_format=torch.contiguous_format)

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict saved by this class, by ladam (keys ``m``, ``v``, ``v_prev``, integer
        ``step``) or by torch.optim.Adam / Adagrad / RMSprop where the state means the same.

        Hyperparameters a foreign state_dict lacks (``c2``, ``stencil``, ...) keep the values of
        this optimizer's groups. Everything is checked before anything is loaded.
        """
        state_dict = dict(state_dict)
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups = []
        for saved, current in zip(saved_groups, self.param_groups):
            group = {**{k: val for k, val in current.items() if k != "params"}, **saved}
            self._check_group(group)
            groups.append(group)
        state_dict["param_groups"] = groups
        state_dict["state"] = {pid: self._translate_state(s) for pid, s in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)

    def _translate_state(self, state: Mapping[str, Any]) -> Dict[str, Any]:
        # Copies: torch's loader keeps tensors that need no cast, so a state_dict taken from a live
        # optimizer would otherwise be shared with it and each would corrupt the other's state.
        # Contiguous in logical order, as this class keeps its state (torch.optim keeps a
        # channels_last parameter's state channels_last; the fused backends refuse that layout).
        out = {
            self._LADAM_STATE_KEYS.get(k, k): val.clone(memory_format=torch.contiguous_format)
            if torch.is_tensor(val)
            else copy.deepcopy(val)
            for k, val in state.items()
        }
        if "step" in out and not torch.is_tensor(out["step"]):
            out["step"] = torch.tensor(float(out["step"]), dtype=torch.float32)
        return out

    # -- subclass hooks --------------------------------------------------------------------------
    def _op(self, group: Dict[str, Any]) -> str:
        raise NotImplementedError

    def _init_state(self, state: Dict[str, Any], p: torch.Tensor, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The state tensors the group's op takes, in the order of its signature."""
        raise NotImplementedError

    def _run(
        self, fn: Callable, group: Dict[str, Any], params, grads, state_lists, steps, use_laps, amp: Dict[str, Any]
    ) -> None:
        """Call the op: ``state_lists`` as :meth:`_state_keys` names them; ``amp`` holds its
        ``grad_scale`` and ``found_inf`` keywords."""
        raise NotImplementedError

    def _after_sharded_step(self, group: Dict[str, Any], params, grads, states, amp: Dict[str, Any]) -> None:
        """Fix-ups of statistics that span a whole row-sharded tensor (none by default)."""
