"""``[J | r]`` of a batch slice: :class:`ResidualJacobian`, layer by layer for layer stacks
(:mod:`fastopt.lm._layerwise`), else through torch.func."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call, jacfwd, jacrev, vmap
from torch.nn.modules import module as _module_globals  # the global forward hooks

from .._layerwise import LayerwiseJacobian, channels_last_view, opens_with_single_channel_conv, unsupported_reason
from ..tree import tree_unsqueeze
from .parameters import FlatParameters, Selection

JACOBIAN_MODES = ("auto", "layerwise", "jacrev", "jacfwd")


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, else ``model(inputs)``: how ``functional_call`` passes
    arguments, without its cost of swapping every parameter in and out."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _has_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward (pre-)hook is registered on ``model``, a submodule, or globally: then
    trial forwards go through the model's own forward, which calls them."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class ResidualJacobian:
    """``[J | r]`` of ``loss_fn.residuals(model(inputs), targets)`` with respect to the (selected)
    flat parameters, one row per residual (sample-major, as ``residuals.view(-1)``).

    The differentiated vector is ``[theta | s]`` and the function ``s * r(theta)``: at s = 1 its
    derivative in s is r, so the residuals come out as the last column of the same Jacobian. The
    vector is cut with one ``torch.split`` (not slices: the backward of a slice allocates and adds
    a zero tensor of the full Jacobian's size, which measured 0.85 s of a 1.75 s Jacobian at
    8000 x 4353), whose backward writes the rows of ``[J | r]`` in one ``cat``.
    """

    def __init__(
        self, model: torch.nn.Module, loss_fn: Any, params: FlatParameters, use_vmap: bool = True, mode: str = "auto"
    ):
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.use_vmap, self.mode = use_vmap, mode
        self._layerwise: Optional[LayerwiseJacobian] = None
        self.last_layerwise_outputs: Optional[Tensor] = None
        self._restride_input = opens_with_single_channel_conv(model)
        self._layerwise_took_last = False  # whether the last Jacobian was the layer-by-layer one

    def forward(self, inputs: Any) -> Any:
        """The model's outputs at the current parameters (what the trial losses are computed from).

        A model opening with a convolution of one input channel gets its image batch restrided
        channels-last (the same tensor, no copy: see fastopt.lm._layerwise.channels_last_view),
        where mkldnn's convolution is faster; its outputs may then differ from ``model(inputs)``
        by round-off (the convolution sums in another order), as the Jacobian's forward does.
        Without autograd, after a layer-by-layer Jacobian, it runs that Jacobian's own forward
        and keeps its records for the next Jacobian (one forward fewer per step on one batch)."""
        layerwise = self._layerwise
        if self._layerwise_took_last and layerwise is not None and not torch.is_grad_enabled():
            # A trial forward (no autograd: a caller who wants a graph gets the model's forward):
            # the same layers the model's forward runs, their inputs and outputs kept for the
            # next Jacobian (fastopt.lm._layerwise.LayerwiseJacobian.record_forward).
            if layerwise.chain_rule_serves(inputs, self.loss_fn) and not _has_hooks(self.model):
                return layerwise.record_forward(inputs)
        if self._restride_input and isinstance(inputs, Tensor):
            inputs = channels_last_view(inputs)
        return call_model(self.model, inputs)

    def _residual_fn(self, selection: Optional[Selection]) -> Tuple[Callable, List[int]]:
        params, model, loss_fn = self.params, self.model, self.loss_fn
        buffers = dict(model.named_buffers())
        names, shapes = params.names, params.shapes

        if selection is None:
            sizes = list(params.splits)

            def tensors_of(pieces):
                return {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}
        else:
            sizes = list(selection.sizes)
            constants = [params.flat[start : start + n] for start, n in zip(params.offsets, params.splits)]

            def tensors_of(pieces):
                out = {}
                for (kind, piece, positions, local), name, shape, base in zip(selection.plan, names, shapes, constants):
                    if kind == "whole":
                        out[name] = pieces[piece].view(shape)
                    elif kind == "part":
                        out[name] = base.index_put((local,), pieces[piece]).view(shape)
                    elif kind == "gather":
                        out[name] = base.index_put((local,), pieces[0].index_select(0, positions)).view(shape)
                    else:  # not selected: a constant, no gradient flows into it
                        out[name] = base.view(shape)
                return out

        def scaled_residuals(theta_and_scale: Tensor, inputs: Any, targets: Any) -> Tensor:
            pieces = torch.split(theta_and_scale, sizes + [1])
            outputs = functional_call(model, {**tensors_of(pieces[:-1]), **buffers}, inputs)
            return loss_fn.residuals(outputs, targets) * pieces[-1]

        return scaled_residuals, sizes

    def layerwise_reason(self, inputs: Any, selection: Optional[Selection]) -> Optional[str]:
        """Why the layer-by-layer Jacobian (fastopt.lm._layerwise) cannot serve this call; None if it can."""
        if selection is not None:
            return "a parameter selection is active"
        if not self.use_vmap:
            return "use_vmap=False asks for one jacrev of the whole batch"
        if not isinstance(inputs, Tensor):
            return "the inputs are not one tensor"
        return unsupported_reason(self.model)

    def __call__(
        self,
        inputs: Any,
        targets: Any,
        selection: Optional[Selection],
        residuals_per_sample: int,
        out: Optional[Tensor] = None,
        layerwise: Optional[bool] = None,
    ) -> Tensor:
        """``[J | r]`` of the batch: written into ``out`` (rows x (P + 1)) when the layer-by-layer
        path runs, else a new tensor from torch.func. ``layerwise``: whether the layer-by-layer
        path can serve (the caller's :meth:`layerwise_reason` is None), None to find out here."""
        columns = (selection.size if selection is not None else self.params.numel) + 1
        self.last_layerwise_outputs = None
        self._layerwise_took_last = False
        if self.mode in ("auto", "layerwise") and out is not None:
            reason = None if layerwise else self.layerwise_reason(inputs, selection)
            if reason is None:
                if self._layerwise is None:
                    offsets = {id(p): start for p, start in zip(self.params.parameters, self.params.offsets)}
                    self._layerwise = LayerwiseJacobian(self.model, offsets, self.params.flat)
                result = self._layerwise(inputs, targets, self.loss_fn, out)
                self.last_layerwise_outputs = self._layerwise.last_outputs
                self._layerwise_took_last = True
                return result
            if self.mode == "layerwise":
                raise ValueError(f"jacobian='layerwise' cannot differentiate this model: {reason}; use jacobian='auto'")
        theta = self.params.flat if selection is None else self.params.flat[selection.indices]
        augmented = torch.cat([theta, theta.new_ones(1)])
        fn, _ = self._residual_fn(selection)
        forward_mode = self.mode == "jacfwd" or (self.mode == "auto" and residuals_per_sample > columns)
        jac = jacfwd if forward_mode else jacrev
        if self.use_vmap:
            # One sample at a time, seen as a batch of 1 (inputs unsqueezed), as tlm does.
            jacobian = vmap(jac(fn), in_dims=(None, 0, 0), randomness="different")(
                augmented, tree_unsqueeze(inputs, 1), tree_unsqueeze(targets, 1)
            )
        else:
            jacobian = jac(lambda a: fn(a, inputs, targets))(augmented)
        return jacobian.reshape(-1, columns)
