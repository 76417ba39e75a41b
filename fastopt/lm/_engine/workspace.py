"""The big buffers of Levenberg-Marquardt steps, kept from step to step: :class:`Workspace`."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor


class Workspace:
    """Buffers kept from step to step. On this project's VM a fresh 139 MB tensor costs ~0.25 s of
    page faults the first time it is written, against 0.04 s to fill it again (measured): the
    Gram matrix, the Cholesky factor and the like are allocated once and reused."""

    def __init__(self):
        self._buffers: Dict[str, Tensor] = {}
        # The last view handed out per name and request: a step of a small model asks for the same
        # few views every time, and building one (slice, view, slice) cost ~2-4 us. Callers write
        # into the views' memory and never restride them.
        self._views: Dict[str, Tuple[Tuple[Any, ...], Tensor]] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, the same memory as last time when it fits."""
        key = ("get", tuple(shape), dtype, device)
        kept = self._views.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        numel = 1
        for n in shape:
            numel *= n
        view = self._memory(name, numel, dtype, device)[:numel].view(shape)
        self._views[name] = (key, view)
        return view

    def matrix(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised (rows, cols) matrix whose rows start on 64-byte boundaries: gemms that
        write into it ran ~1.45x faster than with rows at an odd stride (fastopt/reference/lm.py)."""
        key = ("matrix", rows, cols, dtype, device)
        kept = self._views.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        per_line = max(1, 64 // dtype.itemsize)
        stride = -(-cols // per_line) * per_line
        view = self._memory(name, rows * stride, dtype, device)[: rows * stride].view(rows, stride)[:, :cols]
        self._views[name] = (key, view)
        return view

    def _memory(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            self._views.pop(name, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
