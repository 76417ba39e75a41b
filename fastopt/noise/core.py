"""Gradient-noise estimation, loss smoothing and the noise-adaptive learning-rate policy.

Framework-agnostic: every function takes NumPy arrays (or anything ``numpy.asarray`` accepts) and
torch tensors alike. The math runs in torch (NumPy input is wrapped without a copy), so the same
code gives the same numbers for both kinds; NumPy is imported only when NumPy input arrives.

Notation for a batch of gradients ``g_1 .. g_B`` (rows of a ``(B, P)`` array; each row the gradient
of one sample, or the mean gradient of a micro-batch of ``b`` samples):

* ``g_bar = (1/B) sum_k g_k``                        the mean gradient (the one an optimizer steps with)
* ``S = 1/(B-1) sum_k |g_k - g_bar|^2``             unbiased estimate of ``tr(Sigma_row)``, the total
  variance of one row (``Sigma_row = Sigma / b``, ``Sigma`` the per-sample covariance)
* ``noise_scale = sqrt(S / P)``                     the per-parameter standard deviation across the
  batch, aggregated over parameters as a root mean square (about 1 for standard-normal gradients)
* ``N = S / B``                                     unbiased estimate of ``E|g_bar - G|^2``, the noise
  power of the mean gradient (``G`` the true, full-data gradient)
* ``|G|^2_est = |g_bar|^2 - N``                     unbiased estimate of ``|G|^2``
  (``E|g_bar|^2 = |G|^2 + tr(Sigma_row)/B``)
* ``B_simple = b S / |G|^2_est``                    the simple gradient noise scale
  ``tr(Sigma)/|G|^2`` of McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"
  (arXiv:1812.06162), eq. 2.8 and appendix A.1: these are their two-batch-size estimators with
  ``B_small = b`` and ``B_big = B b``. A ratio of unbiased estimates is not itself unbiased; for a
  stable value average numerator and denominator separately over steps, as they recommend (and
  as :class:`NoiseAdaptiveLR` does).
* ``noise_fraction = N / |g_bar|^2`` (clipped to [0, 1]) the share of the mean gradient's energy that
  is noise: ``B_simple / (B b + B_simple)`` in expectation; 0 for a clean gradient, 1 for pure noise.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch

from .. import _validation as v

if TYPE_CHECKING:  # NumPy is imported only when NumPy input arrives (see above)
    import numpy as np
    import numpy.typing as npt

# NumPy gradients are converted to torch once, without a copy; the result comes back as NumPy.
_NUMPY, _TORCH = "numpy", "torch"


# -- input handling ------------------------------------------------------------------------------
def _gradient_matrix(gradients: Any, name: str, min_batch_size: int) -> Tuple[torch.Tensor, str, Any]:
    """``gradients`` as a 2-D tensor ``(batch, params)`` in the dtype the statistics are computed in,
    the kind of the input (numpy/torch) and the dtype results are returned in.

    Trailing dimensions are flattened: ``(batch, *param_shape)`` is one row per sample.
    """
    out_dtype: Union[torch.dtype, np.dtype]  # results come back in the input's kind
    if isinstance(gradients, torch.Tensor):
        kind, tensor = _TORCH, gradients.detach()
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {tensor.dtype}")
        out_dtype = tensor.dtype if tensor.is_floating_point() else torch.float64
    else:
        import numpy as np

        kind = _NUMPY
        try:
            array = np.asarray(gradients)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be an array of shape (batch_size, num_params), got {type(gradients).__name__}: {exc}"
            ) from exc
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got an array of dtype {array.dtype}")
        out_dtype = array.dtype if array.dtype.kind == "f" else np.dtype(np.float64)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() < 2:
        raise ValueError(
            f"{name} must have shape (batch_size, num_params): one gradient per row, "
            f"got shape {tuple(tensor.shape)}; a single gradient vector g is g.reshape(1, -1), "
            f"but noise needs at least {min_batch_size} rows"
        )
    batch = tensor.shape[0]
    if batch < min_batch_size:
        raise ValueError(
            f"{name} has batch_size {batch} (shape {tuple(tensor.shape)}): gradient noise needs "
            f"the gradients of at least {min_batch_size} samples or micro-batches, one per row "
            f"(a single gradient has no variance; 4 or more give usable estimates)"
        )
    tensor = tensor.reshape(batch, -1)
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has no parameters (shape {tuple(tensor.shape)})")
    # fp64 where it is cheap (CPU); on accelerators fp32, which fp16/bf16 are upcast to.
    compute = torch.float64 if tensor.device.type == "cpu" or tensor.dtype == torch.float64 else torch.float32
    tensor = tensor.to(compute)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} non-finite values (nan or inf); noise cannot be estimated")
    return tensor, kind, out_dtype


def _returned(tensor: torch.Tensor, kind: str, out_dtype: Any) -> Union[torch.Tensor, np.ndarray]:
    """A result vector in the caller's kind and dtype."""
    if kind == _TORCH:
        return tensor.to(out_dtype)
    return tensor.cpu().numpy().astype(out_dtype, copy=False)


