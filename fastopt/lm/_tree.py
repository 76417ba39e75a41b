"""Pytree helpers for batches that are tensors, tuples, lists or dicts of tensors."""
from __future__ import annotations

from typing import Any, List

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def tree_unsqueeze(tree: Any, dim: int = 0) -> Any:
    return tree_map(lambda x: x.unsqueeze(dim) if isinstance(x, Tensor) else x, tree)


def tree_to_device(tree: Any, device) -> Any:
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)


def tree_first_tensor(tree: Any) -> Tensor:
    leaves, _ = tree_flatten(tree)
    first = next((x for x in leaves if isinstance(x, Tensor)), None)
    if first is None:
        raise ValueError("the batch holds no tensor")
    return first


def tree_slice(tree: Any, start: int, end: int) -> Any:
    return tree_map(lambda x: x[start:end] if hasattr(x, "__getitem__") and not isinstance(x, str) else x, tree)


def tree_cat(trees: List[Any], dim: int = 0) -> Any:
    """Tensor leaves concatenated; other leaves taken from the first tree."""
    if len(trees) == 1:
        return trees[0]
    _, spec = tree_flatten(trees[0])
    leaves = [tree_flatten(t)[0] for t in trees]
    return tree_unflatten([torch.cat(g, dim=dim) if isinstance(g[0], Tensor) else g[0] for g in zip(*leaves)], spec)


def batch_size_of(tree: Any) -> int:
    """The first dimension of the batch's first tensor."""
    first = tree_first_tensor(tree)
    if first.dim() == 0:
        raise ValueError("inputs/targets must have a batch dimension; got a 0-dim tensor")
    return first.shape[0]
