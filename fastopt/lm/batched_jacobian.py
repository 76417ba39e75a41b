"""Residuals and per-problem Jacobians of a batch of independent problems, with torch.func.

``residual_fn(x, *args, **kwargs)`` maps parameters ``x`` (B, P) to residuals (B, N), row ``b``
depending only on ``x[b]`` (and on row ``b`` of the per-problem data). Under that independence the
B Jacobians (N x P each) come from P forward-mode or N reverse-mode products for the whole batch,
not B * P:

* forward (``jacfwd``): perturb every problem's parameter ``j`` together, ``v -> r(x + v)`` with a
  shared ``v`` in R^P; its Jacobian at 0 is (B, N, P) and ``dr_b / dx_b``. P jvps, vmapped.
* reverse (``jacrev``): differentiate ``x -> sum_b r(x)_b`` in R^N; row ``i`` of its Jacobian holds
  ``dr_bi / dx_b`` for every b. N vjps, vmapped.

* lanes (``"lanes"``, :mod:`fastopt.lm.forward_lanes`): one call of ``residual_fn`` on a value
  that carries P tangent lanes through the user's torch operations, lanes that are zero kept out
  of the arithmetic. Several times less work than jacfwd for the usual model; a function using an
  operation lanes do not cover falls back to jacfwd (same Jacobian, jacfwd's speed).

"auto" takes lanes when P <= N (the usual tall problem) and reverse mode otherwise; with
``compile=True`` it takes jacfwd (what torch.compile is known to trace). A
``residual_fn`` that mixes problems (e.g. normalises over the batch) breaks the independence and
gets a wrong Jacobian: pass ``jac=callable`` for such functions.

:class:`ProblemData` holds the extra arguments of ``residual_fn`` and slices the per-problem ones
(tensors of two or more dimensions whose leading dimension is B) when the solver drops finished
problems from the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev

from .forward_lanes import lanes_input, lanes_output

__all__ = ["JAC_MODES", "ProblemData", "Evaluator", "resolve_jac_mode", "is_per_problem"]

JAC_MODES = ("auto", "lanes", "jacfwd", "jacrev")


def is_per_problem(value: Any, batch: int) -> bool:
    """The rule for extra data: tensors of two or more dimensions whose leading dimension is the
    batch size are per-problem; 1-D tensors (a shared grid of N points, even when N == B) and
    everything else are shared."""
    return torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch


class ProblemData:
    """Extra arguments of ``residual_fn`` for the problems of the current batch.

    Tensors of two or more dimensions whose leading dimension equals the batch size B are
    per-problem (row b belongs to problem b) and are sliced with the parameters; everything else is
    shared and passed as is (:func:`is_per_problem`).
    ``sqrt_weights`` ((B, N) per problem, (N,) shared, or None) scales the residuals.
    """

    def __init__(self, args: Sequence[Any], kwargs: Dict[str, Any], sqrt_weights: Optional[Tensor], batch: int):
        self.args, self.kwargs, self.sqrt_weights, self.batch = tuple(args), dict(kwargs), sqrt_weights, batch

    def _map(self, fn: Callable[[Tensor], Tensor], batch: int) -> "ProblemData":
        def pick(v):
            return fn(v) if is_per_problem(v, self.batch) else v

        weights = self.sqrt_weights
        if weights is not None and weights.dim() == 2:
            weights = fn(weights)
        return ProblemData([pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}, weights, batch)

    def take(self, index: Tensor) -> "ProblemData":
        """The data of the problems ``index`` (a 1-D index tensor into the current batch)."""
        return self._map(lambda v: v.index_select(0, index.to(v.device)), int(index.numel()))

    def rows(self, start: int, stop: int) -> "ProblemData":
        """The data of problems ``start:stop`` (views)."""
        return self._map(lambda v: v[start:stop], stop - start)


class Evaluator:
    """Weighted residuals ``f = sqrt(w) * residual_fn(x, ...)`` (B, N) and their Jacobian (B, N, P).

    ``jac`` is "lanes", "jacfwd", "jacrev" (see :func:`resolve_jac_mode`) or a callable
    ``jac(x, *args, **kwargs)`` returning the (B, N, P) Jacobian of the unweighted residuals.

    ``single`` marks one problem given as x0 of shape (P,): ``residual_fn`` then takes (P,) and
    returns (N,), as in scipy, and the solver's (1, P) batch is unwrapped around the call.

    :meth:`terms` applies ``reduce(f, J)`` (the solver's cost and normal equations) to the
    evaluation. Both it and :meth:`residuals_and_jacobian` run ``chunk`` problems at a time, which
    bounds the memory of the Jacobian's temporaries. With ``compile`` the evaluations run through
    ``torch.compile`` on chunks of exactly ``chunk`` problems (the last one padded by repeating a
    problem), ``reduce`` included when ``fuse_reduce`` so that the (B, N, P) Jacobian need not be
    written out and read back. Fixed-size chunks give torch.compile one static shape to compile
    for (its dynamic shapes do not get through torch.func's transforms in torch 2.13), while the
    solver still drops finished problems from the batch.
    """

    def __init__(
        self,
        residual_fn: Callable,
        jac: Any,
        single: bool,
        reduce: Optional[Callable] = None,
        compile: bool = False,
        fuse_reduce: bool = False,
        chunk: int = 1 << 16,
    ):
        self.residual_fn, self.jac, self.single, self.reduce = residual_fn, jac, single, reduce
        # Why lanes were given up for jacfwd (an operation they do not differentiate), or None.
        self.lanes_fallback: Optional[str] = None
        self.compile, self.fuse_reduce, self.chunk = compile, compile and fuse_reduce, chunk
        self._evaluate_terms, self._evaluate_jacobian = self._terms, self._residuals_and_jacobian
        if compile:
            self._evaluate_terms = torch.compile(
                self._terms if self.fuse_reduce else self._residuals_and_jacobian, dynamic=False
            )
            self._evaluate_jacobian = torch.compile(self._residuals_and_jacobian, dynamic=False)

    def raw(self, x: Tensor, data: ProblemData) -> Tensor:
        """``residual_fn`` at x (B, P) as a (B, N) tensor, unweighted."""
        if self.single:
            return self.residual_fn(x[0], *data.args, **data.kwargs).unsqueeze(0)
        return self.residual_fn(x, *data.args, **data.kwargs)

    def residuals(self, x: Tensor, data: ProblemData) -> Tensor:
        f = self.raw(x, data)
        return f if data.sqrt_weights is None else f * data.sqrt_weights

    def residuals_and_jacobian(self, x: Tensor, data: ProblemData) -> Tuple[Tensor, Tensor]:
        """(f, J) at x: (B, N) weighted residuals and their (B, N, P) Jacobian."""
        # _residuals_and_jacobian returns the pair (f, J); _chunked keeps the arity of fn's result.
        return cast(Tuple[Tensor, Tensor], self._chunked(self._evaluate_jacobian, x, data))

    def terms(self, x: Tensor, data: ProblemData) -> Tuple[Tensor, ...]:
        """``reduce(f, J)`` at x."""
        assert self.reduce is not None, "terms() needs an Evaluator built with reduce"
        if self.compile and not self.fuse_reduce:
            return self.reduce(*self._chunked(self._evaluate_terms, x, data))
        return self._chunked(self._evaluate_terms, x, data)

    def _chunked(self, fn: Callable, x: Tensor, data: ProblemData) -> Tuple[Tensor, ...]:
        """``fn(x, sqrt_weights, args, kwargs)``, ``chunk`` problems at a time; compiled code gets
        exactly ``chunk`` problems per call, the last call padded with copies of its first problem,
        whose results are dropped."""
        batch, chunk = x.shape[0], self.chunk
        parts = []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            if stop - start == batch and not (self.compile and batch < chunk):
                xs, ds = x, data
            elif stop - start == chunk or not self.compile:
                xs, ds = x[start:stop], data.rows(start, stop)
            else:
                index = torch.arange(start, start + chunk, device=x.device).clamp_max(stop - 1)
                xs, ds = x.index_select(0, index), data.take(index)
            out = fn(xs, ds.sqrt_weights, ds.args, ds.kwargs)
            parts.append([o[: stop - start] for o in out])
        if len(parts) == 1:
            return tuple(parts[0])
        return tuple(torch.cat(p) for p in zip(*parts))

    def _terms(self, x: Tensor, sqrt_weights: Optional[Tensor], args: Tuple, kwargs: Dict):
        assert self.reduce is not None  # only terms() evaluates it, and it checks the same
        return self.reduce(*self._residuals_and_jacobian(x, sqrt_weights, args, kwargs))

    def _residuals_and_jacobian(self, x: Tensor, sqrt_weights: Optional[Tensor], args: Tuple, kwargs: Dict):
        data = ProblemData(args, kwargs, sqrt_weights, x.shape[0])
        if callable(self.jac):
            f = self.residuals(x, data)
            jx = x[0] if self.single else x
            j = self.jac(jx, *args, **kwargs)
            j = j.unsqueeze(0) if self.single else j
            return f, (j if sqrt_weights is None else j * sqrt_weights.unsqueeze(-1))
        if self.jac == "lanes":
            try:
                # a LaneDual stands in for the tensor x (it answers residual_fn's torch calls)
                dual = cast(Tensor, lanes_input(x))
                return lanes_output(self.residuals(dual, data), x.shape[-1])
            except Exception as err:  # noqa: BLE001 - any failure of the lanes pass: jacfwd decides
                # The same Jacobian from jacfwd, for this and every later evaluation; a genuine
                # error of residual_fn is raised by jacfwd below.
                self.lanes_fallback = f"{type(err).__name__}: {err}"
                self.jac = "jacfwd"
        if self.jac == "jacfwd":

            def shifted(v):
                f = self.residuals(x + v, data)
                return f, f

            j, f = jacfwd(shifted, has_aux=True)(torch.zeros_like(x[0]))
            return f, j

        def summed(xx):
            f = self.residuals(xx, data)
            return f.sum(0), f

        j, f = jacrev(summed, has_aux=True)(x)
        return f, j.permute(1, 0, 2)


def resolve_jac_mode(jac: Any, n_params: int, n_residuals: int, compile: bool = False) -> Any:
    """The Jacobian mode "auto" stands for: forward mode (lanes eagerly, jacfwd under compile=True)
    unless P > N (then reverse mode: N vjps are fewer). "lanes" under compile=True is jacfwd."""
    forward = "jacfwd" if compile else "lanes"
    if jac == "auto":
        return forward if n_params <= n_residuals else "jacrev"
    return forward if jac == "lanes" else jac
