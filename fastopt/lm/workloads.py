"""Synthetic batched fitting problems: the benchmark workload of bench/bench_lsq.py, also used by
the tests and handy as an example of a batched model for :func:`fastopt.lm.curve_fit`."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["gaussian_peak", "gaussian_peaks"]


def gaussian_peak(t: Tensor, p: Tensor) -> Tensor:
    """a * exp(-(t - mu)**2 / (2 s**2)) + c for p = (a, mu, s, c), (B, 4) -> (B, M) with t (M,)."""
    a, mu, s, c = (p[..., i : i + 1] for i in range(4))
    z = (t - mu) / s
    return a * torch.exp(-0.5 * z * z) + c


def gaussian_peaks(
    batch: int, dtype: torch.dtype = torch.float64, m: int = 64, noise: float = 0.05, seed: int = 0
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(t (M,), ydata (B, M), p0 (B, 4), p_true (B, 4)): noisy peaks with random height, centre, width
    and offset, and the data-driven initial guess a practitioner would use (height above the
    baseline, position of the maximum, a fixed width, the baseline)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(-3, 3, m, dtype=torch.float64)
    u = torch.rand(batch, 4, generator=gen, dtype=torch.float64)
    p_true = torch.stack([0.5 + 1.5 * u[:, 0], -1 + 2 * u[:, 1], 0.3 + 0.7 * u[:, 2], -0.2 + 0.4 * u[:, 3]], -1)
    y = gaussian_peak(t, p_true) + noise * torch.randn(batch, m, generator=gen, dtype=torch.float64)
    base = torch.minimum(y[:, :8].mean(-1), y[:, -8:].mean(-1))
    p0 = torch.stack([y.max(-1).values - base, t[y.argmax(-1)], torch.full_like(base, 0.6), base], -1)
    return t.to(dtype), y.to(dtype), p0.to(dtype), p_true.to(dtype)
