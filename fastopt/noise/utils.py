"""Synthetic noisy landscapes, gradient statistics and plots for the noise-adaptive learning rate.

The landscapes use NumPy (``pip install numpy``); the plots use matplotlib (``pip install
'fastopt[plot]'``), imported only when a plot is drawn, and write PNG files (no window is opened).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import _validation as v
from .._plotting import agg_figure
from .core import NoiseEstimator

if TYPE_CHECKING:  # NumPy is imported where a landscape is made (_numpy)
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "NoisyLandscape",
    "create_noisy_landscape",
    "compute_gradient_variance",
    "visualize_landscape",
    "plot_training_curves",
]


def _numpy():
    try:
        import numpy as np
    except ImportError as exc:  # pragma: no cover - numpy is present wherever the tests run
        raise ImportError("fastopt.noise landscapes need NumPy: pip install numpy") from exc
    return np


class NoisyLandscape:
    r"""A quadratic bowl with high-frequency ripples: smooth curvature plus noise-induced minima.

    .. math::

        L(x) = \sum_i \tfrac12 c_i x_i^2 \;+\; a \sum_i \bigl(1 - \cos(\omega x_i + \varphi_i)\bigr)

    ``c_i`` the true curvatures, ``a`` = ``noise_scale`` the ripple amplitude, ``omega`` their
    angular frequency (wavelength ``2 pi / omega``), ``phi_i`` random phases fixed by ``seed``.
    The ripples add local minima wherever ``|c_i x_i| < a omega``; each has curvature about
    ``c_i + a omega^2``, so gradient descent with a rate ``lr`` stays trapped in one when
    ``lr (c_i + a omega^2) < 2`` and small steps cannot cross the barriers, while the true bowl only
    needs ``lr c_i < 2``. The function is separable, so its global minimizer and the basin that
    leads to it are found exactly by a 1-D grid search per coordinate (:meth:`global_minimum`,
    :meth:`in_global_basin`).

    Per-sample gradients (:meth:`sample_gradients`) are gradients at jittered points
    ``x + spread * xi``, ``xi ~ N(0, I)``: the same surface seen through slightly different data.
    Their mean estimates the gradient of the Gaussian-smoothed loss (the noise-free surrogate);
    their spread is large among the ripples and small on the smooth slopes.
    """

    def __init__(
        self,
        dim: int,
        noise_scale: float,
        *,
        curvature: npt.ArrayLike = 1.0,
        frequency: float = 8.0,
        spread: Optional[float] = None,
        seed: Optional[int] = None,
    ):
        np = _numpy()
        v.int_at_least(1)("dim", dim)
        v.at_least(0.0, finite=True)("noise_scale", noise_scale)
        v.finite_positive("frequency", frequency)
        curvatures = np.broadcast_to(np.asarray(curvature, dtype=np.float64), (dim,)).copy()
        if not (np.isfinite(curvatures).all() and (curvatures > 0).all()):
            raise ValueError(f"Invalid curvature: {curvatures!r} (must be finite and > 0, a number or {dim} numbers)")
        spread = 0.25 * 2 * np.pi / frequency if spread is None else spread
        v.at_least(0.0)("spread", spread)
        self.dim, self.noise_scale, self.frequency, self.spread = (
            dim,
            float(noise_scale),
            float(frequency),
            float(spread),
        )
        self.curvature = curvatures
        self.phase = np.random.default_rng(seed).uniform(0.0, 2 * np.pi, dim)
        self._minimum: Optional[Tuple[Any, Any, Any]] = None

    # -- values -------------------------------------------------------------------------------
    def compute_loss_and_grad(self, params: Union[torch.Tensor, npt.ArrayLike]) -> Tuple[Any, Any]:
        """``(L(x), grad L(x))`` for params of shape ``(dim,)`` (a float and a ``(dim,)`` array) or
        ``(batch, dim)`` (arrays of shape ``(batch,)`` and ``(batch, dim)``). Torch tensors in give
        float64 tensors out (computed in NumPy on the CPU)."""
        np = _numpy()
        is_torch = isinstance(params, torch.Tensor)
        x = np.asarray(params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else params, dtype=np.float64)
        if x.shape[-1:] != (self.dim,) or x.ndim > 2:
            raise ValueError(f"params must have shape ({self.dim},) or (batch, {self.dim}), got {x.shape}")
        angle = self.frequency * x + self.phase
        loss = (0.5 * self.curvature * x * x + self.noise_scale * (1.0 - np.cos(angle))).sum(-1)
        grad = self.curvature * x + self.noise_scale * self.frequency * np.sin(angle)
        if is_torch:
            return torch.as_tensor(loss), torch.from_numpy(grad)
        return (float(loss), grad) if x.ndim == 1 else (loss, grad)

    def smooth_loss(self, params: npt.ArrayLike) -> Any:
        """The ripple-free bowl ``sum_i c_i x_i^2 / 2`` (same shapes as :meth:`compute_loss_and_grad`)."""
        np = _numpy()
        x = np.asarray(params, dtype=np.float64)
        out = (0.5 * self.curvature * x * x).sum(-1)
        return float(out) if x.ndim == 1 else out

    def sample_gradients(self, params: npt.ArrayLike, batch_size: int, rng: np.random.Generator) -> Tuple[Any, Any]:
        """Losses ``(batch_size,)`` and per-sample gradients ``(batch_size, dim)`` at
        ``params + spread * xi`` (``rng``: a ``numpy.random.Generator``)."""
        np = _numpy()
        v.int_at_least(1)("batch_size", batch_size)
        x = np.asarray(params, dtype=np.float64)
        jittered = x + self.spread * rng.standard_normal((batch_size, self.dim))
        return self.compute_loss_and_grad(jittered)

    # -- the global minimum and its basin ------------------------------------------------------
    def _profile(self, i: int):
        """Coordinate ``i``'s 1-D loss on a grid covering all its minima (64 points per wavelength:
        minima lie where ``|c x| <= a omega``)."""
        np = _numpy()
        c = self.curvature[i]
        reach = (self.noise_scale * self.frequency + 1e-12) / c + 2 * np.pi / self.frequency
        x = np.linspace(-reach, reach, int(64 * reach * self.frequency / np.pi) + 3)
        return x, 0.5 * c * x * x + self.noise_scale * (1.0 - np.cos(self.frequency * x + self.phase[i]))

    def _coordinate_minima(self):
        """Per coordinate: the global minimizer and the interval of its gradient-flow basin."""
        if self._minimum is None:
            np = _numpy()
            best, low, high = np.empty(self.dim), np.empty(self.dim), np.empty(self.dim)
            for i in range(self.dim):
                x, f = self._profile(i)
                k = int(np.argmin(f))
                # The basin under gradient flow runs to the nearest local maxima on either side.
                left, right = k, k
                while left > 0 and f[left - 1] > f[left]:
                    left -= 1
                while right < len(x) - 1 and f[right + 1] > f[right]:
                    right += 1
                best[i] = x[k]
                low[i] = x[left] if left > 0 else -np.inf
                high[i] = x[right] if right < len(x) - 1 else np.inf
            self._minimum = (best, low, high)
        return self._minimum

    def global_minimum(self) -> Tuple[Any, float]:
        """``(x_star, L(x_star))``, accurate to 1/64 of a ripple wavelength."""
        x_star = self._coordinate_minima()[0]
        return x_star.copy(), self.compute_loss_and_grad(x_star)[0]

    def in_global_basin(self, params: npt.ArrayLike) -> bool:
        """Whether gradient flow from ``params`` ends in the global minimum (every coordinate lies
        between the local maxima that bound the global minimizer's well)."""
        np = _numpy()
        _, low, high = self._coordinate_minima()
        x = np.asarray(params, dtype=np.float64)
        return bool(((x > low) & (x < high)).all())

    def count_local_minima(self) -> int:
        """Local minima of the whole landscape (the product of the counts per coordinate)."""
        total = 1
        for i in range(self.dim):
            _, f = self._profile(i)
            total *= int(((f[1:-1] < f[:-2]) & (f[1:-1] <= f[2:])).sum())
        return total


def create_noisy_landscape(dim: int, noise_scale: float, **kwargs: Any) -> NoisyLandscape:
    """A :class:`NoisyLandscape` of ``dim`` coordinates with ripple amplitude ``noise_scale``
    (keyword arguments: ``curvature``, ``frequency``, ``spread``, ``seed``)."""
    return NoisyLandscape(dim, noise_scale, **kwargs)


def compute_gradient_variance(gradients: Union[torch.Tensor, npt.ArrayLike]) -> float:
    """Total variance of a batch of gradients ``(batch_size, num_params)``: the unbiased estimate
    ``1/(B-1) sum_k |g_k - g_bar|^2`` of ``tr(Sigma)``, the sum over parameters of the
    per-parameter variances (:meth:`NoiseEstimator.compute_variance` gives them one by one).
    NumPy arrays or torch tensors; a Python float."""
    return NoiseEstimator().noise_statistics(gradients).trace_row_covariance


# -- plots -------------------------------------------------------------------------------------------


def _save(fig, path: str) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def visualize_landscape(
    landscape: NoisyLandscape,
    path: str,
    *,
    trajectories: Optional[Mapping[str, Any]] = None,
    extent: Optional[float] = None,
    resolution: int = 300,
    title: Optional[str] = None,
) -> str:
    """Draw the landscape (its first coordinate for ``dim == 1``, a filled contour of the first two
    otherwise, the others held at their global minimizer) with optional trajectories
    ``{name: array (steps, dim)}``; write a PNG to ``path`` and return the path."""
    np = _numpy()
    v.instance_of(NoisyLandscape, "a NoisyLandscape")("landscape", landscape)
    v.int_at_least(10)("resolution", resolution)
    trajectories = {name: np.asarray(t, dtype=np.float64) for name, t in (trajectories or {}).items()}
    for name, t in trajectories.items():
        if t.ndim != 2 or t.shape[1] != landscape.dim:
            raise ValueError(f"trajectories[{name!r}] must have shape (steps, {landscape.dim}), got {t.shape}")
    if extent is None:
        reach = max([3.0] + [float(np.abs(t[:, :2]).max()) * 1.1 for t in trajectories.values() if t.size])
        extent = reach
    x_star, _ = landscape.global_minimum()
    fig = agg_figure("visualize_landscape", figsize=(6, 5))
    ax = fig.add_subplot()
    grid = np.linspace(-extent, extent, resolution)
    if landscape.dim == 1:
        loss, _ = landscape.compute_loss_and_grad(grid[:, None])
        ax.plot(grid, loss, color="0.3", lw=1)
        for name, t in trajectories.items():
            tl, _ = landscape.compute_loss_and_grad(t)
            ax.plot(t[:, 0], tl, ".-", ms=3, lw=0.8, label=name)
        ax.set_xlabel("x")
        ax.set_ylabel("loss")
    else:
        gx, gy = np.meshgrid(grid, grid)
        points = np.tile(x_star, (gx.size, 1))
        points[:, 0], points[:, 1] = gx.ravel(), gy.ravel()
        loss, _ = landscape.compute_loss_and_grad(points)
        contour = ax.contourf(gx, gy, loss.reshape(gx.shape), levels=40, cmap="viridis")
        fig.colorbar(contour, ax=ax, label="loss")
        for name, t in trajectories.items():
            ax.plot(t[:, 0], t[:, 1], ".-", ms=2, lw=0.8, label=name)
        ax.plot([x_star[0]], [x_star[1]], "r*", ms=12, label="global minimum")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
    if trajectories or landscape.dim > 1:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(
        title
        or f"noisy landscape (noise_scale={landscape.noise_scale:g}, {landscape.count_local_minima()} local minima)"
    )
    return _save(fig, path)


def plot_training_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str,
    *,
    title: Optional[str] = None,
    log_loss: bool = True,
) -> str:
    """Plot training histories ``{run_name: {"loss": [...], "lr": [...], ...}}``: one panel per
    quantity (loss first, then lr, then the others), one line per run; write a PNG to ``path``
    and return the path. A plain ``{run_name: [losses]}`` is accepted too."""
    np = _numpy()
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {run_name: {quantity: values}} or {run_name: values}")
    runs: Dict[str, Dict[str, Any]] = {}
    for name, series in curves.items():
        series = series if isinstance(series, Mapping) else {"loss": series}
        runs[name] = {k: np.asarray(val, dtype=np.float64).ravel() for k, val in series.items()}
    quantities = []
    for series in runs.values():
        quantities += [k for k in series if k not in quantities]
    quantities.sort(key=lambda k: (k != "loss", k != "lr", k))
    fig = agg_figure("plot_training_curves", figsize=(6, 2.6 * len(quantities)))
    axes = [fig.add_subplot(len(quantities), 1, i + 1) for i in range(len(quantities))]
    for ax, quantity in zip(axes, quantities):
        for name, series in runs.items():
            if quantity in series:
                ax.plot(series[quantity], lw=1, label=name)
        ax.set_ylabel(quantity)
        if log_loss and quantity == "loss" and all((s["loss"] > 0).all() for s in runs.values() if "loss" in s):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    return _save(fig, path)
