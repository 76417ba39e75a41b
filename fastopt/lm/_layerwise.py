"""Per-sample Jacobians of layer stacks without torch.func: one forward, one backward per output.

For an ``nn.Sequential`` (nested ones included) of ``nn.Linear`` / ``nn.Conv2d`` layers and
sample-wise modules (activations, pooling, flatten, ...), the Jacobian row of residual (n, o) is,
per layer with input ``a`` and output ``z = a W^T + b`` (or the convolution),

    dr[n, o]/dW = delta[n] (x) a[n],   dr[n, o]/db = delta[n],   delta = d(sum_n r[n, o])/dz,

because sample n's residuals depend on sample n alone. One forward records each layer's input
and output, one backward per residual component o gives every delta, and the products are
written straight into the rows of ``[J | r]``. Same values as ``vmap(jacrev(...))`` (the chain
rule, summed in another order); measured on this project's CPU (one thread) 0.76 ms against
1.62 ms for the 61-parameter sinc model on 1000 samples, where torch.func's per-call overhead
dominates. Anything else (other layers, buffers, custom containers, dropout in training mode)
goes to torch.func: :func:`unsupported_reason` says why.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import MSELoss

__all__ = ["LayerwiseJacobian", "unsupported_reason"]

# Modules without parameters that act on each sample separately (batch dimension first).
_SAMPLEWISE = (
    nn.Identity,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


# Activations whose backward is called directly: the delta g below the layer from g above it and
# the layer's output y (None: the identity), by the aten kernels autograd itself calls for them
# (the same values, bit for bit). A stack of Linear layers and these under MSE residuals takes its
# deltas by the chain rule written out (LayerwiseJacobian._chain_rule): no autograd graph in the
# forward, no engine call per residual component, where both cost more than the arithmetic on
# small models (the 61-parameter sinc network on 1000 samples: see bench/results/lm_profile_cpu.md).
_aten = torch.ops.aten
_BACKWARDS: Dict[type, Optional[Callable[[Tensor, Tensor], Tensor]]] = {
    nn.Identity: None,
    nn.Tanh: lambda g, y: _aten.tanh_backward(g, y),
    nn.Sigmoid: lambda g, y: _aten.sigmoid_backward(g, y),
    nn.ReLU: lambda g, y: _aten.threshold_backward(g, y, 0),
}


def _leaves(model: nn.Module, out: List[nn.Module]) -> Optional[str]:
    if type(model) is nn.Sequential:
        for child in model:
            reason = _leaves(child, out)
            if reason:
                return reason
        return None
    out.append(model)
    return None


def _leaf_reason(m: nn.Module) -> Optional[str]:
    kind = type(m)
    if kind is nn.Linear:
        return None
    if kind is nn.Conv2d:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            return f"{m!r}: only groups=1, zero padding given as numbers"
        return None
    if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
        return f"{kind.__name__} has parameters or buffers"
    if kind in (nn.Flatten, nn.Unflatten):
        # A negative dimension may reach the batch dimension: only positive ones are sample-wise.
        dim = cast(nn.Flatten, m).start_dim if kind is nn.Flatten else cast(nn.Unflatten, m).dim
        return None if dim >= 1 else f"{kind.__name__} with dimension {dim} may act across samples"
    if kind in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
        return None if (not m.training or m.p == 0) else "dropout in training mode (random per sample)"
    if kind in (nn.Softmax, nn.LogSoftmax):
        # dim=-1 is the feature dimension of any input with one (a batch of vectors or more).
        softmax_dim = cast(Union[nn.Softmax, nn.LogSoftmax], m).dim
        return (
            None
            if softmax_dim is not None and (softmax_dim >= 1 or softmax_dim == -1)
            else f"{kind.__name__}(dim={softmax_dim}) may act across samples"
        )
    if kind in _SAMPLEWISE:
        return None
    return f"{kind.__name__} is not a layer fastopt differentiates layer by layer"


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why :class:`LayerwiseJacobian` cannot differentiate ``model``; None if it can."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    leaves: List[nn.Module] = []
    _leaves(model, leaves)
    if len({id(m) for m in leaves}) != len(leaves):
        return "a module appears twice in the model (shared weights)"
    for m in leaves:
        reason = _leaf_reason(m)
        if reason:
            return reason
    return None


def _for_inplace(m: nn.Module, h: Tensor) -> Tensor:
    """``h``, or a copy of it for a module that overwrites its input (``inplace=True``): the
    layer-by-layer Jacobian keeps each layer's output (autograd differentiates with respect to it,
    the chain rule reads it), which an in-place activation would overwrite."""
    return h.clone() if getattr(m, "inplace", False) else h


def _unfolded(
    a: Tensor, kernel: Tuple[int, ...], dilation: Tuple[int, ...], padding: Any, stride: Tuple[int, ...]
) -> Tensor:
    """``F.unfold(a, ...)``: (B, C * kh * kw, OH * OW), the same values. Without dilation it is a
    strided view of the (padded) input copied once: measured on this project's CPU, 5000 samples
    of the MNIST example's convolutions, 27 ms against F.unfold's 65 ms (1 x 28 x 28, k 4, s 2),
    37 against 57 (8 x 13 x 13) and 0.6-1.5 against 7-9 ms (the 2 x 2 kernels): F.unfold (im2col)
    works through the batch sample by sample."""
    if tuple(dilation) != (1, 1):
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    if pad_h or pad_w:
        a = F.pad(a, (pad_w, pad_w, pad_h, pad_h))
    (kh, kw), (sh, sw) = kernel, stride
    windows = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, OH, OW, kh, kw), a view
    b, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, oh * ow)


class LayerwiseJacobian:
    """Writes ``[J | r]`` of a qualifying model into a buffer (see the module doc).

    ``offsets`` maps each trainable parameter (by id) to its column offset in the flat vector.
    """

    def __init__(self, model: nn.Module, offsets: Dict[int, int]):
        self.leaves: List[nn.Module] = []
        _leaves(model, self.leaves)
        self.offsets = offsets
        self.last_outputs: Optional[Tensor] = None  # the model's outputs of the last call
        # Linear layers and activations of known derivative only: the chain rule written out.
        self.explicit_chain = any(type(m) is nn.Linear for m in self.leaves) and all(
            type(m) is nn.Linear or type(m) in _BACKWARDS for m in self.leaves
        )

    def _forward(self, x: Tensor) -> Tuple[Tensor, List[Tuple[nn.Module, Tensor, Tensor]]]:
        """The outputs, and per parameterised layer (module, input, output); the first layer's
        output is made a leaf of the graph, so that backward stops there."""
        records: List[Tuple[nn.Module, Tensor, Tensor]] = []
        h = x
        graph_started = False
        for m in self.leaves:
            if type(m) is nn.Linear:
                a = h
                h = F.linear(a, m.weight.detach(), None if m.bias is None else m.bias.detach())
            elif type(m) is nn.Conv2d:
                a = h
                h = F.conv2d(
                    a,
                    m.weight.detach(),
                    None if m.bias is None else m.bias.detach(),
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                )
            else:
                h = m(_for_inplace(m, h))
                continue
            if not graph_started:
                h = h.detach().requires_grad_()
                graph_started = True
            records.append((m, a.detach(), h))
        return h, records

    def __call__(self, inputs: Any, targets: Any, loss_fn: Any, out: Tensor) -> Tensor:
        """Fill ``out`` (rows = samples x residuals per sample, columns = P + 1) and return it."""
        if self.explicit_chain and type(loss_fn) is MSELoss and isinstance(inputs, Tensor) and inputs.dim() == 2:
            return self._chain_rule(inputs, targets, loss_fn, out)
        with torch.enable_grad():
            outputs, records = self._forward(inputs)
            self.last_outputs = outputs.detach()
            residuals = loss_fn.residuals(outputs, targets)
            batch = residuals.shape[0]
            per_sample = residuals[0].numel() if batch else 1
            if batch * per_sample != out.shape[0]:
                raise ValueError(
                    f"{batch} samples x {per_sample} residuals do not fill the {out.shape[0]} rows expected"
                )
            flat_r = residuals.reshape(batch, per_sample)
            rows = out.view(batch, per_sample, out.shape[1])
            rows[:, :, -1].copy_(flat_r.detach())
            outs = [z for _, _, z in records]
            for o in range(per_sample):
                deltas = torch.autograd.grad(
                    flat_r[:, o].sum(), outs, retain_graph=o + 1 < per_sample, allow_unused=True
                )
                target = rows[:, o, :]
                for (m, a, _), delta in zip(records, deltas):
                    self._write_layer(m, a, delta, target)
        return out

    @torch.no_grad()
    def _chain_rule(self, inputs: Tensor, targets: Any, loss_fn: Any, out: Tensor) -> Tensor:
        """``__call__`` for a stack of Linear layers and :data:`_BACKWARDS` activations on a batch
        of vectors, MSE residuals ``y_pred - y_true`` (d r[n, o] / d outputs[n] = e_o): the deltas
        by the chain rule, layer by layer from the last."""
        steps: List[Tuple[nn.Module, Tensor, Tensor]] = []  # (module, its input, its output)
        h = inputs
        for m in self.leaves:
            if type(m) is nn.Linear:
                y = F.linear(h, m.weight, m.bias)
            else:
                y = m(_for_inplace(m, h))
            steps.append((m, h, y))
            h = y
        self.last_outputs = h
        residuals = loss_fn.residuals(h, targets)
        batch, per_sample = residuals.shape[0], residuals[0].numel() if residuals.shape[0] else 1
        if batch * per_sample != out.shape[0]:
            raise ValueError(f"{batch} samples x {per_sample} residuals do not fill the {out.shape[0]} rows expected")
        rows = out.view(batch, per_sample, out.shape[1])
        rows[:, :, -1].copy_(residuals.reshape(batch, per_sample))
        first = next(i for i, (m, _, _) in enumerate(steps) if type(m) is nn.Linear)
        for o in range(per_sample):
            delta = h.new_zeros(h.shape)
            delta[:, o] = 1
            target = rows[:, o, :]
            for i in range(len(steps) - 1, first - 1, -1):
                m, a, y = steps[i]
                if type(m) is nn.Linear:
                    self._write_layer(m, a, delta, target)
                    if i > first:  # the delta of the layer below; none is needed below the first
                        delta = delta.matmul(m.weight)
                else:
                    backward = _BACKWARDS[type(m)]
                    if backward is not None:
                        delta = backward(delta, y)
        return out

    def _write_layer(self, m: nn.Module, a: Tensor, delta: Optional[Tensor], rows: Tensor) -> None:
        batch = rows.shape[0]
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is None or id(p) not in self.offsets:
                continue  # no bias, or a frozen parameter (not in the flat vector)
            start = self.offsets[id(p)]
            block = rows[:, start : start + p.numel()]
            if delta is None:  # this layer does not reach the residual
                block.zero_()
                continue
            if name == "bias":
                if type(m) is nn.Linear and delta.dim() == 2:  # (B, out): the rows themselves
                    block.copy_(delta)
                elif type(m) is nn.Linear:  # summed over any dimensions between batch and features
                    block.copy_(delta.reshape(batch, -1, p.numel()).sum(1))
                else:
                    block.copy_(delta.flatten(2).sum(2))
            elif type(m) is nn.Linear:
                if delta.dim() == 2:  # (B, out) x (B, in): the outer product, written in place
                    torch.mul(delta[:, :, None], a[:, None, :], out=block.view(batch, *p.shape))
                else:
                    block.copy_(torch.einsum("b...o,b...i->boi", delta, a).reshape(batch, -1))
            else:  # Conv2d: per-sample weight gradient from the unfolded input
                conv = cast(nn.Conv2d, m)
                # _leaf_reason admits no padding string but "valid": the rest are numbers.
                padding = 0 if conv.padding == "valid" else cast(Tuple[int, ...], conv.padding)
                cols = _unfolded(a, conv.kernel_size, conv.dilation, padding, conv.stride)
                grad = torch.bmm(delta.flatten(2), cols.transpose(1, 2))
                block.copy_(grad.reshape(batch, -1))
