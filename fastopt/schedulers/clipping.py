"""Gradient clipping whose bound shrinks with the curvature: :func:`curvature_aware_clip`."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import Tensor

from .. import _validation as v


def curvature_aware_clip(
    grads: Iterable[Optional[Tensor]], curvature: float, max_norm: float = 1.0, *, curvature_scale: float = 1e4
) -> List[Optional[Tensor]]:
    r"""Clip gradients harder in high-curvature regions.

    With :math:`m = \texttt{max\_norm} / (1 + \kappa / \texttt{curvature\_scale})` and the global norm
    :math:`\|g\| = \sqrt{\sum_i \|g_i\|^2}`: returns :math:`g_i \cdot m / \|g\|` when
    :math:`\|g\| > m`, else the gradients themselves. New tensors, nothing modified in place
    (``None`` entries are passed through).

    Args:
        grads: the gradients (e.g. ``[p.grad for p in model.parameters()]``).
        curvature (float): :math:`\kappa \ge 0`.
        max_norm (float): the norm bound at zero curvature, > 0. Default: 1.
        curvature_scale (float): the curvature that halves the bound, > 0. Default: 1e4 (the seed's).
    """
    grads = list(grads)
    v.at_least(0.0)("curvature", curvature)
    v.finite_positive("max_norm", max_norm)
    v.finite_positive("curvature_scale", curvature_scale)
    for i, g in enumerate(grads):
        if g is not None and not torch.is_tensor(g):
            raise TypeError(f"grads[{i}] must be a tensor or None, got {type(g).__name__}")
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    effective_max = max_norm / (1.0 + curvature / curvature_scale)
    # One fused launch for all norms (per tensor on its own device, accumulated in float64 as
    # before), one host read for the decision.
    norms = torch._foreach_norm([g.detach() for g in present], 2, dtype=torch.float64)
    device = present[0].device
    norm = float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])))
    if not norm > effective_max:
        return grads
    scale = effective_max / norm
    return [None if g is None else g * scale for g in grads]
