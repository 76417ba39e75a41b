"""Optimizer configuration from a model's architecture (ladam 0.4.1's ``ladam.auto``).

:func:`analyze_model` sorts a model's trainable parameters into layer types and reports how much
of the model sits in types where the Laplacian coupling helped in ladam's benchmarks;
:func:`auto_configure` builds a :class:`fastopt.LAdam` with one parameter group per recommended
``c2`` and, given the run length, a :class:`fastopt.ChiAnnealScheduler`::

    from fastopt.auto import auto_configure
    optimizer, scheduler = auto_configure(model, lr=1e-3, total_steps=10_000)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _validation as v
from .optim import ChiAnnealScheduler, LAdam

# Module or parameter names (one dot-separated component, lower-cased) that mark attention.
_ATTENTION_NAMES = frozenset(
    (
        "self_attn",
        "multihead_attn",
        "attention",
        "attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "query",
        "key",
        "value",
    )
)

# Layer type of a >= 2-D parameter by the type of the module that owns it, first match wins.
_OWNER_TYPES = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    (
        (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
            nn.LayerNorm,
            nn.GroupNorm,
            nn.InstanceNorm1d,
            nn.InstanceNorm2d,
            nn.InstanceNorm3d,
        ),
        "norm",
    ),
    ((nn.Embedding,), "embedding"),
    ((nn.Linear,), "linear"),
)

# Recommended c2 per layer type, ladam 0.4.1's table (from its 64-experiment benchmark): only
# plain linear layers gained; attention was harmed (GPT-2 perplexity blew up), the rest showed no
# benefit or has no spatial structure. The order is the order of the report's "c2_map".
C2_BY_LAYER_TYPE: Dict[str, float] = {
    "linear": 1e-5,
    "conv": 0.0,
    "attention": 0.0,
    "norm": 0.0,
    "embedding": 0.0,
    "bias": 0.0,
    "other": 0.0,
}


def _is_attention(name: str) -> bool:
    return not _ATTENTION_NAMES.isdisjoint(name.lower().split("."))


def _layer_type(name: str, param: torch.Tensor, modules: Dict[str, nn.Module]) -> str:
    """One of 'attention', 'conv', 'linear', 'norm', 'embedding', 'bias' (ladam's classes)."""
    if param.ndim <= 1:
        return "bias"
    if _is_attention(name):
        return "attention"
    owner = modules.get(name.rpartition(".")[0])
    for types, kind in _OWNER_TYPES:
        if isinstance(owner, types):
            return kind
    # ladam's shape fallback; its last case ("other" for < 2-D) cannot occur after "bias".
    return "conv" if param.ndim >= 3 else "linear"


def _typed_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(layer type, parameter) for each trainable parameter, in ``named_parameters`` order."""
    modules = dict(model.named_modules())
    return [(_layer_type(name, p, modules), p) for name, p in model.named_parameters() if p.requires_grad]


def _architecture(model: nn.Module) -> str:
    """'transformer', 'rnn', 'cnn' or 'mlp', checked in that order (ladam's rule)."""
    modules = list(model.modules())
    if any(_is_attention(name) for name, _ in model.named_parameters()) or any(
        "attention" in t or "transformer" in t for t in (type(m).__name__.lower() for m in modules)
    ):
        return "transformer"
    if any(isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)) for m in modules):
        return "rnn"
    if any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in modules):
        return "cnn"
    return "mlp"