def _scalar(value: Any, name: str) -> float:
    """A finite Python float from a number, a 0-dim / one-element array or tensor."""
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__") and not isinstance(value, numbers.Number):
        size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
        if size != 1:
            shape = tuple(value.shape) if hasattr(value, "shape") else "?"
            raise ValueError(f"{name} must be a single number, got an array of shape {shape}")
        value = value.item()
    v.finite(name, value)
    return float(value)


# -- noise statistics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseStatistics:
    """Sufficient statistics of one batch of gradients (see the module docstring for the math).

    Attributes:
        batch_size: ``B``, the number of rows (samples or micro-batches).
        num_params: ``P``, the length of one gradient.
        samples_per_row: ``b``, the samples averaged in one row (1 for per-sample gradients).
        mean_grad_sq_norm: ``|g_bar|^2``.
        trace_row_covariance: ``S``, the unbiased estimate of ``tr(Sigma_row)``.
    """

    batch_size: int
    num_params: int
    samples_per_row: int
    mean_grad_sq_norm: float
    trace_row_covariance: float

    @property
    def noise_scale(self) -> float:
        """``sqrt(S / P)``: RMS over parameters of the per-parameter std across the batch."""
        return math.sqrt(self.trace_row_covariance / self.num_params)

    @property
    def mean_noise_power(self) -> float:
        """``N = S / B``: unbiased estimate of ``E|g_bar - G|^2``."""
        return self.trace_row_covariance / self.batch_size

    @property
    def true_grad_sq_norm(self) -> float:
        """``|g_bar|^2 - S/B``: unbiased estimate of ``|G|^2`` (can be <= 0 when noise dominates)."""
        return self.mean_grad_sq_norm - self.mean_noise_power

    @property
    def trace_covariance(self) -> float:
        """``b S``: unbiased estimate of the per-sample ``tr(Sigma)``."""
        return self.samples_per_row * self.trace_row_covariance

    @property
    def b_simple(self) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` in samples; ``inf`` when the estimate of ``|G|^2`` is <= 0."""
        g2 = self.true_grad_sq_norm
        return self.trace_covariance / g2 if g2 > 0 else math.inf

    @property
    def noise_fraction(self) -> float:
        """``N / |g_bar|^2`` clipped to [0, 1]: 1 for a mean gradient of exactly 0 with noise around
        it, 0 when every gradient is zero."""
        return _noise_fraction(self.mean_noise_power, self.mean_grad_sq_norm)

    @classmethod
    def from_moments(
        cls,
        batch_size: int,
        num_params: int,
        mean_grad_sq_norm: float,
        sum_sq_deviation: float,
        samples_per_row: int = 1,
    ) -> "NoiseStatistics":
        """From ``|g_bar|^2`` and ``sum_k |g_k - g_bar|^2`` (the centred sum of squares)."""
        return cls(
            int(batch_size),
            int(num_params),
            int(samples_per_row),
            float(mean_grad_sq_norm),
            float(sum_sq_deviation) / (batch_size - 1),
        )


def _noise_fraction(noise_power: float, mean_sq_norm: float) -> float:
    if mean_sq_norm <= 0:  # a mean gradient of exactly 0: all noise, or no gradient at all
        return 1.0 if noise_power > 0 else 0.0
    return min(1.0, max(0.0, noise_power / mean_sq_norm))


class NoiseEstimator:
    """Gradient noise of a batch of gradients ``(batch_size, num_params)``: per-sample gradients, or
    the mean gradients of equal micro-batches (then pass ``samples_per_row``).

    Args:
        min_batch_size: fewest rows accepted (>= 2: one gradient has no variance). Fewer raise
            ``ValueError`` naming the argument.

    Example::

        >>> g = np.random.default_rng(0).standard_normal((32, 10))
        >>> NoiseEstimator().estimate_noise(g)      # about 1: each parameter has std 1
    """

    def __init__(self, min_batch_size: int = 2):
        v.int_at_least(2)("min_batch_size", min_batch_size)
        self.min_batch_size = min_batch_size

    def compute_variance(self, gradients: Union[torch.Tensor, npt.ArrayLike]) -> Union[torch.Tensor, np.ndarray]:
        """Per-parameter unbiased variance across the batch, ``1/(B-1) sum_k (g_ki - g_bar_i)^2``.

        Returns an array of shape ``(num_params,)`` of the input's kind (a NumPy array for NumPy
        input, a tensor on the input's device for a tensor) and floating dtype.
        """
        matrix, kind, out_dtype = _gradient_matrix(gradients, "gradients", self.min_batch_size)
        return _returned(matrix.var(dim=0, correction=1), kind, out_dtype)

    def estimate_noise(self, gradients: Union[torch.Tensor, npt.ArrayLike]) -> float:
        """The noise scale ``sqrt(mean_i var_i)``: the per-parameter standard deviation across the
        batch, aggregated over parameters as a root mean square (``sqrt(tr(Sigma_row) / P)``).
        About 1 for standard-normal gradients. A Python float."""
        return self.noise_statistics(gradients).noise_scale

    def gradient_noise_scale(self, gradients: Union[torch.Tensor, npt.ArrayLike], samples_per_row: int = 1) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) in samples, from unbiased
        estimates of both; ``inf`` when the estimate of ``|G|^2`` is <= 0 (noise swamps the signal).
        A Python float."""
        return self.noise_statistics(gradients, samples_per_row).b_simple

    def noise_statistics(
        self, gradients: Union[torch.Tensor, npt.ArrayLike], samples_per_row: int = 1
    ) -> NoiseStatistics:
        """All statistics of the batch in one pass (see :class:`NoiseStatistics`)."""
        v.int_at_least(1)("samples_per_row", samples_per_row)
        matrix, _, _ = _gradient_matrix(gradients, "gradients", self.min_batch_size)
        mean = matrix.mean(dim=0)
        # Centred two-pass sum of squares: no cancellation when the mean dominates the spread.
        sum_sq_dev = (matrix - mean).square().sum()
        return NoiseStatistics.from_moments(
            matrix.shape[0], matrix.shape[1], float(mean.square().sum()), float(sum_sq_dev), samples_per_row
        )


# -- loss smoothing -----------------------------------------------------------------------------------
class LossSmoother:
    """Exponential moving average of the loss, started at the first value, with an optional
    moving-average low-pass filter on top.

    ``s_1 = L_1``, ``s_t = alpha s_{t-1} + (1 - alpha) L_t``. With ``window = w`` the value returned is
    ``mean(s_{t-w+1} .. s_t)`` (fewer at the start): a boxcar FIR filter whose frequency response is
    zero at periods ``w, w/2, ..``; e.g. ``window=2`` cancels the period-2 oscillation of a learning
    rate that is too large for the curvature.

    :attr:`deviation` tracks how much the loss fluctuates around its average: the bias-corrected
    EMA (same ``alpha``) of ``|L_t - s_{t-1}|``, 0 until the second loss.

    Args:
        alpha: EMA decay in [0, 1); larger is smoother and slower (0 returns the raw loss).
        window: length of the moving average applied after the EMA, or None for no filter.
    """

    def __init__(self, alpha: float = 0.9, window: Optional[int] = None):
        v.in_interval(0.0, 1.0, high_inclusive=False)("alpha", alpha)
        v.optional(v.int_at_least(1))("window", window)
        self.alpha = float(alpha)
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget every loss seen."""
        self._ema: Optional[float] = None
        self._recent: deque = deque(maxlen=self.window or 1)
        self._deviation_avg = 0.0
        self.num_updates = 0

    def update(self, loss: Union[torch.Tensor, npt.ArrayLike]) -> float:
        """Feed one loss (a number, or a one-element array/tensor); return the smoothed loss."""
        loss = _scalar(loss, "loss")
        if self._ema is None:
            self._ema = loss
        else:
            a = self.alpha
            self._deviation_avg = a * self._deviation_avg + (1.0 - a) * abs(loss - self._ema)
            self._ema = a * self._ema + (1.0 - a) * loss
        self._recent.append(self._ema)
        self.num_updates += 1
        smoothed = self.get_smoothed_loss()
        assert smoothed is not None  # this update set the EMA
        return smoothed

    def get_smoothed_loss(self) -> Optional[float]:
        """The current smoothed loss, or None before the first :meth:`update`."""
        if self._ema is None:
            return None
        return sum(self._recent) / len(self._recent) if self.window else self._ema

    @property
    def deviation(self) -> float:
        """Typical ``|L_t - s_{t-1}|``: the bias-corrected EMA of the loss's deviations from its average."""
        n = self.num_updates - 1  # deviations seen
        if n <= 0:
            return 0.0
        return self._deviation_avg / (1.0 - self.alpha**n) if self.alpha > 0 else self._deviation_avg

    def state_dict(self) -> Dict[str, Any]:
        return {
            "alpha": self.alpha,
            "window": self.window,
            "ema": self._ema,
            "recent": list(self._recent),
            "deviation_avg": self._deviation_avg,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_keys(state, self.state_dict(), "LossSmoother")
        if state["alpha"] != self.alpha or state["window"] != self.window:
            raise ValueError(
                f"LossSmoother.load_state_dict: the state was saved with alpha={state['alpha']}, "
                f"window={state['window']}; this smoother has alpha={self.alpha}, window={self.window}"
            )
        self._ema = state["ema"]
        self._recent = deque(state["recent"], maxlen=self.window or 1)
        self._deviation_avg = float(state["deviation_avg"])
        self.num_updates = int(state["num_updates"])


def _check_keys(state: Any, expected: Dict[str, Any], owner: str) -> None:
    if not isinstance(state, dict) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{owner}.load_state_dict: expected a dict with keys {sorted(expected)}, got {got}")


# -- the policy ---------------------------------------------------------------------------------------
class NoiseAdaptiveLR:
    r"""Learning rate adapted to the gradient noise, guarded by the smoothed loss.

    Small fixed learning rates stall in the narrow, noise-induced minima of a rugged loss. While
    the mean gradient is clean (it mostly points along the true, smoothed slope) this policy
    takes large steps, which carry the iterate across such divots; as noise comes to dominate
    (near the minimum of the smoothed loss) it shrinks the rate, so that the iterate settles where
    the true curvature leads. The target is McCandlish et al.'s optimal SGD rate
    ``eps_opt = eps_max / (1 + B_noise / B)`` (arXiv:1812.06162, eq. 2.7), written with the noise
    fraction ``phi``, whose expectation is ``B_simple / (B + B_simple)``:

    .. math::
        \mathrm{lr}_{target} = \mathrm{clip}\bigl(\mathrm{ceiling}\,(1 - \phi),\
        \mathrm{min\_lr},\ \mathrm{ceiling}\bigr)

    Per call:

    1. ``phi = EMA(N) / EMA(|g_bar|^2)`` (EMAs with decay ``noise_beta`` of the
       :class:`NoiseStatistics`; a ratio of averages, as McCandlish et al. advise);
    2. the smoothed loss ``L_s`` and its fluctuation ``D`` from :class:`LossSmoother`;
    3. :meth:`update_policy`:

       * safeguard: if ``L_s > best + rise_tolerance * D`` (``best``: the lowest ``L_s`` since
         the last cut) and no cooldown runs, the rate has outgrown the true curvature:
         ``lr <- lr * decrease_factor``, the ``ceiling`` (initially ``max_lr``) comes down to
         the new rate, and a cooldown of ``cooldown`` calls starts;
       * during a cooldown the rate is held;
       * otherwise the rate moves toward the target by a factor of at most ``1 + growth``;
       * the rate is clipped to ``[min_lr, ceiling]``.

    The rate starts at ``base_lr`` and always lies in ``[min_lr, max_lr]``. Keep ``max_lr`` below
    ``2 / lambda_max`` of the true (smoothed) curvature for gradient descent to stay stable in the
    true basin; the safeguard lowers the ceiling if it is not.

    Args:
        base_lr: the rate before any measurement (> 0).
        min_lr: lower bound, in (0, base_lr]; default ``base_lr / 10``.
        max_lr: upper bound and initial ceiling, >= base_lr; default ``10 * base_lr``.
        alpha, window: the :class:`LossSmoother`'s.
        noise_beta: EMA decay of the noise statistics in [0, 1) (0: this batch's alone).
        growth: largest relative change of the rate per call toward its target (> 0).
        decrease_factor: factor of a safeguard cut, in (0, 1].
        cooldown: calls during which the rate is held after a cut (int >= 0).
        rise_tolerance: how many loss fluctuations ``D`` the smoothed loss may rise above its best
            before the safeguard cuts (>= 0).
        estimator: the :class:`NoiseEstimator` of :meth:`get_adapted_lr` (default: a new one).
    """

    def __init__(
        self,
        base_lr: float,
        min_lr: Optional[float] = None,
        max_lr: Optional[float] = None,
        *,
        alpha: float = 0.9,
        window: Optional[int] = None,
        noise_beta: float = 0.9,
        growth: float = 0.1,
        decrease_factor: float = 0.5,
        cooldown: int = 10,
        rise_tolerance: float = 1.0,
        estimator: Optional[NoiseEstimator] = None,
    ):
        v.finite_positive("base_lr", base_lr)
        min_lr = base_lr / 10 if min_lr is None else min_lr
        max_lr = base_lr * 10 if max_lr is None else max_lr
        v.finite_positive("min_lr", min_lr)
        v.finite_positive("max_lr", max_lr)
        if not min_lr <= base_lr <= max_lr:
            raise ValueError(
                f"Invalid min_lr, base_lr, max_lr: {min_lr!r}, {base_lr!r}, {max_lr!r} "
                f"(must satisfy min_lr <= base_lr <= max_lr)"
            )
        v.in_interval(0.0, 1.0, high_inclusive=False)("noise_beta", noise_beta)
        v.finite_positive("growth", growth)
        v.in_interval(0.0, 1.0, low_inclusive=False, high_inclusive=True)("decrease_factor", decrease_factor)
        v.int_at_least(0)("cooldown", cooldown)
        v.at_least(0.0, finite=True)("rise_tolerance", rise_tolerance)
        v.optional(v.instance_of(NoiseEstimator, "a NoiseEstimator"))("estimator", estimator)
        self.base_lr, self.min_lr, self.max_lr = float(base_lr), float(min_lr), float(max_lr)
        self.noise_beta = float(noise_beta)
        self.growth = float(growth)
        self.decrease_factor = float(decrease_factor)
        self.cooldown = cooldown
        self.rise_tolerance = float(rise_tolerance)
        self.estimator = estimator or NoiseEstimator()
        self.smoother = LossSmoother(alpha, window)
        self.reset()

    def reset(self) -> None:
        """Back to ``lr = base_lr``, ``ceiling = max_lr``, with no history."""
        self.lr = self.base_lr
        self.ceiling = self.max_lr
        self.cooldown_left = 0
        self.num_updates = 0
        self.num_cuts = 0
        self.noise_fraction: Optional[float] = None
        self.last_statistics: Optional[NoiseStatistics] = None
        self._noise_power_avg = 0.0
        self._sq_norm_avg = 0.0
        self._best: Optional[float] = None
        self.smoother.reset()

    def get_adapted_lr(
        self, gradients_batch: Union[torch.Tensor, npt.ArrayLike], loss: Union[torch.Tensor, npt.ArrayLike]
    ) -> float:
        """Estimate the noise of ``gradients_batch`` (shape ``(batch_size, num_params)``, at least
        2 rows: per-sample or micro-batch gradients), smooth ``loss``, update the policy; return
        the learning rate for this step (a Python float)."""
        return self.adapt_from_statistics(self.estimator.noise_statistics(gradients_batch), loss)

    def adapt_from_statistics(self, statistics: NoiseStatistics, loss: Union[torch.Tensor, npt.ArrayLike]) -> float:
        """:meth:`get_adapted_lr` from precomputed :class:`NoiseStatistics` (what the PyTorch
        wrapper measures without materializing the gradient batch)."""
        v.instance_of(NoiseStatistics, "NoiseStatistics")("statistics", statistics)
        for name in ("mean_grad_sq_norm", "trace_row_covariance"):
            value = getattr(statistics, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"statistics.{name} must be finite and >= 0, got {value!r}")
        smoothed = self.smoother.update(loss)  # validates loss before any state below changes
        b = self.noise_beta
        self._noise_power_avg = b * self._noise_power_avg + (1 - b) * statistics.mean_noise_power
        self._sq_norm_avg = b * self._sq_norm_avg + (1 - b) * statistics.mean_grad_sq_norm
        # Both averages start at 0 with the same decay, so their ratio needs no bias correction.
        self.last_statistics = statistics
        return self.update_policy(
            _noise_fraction(self._noise_power_avg, self._sq_norm_avg), smoothed, self.smoother.deviation
        )

    def update_policy(self, noise_fraction: float, smoothed_loss: float, loss_deviation: float = 0.0) -> float:
        """One step of the policy (see the class docstring) from a noise fraction in [0, 1], the
        current smoothed loss and the loss fluctuation ``D`` (>= 0); returns the new rate."""
        noise_fraction = _scalar(noise_fraction, "noise_fraction")
        v.in_interval(0.0, 1.0, high_inclusive=True)("noise_fraction", noise_fraction)
        smoothed_loss = _scalar(smoothed_loss, "smoothed_loss")
        loss_deviation = _scalar(loss_deviation, "loss_deviation")
        v.at_least(0.0)("loss_deviation", loss_deviation)
        best = self._best
        if best is not None and smoothed_loss > best + self.rise_tolerance * loss_deviation and self.cooldown_left == 0:
            self.lr = max(self.min_lr, self.lr * self.decrease_factor)
            self.ceiling = self.lr
            self.cooldown_left = self.cooldown
            self.num_cuts += 1
            best = smoothed_loss
        elif self.cooldown_left > 0:
            self.cooldown_left -= 1
        else:
            target = min(max(self.ceiling * (1.0 - noise_fraction), self.min_lr), self.ceiling)
            step = 1.0 + self.growth
            self.lr *= min(max(target / self.lr, 1.0 / step), step)
        self._best = smoothed_loss if best is None else min(best, smoothed_loss)
        self.lr = min(max(self.lr, self.min_lr), self.ceiling)
        self.noise_fraction = noise_fraction
        self.num_updates += 1
        return self.lr

    def state_dict(self) -> Dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue identically (plain Python values)."""
        return {
            "lr": self.lr,
            "ceiling": self.ceiling,
            "cooldown_left": self.cooldown_left,
            "num_updates": self.num_updates,
            "num_cuts": self.num_cuts,
            "noise_fraction": self.noise_fraction,
            "noise_power_avg": self._noise_power_avg,
            "sq_norm_avg": self._sq_norm_avg,
            "best": self._best,
            "smoother": self.smoother.state_dict(),
            "last_statistics": None if self.last_statistics is None else asdict(self.last_statistics),
            "hyperparameters": self._hyperparameters(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the hyperparameters must match this policy's."""
        _check_keys(state, self.state_dict(), "NoiseAdaptiveLR")
        if state["hyperparameters"] != self._hyperparameters():
            raise ValueError(
                f"NoiseAdaptiveLR.load_state_dict: the state was saved with hyperparameters "
                f"{state['hyperparameters']}, this policy has {self._hyperparameters()}"
            )
        stats = state["last_statistics"]
        stats = None if stats is None else NoiseStatistics(**stats)
        self.smoother.load_state_dict(state["smoother"])
        self.lr, self.ceiling = float(state["lr"]), float(state["ceiling"])
        self.cooldown_left, self.num_updates = int(state["cooldown_left"]), int(state["num_updates"])
        self.num_cuts = int(state["num_cuts"])
        self.noise_fraction = state["noise_fraction"]
        self._noise_power_avg, self._sq_norm_avg = float(state["noise_power_avg"]), float(state["sq_norm_avg"])
        self._best = state["best"]
        self.last_statistics = stats

    def _hyperparameters(self) -> Dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "noise_beta": self.noise_beta,
            "growth": self.growth,
            "decrease_factor": self.decrease_factor,
            "cooldown": self.cooldown,
            "rise_tolerance": self.rise_tolerance,
        }
