"""Small models, exact Hessians and synthetic problems with known curvature for the curvature tests."""

from __future__ import annotations

import math
from typing import Callable, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


@pytest.fixture(scope="module")
def one_thread():
    """The models here are tiny: one intra-op thread is as fast as two and, on a machine whose
    cores are oversubscribed, 10-100x faster (OpenMP threads waiting on busy cores). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyAttention(nn.Module):
    """One self-attention layer (F.scaled_dot_product_attention) and a classifier head."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):  # x: (batch, seq, d)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out(h.mean(1))


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a hand-written backward that has no derivative itself (like many fused kernels)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        return grad_out * (1 - y * y)


class OnceTanh(nn.Module):
    def forward(self, x):
        return OnceDifferentiableTanh.apply(x)


def mlp_with(activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), activation(), nn.Linear(10, 3))


def exact_hessian(model: nn.Module, loss_fn, x, y, names: List[str] = None) -> torch.Tensor:
    """The dense Hessian of loss_fn(model(x), y) in the trainable parameters (flattened in
    named_parameters order), by torch.autograd.functional.hessian; attention on its math kernel."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    flat = torch.cat([p.detach().flatten() for _, p in named])

    def loss_of(theta):
        params, i = {}, 0
        for n, p in named:
            params[n] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(loss_of, flat)


def block_slices(model: nn.Module) -> dict:
    """Layer name -> slice of the flattened parameter vector (named_parameters order)."""
    out, i = {}, 0
    for n, p in model.named_parameters():
        layer = n.rpartition(".")[0]
        start = out[layer].start if layer in out else i
        out[layer] = slice(start, i + p.numel())
        i += p.numel()
    return out


def hutchinson_std_error(h: torch.Tensor, k: int, block: slice = None) -> float:
    """Standard error of Hutchinson's trace estimate (Rademacher probes, k samples), from the exact
    Hessian: Var(v^T H v) = 2 sum_{a != b} H_ab^2; for the block estimate v_g^T (Hv)_g the pairs
    inside the block count 4 H_ab^2 per unordered pair, those across its border H_ab^2."""
    off = h - torch.diag(torch.diag(h))
    if block is None:
        var = 2 * off.pow(2).sum()
    else:
        inside = off[block, block].pow(2).sum() * 2  # 4 H_ab^2 per unordered pair = 2 per ordered pair
        rows = off[block].pow(2).sum() - off[block, block].pow(2).sum()
        var = inside + rows
    return math.sqrt(float(var) / k)


class SharpValley(nn.Module):
    r"""A synthetic problem whose curvature decays along the training path.

    :math:`L = \tfrac12 c\, e^{-\phi} \sum_i \psi_i^2 + \lambda \sum_i \sqrt{1 + (\phi_i - T)^2}` with
    :math:`\psi = 0`: a valley of sharpness :math:`c e^{-\phi}` that widens as gradient descent moves
    :math:`\phi` toward :math:`T` down a slope of gradient about :math:`\lambda`. The model returns
    its parameters; :meth:`loss` is the loss function (inputs and targets are unused).
    """

    def __init__(self, m: int = 3, c: float = 100.0, lam: float = 1.0, far: float = 20.0):
        super().__init__()
        self.phi = nn.Parameter(torch.zeros(m))
        self.psi = nn.Parameter(torch.zeros(m))
        self.c, self.lam, self.far = c, lam, far

    def forward(self, x):
        return self.phi, self.psi

    def loss(self, out, targets):
        phi, psi = out
        return (0.5 * self.c * torch.exp(-phi) * psi**2).sum() + self.lam * torch.sqrt(1 + (phi - self.far) ** 2).sum()

    def analytic_curvature(self, eps: float = 1e-8) -> float:
        """kappa = tr(H) / (||g||^2 + eps) at psi = 0, where H is diagonal (so Hutchinson is exact):
        H_psi = c e^{-phi}, H_phi = lam / s^3, g_phi = lam (phi - T) / s, g_psi = 0, s = sqrt(1 + (phi - T)^2)."""
        phi = self.phi.detach().double()
        s = torch.sqrt(1 + (phi - self.far) ** 2)
        trace = (self.c * torch.exp(-phi) + self.lam / s**3).sum()
        g_sq = ((self.lam * (phi - self.far) / s) ** 2).sum()
        return float(trace / (g_sq + eps))


class Quadratic(nn.Module):
    """Least squares L = ||X theta - y||^2 / (2N): Hessian X^T X / N, known in closed form."""

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x @ self.theta


def half_mse(pred, y):
    return 0.5 * ((pred - y) ** 2).mean()


def quadratic_data(dim: int = 8, n: int = 64, condition: float = 100.0, seed: int = 0, dtype=torch.float64):
    """X with singular values spread so that X^T X / N has eigenvalues from 1 to ``condition``;
    returns X, y = X theta*, theta* and the Hessian X^T X / N of :func:`half_mse` (factor 1/2, mean)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, dim, generator=g, dtype=dtype))
    w, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    eig = torch.logspace(0, math.log10(condition), dim, dtype=dtype)
    x = u @ torch.diag(torch.sqrt(eig * n)) @ w.T
    theta_star = torch.randn(dim, generator=g, dtype=dtype)
    return x, x @ theta_star, theta_star, w @ torch.diag(eig) @ w.T
