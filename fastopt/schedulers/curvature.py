r"""CurvatureEstimator: the local curvature of a model's loss from gradients or Hessian-vector products.

The curvature at parameters :math:`\theta` (the seed's definition) is

.. math::
    \kappa(\theta) = \frac{\|\nabla^2 L(\theta)\|}{\|\nabla L(\theta)\|^2 + \epsilon}

with :math:`\|\nabla^2 L\|` estimated by one of

* ``method='secant'``: the secant (Barzilai-Borwein) curvature along the path since the
  previous estimate, :math:`\|y\| / \|s\|` with :math:`s = \theta_t - \theta_{t'}` and
  :math:`y = g_t - g_{t'}` (:math:`y = \bar H s`, :math:`\bar H` the Hessian averaged along the
  segment, so :math:`\|y\|/\|s\| \le \|\bar H\|_2`, equal along its top eigenvector). Through a
  scheduler it reuses the training gradients in ``.grad``: no extra pass. Successive estimates see
  different mini-batches, so :math:`y` also carries their gradient noise (an upward bias, smaller the
  longer the segment);
* ``method='secant_same_batch'``: the same with :math:`g_{t'}` re-evaluated at :math:`\theta_{t'}`
  on the current batch, which removes that noise, for one extra gradient per estimate;
* ``method='amortized_power'`` (the default): power iteration spread over the estimates, one iteration each: the
  vector :math:`v` is kept from one estimate to the next, :math:`\|H\| := \|Hv\|` and
  :math:`v \leftarrow Hv / \|Hv\|`, with :math:`Hv` a finite difference of gradients on the batch
  (one gradient beyond the training one in ``.grad``, drawing the training forward's dropout masks
  again; two where no training gradient is given, or where the model has active dropout modules
  and the training forward cannot be replayed: see :meth:`CurvatureEstimator.measure`). It
  converges to :math:`|\lambda|_{max}` while the Hessian changes slowly against the estimation
  interval;
* ``method='exact'``: :math:`|\lambda|_{max}` of the dense Hessian (``n`` Hessian-vector products and
  ``eigvalsh``), the reference for models of at most ``MAX_EXACT_PARAMETERS`` parameters;
* ``method='hutchinson'``: :math:`|\mathrm{tr}\, H|` from Hutchinson's estimator
  :math:`\mathrm{tr}\, H \approx \frac1k \sum_{i=1}^k v_i^\top H v_i` with Rademacher probes
  :math:`v_i \in \{-1, 1\}^n` (unbiased; variance :math:`\frac2k \sum_{a \ne b} H_{ab}^2`).
  For a positive semi-definite Hessian :math:`\mathrm{tr}\, H = \sum_j \lambda_j \ge \lambda_{max}`;
* ``method='power'``: :math:`|\lambda|_{max}`, the spectral norm, by power iteration with Rayleigh
  quotients :math:`\lambda \approx v^\top H v`, :math:`v \leftarrow Hv / \|Hv\|`.

Per-group figures (``groups=``) use the diagonal blocks :math:`H_{gg}` and gradients :math:`g_g`:
:math:`\kappa_g = \|H_{gg}\| / (\|g_g\|^2 + \epsilon)`. Hutchinson gets every block's trace from the
same probes, :math:`\mathrm{tr}\, H_{gg} = E[v_g^\top (Hv)_g]` (the cross-block terms have mean 0),
so they cost nothing extra; power iteration runs one vector per group beside the global one, all
in the same batched Hessian-vector product per iteration.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .. import _validation as v
from . import _hvp, _rng_replay

METHODS = ("secant", "secant_same_batch", "amortized_power", "hutchinson", "power", "exact")
# The gradient-only methods: they can use the training gradient (``grads``), need no double backward.
SECANT_METHODS = ("secant", "secant_same_batch", "amortized_power")
# Chosen by measurement (bench/results/curvature_accuracy.md, curvature_warmup.md, curvature_cpu.md):
# the cheapest method whose ||H|| followed |lambda|_max (full batch: median 0.99x the exact figure)
# and which kept the warmup experiment's conclusions; one gradient per estimate (dropout replayed).
# 'secant' costs nothing but measures the curvature along the optimizer's path (0.006-0.4x
# |lambda|_max, varying 10x along a run) and reversed the CNN warmup trend.
DEFAULT_METHOD = "amortized_power"
# The dense Hessian of 'exact' takes n Hessian-vector products and n^2 floats: 4096 parameters is
# 134 MB in float64 and a few seconds on a CPU core.
MAX_EXACT_PARAMETERS = 4096
HVP_CHOICES = ("auto",) + _hvp.HVP_METHODS
GROUPINGS = ("layers", "parameters")
GLOBAL = "__all__"  # the key of the whole-model figures inside the power iteration
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class GroupMeasurement:
    """Curvature figures of one parameter group (or of all parameters).

    Attributes:
        curvature: :math:`\\kappa = \\|H\\| / (\\|g\\|^2 + \\epsilon)`.
        hessian_norm: :math:`\\|H\\|`: ``abs(trace)`` (hutchinson), ``abs(top_eigenvalue)`` (power,
            exact), :math:`\\|y\\|/\\|s\\|` (secant methods) or :math:`\\|Hv\\|` (amortized_power).
        grad_norm_sq: :math:`\\|g\\|^2`.
        trace: Hutchinson's estimate of :math:`\\mathrm{tr}\\, H` (hutchinson), the exact trace (exact).
        trace_std_error: its standard error, sample std / sqrt(k) (hutchinson, k >= 2).
        top_eigenvalue: the largest-magnitude eigenvalue, signed: a Rayleigh quotient (power) or
            exact (exact).
        directional_curvature: :math:`s^\\top y / s^\\top s` along the secant step (secant methods;
            the Rayleigh quotient :math:`v^\\top Hv` for amortized_power).
        step_norm: :math:`\\|s\\|`, the length of the secant step (1 for amortized_power's unit vector).
    """

    curvature: float
    hessian_norm: float
    grad_norm_sq: float
    trace: Optional[float] = None
    trace_std_error: Optional[float] = None
    top_eigenvalue: Optional[float] = None
    directional_curvature: Optional[float] = None
    step_norm: Optional[float] = None


@dataclass
class CurvatureMeasurement(GroupMeasurement):
    """The figures of one estimate: the whole model's (the inherited fields), the loss, each group's
    (``groups``, empty unless the estimator has ``groups``), and how they were obtained."""

    loss: float = math.nan
    groups: Dict[str, GroupMeasurement] = field(default_factory=dict)
    method: str = ""
    hvp: str = ""
    n_products: int = 0  # Hessian-vector products computed
    n_gradients: int = 0  # gradient evaluations of the gradient-only methods beyond the training step's


def _rademacher(like: Sequence[Tensor], k: int, generator: torch.Generator) -> List[Tensor]:
    # Drawn on the generator's device (the first parameter's), then moved: parameters may span devices.
    return [
        torch.empty((k,) + tuple(p.shape), dtype=p.dtype, device=generator.device)
        .bernoulli_(0.5, generator=generator)
        .mul_(2)
        .sub_(1)
        .to(p.device)
        for p in like
    ]


def _dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """(n_params, k) float64: per parameter and probe, <a_i, b_i>."""
    return torch.stack([(x * y).reshape(x.shape[0], -1).sum(1, dtype=torch.float64) for x, y in zip(a, b)])


def _has_active_dropout(model: nn.Module) -> bool:
    """Whether a dropout module of ``model`` would draw a mask (training mode, p > 0); functional
    dropout inside a forward is invisible here."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())


# The reductions below run a few times per estimate over every parameter. An estimate of the
# gradient-only methods is one gradient plus these, so they are kept to a few calls: as per-tensor
# loops of float64 conversions and sums, the four of an amortized_power estimate (gradient check,
# step length, figures, vector update) took 0.81 ms on the CNN and 2.1 ms on the transformer of
# bench/bench_curvature.py (6% / 15% of a training step); with foreach norms 0.38 / 0.91 ms.
# Half-precision norms are taken in float32 (a float16 norm overflows past 65504).


def _stacked(scalars: Sequence[Tensor]) -> Tensor:
    """(n,) float64 on the first scalar's device (parameters may span devices)."""
    device = scalars[0].device
    return torch.stack([t.to(device) for t in scalars]).to(torch.float64)


def _as_vector(t: Tensor) -> Tensor:
    """``t`` flattened, in float32 at least."""
    t = t.detach().reshape(-1)
    return t.float() if t.element_size() < 4 else t


def _dots_flat(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """(n_params,) float64: per parameter, <a, b> (accumulated in float32 or the tensors' dtype)."""
    return _stacked([torch.dot(_as_vector(x), _as_vector(y)) for x, y in zip(a, b)])


def _sq_norms(tensors: Sequence[Tensor]) -> Tensor:
    """(n_params,) float64: per tensor, ||t||^2, from one foreach norm per device."""
    tensors = [t.detach() for t in tensors]
    dtype = torch.float32 if tensors[0].element_size() < 4 else None
    if len({t.device for t in tensors}) == 1:
        return _stacked(torch._foreach_norm(tensors, dtype=dtype)).pow(2)
    return _stacked([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]).pow(2)


def _leading_slice(tree: Any, batch: int, size: int) -> Any:
    return tree_map(lambda t: t[:size] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == batch else t, tree)


class CurvatureEstimator:
    r"""Estimate :math:`\kappa = \|\nabla^2 L\| / \|\nabla L\|^2` of ``loss_fn(model(inputs), targets)``.

    Hessian-vector products come from :mod:`fastopt.schedulers._hvp`: by default
    (``hvp='auto'``) reverse-over-reverse, the gradient graph built once per estimate and all
    probes in one batched backward pass; if the model's ops lack double backward it falls back,
    with a warning, to forward-over-reverse (torch.func ``vmap`` over ``jvp`` of ``grad``) and
    then to finite differences of first-order gradients. An estimate changes nothing the training
    run sees: parameters, ``.grad``, buffers (BatchNorm statistics) and the global random number
    generators are as they were (dropout inside an estimate uses the estimator's own seed, or
    replays the training forward's masks; see below).

    Args:
        model (nn.Module): the model; its trainable parameters (``requires_grad``) are the
            variables of :math:`L` unless ``parameters`` narrows them.
        loss_fn (callable or None): ``loss_fn(model(inputs), targets)`` returns the scalar loss;
            it may unpack a model output that is a dict or tuple. ``None``: ``model(inputs)`` is
            the loss itself and ``targets`` are ignored.
        method (str): ``'secant'`` (:math:`\|H\| := \|y\|/\|s\|` along the path since the previous
            estimate, from gradients only), ``'secant_same_batch'`` (the same, both gradients on the
            current batch), ``'amortized_power'`` (:math:`\|H\| := \|Hv\|`, one power iteration per
            estimate by differences of gradients), ``'hutchinson'`` (:math:`\|H\| := |\mathrm{tr}\, H|`),
            ``'power'`` (:math:`\|H\| := |\lambda|_{max}` by power iteration) or ``'exact'``
            (:math:`|\lambda|_{max}` of the dense Hessian, small models only). Default:
            ``'amortized_power'``, the cheapest that followed the exact figure
            (bench/results/curvature_accuracy.md, curvature_cpu.md).

    **The gradient-only methods** (``'secant'``, ``'secant_same_batch'``, ``'amortized_power'``) need
    no double backward. A secant needs two points: the first estimate (or one at the same parameters
    as the previous) takes a central difference along the gradient, :math:`s = 2h\, g` (relative
    length ``fd_relative_step``, default :math:`\epsilon_{mach}^{1/3}`), two gradients on the batch
    (three without ``grads``); later ones pair the current point with the previous estimate's.
    ``grads`` (:meth:`estimate`, :meth:`measure`; the schedulers pass the parameters' ``.grad``) is
    the gradient of the loss on ``inputs`` at the current parameters: with it ``'secant'`` costs no
    pass at all, ``'secant_same_batch'`` and ``'amortized_power'`` one gradient; without it each
    computes the current gradient too. **Dropout**: a gradient that pairs with ``grads`` must see
    the training forward's masks. These estimators (with ``use_grad``) put a forward pre-hook on
    the model that keeps the generator states each forward with gradients enabled starts from
    (:class:`~fastopt.schedulers._rng_replay.ForwardRecorder`: a copy of the CPU state, the CUDA
    seeds and offsets, no device work) and replay them where the latest such forward is the one
    behind ``grads``: called with the same ``inputs`` (the same tensors or equal ones), the
    parameters unchanged since (their version counters), the same train/eval mode. So construct
    the estimator before the training loop. Otherwise, with active ``nn.Dropout`` modules,
    ``'amortized_power'`` takes a central difference of two gradients of its own. The user's random
    stream is restored after every estimate either way. Under
    ``torch.amp.GradScaler`` unscale ``.grad`` first (``scaler.unscale_(optimizer)``); with gradient
    accumulation construct the scheduler's estimator with ``use_grad=False``. The loss in a
    measurement from ``grads`` is NaN (no forward ran). Per-group figures use the rows of the
    group, :math:`\|y_g\| / \|s_g\|` (:math:`\|(Hv)_g\| / \|v_g\|`), so they include the coupling
    to other groups.

    Keyword Args:
        n_samples (int): Rademacher probes per Hutchinson estimate. Default: 10 (the seed's).
        n_iterations (int): power iterations per estimate. Default: 5 (the seed's).
        tol (float or None): stop the power iteration early once every Rayleigh quotient changes
            by at most ``tol`` relative. Default: None (always ``n_iterations``).
        hvp (str): ``'auto'``, ``'reverse_over_reverse'``, ``'reverse_over_reverse_loop'``,
            ``'forward_over_reverse'`` or ``'finite_difference'``. Default: ``'auto'`` (the first
            that works of reverse-over-reverse, its loop, forward-over-reverse, finite
            differences). For hundreds of probes per pass ``'forward_over_reverse'`` measured
            faster (1.4-2.5x on small models, CPU); for a handful, reverse-over-reverse.
        groups: per-group figures in :meth:`measure` / :meth:`estimate_per_group`: ``'layers'``
            (one group per module owning parameters, keyed by module name, ``''`` for the root),
            ``'parameters'`` (one per parameter name), a mapping name -> parameters, or an
            optimizer (one per param group, keyed by the group's ``'name'`` or its index).
            Default: None.
        parameters (iterable of Tensor or None): the parameters to measure curvature in
            (:math:`H` is then the block of those); default all trainable parameters.
        estimation_batch_size (int or None): estimate on the first ``estimation_batch_size``
            samples of ``inputs`` and ``targets`` only (every tensor whose leading dimension equals
            the batch size is sliced), to cut the cost. Default: None (the whole batch).
        max_probes_per_pass (int or None): Hutchinson probes per batched pass (bounds the memory
            of k probe-sized tensors); default all in one pass.
        eps (float): added to :math:`\|g\|^2`. Default: 1e-8 (the seed's).
        math_attention (bool): run ``scaled_dot_product_attention`` on its math kernel during
            estimates; its fused kernels have no double backward. Default: True.
        fd_relative_step (float or None): the finite-difference step relative to
            :math:`\max(1, \mathrm{rms}(\theta))`; default :math:`\epsilon_{mach}^{1/3}`.
        seed (int): seeds the probes and the forward passes of estimates. Default: 0.
        use_grad (bool): whether the schedulers hand the secant methods the parameters' ``.grad``
            as the gradient on the estimation batch. Default: True.

    Attributes:
        curvature_history (list of float): :math:`\kappa` of each :meth:`estimate`.
        last_measurement (CurvatureMeasurement or None): the figures of the latest estimate.
        hvp_in_use (str or None): the engine ``'auto'`` settled on (None before the first estimate).

    Example::

        >>> est = CurvatureEstimator(model, nn.CrossEntropyLoss(), method="hutchinson", n_samples=5)
        >>> kappa = est.estimate(x, y)
        >>> est.hessian_trace(x, y, n_samples=100), est.top_eigenvalue(x, y, n_iterations=20)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable],
        method: str = DEFAULT_METHOD,
        *,
        n_samples: int = 10,
        n_iterations: int = 5,
        tol: Optional[float] = None,
        hvp: str = "auto",
        groups: Union[None, str, Mapping[str, Iterable[Tensor]], torch.optim.Optimizer] = None,
        parameters: Optional[Iterable[Tensor]] = None,
        estimation_batch_size: Optional[int] = None,
        max_probes_per_pass: Optional[int] = None,
        eps: float = 1e-8,
        math_attention: bool = True,
        fd_relative_step: Optional[float] = None,
        seed: int = 0,
        use_grad: bool = True,
    ):
        v.nn_module("model", model)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        v.one_of(METHODS)("method", method)
        v.int_at_least(1)("n_samples", n_samples)
        v.int_at_least(1)("n_iterations", n_iterations)
        v.optional(v.at_least(0.0))("tol", tol)
        v.one_of(HVP_CHOICES)("hvp", hvp)
        v.optional(v.int_at_least(1))("estimation_batch_size", estimation_batch_size)
        v.optional(v.int_at_least(1))("max_probes_per_pass", max_probes_per_pass)
        v.at_least(0.0, finite=True)("eps", eps)
        v.optional(v.finite_positive)("fd_relative_step", fd_relative_step)
        v.int_at_least(0)("seed", seed)
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.n_samples = n_samples
        self.n_iterations = n_iterations
        self.tol = tol
        self.hvp = hvp
        self.estimation_batch_size = estimation_batch_size
        self.max_probes_per_pass = max_probes_per_pass
        self.eps = float(eps)
        self.math_attention = bool(math_attention)
        self.fd_relative_step = fd_relative_step
        self.names, self.params = self._select_parameters(parameters)
        self.groups = self._resolve_groups(groups)
        self.use_grad = bool(use_grad)
        n = sum(p.numel() for p in self.params)
        if method == "exact" and n > MAX_EXACT_PARAMETERS:
            raise ValueError(
                f"method='exact' builds the dense Hessian: {n} measured parameters is more than "
                f"MAX_EXACT_PARAMETERS={MAX_EXACT_PARAMETERS}; use 'secant', 'hutchinson' or 'power'"
            )
        # The secant methods' previous point: (parameters, gradient) at the latest estimate.
        self._secant_point: Optional[Tuple[List[Tensor], List[Tensor]]] = None
        self._power_vector: Optional[List[Tensor]] = None  # amortized_power's current unit vector
        self.curvature_history: List[float] = []
        self.last_measurement: Optional[CurvatureMeasurement] = None
        self.hvp_in_use: Optional[str] = None
        self._resolved: Dict[str, str] = {}  # source kind ('inputs' or 'loss') -> engine 'auto' settled on
        self._generator = torch.Generator().manual_seed(seed)
        # The generator states of the training forwards, replayed where a gradient pairs with .grad.
        self._recorder = _rng_replay.ForwardRecorder(model, self.params) if self.wants_grad else None

    # -- configuration ---------------------------------------------------------------------------
    def _select_parameters(self, parameters) -> Tuple[List[str], List[Tensor]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if parameters is not None:
            wanted = list(parameters)
            by_id = {id(p): (n, p) for n, p in self.model.named_parameters()}
            for i, p in enumerate(wanted):
                if not torch.is_tensor(p) or id(p) not in by_id:
                    raise ValueError(f"parameters[{i}] is not a parameter of model")
                if not p.requires_grad:
                    raise ValueError(f"parameters[{i}] ({by_id[id(p)][0]}) does not require grad")
            if len({id(p) for p in wanted}) != len(wanted):
                raise ValueError("parameters lists the same tensor twice")
            named = [by_id[id(p)] for p in wanted]
        if not named:
            raise ValueError("model has no trainable parameters (none requires grad): nothing to measure")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"the measured parameters must share one floating-point dtype, got {sorted(map(str, dtypes))}"
            )
        return [n for n, _ in named], [p for _, p in named]

    def _resolve_groups(self, groups) -> Dict[str, List[int]]:
        if groups is None:
            return {}
        index = {id(p): i for i, p in enumerate(self.params)}
        out: Dict[str, List[int]] = {}
        if isinstance(groups, str):
            v.one_of(GROUPINGS)("groups", groups)
            for i, name in enumerate(self.names):
                key = name.rpartition(".")[0] if groups == "layers" else name
                out.setdefault(key, []).append(i)
            return out
        if isinstance(groups, torch.optim.Optimizer):
            items = [(str(g.get("name", i)), g["params"]) for i, g in enumerate(groups.param_groups)]
        elif isinstance(groups, Mapping):
            items = [(str(k), val) for k, val in groups.items()]
        else:
            raise TypeError(
                f"groups must be None, one of {GROUPINGS}, a mapping name -> parameters or an "
                f"optimizer, got {type(groups).__name__}"
            )
        for key, tensors in items:
            if key in out:
                raise ValueError(f"groups: the name {key!r} appears twice")
            tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
            idx = []
            for p in tensors:
                if id(p) not in index:
                    raise ValueError(
                        f"groups[{key!r}] holds a tensor that is not among the measured parameters "
                        "(the model's trainable parameters, or `parameters`)"
                    )
                idx.append(index[id(p)])
            if not idx:
                raise ValueError(f"groups[{key!r}] is empty")
            out[key] = idx
        return out

    # -- public API ------------------------------------------------------------------------------
    @property
    def wants_grad(self) -> bool:
        """Whether a scheduler should pass the training gradient (``.grad``) as ``grads``."""
        return self.use_grad and self.method in SECANT_METHODS

    def estimate(
        self, inputs: Any, targets: Any = None, *, grads: Optional[Sequence[Optional[Tensor]]] = None
    ) -> float:
        """:math:`\\kappa` at the current parameters (by ``method``); appended to
        ``curvature_history``. Non-finite when the loss or gradient is (nothing is clipped).
        ``grads``: the gradient on ``inputs`` at the current parameters, if the caller has it
        (one tensor per measured parameter; used by the secant methods only)."""
        m = self.measure(inputs, targets, grads=grads)
        self.curvature_history.append(m.curvature)
        return m.curvature

    def estimate_from_loss(self, loss: Tensor, *, grads: Optional[Sequence[Optional[Tensor]]] = None) -> float:
        """:math:`\\kappa` from a loss whose autograd graph is still alive (e.g. after
        ``loss.backward(retain_graph=True)``), without another forward pass; appended to
        ``curvature_history``. Only reverse-over-reverse products can use such a graph; the secant
        method differentiates it once (no graph needed when ``grads`` is given), and
        ``'secant_same_batch'`` cannot work from a loss (it needs the batch)."""
        m = self.measure_from_loss(loss, grads=grads)
        self.curvature_history.append(m.curvature)
        return m.curvature

    def estimate_per_group(
        self, inputs: Any, targets: Any = None, *, grads: Optional[Sequence[Optional[Tensor]]] = None
    ) -> Dict[str, float]:
        """:math:`\\kappa_g` of each group (needs ``groups``); also appends the global :math:`\\kappa`
        to ``curvature_history``."""
        if not self.groups:
            raise ValueError(
                "estimate_per_group needs groups: construct the estimator with groups='layers', "
                "'parameters', a mapping name -> parameters or an optimizer"
            )
        m = self.measure(inputs, targets, grads=grads)
        self.curvature_history.append(m.curvature)
        return {k: g.curvature for k, g in m.groups.items()}

    def measure(
        self, inputs: Any, targets: Any = None, *, grads: Optional[Sequence[Optional[Tensor]]] = None
    ) -> CurvatureMeasurement:
        """All figures of one estimate (see :class:`CurvatureMeasurement`); no history entry."""
        if self.method in SECANT_METHODS:
            objective, sliced = self._objective(inputs, targets)
            # A gradient of the whole batch does not pair with gradients of its leading samples.
            if not sliced and grads is not None and self._recorder is not None:
                objective.replay = self._recorder.replay_state(inputs)
            if self.method == "amortized_power":
                return self._amortized_power(objective, None if sliced else grads)
            return self._secant(objective, None if sliced else grads)
        return self._measure(self._source(inputs, targets), self.method, self.n_samples, self.n_iterations)

    def measure_from_loss(
        self, loss: Tensor, *, grads: Optional[Sequence[Optional[Tensor]]] = None
    ) -> CurvatureMeasurement:
        """:meth:`measure` from a loss whose graph is alive; see :meth:`estimate_from_loss`."""
        if self.method == "amortized_power":
            return self._amortized_power_from_loss(loss)
        if self.method in SECANT_METHODS:
            return self._secant_from_loss(loss, grads)
        return self._measure(self._loss_source(loss), self.method, self.n_samples, self.n_iterations)

    def hessian_trace(self, inputs: Any, targets: Any = None, n_samples: Optional[int] = None) -> float:
        """Hutchinson's estimate of :math:`\\mathrm{tr}\\, \\nabla^2 L` with ``n_samples`` Rademacher
        probes (default ``self.n_samples``), whatever ``method`` is."""
        n = self.n_samples if n_samples is None else n_samples
        v.int_at_least(1)("n_samples", n)
        trace = self._measure(self._source(inputs, targets), "hutchinson", n, self.n_iterations).trace
        assert trace is not None  # the hutchinson method always sets it
        return trace

    def top_eigenvalue(self, inputs: Any, targets: Any = None, n_iterations: Optional[int] = None) -> float:
        """The eigenvalue of :math:`\\nabla^2 L` of largest magnitude (signed), by ``n_iterations``
        power iterations (default ``self.n_iterations``), whatever ``method`` is."""
        n = self.n_iterations if n_iterations is None else n_iterations
        v.int_at_least(1)("n_iterations", n)
        top = self._measure(self._source(inputs, targets), "power", self.n_samples, n).top_eigenvalue
        assert top is not None  # the power method always sets it
        return top

    def hessian_vector_products(self, inputs: Any, targets: Any, vectors: Sequence[Tensor]) -> List[Tensor]:
        """:math:`H v_i` for a batch of vectors: ``vectors[j]`` has shape ``(k, *p_j.shape)`` for the
        j-th measured parameter (order of ``self.names``); the result has the same shapes."""
        vectors = list(vectors)
        if len(vectors) != len(self.params):
            raise ValueError(
                f"vectors must hold one tensor per measured parameter ({len(self.params)}), got {len(vectors)}"
            )
        k = vectors[0].shape[0] if torch.is_tensor(vectors[0]) and vectors[0].dim() > 0 else None
        for j, (t, p) in enumerate(zip(vectors, self.params)):
            if not torch.is_tensor(t) or tuple(t.shape) != (k,) + tuple(p.shape):
                raise ValueError(
                    f"vectors[{j}] must have shape (k, *{tuple(p.shape)}) with the same k for all, "
                    f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
                )
        vectors = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(vectors, self.params)]
        return self._first_products(self._source(inputs, targets), vectors)[1]

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """History, the probe generator's state, the resolved HVP engine and the secant methods'
        previous point; plain types and tensors, so ``torch.load(weights_only=True)`` reads it."""
        last = self.last_measurement
        point = self._secant_point
        return {
            "secant_point": None
            if point is None
            else {"params": [t.clone() for t in point[0]], "grads": [t.clone() for t in point[1]]},
            "power_vector": None if self._power_vector is None else [t.clone() for t in self._power_vector],
            "curvature_history": list(self.curvature_history),
            "hvp_in_use": self.hvp_in_use,
            "resolved": dict(self._resolved),
            "generator": self._generator.get_state(),
            "last_measurement": None if last is None else dataclasses.asdict(last),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"curvature_history", "hvp_in_use", "generator"} - set(state_dict)
        if missing:
            raise KeyError(f"CurvatureEstimator state_dict lacks {sorted(missing)}")
        self._generator.set_state(state_dict["generator"])
        self.curvature_history = list(state_dict["curvature_history"])
        self.hvp_in_use = state_dict["hvp_in_use"]
        self._resolved = dict(state_dict.get("resolved", {}))
        last = state_dict.get("last_measurement")
        if last is not None:
            last = dict(last)
            last["groups"] = {k: GroupMeasurement(**g) for k, g in last.get("groups", {}).items()}
            last = CurvatureMeasurement(**last)
        self.last_measurement = last
        point = state_dict.get("secant_point")
        self._secant_point = (
            None
            if point is None
            else (self._like_params(point["params"], "secant_point"), self._like_params(point["grads"], "secant_point"))
        )
        vector = state_dict.get("power_vector")
        self._power_vector = None if vector is None else self._like_params(vector, "power_vector")

    def _like_params(self, tensors: Sequence[Tensor], what: str) -> List[Tensor]:
        tensors = list(tensors)
        if [tuple(t.shape) for t in tensors] != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"CurvatureEstimator state_dict: {what} does not match the measured parameters' shapes")
        return [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(tensors, self.params)]

    # -- sources of Hessian-vector products ------------------------------------------------------
    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self._generator))

    def _objective(self, inputs: Any, targets: Any) -> Tuple[_hvp.Objective, bool]:
        """The loss on (the leading ``estimation_batch_size`` samples of) the batch, and whether it
        was sliced."""
        forward_seed = self._draw_seed()  # drawn first by every source: the same probes follow
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "CurvatureEstimator cannot differentiate inside torch.inference_mode(); "
                "call it outside (torch.no_grad() is fine: it enables grad itself)"
            )
        sliced = False
        if self.estimation_batch_size is not None:
            leaves = [t for t in tree_flatten(inputs)[0] if torch.is_tensor(t) and t.dim() > 0]
            if not leaves:
                raise ValueError("estimation_batch_size needs inputs holding a tensor with a batch dimension")
            batch = leaves[0].shape[0]
            if self.estimation_batch_size < batch:
                inputs = _leading_slice(inputs, batch, self.estimation_batch_size)
                targets = _leading_slice(targets, batch, self.estimation_batch_size)
                sliced = True
        objective = _hvp.Objective(
            self.model, self.loss_fn, self.names, self.params, inputs, targets, forward_seed, self.math_attention
        )
        return objective, sliced

    def _source(self, inputs: Any, targets: Any):
        objective, _ = self._objective(inputs, targets)

        def make(name: str, verify: bool):
            if name == "finite_difference":
                return _hvp.FiniteDifference(objective, self.fd_relative_step)
            if name == "forward_over_reverse":
                return _hvp.ForwardOverReverse(objective)
            return _hvp.ENGINES[name](objective, verify=verify)

        order = _hvp.AUTO_ORDER if self.hvp == "auto" else (self.hvp,)
        return "inputs", make, order

    def _loss_source(self, loss: Tensor):
        self._draw_seed()  # the forward seed _source draws: probes then match those of estimate(inputs, targets)
        _hvp.check_scalar_loss(loss, "the loss passed in")
        if loss.grad_fn is None:
            raise ValueError(
                "the loss passed in has no autograd graph (grad_fn is None): compute it with "
                "gradients enabled from the model's parameters"
            )

        def make(name: str, verify: bool):
            return _hvp.ReverseOverReverse.from_loss(
                loss, self.params, batched=(name == "reverse_over_reverse"), verify=verify
            )

        if self.hvp in ("forward_over_reverse", "finite_difference"):
            raise ValueError(
                f"hvp={self.hvp!r} needs inputs and targets to re-evaluate the loss; a loss graph "
                "supports only 'reverse_over_reverse' (or 'auto')"
            )
        order = ("reverse_over_reverse", "reverse_over_reverse_loop") if self.hvp == "auto" else (self.hvp,)
        return "loss", make, order

    def _first_products(self, source, vectors: Sequence[Tensor]):
        """(engine, H @ vectors): tries the engines of ``source`` in order until one works."""
        kind, make, order = source
        # The graph walk for ops without double backward runs until an engine has worked once:
        # the graph's structure is the same at every estimate of a model.
        verify = kind not in self._resolved
        if kind in self._resolved:
            order = (self._resolved[kind],)
        failures = []
        for name in order:
            try:
                engine = make(name, verify)
                products = engine.hvp(vectors)
            except _OUT_OF_MEMORY:
                raise
            except (RuntimeError, NotImplementedError) as err:
                if len(order) == 1:
                    raise
                failures.append((name, err))
                continue
            if failures:
                reasons = "; ".join(f"{n}: {type(e).__name__}: {str(e).splitlines()[0][:200]}" for n, e in failures)
                warnings.warn(
                    f"CurvatureEstimator: using {name} Hessian-vector products from now on ({reasons})", stacklevel=4
                )
            self._resolved[kind] = name
            self.hvp_in_use = name
            return engine, products
        reasons = "\n".join(f"  {n}: {type(e).__name__}: {e}" for n, e in failures)
        raise RuntimeError(f"CurvatureEstimator: no Hessian-vector product method worked:\n{reasons}") from failures[
            -1
        ][1]

    # -- the estimators --------------------------------------------------------------------------
    def _measure(self, source, method: str, n_samples: int, n_iterations: int) -> CurvatureMeasurement:
        device = self.params[0].device
        generator = torch.Generator(device=device).manual_seed(self._draw_seed())
        if method == "hutchinson":
            engine, figures, n_products = self._hutchinson(source, n_samples, generator)
        elif method == "exact":
            engine, figures, n_products = self._exact(source)
        else:
            engine, figures, n_products = self._power(source, n_iterations, generator)
        grad_sq = _sq_norms(engine.grads)
        measured = {}
        for key, idx in [(GLOBAL, list(range(len(self.params))))] + list(self.groups.items()):
            trace, se, top = figures[key]
            g_sq = float(grad_sq[idx].sum())
            norm = abs(trace) if method == "hutchinson" else abs(top)  # power and exact: |lambda|_max
            measured[key] = GroupMeasurement(norm / (g_sq + self.eps), norm, g_sq, trace, se, top)
        whole = measured.pop(GLOBAL)
        assert self.hvp_in_use is not None  # _first_products set it: every estimate calls it first
        m = CurvatureMeasurement(
            **vars(whole),
            loss=float(engine.loss),
            groups=measured,
            method=method,
            hvp=self.hvp_in_use,
            n_products=n_products,
        )
        self.last_measurement = m
        return m

    def _hutchinson(self, source, n_samples: int, generator: torch.Generator):
        chunk = self.max_probes_per_pass or n_samples
        engine, dot_chunks = None, []
        for start in range(0, n_samples, chunk):
            probes = _rademacher(self.params, min(chunk, n_samples - start), generator)
            if engine is None:
                engine, products = self._first_products(source, probes)
            else:
                products = engine.hvp(probes)
            dot_chunks.append(_dots(probes, products))
        dots = torch.cat(dot_chunks, dim=1)  # (n_params, k): v_p . (Hv)_p
        figures = {}
        for key, idx in [(GLOBAL, list(range(len(self.params))))] + list(self.groups.items()):
            samples = dots[idx].sum(0)
            se = float(samples.std() / math.sqrt(n_samples)) if n_samples > 1 else None
            figures[key] = (float(samples.mean()), se, None)
        return engine, figures, n_samples

    def _power(self, source, n_iterations: int, generator: torch.Generator):
        supports = [(GLOBAL, list(range(len(self.params))))] + list(self.groups.items())
        b = len(supports)
        # masks[i][j] = 1 where parameter i belongs to the support of vector j
        mask = torch.zeros(len(self.params), b, dtype=torch.float64)
        for j, (_, idx) in enumerate(supports):
            mask[idx, j] = 1.0
        masks = [
            mask[i].to(device=p.device, dtype=p.dtype).view((b,) + (1,) * p.dim()) for i, p in enumerate(self.params)
        ]
        vecs = [
            torch.randn((b,) + tuple(p.shape), dtype=p.dtype, device=generator.device, generator=generator).to(p.device)
            * m
            for p, m in zip(self.params, masks)
        ]
        vecs = self._normalized(vecs)
        engine, previous, rayleigh = None, None, torch.zeros(b, dtype=torch.float64)
        n_products = 0
        for _ in range(n_iterations):
            if engine is None:
                engine, products = self._first_products(source, vecs)
            else:
                products = engine.hvp(vecs)
            n_products += b
            products = [h * m for h, m in zip(products, masks)]  # the diagonal block of each group
            rayleigh = _dots(vecs, products).sum(0)  # v is unit and supported on its block
            vecs = self._normalized(products, keep=vecs)
            if (
                self.tol is not None
                and previous is not None
                and bool(((rayleigh - previous).abs() <= self.tol * rayleigh.abs()).all())
            ):
                break
            previous = rayleigh
        return engine, {key: (None, None, float(rayleigh[j])) for j, (key, _) in enumerate(supports)}, n_products

    def _exact(self, source):
        """The dense Hessian from n products with the unit vectors, then eigvalsh per block."""
        sizes = [p.numel() for p in self.params]
        n = sum(sizes)
        chunk = self.max_probes_per_pass or n
        engine, columns = None, []
        for start in range(0, n, chunk):
            eye = torch.eye(n, dtype=self.params[0].dtype)[start : start + chunk]
            probes = [
                block.reshape((-1,) + tuple(p.shape)).to(p.device)
                for block, p in zip(eye.split(sizes, dim=1), self.params)
            ]
            if engine is None:
                engine, products = self._first_products(source, probes)
            else:
                products = engine.hvp(probes)
            columns.append(torch.cat([h.reshape(h.shape[0], -1).to("cpu", torch.float64) for h in products], 1))
        hessian = torch.cat(columns)
        hessian = (hessian + hessian.T) / 2  # symmetric up to rounding
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        figures = {}
        for key, idx in [(GLOBAL, list(range(len(self.params))))] + list(self.groups.items()):
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
            block = hessian[rows][:, rows]
            eig = torch.linalg.eigvalsh(block)
            top = float(eig[eig.abs().argmax()])
            figures[key] = (float(block.trace()), None, top)
        return engine, figures, n

    # -- the secant methods ------------------------------------------------------------------------
    def _secant_from_loss(self, loss: Tensor, grads: Optional[Sequence[Optional[Tensor]]]) -> CurvatureMeasurement:
        self._draw_seed()  # as _objective does: the same random stream whichever entry point
        _hvp.check_scalar_loss(loss, "the loss passed in")
        if self.method == "secant_same_batch":
            raise ValueError(
                "method='secant_same_batch' re-evaluates the gradient on the batch, which a loss does not "
                "carry: use estimate(inputs, targets), or method='secant'"
            )
        g = self._usable(grads)
        point = self._secant_point
        first = point is None or self._same_point(point[0])
        if (g is None or first) and loss.grad_fn is None:
            raise ValueError(
                "the loss passed in has no autograd graph (grad_fn is None): compute it with "
                "gradients enabled from the model's parameters"
            )
        n_gradients = 0
        if g is None:
            with torch.enable_grad():
                raw = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            g = [t.detach() for t in _hvp._zeros_for_none(raw, self.params)]
            n_gradients += 1
        n_products = 0
        if first:
            # No earlier point: the limit of a short step back along the gradient, y = h H g, from
            # one Hessian-vector product through the loss graph (the first estimate only).
            _, products = self._first_products(self._loss_source(loss), [t.unsqueeze(0) for t in g])
            n_products = 1
            point = ([p.detach() - t for p, t in zip(self.params, g)], [a - b[0] for a, b in zip(g, products)])
        return self._secant_step(loss.detach(), g, point, n_gradients, n_products)

    def _secant_step(self, loss: Tensor, g: List[Tensor], point, n_gradients: int, n_products: int = 0):
        """The figures of the secant from ``point`` to here; here becomes the next estimate's point."""
        theta = [p.detach() for p in self.params]
        steps = [a - b for a, b in zip(theta, point[0])]
        changes = [a - b for a, b in zip(g, point[1])]
        self._secant_point = ([t.clone() for t in theta], [t.clone() for t in g])
        return self._secant_figures(loss, g, steps, changes, n_gradients, n_products)

    # -- amortized power iteration -----------------------------------------------------------------
    def _start_vector(self, g: Optional[List[Tensor]] = None) -> List[Tensor]:
        if self._power_vector is not None:
            return self._power_vector
        if g is not None and float(_sq_norms(g).sum()) > 0:
            # The gradient lies mostly in the top eigenspace (cross-entropy, least squares): a
            # better start than a random vector (0.43 against 0.20 of |lambda|_max=0.64 on a
            # small MLP), so the first estimates are nearer.
            return [t[0] for t in self._normalized([t.unsqueeze(0) for t in g])]
        generator = torch.Generator(device=self.params[0].device).manual_seed(self._draw_seed())
        v = [
            torch.randn(p.shape, dtype=p.dtype, device=generator.device, generator=generator).to(p.device)
            for p in self.params
        ]
        return [t[0] for t in self._normalized([t.unsqueeze(0) for t in v])]

    def _keep_vector(self, v: List[Tensor], hv: List[Tensor]) -> None:
        norm = math.sqrt(float(_sq_norms(hv).sum()))
        # H v = 0: v is an eigenvector of eigenvalue 0; keep it. A non-finite product (a NaN loss)
        # keeps it too, so one bad batch does not end the iteration.
        self._power_vector = v if norm == 0.0 or not math.isfinite(norm) else list(torch._foreach_div(hv, norm))

    def _amortized_power(
        self, objective: _hvp.Objective, grads: Optional[Sequence[Optional[Tensor]]]
    ) -> CurvatureMeasurement:
        theta = [p.detach() for p in self.params]
        g = self._usable(grads)
        loss, n_gradients, own = torch.tensor(math.nan), 0, False
        if g is None and self._power_vector is None:
            loss, g = _hvp.loss_and_grads(objective, theta)  # once, for the start vector
            n_gradients, own = 1, True
        v = self._start_vector(g)
        # One-sided differences need the same function at both points: with dropout active the
        # training forward's masks are not the estimate's (the estimator's own gradient's are).
        # The training forward's random numbers replayed (objective.replay) make them the same.
        h = self._fd_step(theta, v)
        if g is not None and (own or objective.replay is not None or not _has_active_dropout(self.model)):
            _, g_plus = _hvp.loss_and_grads(objective, torch._foreach_add(theta, v, alpha=h))
            hv = list(torch._foreach_div(torch._foreach_sub(g_plus, g), h))
            n_gradients += 1
        else:
            loss_plus, g_plus = _hvp.loss_and_grads(objective, torch._foreach_add(theta, v, alpha=h))
            loss_minus, g_minus = _hvp.loss_and_grads(objective, torch._foreach_add(theta, v, alpha=-h))
            hv = list(torch._foreach_div(torch._foreach_sub(g_plus, g_minus), 2 * h))
            if g is None:  # the mean of the two gradients is g(theta) up to O(h^2)
                g = [(a + b) / 2 for a, b in zip(g_plus, g_minus)]
                loss = (loss_plus + loss_minus) / 2
            n_gradients += 2
        self._keep_vector(v, hv)
        return self._secant_figures(loss, g, v, hv, n_gradients, 0)

    def _amortized_power_from_loss(self, loss: Tensor) -> CurvatureMeasurement:
        source = self._loss_source(loss)  # checks the loss and its graph first
        if self._power_vector is None:
            with torch.enable_grad():
                raw = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            v = self._start_vector([t.detach() for t in _hvp._zeros_for_none(raw, self.params)])
        else:
            v = self._power_vector
        engine, products = self._first_products(source, [t.unsqueeze(0) for t in v])
        hv = [t[0] for t in products]
        self._keep_vector(v, hv)
        return self._secant_figures(engine.loss, list(engine.grads), v, hv, 0, 1)

    def _usable(self, grads: Optional[Sequence[Optional[Tensor]]]) -> Optional[List[Tensor]]:
        """``grads`` checked against the parameters, or None where there is nothing to use (None,
        a missing ``.grad``, or all zeros: a gradient zeroed but not yet recomputed)."""
        if grads is None:
            return None
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(
                f"grads must hold one tensor per measured parameter ({len(self.params)}), got {len(grads)}"
            )
        if any(g is None for g in grads):
            return None
        for j, (g, p) in enumerate(zip(grads, self.params)):
            if not torch.is_tensor(g) or g.shape != p.shape:
                raise ValueError(
                    f"grads[{j}] must be a tensor of shape {tuple(p.shape)}, got "
                    f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__}"
                )
        detached = [cast(Tensor, g).detach() for g in grads]
        if float(_sq_norms(detached).sum()) == 0.0:
            return None
        return detached

    def _same_point(self, values: Sequence[Tensor]) -> bool:
        return all(torch.equal(a, p.detach()) for a, p in zip(values, self.params))

    def _secant(self, objective: _hvp.Objective, grads: Optional[Sequence[Optional[Tensor]]]) -> CurvatureMeasurement:
        theta = [p.detach() for p in self.params]
        point = self._secant_point
        usable = self._usable(grads)
        n_gradients = 0
        loss = torch.tensor(math.nan)
        if point is None or self._same_point(point[0]):
            # No earlier point to pair with: a central difference along the gradient, both
            # gradients on this batch under one seed (dropout masks match). Central, not one-sided:
            # in float32 a one-sided step of sqrt(eps) gave 2.3x |lambda|_max on the transformer.
            if usable is None:
                loss, g = _hvp.loss_and_grads(objective, theta)
                n_gradients += 1
            else:
                g = usable
            direction = g
            if float(_sq_norms(g).sum()) == 0.0:
                generator = torch.Generator(device=theta[0].device).manual_seed(self._draw_seed())
                direction = [r[0] for r in _rademacher(self.params, 1, generator)]
            h = self._fd_step(theta, direction)
            loss_plus, g_plus = _hvp.loss_and_grads(objective, [t + h * d for t, d in zip(theta, direction)])
            loss_minus, g_minus = _hvp.loss_and_grads(objective, [t - h * d for t, d in zip(theta, direction)])
            n_gradients += 2
            if not math.isfinite(float(loss)):
                loss = (loss_plus + loss_minus) / 2
            self._secant_point = ([t.clone() for t in theta], [t.clone() for t in g])
            steps = [2 * h * d for d in direction]
            changes = [a - b for a, b in zip(g_plus, g_minus)]
            return self._secant_figures(loss, g, steps, changes, n_gradients, 0)
        else:
            if usable is None:
                loss, g = _hvp.loss_and_grads(objective, theta)
                n_gradients += 1
            else:
                g = usable
            if self.method == "secant_same_batch":
                _, g_previous = _hvp.loss_and_grads(objective, point[0])
                n_gradients += 1
                point = (point[0], g_previous)
        return self._secant_step(loss, g, point, n_gradients)

    def _fd_step(self, theta: Sequence[Tensor], direction: Sequence[Tensor]) -> float:
        """A finite-difference step along ``direction``: ``h ||direction|| = delta max(1, rms(theta))``
        with ``delta = fd_relative_step``, by default eps^(1/3) (for central differences it balances
        O(h^2) truncation and eps/h rounding; one-sided ones use it too, not sqrt(eps): backward
        passes carry far more rounding than eps, and sqrt(eps) in float32 gave 2-3x |lambda|_max on
        the transformer of bench/experiment_warmup.py). The whole move is delta times
        a typical coordinate, wherever the direction concentrates: a per-coordinate step (delta
        rms(theta) / rms(direction)) or one of delta ||theta|| moved a 135k-parameter transformer
        near its minimum so far (0.5 in norm along a sharp direction) that the gradients there were
        10-100x off (bench/experiment_warmup.py, float32)."""
        n = sum(t.numel() for t in theta)
        theta_sq, direction_sq = torch.stack([_sq_norms(theta).sum(), _sq_norms(direction).sum()]).tolist()
        rms_theta = math.sqrt(theta_sq / max(n, 1))
        direction_norm = math.sqrt(direction_sq)
        relative = self.fd_relative_step or torch.finfo(theta[0].dtype).eps ** (1 / 3)
        return relative * max(1.0, rms_theta) / direction_norm

    def _secant_figures(
        self, loss: Tensor, g: List[Tensor], steps: List[Tensor], changes: List[Tensor], n_gradients: int, n_products
    ) -> CurvatureMeasurement:
        """||y_g|| / ||s_g|| and s_g.y_g / s_g.s_g per group, for a secant (s, y) or a product (v, Hv)."""
        # One transfer of all per-parameter sums: this estimate's whole cost is these few reductions.
        stats = torch.stack([_sq_norms(steps), _sq_norms(changes), _dots_flat(steps, changes), _sq_norms(g)])
        s_sq, y_sq, sy, grad_sq = stats.cpu().tolist()
        measured = {}
        for key, idx in [(GLOBAL, list(range(len(self.params))))] + list(self.groups.items()):
            ss, yy, g_sq = sum(s_sq[i] for i in idx), sum(y_sq[i] for i in idx), sum(grad_sq[i] for i in idx)
            # A group the step did not move has no secant: NaN, which the schedulers skip with a warning.
            norm = math.sqrt(yy / ss) if ss > 0 else math.nan
            directional = sum(sy[i] for i in idx) / ss if ss > 0 else math.nan
            measured[key] = GroupMeasurement(
                norm / (g_sq + self.eps), norm, g_sq, directional_curvature=directional, step_norm=math.sqrt(ss)
            )
        whole = measured.pop(GLOBAL)
        m = CurvatureMeasurement(
            **vars(whole),
            loss=float(loss),
            groups=measured,
            method=self.method,
            hvp="",
            n_products=n_products,
            n_gradients=n_gradients,
        )
        self.last_measurement = m
        return m

    @staticmethod
    def _normalized(vectors: Sequence[Tensor], keep: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        norms = _sq_norms_rows(vectors).sqrt()  # (b,)
        zero = norms == 0
        out = []
        for i, t in enumerate(vectors):
            n = norms.to(device=t.device, dtype=t.dtype).view((-1,) + (1,) * (t.dim() - 1))
            scaled = t / torch.where(n == 0, torch.ones_like(n), n)
            if keep is not None and bool(zero.any()):
                # H v = 0 on a block: v is an eigenvector of eigenvalue 0; keep it.
                z = zero.to(t.device).view((-1,) + (1,) * (t.dim() - 1))
                scaled = torch.where(z, keep[i], scaled)
            out.append(scaled)
        return out


def _sq_norms_rows(vectors: Sequence[Tensor]) -> Tensor:
    """(b,) float64: the squared norm of each row across all tensors."""
    return torch.stack([t.reshape(t.shape[0], -1).to(torch.float64).pow(2).sum(1).cpu() for t in vectors]).sum(0)