def analyze_model(model: nn.Module) -> Dict[str, Any]:
    """Classify a model's trainable parameters and say whether LAdam's coupling is likely to help.

    A parameter of at most one dimension is a ``'bias'``; a larger one is ``'attention'`` when a
    component of its name is an attention name (``attn``, ``q_proj``, ``query``, ...), else it
    takes the type of the module that owns it (Conv1d/2d/3d: ``'conv'``, batch/layer/group/
    instance norms: ``'norm'``, Embedding: ``'embedding'``, Linear: ``'linear'``), else ``'conv'``
    for 3 or more dimensions and ``'linear'`` for 2.

    Returns:
        dict with, exactly as ``ladam.auto.analyze_model`` 0.4.1:
        ``architecture`` ('transformer', 'rnn', 'cnn' or 'mlp'), ``total_params`` (trainable
        elements), ``layer_counts`` and ``layer_params`` (tensors and elements per layer type,
        sorted by type), ``recommendation`` (a sentence) and ``c2_map`` (recommended c2 of each
        type present).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    v.nn_module("model", model)
    counts: Dict[str, int] = {}
    sizes: Dict[str, int] = {}
    for kind, p in _typed_parameters(model):
        counts[kind] = counts.get(kind, 0) + 1
        sizes[kind] = sizes.get(kind, 0) + p.numel()
    arch = _architecture(model)
    total = sum(sizes.values())
    coupled = [kind for kind, c2 in C2_BY_LAYER_TYPE.items() if c2 > 0 and kind in counts]
    coupled_params = sum(sizes[kind] for kind in coupled)
    pct = 100.0 * coupled_params / total if total > 0 else 0.0
    # The sentences are ladam's, word for word (the report is compared to ladam's).
    if not coupled:
        rec = (
            f"Architecture '{arch}' has no layer types where LAdamW's Laplacian "
            f"provides measured benefit. Consider using standard AdamW."
        )
    elif pct < 10:
        rec = (
            f"Only {pct:.1f}% of parameters ({coupled_params:,} / {total:,}) "
            f"benefit from Laplacian coupling. Mixed optimizer recommended."
        )
    else:
        rec = (
            f"{pct:.1f}% of parameters ({coupled_params:,} / {total:,}) are in "
            f"layer types where LAdamW showed gains. Good candidate for LAdamW."
        )
    return {
        "architecture": arch,
        "total_params": total,
        "layer_counts": dict(sorted(counts.items())),
        "layer_params": dict(sorted(sizes.items())),
        "recommendation": rec,
        "c2_map": {kind: c2 for kind, c2 in C2_BY_LAYER_TYPE.items() if kind in counts},
    }


def auto_configure(
    model: nn.Module,
    lr: float = 1e-3,
    total_steps: Optional[int] = None,
    total_epochs: Optional[int] = None,
    steps_per_epoch: Optional[int] = None,
    weight_decay: float = 0.0,
    use_scheduler: bool = True,
) -> Tuple[LAdam, Optional[ChiAnnealScheduler]]:
    """A :class:`fastopt.LAdam` with per-layer-type ``c2`` and, optionally, a
    :class:`fastopt.ChiAnnealScheduler`, as ``ladam.auto.auto_configure`` 0.4.1 builds them.

    Trainable parameters are classified as in :func:`analyze_model` and grouped by the ``c2`` of
    their type (linear weights 1e-5, everything else 0), one group per distinct ``c2`` in
    increasing order, each with ``lr`` and ``weight_decay``; the other hyperparameters are
    LAdam's defaults.

    Args:
        model (nn.Module): the model to optimize.
        lr (float): learning rate of every group, finite and > 0. Default: 1e-3.
        total_steps (int, optional): scheduler length, >= 1.
        total_epochs (int, optional), steps_per_epoch (int, optional): both >= 1; their product
            is the scheduler length when ``total_steps`` is not given.
        weight_decay (float): decoupled weight decay, >= 0. Default: 0.
        use_scheduler (bool): build the scheduler. Default: True.

    Returns:
        ``(optimizer, scheduler)``; ``scheduler`` is ``None`` when ``use_scheduler`` is False.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an argument has the wrong type.
        ValueError: an argument is out of range; ``use_scheduler`` is True and no length is
            given (ladam's error); the model has no trainable parameter (torch's error).

    Example::

        >>> optimizer, scheduler = auto_configure(model, lr=1e-3, total_epochs=100, steps_per_epoch=391)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step(); optimizer.zero_grad()
        ...     if scheduler: scheduler.step()
    """
    v.nn_module("model", model)
    v.finite_positive("lr", lr)
    for name, value in (
        ("total_steps", total_steps),
        ("total_epochs", total_epochs),
        ("steps_per_epoch", steps_per_epoch),
    ):
        v.optional(v.int_at_least(1))(name, value)
    v.at_least(0.0, finite=True)("weight_decay", weight_decay)
    v.flag("use_scheduler", use_scheduler)

    if total_steps is None and total_epochs is not None and steps_per_epoch is not None:
        total_steps = total_epochs * steps_per_epoch
    if total_steps is None and use_scheduler:
        raise ValueError("Either total_steps or (total_epochs + steps_per_epoch) required when use_scheduler=True")

    by_c2: Dict[float, List[nn.Parameter]] = {}
    for kind, p in _typed_parameters(model):
        by_c2.setdefault(C2_BY_LAYER_TYPE[kind], []).append(p)
    optimizer = LAdam(
        [
            {"params": params, "c2": c2, "lr": lr, "weight_decay": weight_decay}
            for c2, params in sorted(by_c2.items(), key=lambda item: item[0])
        ]
    )
    scheduler = None
    if use_scheduler:
        assert total_steps is not None  # use_scheduler without total_steps raised above
        scheduler = ChiAnnealScheduler(optimizer, total_steps=total_steps)
    return optimizer, scheduler
