r"""Hessian-vector products of a model's loss for a batch of probe vectors at a time.

The loss is :math:`L(\theta) = \ell(f(x; \theta), y)`; ``hvp(V)`` returns :math:`H v_i` for each row
:math:`v_i` of ``V`` (one tensor of shape ``(k, *p.shape)`` per parameter ``p``), with
:math:`H = \nabla^2_\theta L`. Engines, by the name :class:`~fastopt.schedulers.CurvatureEstimator`
takes in ``hvp=``:

``reverse_over_reverse``
    The gradient graph is built once (``autograd.grad(L, θ, create_graph=True)``); all k products
    come from one backward pass through it, ``autograd.grad(g, θ, V, is_grads_batched=True)``
    (autograd vmaps that pass over the rows of V). Pearlmutter's :math:`Hv = \nabla_\theta (g \cdot v)`.
``reverse_over_reverse_loop``
    The same graph, then a Python loop of k double-backward calls: the seed's Hutchinson loop.
``forward_over_reverse``
    torch.func: ``vmap`` over ``jvp(grad_and_value(L), θ, v)`` with ``functional_call``; the primal
    forward and backward run once, the tangents of all k probes ride along batched.
``finite_difference``
    First derivatives only, for models whose ops lack double backward and forward-mode AD:
    :math:`Hv \approx (g(\theta + h v) - g(\theta - h v)) / 2h`, two gradient evaluations per probe
    (a loop), error :math:`O(h^2)` from truncation plus :math:`O(\epsilon_{mach} \|g\| / h)` from rounding.

Every forward pass of an estimate runs under :func:`evaluation_context`: the model's buffers are
cloned (BatchNorm running statistics and any other buffer a forward mutates stay as they were),
BatchNorm layers in training mode stop tracking statistics (they still normalise with batch
statistics, as the training forward does), ``scaled_dot_product_attention`` uses its math kernel
(optional; fused CPU/GPU kernels have no double backward), and the random number generators are
seeded with the estimate's own seed and restored afterwards, so dropout masks are the same in
every evaluation of one estimate and the training run's random stream is not advanced. Where the
objective carries the generator states of the training forward (``Objective.replay``, from
:class:`~fastopt.schedulers._rng_replay.ForwardRecorder`) its first-order evaluations start from
those instead: they draw the training forward's dropout masks, so their gradients pair with the
training gradient in ``.grad``. First-order evaluations keep the default attention kernels (no
double backward needed), which a replay needs: a fused kernel draws its dropout differently.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.func import functional_call, grad_and_value, jvp, vmap

from ._rng_replay import GeneratorStates, estimator_forwards

HVP_METHODS = ("reverse_over_reverse", "reverse_over_reverse_loop", "forward_over_reverse", "finite_difference")
# The order 'auto' tries them in. Reverse-over-reverse first: with 5 probes a whole estimate took
# 1.03x / 1.07x / 1.85x less time than forward-over-reverse on a small CNN / transformer / MLP
# (bench/results/curvature_cpu.md, CPU, one thread); forward-over-reverse also fails on F.mse_loss
# in current torch (pytorch/pytorch#123996, "ZeroTensors are immutable"). With hundreds of probes
# in one pass forward-over-reverse was the faster one (1.4-2.5x on the test models): pass it by name.
AUTO_ORDER = ("reverse_over_reverse", "reverse_over_reverse_loop", "forward_over_reverse", "finite_difference")


@contextlib.contextmanager
def _batchnorm_without_tracking(model: nn.Module) -> Iterator[None]:
    # In training mode BatchNorm normalises with batch statistics either way; with tracking off it
    # just does not write running_mean/var (a write that torch.func transforms also reject).
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextlib.contextmanager
def _math_attention(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def _seeded_rng(seed: int, devices: Sequence[torch.device]) -> Iterator[None]:
    cuda = sorted(
        {d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"}
    )
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def replayed_rng(states: GeneratorStates) -> Iterator[None]:
    """The default generators set to ``states`` inside, restored to what they were on exit."""
    with torch.random.fork_rng(devices=sorted(states.cuda)):
        torch.set_rng_state(states.cpu)
        for index, state in states.cuda.items():
            torch.cuda.set_rng_state(state, index)
        yield


class Objective:
    """The loss as a function of (some of) the model's parameters, at fixed inputs and targets.

    ``objective(tensors)`` evaluates the loss with ``tensors`` standing in for the parameters
    ``names`` (``functional_call``), on cloned buffers, under the estimate's seeded RNG; first-order
    evaluations under the training forward's generator states where ``replay`` holds them.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable],
        names: Sequence[str],
        params: Sequence[Tensor],
        inputs: Any,
        targets: Any,
        seed: int,
        math_attention: bool,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.names = list(names)
        self.params = list(params)
        self.inputs = inputs
        self.targets = targets
        self.seed = seed
        self.math_attention = math_attention
        self.replay: Optional[GeneratorStates] = None

    @contextlib.contextmanager
    def evaluation_context(self, first_order: bool = False) -> Iterator[None]:
        """Gradients on, the estimate's random numbers (the training forward's where ``replay`` is
        set and ``first_order``), BatchNorm not tracking, the math attention kernel unless
        ``first_order``; forwards inside are not recorded as training forwards."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(estimator_forwards())
            if first_order and self.replay is not None:
                stack.enter_context(replayed_rng(self.replay))
            else:
                stack.enter_context(_seeded_rng(self.seed, [p.device for p in self.params]))
            stack.enter_context(_batchnorm_without_tracking(self.model))
            stack.enter_context(_math_attention(self.math_attention and not first_order))
            yield

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        out = functional_call(self.model, {**buffers, **dict(zip(self.names, tensors))}, (self.inputs,))
        loss = out if self.loss_fn is None else self.loss_fn(out, self.targets)
        return check_scalar_loss(loss, "loss_fn(model(inputs), targets)" if self.loss_fn else "model(inputs)")


def check_scalar_loss(loss: Any, what: str) -> Tensor:
    if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if torch.is_tensor(loss)
            else type(loss).__name__
        )
        raise TypeError(
            f"{what} must return a real scalar tensor (the loss), got {got}; pass a loss_fn "
            "that reduces the model's output (a dict or tuple too) to one number"
        )
    return loss.reshape(())


def _zeros_for_none(
    grads: Sequence[Optional[Tensor]], like: Sequence[Tensor], batch: Optional[int] = None
) -> List[Tensor]:
    # A parameter the loss does not use has a zero gradient and a zero Hessian row.
    out = []
    for g, p in zip(grads, like):
        if g is None:
            g = torch.zeros(((batch,) if batch is not None else ()) + tuple(p.shape), dtype=p.dtype, device=p.device)
        out.append(g)
    return out


# Nodes that mark a missing double backward. A backward decorated @once_differentiable hangs an
# Error node off a detached leaf: autograd.grad(g, params) prunes that branch and would return
# Hessian-vector products without those second-derivative terms, silently. Found by a graph walk.
_NO_DOUBLE_BACKWARD = {
    "torch::autograd::Error": "a custom autograd.Function whose backward is @once_differentiable",
    "torch::autograd::NotImplemented": "an op whose derivative of the backward is not implemented",
}


def check_twice_differentiable(grads: Sequence[Tensor]) -> None:
    """Raise if the graph of ``grads`` holds a node that cannot be differentiated (see above)."""
    stack: List[Optional[Node]] = [g.grad_fn for g in grads if g.grad_fn is not None]
    seen: Set[Node] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        reason = _NO_DOUBLE_BACKWARD.get(node.name())
        if reason is not None:
            raise RuntimeError(
                f"the gradient graph holds a {node.name()} node: {reason}; it has no double "
                "backward, so reverse-over-reverse Hessian-vector products are impossible"
            )
        stack.extend(fn for fn, _ in node.next_functions)


class ReverseOverReverse:
    """Hv from one gradient graph: ``autograd.grad(g, θ, V, is_grads_batched=batched)``.

    ``ReverseOverReverse.from_loss(loss, params)`` uses a loss whose graph is alive (the training
    step's own forward); ``ReverseOverReverse(objective)`` runs the forward itself. ``verify`` walks
    the gradient graph once for nodes without double backward (``check_twice_differentiable``).
    """

    name = "reverse_over_reverse"

    def __init__(self, objective: Objective, batched: bool = True, verify: bool = True):
        with objective.evaluation_context():
            loss = objective(objective.params)
            self._build(loss, objective.params, batched, verify)

    @classmethod
    def from_loss(
        cls, loss: Tensor, params: Sequence[Tensor], batched: bool = True, verify: bool = True
    ) -> "ReverseOverReverse":
        self = cls.__new__(cls)
        with torch.enable_grad():
            self._build(loss, params, batched, verify)
        return self

    def _build(self, loss: Tensor, params: Sequence[Tensor], batched: bool, verify: bool) -> None:
        self.batched = batched
        self.params = list(params)
        self.loss = loss.detach()
        grads: Sequence[Tensor] = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = _zeros_for_none(grads, self.params)
        if verify:
            check_twice_differentiable(grads)
        self.grads = [g.detach() for g in grads]
        # Gradients that do not depend on the parameters (the loss is linear in them) contribute
        # nothing to Hv; autograd would reject them as outputs.
        self._live = [i for i, g in enumerate(grads) if g.requires_grad]
        self._graph_grads = [grads[i] for i in self._live]

    def hvp(self, vectors: Sequence[Tensor]) -> List[Tensor]:
        k = vectors[0].shape[0]
        if not self._live:
            return [torch.zeros_like(v) for v in vectors]
        with torch.enable_grad():
            cotangents = [vectors[i] for i in self._live]
            if self.batched:
                hv = torch.autograd.grad(
                    self._graph_grads,
                    self.params,
                    cotangents,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
                return [h.detach() for h in _zeros_for_none(hv, self.params, k)]
            rows = []
            for j in range(k):
                hv = torch.autograd.grad(
                    self._graph_grads, self.params, [c[j] for c in cotangents], retain_graph=True, allow_unused=True
                )
                rows.append(_zeros_for_none(hv, self.params))
            return [torch.stack([r[i] for r in rows]).detach() for i in range(len(self.params))]


class ReverseOverReverseLoop(ReverseOverReverse):
    """The same graph, probes in a Python loop of double-backward calls (the seed's way)."""

    name = "reverse_over_reverse_loop"

    def __init__(self, objective: Objective, verify: bool = True):
        super().__init__(objective, batched=False, verify=verify)


class ForwardOverReverse:
    """Hv for all probes in one call of ``vmap(jvp(grad_and_value(L)))`` (torch.func)."""

    name = "forward_over_reverse"

    def __init__(self, objective: Objective):
        self.objective = objective
        self.params = objective.params
        self._primals = {n: p.detach() for n, p in zip(objective.names, objective.params)}
        self.loss: Optional[Tensor] = None
        self.grads: Optional[List[Tensor]] = None

    def hvp(self, vectors: Sequence[Tensor]) -> List[Tensor]:
        names = self.objective.names

        def loss_of(params: Dict[str, Tensor]) -> Tensor:
            return self.objective([params[n] for n in names])

        def one(tangents: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Tensor]:
            # jvp without has_aux returns (primals_out, tangents_out); its stub also admits a 3-tuple.
            (grads, loss), (hv, _) = cast(
                Tuple[Tuple[Dict[str, Tensor], Tensor], Tuple[Dict[str, Tensor], Tensor]],
                jvp(grad_and_value(loss_of), (self._primals,), (tangents,)),
            )
            return hv, grads, loss

        with self.objective.evaluation_context():
            # out_dims_t in torch's stubs omits None inside the tuple, which vmap accepts (unbatched outputs).
            hv, grads, loss = vmap(one, randomness="same", out_dims=(0, None, None))(dict(zip(names, vectors)))  # type: ignore[arg-type]
        if self.grads is None:
            self.loss, self.grads = loss.detach(), [grads[n].detach() for n in names]
        return [hv[n].detach() for n in names]


def loss_and_grads(objective: Objective, values: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """The loss and its gradient (first derivatives only) with ``values`` standing in for the
    objective's parameters, under its evaluation context; both detached."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    with objective.evaluation_context(first_order=True):
        loss = objective(leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [g.detach() for g in _zeros_for_none(grads, leaves)]


class FiniteDifference:
    r"""Central differences of the gradient: :math:`Hv \approx (g(\theta+hv) - g(\theta-hv)) / 2h`.

    The step is :math:`h = \delta \max(1, \mathrm{rms}(\theta)) / \mathrm{rms}(v)` with
    :math:`\delta = \epsilon_{mach}^{1/3}` (balances the :math:`h^2` truncation error against the
    :math:`\epsilon_{mach}/h` rounding error) unless ``relative_step`` is given. Each probe costs
    two forward and backward passes, in a loop, first derivatives only.
    """

    name = "finite_difference"

    def __init__(self, objective: Objective, relative_step: Optional[float] = None):
        self.objective = objective
        self.params = objective.params
        dtype = objective.params[0].dtype
        self.relative_step = relative_step if relative_step is not None else torch.finfo(dtype).eps ** (1 / 3)
        self.loss, self.grads = self._loss_and_grads([p.detach() for p in self.params])
        theta_sq = sum(float(p.detach().double().pow(2).sum()) for p in self.params)
        n = sum(p.numel() for p in self.params)
        self._scale = max(1.0, math.sqrt(theta_sq / max(n, 1)))

    def _loss_and_grads(self, values: Sequence[Tensor]):
        return loss_and_grads(self.objective, values)

    def hvp(self, vectors: Sequence[Tensor]) -> List[Tensor]:
        k = vectors[0].shape[0]
        base = [p.detach() for p in self.params]
        n = sum(p.numel() for p in base)
        rows = []
        for j in range(k):
            v = [vec[j] for vec in vectors]
            v_rms = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v) / max(n, 1))
            if v_rms == 0.0:
                rows.append([torch.zeros_like(t) for t in v])
                continue
            h = self.relative_step * self._scale / v_rms
            _, plus = self._loss_and_grads([p + h * t for p, t in zip(base, v)])
            _, minus = self._loss_and_grads([p - h * t for p, t in zip(base, v)])
            rows.append([(a - b) / (2 * h) for a, b in zip(plus, minus)])
        return [torch.stack([r[i] for r in rows]) for i in range(len(base))]


ENGINES = {
    "reverse_over_reverse": ReverseOverReverse,
    "reverse_over_reverse_loop": ReverseOverReverseLoop,
    "forward_over_reverse": ForwardOverReverse,
    "finite_difference": FiniteDifference,
}
