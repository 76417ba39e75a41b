"""Small models and data shared by fastopt.lm's tests, benchmarks and examples."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def tanh_mlp(widths: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """Linear layers of ``widths`` (e.g. (1, 20, 1): torch-levenberg-marquardt's 61-parameter sinc
    network) with tanh between them, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(dtype)


def sinc_data(n: int, frequency: float = 10.0, dtype: torch.dtype = torch.float32,
              device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of y = sinc(frequency x) on [-1, 1], as (n, 1) columns."""
    x = torch.linspace(-1, 1, n, dtype=dtype, device=device).unsqueeze(1)
    return x, torch.sinc(frequency * x)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """One epoch of shuffled (x, y) batches, the order fixed by ``seed``."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def train_adam_for(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   seconds: float, lr: float) -> Tuple[int, int]:
    """Adam on shuffled batches (epoch e shuffled with seed e) until ``seconds`` have passed, the
    baseline of the examples; returns (steps, epochs)."""
    import time

    adam = torch.optim.Adam(model.parameters(), lr=lr)
    start, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        for xb, yb in shuffled_batches(x, y, batch_size, epochs):
            adam.zero_grad()
            loss_fn(model(xb), yb).backward()
            adam.step()
            steps += 1
        epochs += 1
    return steps, epochs
