"""The random numbers of the training forward, kept so that an estimate's forward can draw them again.

A finite difference of gradients :math:`(g(\\theta + h v) - g(\\theta)) / h` needs the same function
at both points. With dropout active the training gradient :math:`g(\\theta)` saw the masks of the
training forward; a forward at :math:`\\theta + h v` draws other masks unless it starts from the same
generator state. :class:`ForwardRecorder` keeps, at each forward of the model with gradients
enabled, the generator states it started from (a forward pre-hook: a copy of the CPU generator's
5 KB state and of each CUDA generator's seed and offset, no device work), what it was called with,
and the parameters' version counters. :meth:`ForwardRecorder.replay_state` hands those states back
when the latest such forward is the one behind ``.grad`` as far as can be checked: the same inputs,
the parameters untouched since (an optimizer step bumps their versions), the same train/eval mode.

The states are replayed inside ``torch.random.fork_rng`` (:func:`fastopt.schedulers._hvp.replayed_rng`),
so the user's random stream after an estimate is the one it would be without it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten


class _Nesting(threading.local):
    depth = 0  # > 0 while an estimator runs its own forwards: never training forwards


_estimating = _Nesting()


@contextlib.contextmanager
def estimator_forwards() -> Iterator[None]:
    """Forwards inside this context are an estimator's own: no recorder keeps them."""
    depth = _estimating.depth
    _estimating.depth = depth + 1
    try:
        yield
    finally:
        _estimating.depth = depth


@dataclass
class GeneratorStates:
    """The default generators' states: the CPU one and one per CUDA device index."""

    cpu: Tensor
    cuda: Dict[int, Tensor]


@dataclass
class _Forward:
    states: GeneratorStates
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    versions: List[int]
    training: bool


def _cuda_indices(params: Sequence[Tensor]) -> List[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _same_inputs(recorded: Any, given: Any) -> bool:
    """Whether ``given`` is the recorded forward's input: the same objects, or equal tensors."""
    if recorded is given:
        return True
    a, spec_a = tree_flatten(recorded)
    b, spec_b = tree_flatten(given)
    if spec_a != spec_b:
        return False
    for x, y in zip(a, b):
        if torch.is_tensor(x) and torch.is_tensor(y):
            if x is not y and (
                x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y)
            ):
                return False
        elif torch.is_tensor(x) or torch.is_tensor(y) or x != y:
            return False
    return True


class _RecordingHook:
    """The pre-hook: hands each forward to its recorder while that lives. It holds the recorder
    weakly (the model must not keep the estimator alive), and a pickled or deep-copied model gets a
    hook that records nothing (``torch.save(model)`` keeps working; a copy is not the model)."""

    def __init__(self, recorder: "ForwardRecorder"):
        self._recorder: Optional[weakref.ReferenceType] = weakref.ref(recorder)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        recorder = self._recorder() if self._recorder is not None else None
        if recorder is not None:
            recorder._on_forward(module, args, kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._recorder = None


class ForwardRecorder:
    """Keeps the generator states of the latest forward of ``model`` run with gradients enabled.

    Registered as a forward pre-hook on ``model``; the hook is removed when the recorder is
    garbage-collected or :meth:`close` is called. Forwards of other modules and an estimator's own
    forwards are ignored. The latest
    forward's arguments are held (references, no copy) until the next one replaces them.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self._model = weakref.ref(model)
        self._params = list(params)
        self._cuda = _cuda_indices(self._params)
        self._latest: Optional[_Forward] = None
        self._handle = model.register_forward_pre_hook(_RecordingHook(self), with_kwargs=True)
        self._finalizer = weakref.finalize(self, self._handle.remove)

    def close(self) -> None:
        """Remove the hook from the model."""
        self._finalizer()
        self._latest = None

    def _on_forward(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if module is not self._model() or _estimating.depth or not torch.is_grad_enabled():
            return
        if self._cuda and torch.cuda.is_current_stream_capturing():
            # A captured graph replays its own offsets: no state to copy, nothing to match later.
            self._latest = None
            return
        states = GeneratorStates(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in self._cuda})
        self._latest = _Forward(states, args, dict(kwargs), [p._version for p in self._params], module.training)

    def replay_state(self, inputs: Any) -> Optional[GeneratorStates]:
        """The generator states the training forward on ``inputs`` started from, or None where the
        latest recorded forward cannot be shown to be that forward (other inputs, keyword
        arguments, parameters changed since, another train/eval mode, or no forward recorded)."""
        latest, model = self._latest, self._model()
        if latest is None or model is None or latest.kwargs or len(latest.args) != 1:
            return None
        if latest.training != model.training or latest.versions != [p._version for p in self._params]:
            return None
        return latest.states if _same_inputs(latest.args[0], inputs) else None
