"""The big buffers of Levenberg-Marquardt steps, kept from step to step: :class:`Workspace`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor


class Workspace:
    """Buffers kept from step to step. On this project's VM a fresh 139 MB tensor costs ~0.25 s of
    page faults the first time it is written, against 0.04 s to fill it again (measured): the
    Gram matrix, the Cholesky factor and the like are allocated once and reused."""

    def __init__(self):
        self._buffers: Dict[str, Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, the same memory as last time when it fits."""
        numel = 1
        for n in shape:
            numel *= n
        return self._memory(name, numel, dtype, device)[:numel].view(shape)

    def matrix(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised (rows, cols) matrix whose rows start on 64-byte boundaries: gemms that
        write into it ran ~1.45x faster than with rows at an odd stride (fastopt/reference/lm.py)."""
        per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
        stride = -(-cols // per_line) * per_line
        return self._memory(name, rows * stride, dtype, device)[: rows * stride].view(rows, stride)[:, :cols]

    def _memory(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()
