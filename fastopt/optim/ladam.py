"""LAdam / LAdamW: Adam with a Laplacian-smoothed second moment (ladam 0.4.1's LAdamW)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple, Union

import torch

from .. import _validation as v
from ..reference._amp import grad_factor
from ..reference.laplacian import STENCILS
from . import _sharded
from ._base import LaplacianOptimizer

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

MODES = ("variance_lap", "update_lap", "weight_lap", "wave_variance")
_MODE_OPS = {
    "variance_lap": "ladam_step",
    "update_lap": "ladam_update_lap_step",
    "weight_lap": "ladam_weight_lap_step",
    "wave_variance": "ladam_wave_step",
}


class LAdam(LaplacianOptimizer):
    r"""LAdam (Laplacian AdamW): AdamW whose second-moment estimate is smoothed by a discrete
    Laplacian, coupling the learning rates of neighbouring weights.

    Same arguments, defaults and results as ``ladam.LAdamW`` 0.4.1, plus ``backend``. Mode
    ``variance_lap`` (default), per parameter with step count :math:`t`:

    .. math::
        p &\leftarrow p\,(1 - lr \cdot wd) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat m &= m / (1-\beta_1^t), \qquad \hat v = v / (1-\beta_2^t) \\
        \tilde v &= \max(\hat v + c_2 \nabla^2 \hat v,\ \epsilon)
            \quad\text{(where the parameter uses the Laplacian)} \\
        p &\leftarrow p - lr\, \hat m / (\sqrt{\tilde v} + \epsilon)

    :math:`\nabla^2` is the circular 9-point ``[[1,4,1],[4,-20,4],[1,4,1]]/6`` or 5-point stencil
    on the parameter viewed as ``(shape[0], -1)``, or ``[1,-2,1]`` on 1-D parameters of 4 or more
    elements; tensors with fewer than 3 rows or columns get none (see
    :func:`fastopt.reference.stencil_layout`). Whether a parameter uses the Laplacian is decided at
    its first step (``c2 > 0`` and ``numel >= min_spatial_size``) and then frozen.

    Other modes: ``update_lap`` smooths Adam's update, ``weight_lap`` diffuses the weights after a
    plain Adam step, ``wave_variance`` replaces the EMA of :math:`g^2` by a damped leapfrog wave
    equation (see :func:`fastopt.reference.ladam_wave_step_reference`).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float): learning rate. Default: 1e-3.
        betas (Tuple[float, float]): EMA coefficients of m and v. Default: (0.9, 0.999).
        eps (float): added to the denominator, and the floor of the smoothed variance. Default: 1e-8.
        weight_decay (float): decoupled (AdamW) weight decay. Default: 0.
        c2 (float): Laplacian coupling strength; 0 gives AdamW. Default: 1e-4.
        mode (str): one of ``'variance_lap'``, ``'update_lap'``, ``'weight_lap'``,
            ``'wave_variance'``. Default: ``'variance_lap'``.
        stencil (str): ``'9point'`` (isotropic) or ``'5point'``. Default: ``'9point'``.
        min_spatial_size (int): parameters with fewer elements get no Laplacian. Default: 16.
        wave_dt, wave_kappa, wave_E0, wave_damping: the wave equation's time step, source
            coupling, background gradient level (0 or ``'auto'``: the mean of the first g^2) and
            friction in [0, 1]; used by ``mode='wave_variance'`` only. Defaults: 0.1, 0.1, 0.0, 0.5.
        backend (str): ``'auto'`` (default), ``'triton'``, ``'cuda'``, ``'cpu'`` or ``'torch'``;
            see :mod:`fastopt.backends`.
        capturable (bool): the step does no host work that a CUDA graph could not capture: step
            counts stay on the device and ``lr`` may be a 1-element float32 tensor on the params'
            device, read by the kernel (change it in place, e.g. ``lr.fill_(x)``, between replays).
            CUDA parameters need backend 'triton' or 'cuda' ('auto' picks triton); run one step
            before capture (it uploads the tile tables) and keep parameters and gradients in place
            (``zero_grad(set_to_none=False)``; the cuda backend also needs them contiguous). On CPU
            parameters every backend takes it and reads a tensor lr on the host. Not combined with
            torch.compile (a tensor lr is read on the host there). Default: False.

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg``, ``exp_avg_sq``,
    ``use_lap``; with ``wave_variance`` also ``prev_exp_avg_sq`` and ``wave_e0_sq``. A state_dict
    saved by ladam (keys ``m``, ``v``, ``v_prev``) loads too.

    Example::

        >>> opt = fastopt.LAdam(model.parameters(), lr=1e-3, c2=1e-4)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    _NAME = "LAdam"
    _CHECKS = {
        "lr": v.at_least(0.0),
        "betas": v.betas,
        "eps": v.at_least(0.0),
        "weight_decay": v.at_least(0.0),
        "c2": v.at_least(0.0),
        "mode": v.one_of(MODES),
        "stencil": v.one_of(STENCILS),
        "min_spatial_size": v.int_at_least(0),
        "wave_dt": v.finite,
        "wave_kappa": v.finite,
        "wave_E0": v.e0_or_auto,
        "wave_damping": v.in_interval(0.0, 1.0, high_inclusive=True),
    }
    _LADAM_STATE_KEYS = {"m": "exp_avg", "v": "exp_avg_sq", "v_prev": "prev_exp_avg_sq", "wave_E0_auto": "wave_e0_sq"}

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        c2: float = 1e-4,
        mode: str = "variance_lap",
        stencil: str = "9point",
        min_spatial_size: int = 16,
        wave_dt: float = 0.1,
        wave_kappa: float = 0.1,
        wave_E0: Union[float, str] = 0.0,
        wave_damping: float = 0.5,
        *,
        backend: str = "auto",
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            c2=c2,
            mode=mode,
            stencil=stencil,
            min_spatial_size=min_spatial_size,
            wave_dt=wave_dt,
            wave_kappa=wave_kappa,
            wave_E0=wave_E0,
            wave_damping=wave_damping,
        )
        super().__init__(params, defaults, backend, capturable)

    def _op(self, group):
        return _MODE_OPS[group["mode"]]

    def _init_state(self, state: Dict[str, Any], p: torch.Tensor, group) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = self._zeros(p)
        if group["mode"] == "wave_variance":
            if "prev_exp_avg_sq" not in state:
                state["prev_exp_avg_sq"] = self._zeros(p)
            if "wave_e0_sq" not in state:
                state["wave_e0_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)

    def _translate_state(self, state):
        out = super()._translate_state(state)
        e0 = out.get("wave_e0_sq")
        if e0 is not None and not torch.is_tensor(e0):  # ladam keeps it as a Python float
            out["wave_e0_sq"] = torch.tensor(float(e0), dtype=torch.float64)  # cast to p's dtype on load
        return out

    def _state_keys(self, group):
        keys = ("exp_avg", "exp_avg_sq")
        return keys + ("prev_exp_avg_sq", "wave_e0_sq") if group["mode"] == "wave_variance" else keys

    def _run(self, fn, group, params, grads, state_lists, steps, use_laps, amp):
        beta1, beta2 = group["betas"]
        common = dict(
            lr=group["lr"],
            beta1=beta1,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            c2=group["c2"],
            stencil=group["stencil"],
            **amp,
        )
        if group["mode"] == "wave_variance":
            e0 = group["wave_E0"]
            fn(
                params,
                grads,
                *state_lists,
                steps,
                use_laps,
                wave_dt=group["wave_dt"],
                wave_kappa=group["wave_kappa"],
                wave_E0=0.0 if e0 == "auto" else e0,
                wave_damping=group["wave_damping"],
                **common,
            )
        else:
            fn(params, grads, *state_lists, steps, use_laps, beta2=beta2, **common)

    def _after_sharded_step(self, group, params, grads, states, amp):
        # wave_variance's background level is the mean of g^2 over the whole tensor, which the
        # step computed over its shard only.
        if group["mode"] != "wave_variance" or group["wave_E0"] not in (0, 0.0, "auto"):
            return
        if amp["found_inf"] is not None and bool(amp["found_inf"] != 0):
            return  # the step was skipped
        factor = 1.0 if amp["grad_scale"] is None else float(grad_factor(amp["grad_scale"]))
        for p, g, s in zip(params, grads, states):
            rows = _sharded.row_group(p)
            if rows is None or float(s["step"]) != 1:
                continue
            total = (_sharded.local(g).double() * factor).square().sum()
            torch.distributed.all_reduce(total, group=rows)
            s["wave_e0_sq"].copy_(total / p.numel())


LAdamW = LAdam
WaveAdam = LAdam  # ladam keeps this older name of LAdamW as an alias too
