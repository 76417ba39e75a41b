"""The trainable parameters of a Levenberg-Marquardt step: :class:`FlatParameters` (one flat
vector the model's parameters are views into, with a backup for rejected attempts) and
:class:`Selection` (the columns a parameter selection strategy picks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

LINALG_DTYPES = (torch.float32, torch.float64)


class FlatParameters:
    """The model's trainable parameters as one flat vector ``flat`` (the parameters' ``.data``
    become views into it, so one ``flat.add_`` updates the model), plus ``backup``."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        kinds = {(p.device, p.dtype) for _, p in named}
        if len(kinds) > 1:
            raise ValueError(
                "Levenberg-Marquardt needs all trainable parameters on one device with one "
                f"dtype; got {sorted(str(k) for k in kinds)}"
            )
        device, dtype = next(iter(kinds))
        if dtype not in LINALG_DTYPES:
            raise TypeError(
                f"Levenberg-Marquardt solves its systems in float32 or float64; the model's "
                f"parameters are {dtype} (convert the model with model.float() or model.double())"
            )
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.splits = [p.numel() for _, p in named]
        self.offsets = [0]
        for n in self.splits:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self.device, self.dtype = device, dtype
        self.flat = torch.cat([p.detach().flatten() for _, p in named])
        for (_, p), start, n in zip(named, self.offsets, self.splits):
            p.data = self.flat[start : start + n].view_as(p)
        self.backup = self.flat.clone()
        self.parameters = [p for _, p in named]

    # Plain copies, no torch.no_grad(): flat and backup need no grad, a copy records nothing.
    def save(self) -> None:
        self.backup.copy_(self.flat)  # into the same buffer: no allocation per accepted step

    def restore(self) -> None:
        self.flat.copy_(self.backup)

    def tensors(self, flat: Tensor) -> Dict[str, Tensor]:
        """Name -> view of ``flat`` (a vector laid out like :attr:`flat`) in each parameter's shape."""
        return {name: t.view(shape) for name, t, shape in zip(self.names, torch.split(flat, self.splits), self.shapes)}


@dataclass
class Selection:
    """The columns of a step's Jacobian: flat indices (in the order given), and how to rebuild each
    parameter tensor from the vector of selected values.

    ``sizes`` splits that vector into one piece per selected tensor (indices sorted ascending), or
    is one piece (any other order). ``plan`` has per parameter tensor (kind, piece, positions,
    local): 'whole' (the piece is the tensor), 'part' (the piece holds the entries ``local``),
    'gather' (entries ``local`` from ``positions`` of the single piece) or 'none' (a constant).
    """

    indices: Tensor
    sizes: List[int]
    plan: List[Tuple[str, int, Optional[Tensor], Optional[Tensor]]]

    @property
    def size(self) -> int:
        return self.indices.numel()


def make_selection(params: FlatParameters, indices: Any) -> Selection:
    """Check a strategy's indices and plan how each parameter tensor is rebuilt from them."""
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            "a parameter selection strategy must return a 1-D integer tensor of flat indices; got "
            f"{indices if not isinstance(indices, Tensor) else (indices.dtype, tuple(indices.shape))}"
        )
    if indices.numel() == 0:
        raise ValueError("the parameter selection strategy selected no parameters")
    host = indices.detach().to("cpu", torch.int64)
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= params.numel:
        raise ValueError(f"parameter selection indices must lie in [0, {params.numel}); got [{low}, {high}]")
    if torch.unique(host).numel() != host.numel():
        raise ValueError("parameter selection indices must be distinct")
    ascending = host.numel() == 1 or bool((host[1:] > host[:-1]).all())
    plan: List[Tuple[str, int, Optional[Tensor], Optional[Tensor]]] = []
    sizes: List[int] = []
    for start, n in zip(params.offsets, params.splits):
        inside = ((host >= start) & (host < start + n)).nonzero().flatten()
        if inside.numel() == 0:
            plan.append(("none", -1, None, None))
            continue
        local = (host[inside] - start).to(params.device)
        if not ascending:
            plan.append(("gather", 0, inside.to(params.device), local))
            continue
        # Sorted indices: this tensor's entries are one contiguous piece of the selected values.
        plan.append(("whole" if inside.numel() == n else "part", len(sizes), None, local))
        sizes.append(inside.numel())
    if not ascending:
        sizes = [host.numel()]
    return Selection(indices.to(device=params.device, dtype=torch.int64), sizes, plan)
