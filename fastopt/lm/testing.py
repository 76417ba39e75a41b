"""Small models and data shared by fastopt.lm's tests, benchmarks and examples."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch


def tanh_mlp(widths: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """Linear layers of ``widths`` (e.g. (1, 20, 1): torch-levenberg-marquardt's 61-parameter sinc
    network) with tanh between them, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: List[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(dtype)


def sinc_data(
    n: int, frequency: float = 10.0, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of y = sinc(frequency x) on [-1, 1], as (n, 1) columns."""
    x = torch.linspace(-1, 1, n, dtype=dtype, device=device).unsqueeze(1)
    return x, torch.sinc(frequency * x)


# Segments a-g of a seven-segment display: (row0, col0, row1, col1) on a 9 x 5 grid.
_SEGMENTS = {
    "a": (0, 0, 0, 4),
    "b": (0, 4, 4, 4),
    "c": (4, 4, 8, 4),
    "d": (8, 0, 8, 4),
    "e": (4, 0, 8, 0),
    "f": (0, 0, 4, 0),
    "g": (4, 0, 4, 4),
}
_DIGITS = ["abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"]


def digits(n: int, seed: int, size: int = 14) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 1, size, size), labels (n,)) of random seven-segment digits drawn from ``seed``:
    MNIST-like data made locally (nothing downloads). The glyph (9 x 5 cells, each
    ``size // 14`` pixels wide) has a random offset, stroke width and intensity, plus Gaussian noise."""
    cell = max(1, size // 14)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.zeros(n, 1, size, size)
    for i in range(n):
        top = int(torch.randint(0, size - 9 * cell, (1,), generator=gen))
        left = int(torch.randint(0, size - 5 * cell, (1,), generator=gen))
        width = int(torch.randint(1, 3, (1,), generator=gen)) * cell
        ink = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
        for seg in _DIGITS[int(labels[i])]:
            r0, c0, r1, c1 = (cell * v for v in _SEGMENTS[seg])
            rows = slice(top + r0, top + r1 + (width if r0 == r1 else cell))
            cols = slice(left + c0, left + c1 + (width if c0 == c1 else cell))
            images[i, 0, rows, cols] = ink
    images += 0.15 * torch.randn(images.shape, generator=gen)
    return images, labels


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """One epoch of shuffled (x, y) batches, the order fixed by ``seed``."""
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def train_adam_for(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seconds: float,
    lr: float,
) -> Tuple[int, int]:
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
