"""PyTorch integration: adapt any torch optimizer's learning rate to the measured gradient noise.

:class:`NoiseAdaptiveOptimizer` wraps an optimizer (``torch.optim.SGD``, ``Adam``, ``fastopt.LAdam``,
...). Before each of its steps it sets the groups' ``lr`` from a :class:`~fastopt.noise.NoiseAdaptiveLR`
policy; the wrapped optimizer's own update runs untouched. The noise comes from one of two sources:

* **micro-batches of gradient accumulation** (nearly free): call :meth:`~NoiseAdaptiveOptimizer.
  record_micro_batch` after each micro-batch's ``backward()``. The wrapper keeps a flat fp32 copy
  of the running gradient sum ``S_{i-1}`` (one per device) and adds, after micro-batch ``i``
  (Welford's update, stable when the mean dominates),

  ``M2 += (i-1)/i * |S_i - i/(i-1) S_{i-1}|^2``,  i.e. ``M2 = sum_i |d_i - d_bar|^2``

  for the micro-batch gradients ``d_i = S_i - S_{i-1}``: per micro-batch one concatenation of the
  gradients and four passes over it, and one host sync per optimizer step.
* **per-sample gradients** (exact, costlier): :meth:`~NoiseAdaptiveOptimizer.per_sample_backward`
  computes them with ``torch.func.vmap(grad)`` in chunks, replaces the usual ``backward()`` (the
  mean gradient goes into ``.grad``) and records their statistics, combining chunks with Chan et
  al.'s parallel update (``O(chunk_size x P)`` memory).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, DefaultDict, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch

from .. import _validation as v
from .core import NoiseAdaptiveLR, NoiseStatistics, _check_keys, _scalar

__all__ = ["NoiseAdaptiveOptimizer", "per_sample_gradient_statistics"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _sum_sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_t |t|^2`` as a 0-dim float64 tensor on the first tensor's device (no host sync):
    one fused norm per (device, dtype), fp16/bf16 accumulated in fp32."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (_, dtype), bucket in buckets.items():
        norms = torch._foreach_norm(bucket, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        total += torch.stack(norms).to(device=device, dtype=torch.float64).square().sum()
    return total


# -- per-sample gradients ---------------------------------------------------------------------------
def per_sample_gradient_statistics(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Optional[Sequence[torch.Tensor]] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[NoiseStatistics, List[torch.Tensor], torch.Tensor]:
    """Per-sample gradients of ``loss_fn(model(x[None]), y[None])`` for every sample of
    ``(inputs, targets)``, reduced on the fly to ``(statistics, mean_grads, mean_loss)``:

    * ``statistics``: :class:`NoiseStatistics` of the per-sample gradients (``samples_per_row=1``);
    * ``mean_grads``: the mean gradient, one tensor per parameter (what ``backward()`` of the mean
      loss gives for models whose samples do not interact, e.g. no BatchNorm in training mode);
    * ``mean_loss``: the mean per-sample loss, a 0-dim tensor.

    ``params`` (default: every parameter of ``model`` that requires grad) are differentiated; the
    model's other parameters and buffers are held constant. ``chunk_size`` samples are
    differentiated at once (default: all), bounding memory at ``chunk_size x P`` gradient values.
    ``loss_fn`` must reduce by the mean (a batch of one sample is passed to it).
    """
    from torch.func import functional_call, grad_and_value, vmap

    v.nn_module("model", model)
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    batch = inputs.shape[0] if inputs.dim() else 0
    if batch < 2 or targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"inputs and targets must hold the same number >= 2 of samples along dim 0, got shapes "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    chunk_size = batch if chunk_size is None else chunk_size
    v.int_at_least(1)("chunk_size", chunk_size)
    named = dict(model.named_parameters())
    chosen = {id(p) for p in (params if params is not None else [p for p in named.values() if p.requires_grad])}
    free = {n: p.detach() for n, p in named.items() if id(p) in chosen}
    if len(free) != len(chosen):
        raise ValueError(
            "params must be parameters of model (found "
            f"{len(free)} of the {len(chosen)} given among model.named_parameters())"
        )
    fixed = {n: p.detach() for n, p in named.items() if id(p) not in chosen}
    fixed.update(dict(model.named_buffers()))

    def sample_loss(free_params, x, y):
        out = functional_call(model, {**fixed, **free_params}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    # randomness="different": dropout draws a mask per sample, as in an ordinary batched forward.
    per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")
    names = list(free)
    count = 0
    mean: Optional[List[torch.Tensor]] = None
    m2: Optional[torch.Tensor] = None
    loss_sum: Optional[torch.Tensor] = None
    for start in range(0, batch, chunk_size):
        grads, losses = per_sample(free, inputs[start : start + chunk_size], targets[start : start + chunk_size])
        n = losses.shape[0]
        chunk_mean = [grads[k].mean(0) for k in names]
        chunk_m2 = _sum_sq_norms([grads[k] - m for k, m in zip(names, chunk_mean)])
        chunk_loss = losses.detach().sum()
        if mean is None:
            count, mean, m2, loss_sum = n, chunk_mean, chunk_m2, chunk_loss
            continue
        assert m2 is not None and loss_sum is not None  # set with mean, by the first chunk
        # Chan, Golub & LeVeque: merge (count, mean, M2) of two sets without revisiting them.
        delta = torch._foreach_sub(chunk_mean, mean)
        m2 = m2 + chunk_m2 + _sum_sq_norms(delta) * (count * n / (count + n))
        torch._foreach_add_(mean, delta, alpha=n / (count + n))
        count += n
        loss_sum = loss_sum + chunk_loss
    assert mean is not None and m2 is not None and loss_sum is not None  # batch >= 2: one chunk or more
    stats = NoiseStatistics.from_moments(count, sum(m.numel() for m in mean), float(_sum_sq_norms(mean)), float(m2))
    return stats, mean, loss_sum / count


# -- the wrapper ----------------------------------------------------------------------------------------
class NoiseAdaptiveOptimizer:
    """Wrap ``optimizer`` so that each step runs at the learning rate a
    :class:`~fastopt.noise.NoiseAdaptiveLR` policy picks from the gradient noise of that step.

    Group ``g`` steps at ``lr_g = policy.lr * base_lr_g / policy.base_lr``, ``base_lr_g`` its ``lr``
    when wrapped; one group: exactly the policy's rate, in ``[min_lr, max_lr]``. Nothing else of
    the optimizer changes: its step, state and hyperparameters are its own.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        policy: a :class:`NoiseAdaptiveLR`; default one with ``base_lr`` the first group's lr and
            ``policy_options`` (``min_lr``, ``max_lr``, ``alpha``, ``cooldown``, ...).

    Per step, record the noise with :meth:`record_micro_batch` (after each micro-batch's
    ``backward()``, at least 2 per step) or :meth:`per_sample_backward`, then call :meth:`step`.
    A step with nothing recorded keeps the current lr (to measure only every few steps).
    If the recorded statistics are not finite (an fp16 overflow), the lr is kept.

    Example::

        opt = NoiseAdaptiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), max_lr=0.2)
        for x, y in loader:
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                loss = loss_fn(model(xb), yb) / 4
                loss.backward()
                opt.record_micro_batch(loss)
            opt.step()
            opt.zero_grad()
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, policy: Optional[NoiseAdaptiveLR] = None, **policy_options: Any
    ):
        v.torch_optimizer("optimizer", optimizer)
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        if policy is None:
            policy = NoiseAdaptiveLR(self.base_lrs[0], **policy_options)
        elif policy_options:
            raise ValueError(f"pass either policy or policy options, not both (got {sorted(policy_options)})")
        v.instance_of(NoiseAdaptiveLR, "a NoiseAdaptiveLR")("policy", policy)
        self.policy = policy
        self._layout_key: Optional[Tuple[int, ...]] = None  # see _layout_of
        self._layout: Dict[torch.device, Tuple[List[torch.Tensor], torch.Tensor]] = {}
        self._clear_pending()
        self._apply_lr()

    # -- what a torch optimizer offers, forwarded ----------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> DefaultDict[torch.Tensor, Any]:
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    @property
    def lr(self) -> float:
        """The policy's current learning rate (that of a single-group optimizer)."""
        return self.policy.lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``; also drops micro-batches recorded since the last step."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._clear_pending()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self.base_lrs.append(float(self.optimizer.param_groups[-1]["lr"]))
        self._apply_lr()

    def __repr__(self) -> str:
        return f"NoiseAdaptiveOptimizer(lr={self.policy.lr:.6g}, optimizer={self.optimizer!r})"

    # -- measuring ----------------------------------------------------------------------------------
    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _clear_pending(self) -> None:
        self._rows = 0
        self._with_grad: List[torch.Tensor] = []
        self._m2: Optional[torch.Tensor] = None
        self._pending_stats: Optional[NoiseStatistics] = None
        self._losses: List[Any] = []
        self._samples_per_row = 1

    @torch.no_grad()
    def record_micro_batch(
        self, loss: Union[float, torch.Tensor, None] = None, batch_size: Optional[int] = None
    ) -> None:
        """Record the micro-batch whose ``backward()`` just ran: its gradient is the change of
        ``.grad`` since the previous call (or since ``zero_grad()`` for the first).

        Args:
            loss: that micro-batch's loss (a number or a 0-dim tensor, read at :meth:`step`);
                the smoother sees the mean over the step's micro-batches.
            batch_size: samples per micro-batch, only to express ``B_simple`` in samples.
        """
        if self._pending_stats is not None:
            raise RuntimeError(
                "record_micro_batch: this step's gradients were already measured by "
                "per_sample_backward; use one source of noise per step"
            )
        v.optional(v.int_at_least(1))("batch_size", batch_size)
        params = self._params()
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                "record_micro_batch: no parameter of the optimizer has a gradient; call it after "
                "each micro-batch's backward()"
            )
        if any(p.grad is None for p in self._with_grad):
            raise RuntimeError(
                "record_micro_batch: a parameter's .grad became None between micro-batches of "
                "one step; call zero_grad() only after step()"
            )
        if any(cast(torch.Tensor, p.grad).is_sparse for p in with_grad):  # each has a grad (with_grad)
            raise RuntimeError("record_micro_batch does not support sparse gradients")
        layout = self._layout_of(params)
        i = self._rows + 1
        for plist, running in layout.values():
            # One flat copy per device: a handful of ops whatever the number of tensors (per-tensor
            # foreach ops cost 3x more on CPU for a 10-tensor CNN, from dispatch alone).
            flat = torch.cat([(p.grad if p.grad is not None else p.new_zeros(p.shape)).reshape(-1) for p in plist])
            if i == 1:
                running.copy_(flat)
                continue
            # running <- S_i - i/(i-1) S_{i-1} = d_i - mean(d_1..d_{i-1}); Welford: M2 += (i-1)/i |.|^2.
            running.mul_(-i / (i - 1)).add_(flat)
            assert self._m2 is not None  # created at the step's first micro-batch (i == 1)
            m2 = torch.dot(running, running).to(device=self._m2.device, dtype=torch.float64)
            self._m2 += m2 * ((i - 1) / i)
            running.copy_(flat)
        if i == 1:
            self._m2 = torch.zeros((), dtype=torch.float64, device=next(iter(layout.values()))[1].device)
        self._with_grad = with_grad
        self._rows = i
        self._samples_per_row = batch_size or self._samples_per_row
        if loss is not None:
            self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)

    def _layout_of(self, params: List[torch.Tensor]) -> Dict[torch.device, Tuple[List[torch.Tensor], torch.Tensor]]:
        """Per device: its parameters and a flat buffer for their running gradient sum (fp32, or
        fp64 where a parameter is fp64), built once and kept while the parameters stay the same."""
        key = tuple(id(p) for p in params)
        if self._layout_key != key:
            by_device: Dict[torch.device, List[torch.Tensor]] = {}
            for p in params:
                by_device.setdefault(p.device, []).append(p)
            self._layout = {}
            for device, plist in by_device.items():
                dtype = torch.float64 if any(p.dtype == torch.float64 for p in plist) else torch.float32
                self._layout[device] = (plist, torch.empty(sum(p.numel() for p in plist), dtype=dtype, device=device))
            self._layout_key = key
        return self._layout

    def per_sample_backward(
        self,
        model: torch.nn.Module,
        loss_fn: Callable,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """In place of ``loss_fn(model(inputs), targets).backward()``: add the mean per-sample
        gradient to ``.grad`` and record the per-sample statistics for the next :meth:`step`
        (:func:`per_sample_gradient_statistics`, over the optimizer's parameters). Returns the mean
        loss (detached). Models whose samples interact (BatchNorm in training mode) need
        :meth:`record_micro_batch` instead."""
        if self._rows or self._pending_stats is not None:
            raise RuntimeError(
                "per_sample_backward: gradients were already recorded for this step; call it once "
                "per step with the whole batch (chunk_size bounds its memory)"
            )
        params = [p for p in self._params() if p.requires_grad]
        stats, mean_grads, loss = per_sample_gradient_statistics(
            model, loss_fn, inputs, targets, params=params, chunk_size=chunk_size
        )
        chosen = {id(p) for p in params}
        model_order = [p for p in model.parameters() if id(p) in chosen]  # the order of mean_grads
        with torch.no_grad():
            for p, g in zip(model_order, mean_grads):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad += g
        self._pending_stats = stats
        self._losses.append(loss)
        return loss

    # -- stepping --------------------------------------------------------------------------------------
    def _statistics(self) -> Optional[NoiseStatistics]:
        if self._pending_stats is not None:
            return self._pending_stats
        if self._rows == 0:
            return None
        if self._rows == 1:
            raise ValueError(
                "step: only 1 micro-batch was recorded since the last step; gradient noise needs "
                "record_micro_batch() after each of at least 2 micro-batches (4 or more give "
                "usable estimates), or per_sample_backward()"
            )
        # The running buffers hold S_k, the sum of the recorded micro-batch gradients.
        total_sq = sum(float(torch.dot(running, running)) for _, running in self._layout.values())
        k = self._rows
        assert self._m2 is not None  # two or more micro-batches recorded: record_micro_batch made it
        return NoiseStatistics(
            k,
            sum(p.numel() for p in self._with_grad),
            self._samples_per_row,
            total_sq / (k * k),
            float(self._m2) / (k - 1),
        )

    def step(
        self, closure: Optional[Callable[[], Any]] = None, loss: Union[float, torch.Tensor, None] = None
    ) -> Optional[float]:
        """Adapt the lr from what was recorded since the last step, then run the optimizer's step.

        Args:
            closure: passed to the optimizer's ``step`` (it runs after the lr is set).
            loss: the loss for the smoother; default the mean of the recorded losses.
        """
        stats = self._statistics()
        saved = (self.policy.state_dict(), [g["lr"] for g in self.param_groups])
        try:
            if (
                stats is not None
                and math.isfinite(stats.mean_grad_sq_norm)
                and math.isfinite(stats.trace_row_covariance)
            ):
                if loss is None:
                    if not self._losses:
                        raise ValueError("step: pass loss=..., or a loss to record_micro_batch / per_sample_backward")
                    loss = _mean_loss(self._losses)
                self.policy.adapt_from_statistics(stats, loss)
                self._apply_lr()
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        except BaseException:
            # A failed step leaves the policy and the learning rates as they were.
            self.policy.load_state_dict(saved[0])
            for group, lr in zip(self.param_groups, saved[1]):
                group["lr"] = lr
            raise
        self._clear_pending()
        return result

    def _apply_lr(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            # base / base_lr first: exactly 1 for a group at the policy's base rate, whose lr is then
            # exactly the policy's.
            lr = self.policy.lr * (base / self.policy.base_lr)
            if isinstance(group["lr"], torch.Tensor):  # Adam(lr=tensor) for capturable/fused steps
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's state_dict, the policy's and the base learning rates (micro-batches
        recorded for a step not yet taken are not saved)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "noise_adaptive_lr": self.policy.state_dict(),
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        _check_keys(state_dict, {"optimizer": 0, "noise_adaptive_lr": 0, "base_lrs": 0}, "NoiseAdaptiveOptimizer")
        base_lrs = state_dict["base_lrs"]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"NoiseAdaptiveOptimizer.load_state_dict: the state has {len(base_lrs)} base "
                f"learning rates for {len(self.optimizer.param_groups)} parameter groups"
            )
        saved_policy = self.policy.state_dict()
        self.policy.load_state_dict(copy.deepcopy(state_dict["noise_adaptive_lr"]))
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except BaseException:
            self.policy.load_state_dict(saved_policy)
            raise
        self.base_lrs = [float(x) for x in base_lrs]
        self._clear_pending()
        self._apply_lr()


def _mean_loss(losses: List[Any]) -> float:
    """The mean of recorded losses: tensors on one device are averaged there, with one host sync."""
    if all(isinstance(x, torch.Tensor) and x.numel() == 1 for x in losses) and len({x.device for x in losses}) == 1:
        return _scalar(torch.stack([x.reshape(()) for x in losses]).double().mean(), "loss")
    return sum(_scalar(x, "loss") for x in losses) / len(losses)
