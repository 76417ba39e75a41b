"""LAdaGrad and LRMSProp: AdaGrad and RMSProp with a Laplacian-smoothed accumulator (ladam 0.4.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import torch

from .. import _validation as v
from ..reference.laplacian import STENCILS
from ._base import LaplacianOptimizer

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT


class LAdaGrad(LaplacianOptimizer):
    r"""LAdaGrad: AdaGrad whose accumulated squared gradient is smoothed by a discrete Laplacian.

    Same arguments, defaults and results as ``ladam.LAdaGrad`` 0.4.1, plus ``backend``:

    .. math::
        p &\leftarrow p\,(1 - lr \cdot wd), \qquad s \leftarrow s + g^2,
        \qquad lr_t = lr / (1 + (t-1)\, lr\_decay) \\
        p &\leftarrow p - lr_t\, g / (\sqrt{\max(s + c_2 \nabla^2 s,\ 0)} + \epsilon)

    (no Laplacian term for parameters that do not use it; see :class:`fastopt.LAdam` for the
    stencils and the ``use_lap`` rule).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float): learning rate. Default: 1e-2.
        lr_decay (float): learning-rate decay. Default: 0.
        eps (float): added to the denominator. Default: 1e-10.
        weight_decay (float): decoupled weight decay. Default: 0.
        c2 (float): Laplacian coupling strength. Default: 1e-4.
        stencil (str): ``'9point'`` or ``'5point'``. Default: ``'9point'``.
        min_spatial_size (int): parameters with fewer elements get no Laplacian. Default: 16.
        backend (str): see :mod:`fastopt.backends`. Default: ``'auto'``.
        capturable (bool): as :class:`fastopt.LAdam`'s (CUDA-graph capture). Default: False.

    State per parameter: ``step``, ``sum``, ``use_lap`` (ladam's and torch.optim.Adagrad's keys).
    """

    _NAME = "LAdaGrad"
    _CHECKS = {
        "lr": v.at_least(0.0),
        "lr_decay": v.at_least(0.0),
        "eps": v.at_least(0.0),
        "weight_decay": v.at_least(0.0),
        "c2": v.at_least(0.0),
        "stencil": v.one_of(STENCILS),
        "min_spatial_size": v.int_at_least(0),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-2,
        lr_decay: float = 0,
        eps: float = 1e-10,
        weight_decay: float = 0,
        c2: float = 1e-4,
        stencil: str = "9point",
        min_spatial_size: int = 16,
        *,
        backend: str = "auto",
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            c2=c2,
            stencil=stencil,
            min_spatial_size=min_spatial_size,
        )
        super().__init__(params, defaults, backend, capturable)

    def _op(self, group):
        return "ladagrad_step"

    def _init_state(self, state, p, group):
        if "sum" not in state:
            state["sum"] = self._zeros(p)

    def _state_keys(self, group):
        return ("sum",)

    def _run(self, fn, group, params, grads, state_lists, steps, use_laps, amp):
        fn(
            params,
            grads,
            state_lists[0],
            steps,
            use_laps,
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            c2=group["c2"],
            stencil=group["stencil"],
            **amp,
        )


class LRMSProp(LaplacianOptimizer):
    r"""LRMSProp: RMSProp whose running average of squared gradients is smoothed by a discrete
    Laplacian.

    Same arguments, defaults and results as ``ladam.LRMSProp`` 0.4.1, plus ``backend``:

    .. math::
        p &\leftarrow p\,(1 - lr \cdot wd), \qquad a \leftarrow \alpha a + (1-\alpha) g^2,
        \qquad d = \sqrt{\max(a + c_2 \nabla^2 a,\ 0)} + \epsilon \\
        b &\leftarrow \mu b + g / d,\ p \leftarrow p - lr\, b \quad (\mu > 0), \qquad
        p \leftarrow p - lr\, g / d \quad (\mu = 0)

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float): learning rate. Default: 1e-2.
        alpha (float): smoothing constant in [0, 1). Default: 0.99.
        eps (float): added to the denominator. Default: 1e-8.
        weight_decay (float): decoupled weight decay. Default: 0.
        momentum (float): momentum factor :math:`\mu`. Default: 0.
        c2 (float): Laplacian coupling strength. Default: 1e-4.
        stencil (str): ``'9point'`` or ``'5point'``. Default: ``'9point'``.
        min_spatial_size (int): parameters with fewer elements get no Laplacian. Default: 16.
        backend (str): see :mod:`fastopt.backends`. Default: ``'auto'``.
        capturable (bool): as :class:`fastopt.LAdam`'s (CUDA-graph capture). Default: False.

    State per parameter: ``step``, ``square_avg``, ``use_lap`` and, with momentum,
    ``momentum_buffer`` (ladam's and torch.optim.RMSprop's keys).
    """

    _NAME = "LRMSProp"
    _CHECKS = {
        "lr": v.at_least(0.0),
        "alpha": v.in_interval(0.0, 1.0, high_inclusive=False),
        "eps": v.at_least(0.0),
        "weight_decay": v.at_least(0.0),
        "momentum": v.at_least(0.0),
        "c2": v.at_least(0.0),
        "stencil": v.one_of(STENCILS),
        "min_spatial_size": v.int_at_least(0),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        c2: float = 1e-4,
        stencil: str = "9point",
        min_spatial_size: int = 16,
        *,
        backend: str = "auto",
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            c2=c2,
            stencil=stencil,
            min_spatial_size=min_spatial_size,
        )
        super().__init__(params, defaults, backend, capturable)

    def _op(self, group):
        return "lrmsprop_step"

    def _init_state(self, state, p, group):
        if "square_avg" not in state:
            state["square_avg"] = self._zeros(p)
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = self._zeros(p)

    def _state_keys(self, group):
        return ("square_avg", "momentum_buffer") if group["momentum"] > 0 else ("square_avg",)

    def _run(self, fn, group, params, grads, state_lists, steps, use_laps, amp):
        momentum = group["momentum"]
        fn(
            params,
            grads,
            state_lists[0],
            state_lists[1] if momentum > 0 else None,
            steps,
            use_laps,
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            c2=group["c2"],
            stencil=group["stencil"],
            **amp,
        )
