"""Pytree helpers for batches that are tensors, tuples, lists or dicts of tensors.

torch-levenberg-marquardt's ``tree`` names with its meanings (``tree_unsqueeze``,
``tree_to_device``, ``tree_first_tensor``, ``tree_cat``, ``tree_slice``, ``tree_indices``), plus
``batch_size_of``, which the training modules use to read a batch's size.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "tree_unsqueeze",
    "tree_to_device",
    "tree_first_tensor",
    "tree_cat",
    "tree_slice",
    "tree_indices",
    "batch_size_of",
]


def _indexable(x: Any) -> bool:
    return hasattr(x, "__getitem__") and not isinstance(x, str)


def tree_unsqueeze(tree: Any, dim: int = 0) -> Any:
    """Every tensor leaf unsqueezed at ``dim``; other leaves unchanged."""
    return tree_map(lambda x: x.unsqueeze(dim) if isinstance(x, Tensor) else x, tree)


def tree_to_device(tree: Any, device: Union[str, torch.device]) -> Any:
    """Every tensor leaf moved to ``device``; other leaves unchanged."""
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)


def tree_first_tensor(tree: Any) -> Tensor:
    """The first tensor leaf in flattening order; ValueError if there is none."""
    leaves, _ = tree_flatten(tree)
    first = next((x for x in leaves if isinstance(x, Tensor)), None)
    if first is None:
        raise ValueError("the batch holds no tensor")
    return first


def tree_cat(trees: List[Any], dim: int = 0) -> Any:
    """Trees of one structure joined leaf by leaf: tensors concatenated along ``dim``, other
    leaves taken from the first tree."""
    if len(trees) == 1:
        return trees[0]
    _, spec = tree_flatten(trees[0])
    leaves = [tree_flatten(t)[0] for t in trees]
    return tree_unflatten([torch.cat(g, dim=dim) if isinstance(g[0], Tensor) else g[0] for g in zip(*leaves)], spec)


def tree_slice(tree: Any, start: int, end: int) -> Any:
    """Every indexable leaf (tensor, sequence; not a str) sliced ``[start:end]``."""
    return tree_map(lambda x: x[start:end] if _indexable(x) else x, tree)


def tree_indices(tree: Any, indices: Union[Sequence[int], Tensor]) -> Any:
    """Every indexable leaf's elements at ``indices``: a tensor indexed at once, another indexable
    leaf with ``x[indices]`` or, where that is refused, rebuilt from ``x[i]``. Leaves that cannot be
    indexed (numbers, None, str) are returned unchanged, as :func:`tree_slice` does; the package
    tried to rebuild them too, which fails for a number and garbles a str."""

    def pick(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x[torch.as_tensor(indices, dtype=torch.long, device=x.device)]
        if not _indexable(x):
            return x
        try:
            return x[indices]
        except TypeError:  # e.g. a sequence without fancy indexing
            return type(x)(x[i] for i in indices)

    return tree_map(pick, tree)


def batch_size_of(tree: Any) -> int:
    """The first dimension of the batch's first tensor."""
    first = tree_first_tensor(tree)
    if first.dim() == 0:
        raise ValueError("inputs/targets must have a batch dimension; got a 0-dim tensor")
    return first.shape[0]
