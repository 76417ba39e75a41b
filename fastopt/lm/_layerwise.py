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

from .. import backends
from .loss import MSELoss

__all__ = ["LayerwiseJacobian", "channels_last_view", "opens_with_single_channel_conv", "unsupported_reason"]

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


# Sample-wise modules whose backward is called directly: the delta g below the module from g
# above it, the module's input a and output y (None: the identity), by the aten kernels autograd
# itself calls for them. A stack of Linear layers and these under MSE residuals, and a stack with
# convolutions under any loss, take their deltas by the chain rule written out
# (LayerwiseJacobian._chain_rule): no autograd graph in the forward, no engine call per residual
# component, where both cost more than the arithmetic on small models (the 61-parameter sinc
# network on 1000 samples: see bench/results/lm_profile_cpu.md), and a trial forward's records
# serve the next Jacobian (LayerwiseJacobian.record_forward).
_aten = torch.ops.aten
_Backward = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
_BACKWARDS: Dict[type, Optional[_Backward]] = {
    nn.Identity: None,
    nn.Tanh: lambda m, g, a, y: _aten.tanh_backward(g, y),
    nn.Sigmoid: lambda m, g, a, y: _aten.sigmoid_backward(g, y),
    nn.ReLU: lambda m, g, a, y: _aten.threshold_backward(g, y, 0),
    # From the output, as autograd does for an in-place ELU (alpha >= 0: see _has_backward);
    # out-of-place autograd differentiates exp(a) instead: the same derivative to round-off.
    # Written over g, a delta of _chain_rule's own that nothing reads again (no fresh memory).
    nn.ELU: lambda m, g, a, y: _aten.elu_backward.grad_input(g, cast(nn.ELU, m).alpha, 1, 1, True, y, grad_input=g),
    nn.Flatten: lambda m, g, a, y: g.reshape(a.shape),
}


# Those whose derivative csrc/lm_conv_delta_cpu.cpp applies as it writes a convolution's input delta
# (fastopt.reference.conv_grads.ACTIVATIONS): the activation between two convolutions costs no pass
# of its own. Measured on this project's CPU (2 threads, 5000 samples, best of 11, load 0.5-1): the
# MNIST example's four input deltas and ELU backwards took 1.9-2.1, 2.3-2.8, 3.2-3.6 and 14.6-21.9 ms
# by aten's convolution_backward and elu_backward, 0.4, 0.7, 1.2 and 8.4 ms by the fused op writing
# over the ELU's output (16 ms into fresh memory: the 27 MB of the largest page-fault on first touch).
_FUSED_ACTIVATIONS = {nn.ELU: "elu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}


# Those of them whose written-out backward is autograd's, bit for bit (ELU's is not: see above):
# Linear stacks with only these keep autograd's values exactly.
_EXACT_BACKWARDS = (nn.Identity, nn.Tanh, nn.Sigmoid, nn.ReLU)


def _has_backward(m: nn.Module) -> bool:
    """Whether :data:`_BACKWARDS` differentiates ``m`` (ELU from its output needs alpha >= 0)."""
    return type(m) in _BACKWARDS and (type(m) is not nn.ELU or m.alpha >= 0)


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, ...]:
    """The padding as numbers: _leaf_reason admits no padding string but "valid"."""
    return (0, 0) if conv.padding == "valid" else cast(Tuple[int, ...], conv.padding)


def _conv_input_delta(conv: nn.Conv2d, delta: Tensor, a: Tensor) -> Tensor:
    """The delta of a convolution's input from its output's: the input half of the convolution's
    backward, the call autograd makes for it."""
    return _aten.convolution_backward(
        delta,
        a,
        conv.weight.detach(),
        None,
        conv.stride,
        _conv_padding(conv),
        conv.dilation,
        False,
        (0, 0),
        conv.groups,
        (True, False, False),
    )[0]


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
    # Only the weight and bias of Linear and Conv2d layers get their columns written: any other
    # parameter (registered on the Sequential itself, or an extra one on a layer) would keep
    # whatever the buffer held, so such a model goes to torch.func.
    written = {id(getattr(m, name)) for m in leaves if type(m) in (nn.Linear, nn.Conv2d) for name in ("weight", "bias")}
    for name, p in model.named_parameters():
        if id(p) not in written:
            return f"parameter {name!r} is not the weight or bias of a Linear or Conv2d layer"
    return None


def _for_inplace(m: nn.Module, h: Tensor) -> Tensor:
    """``h``, or a copy of it for a module that overwrites its input (``inplace=True``): the
    layer-by-layer Jacobian keeps each layer's output (autograd differentiates with respect to it,
    the chain rule reads it), which an in-place activation would overwrite."""
    return h.clone() if getattr(m, "inplace", False) else h


def channels_last_view(a: Tensor) -> Tensor:
    """``a`` itself, restrided channels-last where that is free: a CPU batch of images (B, 1, H, W)
    with one channel, whose NCHW and channels-last layouts are the same bytes (the stride of a
    dimension of size 1 addresses nothing). mkldnn then takes its channels-last convolution, which
    measured on this project's CPU (2 threads, 5000 samples of the MNIST example's first layer,
    1 -> 8 channels, k 4, s 2, 20 calls in one process) 6-7 ms a call against 20-26 ms for the
    NCHW one. The values are the same tensor's; a convolution of it may differ from the NCHW one by
    round-off (another summation order), and its output is channels-last, which the layers after it
    keep: the next convolution's backward measured 9 ms there against 30-80 ms in NCHW, and
    converting back to NCHW costs a permuted copy (~20 ms for that layer's output)."""
    if a.dim() != 4 or a.shape[1] != 1 or a.device.type != "cpu":
        return a
    return a.as_strided(a.shape, (a.stride(0), 1, a.stride(2), a.stride(3)))


def opens_with_single_channel_conv(model: nn.Module) -> bool:
    """Whether ``model`` is an nn.Sequential whose first layer with parameters is an nn.Conv2d of
    one input channel: its forward passes gain by :func:`channels_last_view` of their input."""
    if type(model) is not nn.Sequential:
        return False
    leaves: List[nn.Module] = []
    _leaves(model, leaves)
    first = next((m for m in leaves if any(True for _ in m.parameters(recurse=False))), None)
    return type(first) is nn.Conv2d and first.in_channels == 1


_Step = Tuple[nn.Module, Tensor, Tensor]  # a module, its input and its output


def _layer_forward(m: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor]:
    """(the input as the layer reads it, the output) of an nn.Linear or nn.Conv2d ``m`` with its
    parameters detached (the layer-by-layer Jacobian differentiates with respect to the output)."""
    layer = cast(Union[nn.Linear, nn.Conv2d], m)
    bias = None if layer.bias is None else layer.bias.detach()
    if type(layer) is nn.Linear:
        return h, F.linear(h, layer.weight.detach(), bias)
    conv = cast(nn.Conv2d, layer)
    a = channels_last_view(h)
    return a, F.conv2d(a, conv.weight.detach(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class LayerwiseJacobian:
    """Writes ``[J | r]`` of a qualifying model into a buffer (see the module doc).

    ``offsets`` maps each trainable parameter (by id) to its column offset in the flat vector;
    ``flat`` is that vector, whose parameters' ``.data`` are views of it, if there is one (an
    update of it changes no parameter's own version counter: see :meth:`_versions`).
    """

    def __init__(self, model: nn.Module, offsets: Dict[int, int], flat: Optional[Tensor] = None):
        self.leaves: List[nn.Module] = []
        _leaves(model, self.leaves)
        self.offsets = offsets
        self.flat = flat
        self.last_outputs: Optional[Tensor] = None  # the model's outputs of the last call
        # The convolution ops (per-sample gradients, input delta) of each (op, device, dtype), chosen on first use.
        self._conv_ops: Dict[Tuple[str, torch.device, torch.dtype], Callable[..., Any]] = {}
        # Layers and modules of known derivative only: the chain rule written out.
        self.has_conv = any(type(m) is nn.Conv2d for m in self.leaves)
        self.explicit_chain = any(type(m) in (nn.Linear, nn.Conv2d) for m in self.leaves) and all(
            type(m) in (nn.Linear, nn.Conv2d) or _has_backward(m) for m in self.leaves
        )
        self._exact_chain = all(type(m) in (nn.Linear, *_EXACT_BACKWARDS) for m in self.leaves)
        # The steps of the last record_forward and what they depend on (see _recorded_steps).
        self._record: Optional[Tuple[Tensor, Tuple[int, ...], List[_Step]]] = None

    def _forward(self, x: Tensor) -> Tuple[Tensor, List[Tuple[nn.Module, Tensor, Tensor]]]:
        """The outputs, and per parameterised layer (module, input, output); the first layer's
        output is made a leaf of the graph, so that backward stops there."""
        records: List[Tuple[nn.Module, Tensor, Tensor]] = []
        h = x
        graph_started = False
        for m in self.leaves:
            if type(m) in (nn.Linear, nn.Conv2d):
                a, h = _layer_forward(m, h)
            else:
                h = m(_for_inplace(m, h))
                continue
            if not graph_started:
                h = h.detach().requires_grad_()
                graph_started = True
            records.append((m, a.detach(), h))
        return h, records

    def chain_rule_serves(self, inputs: Any, loss_fn: Any) -> bool:
        """Whether ``__call__`` takes the chain rule written out (:meth:`_chain_rule`): conv nets
        under any loss; Linear stacks of :data:`_EXACT_BACKWARDS` activations on a batch of
        vectors under MSE (autograd's values exactly)."""
        if not (self.explicit_chain and isinstance(inputs, Tensor)):
            return False
        return self.has_conv or (self._exact_chain and type(loss_fn) is MSELoss and inputs.dim() == 2)

    def _versions(self, inputs: Tensor) -> Tuple[int, ...]:
        """What a forward's records depend on besides the inputs' identity: the version counters
        of the inputs, of the flat vector (what Levenberg-Marquardt's updates and restores write)
        and of every layer's parameters (an in-place edit of one bumps its own), and the
        parameters' addresses (a ``.data`` swap changes them)."""
        versions = [inputs._version, -1 if self.flat is None else self.flat._version]
        for m in self.leaves:
            for p in m.parameters(recurse=False):
                versions += [p._version, p.data_ptr()]
        return tuple(versions)

    @torch.no_grad()
    def record_forward(self, inputs: Tensor) -> Tensor:
        """The model's outputs (a trial forward), keeping each module's input and output, which
        the next call of this Jacobian reuses if it gets the same inputs tensor, unchanged, at
        the same parameters (the next step's Jacobian after an accepted attempt, on one batch)."""
        self._record = None  # the last forward's tensors are freed before this one allocates its own
        steps = self._steps(inputs)
        self._record = (inputs, self._versions(inputs), steps)
        return steps[-1][2]

    def _recorded_steps(self, inputs: Tensor) -> Optional[List[_Step]]:
        record, self._record = self._record, None  # used once: the memory is not held longer
        if record is not None and record[0] is inputs and record[1] == self._versions(inputs):
            return record[2]
        return None

    def _steps(self, inputs: Tensor) -> List[_Step]:
        """(module, its input, its output) of each module, in order, without autograd."""
        steps: List[_Step] = []
        h = inputs
        for m in self.leaves:
            if type(m) in (nn.Linear, nn.Conv2d):
                h, y = _layer_forward(m, h)
            elif type(m) is nn.ELU and steps and type(steps[-1][0]) in (nn.Linear, nn.Conv2d):
                # In place on the layer's output, which no backward reads (ELU's reads its own
                # output): no second tensor of that size. Fresh memory costs a page fault per
                # 4 KB on first touch, which measured as much as the ELU itself for the MNIST
                # example's first layer (27 MB) on this project's CPU.
                y = F.elu(h, m.alpha, inplace=True)
            else:
                y = m(_for_inplace(m, h))
            steps.append((m, h, y))
            h = y
        return steps

    def __call__(self, inputs: Any, targets: Any, loss_fn: Any, out: Tensor) -> Tensor:
        """Fill ``out`` (rows = samples x residuals per sample, columns = P + 1) and return it."""
        if self.chain_rule_serves(inputs, loss_fn):
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
        """``__call__`` for a stack of Linear / Conv2d layers and :data:`_BACKWARDS` modules: the
        deltas by the chain rule, layer by layer from the last. The delta at the outputs is e_o
        for MSE residuals ``y_pred - y_true``, else autograd's of the residuals alone."""
        steps = self._recorded_steps(inputs) or self._steps(inputs)
        h = steps[-1][2]
        self.last_outputs = h
        mse = type(loss_fn) is MSELoss
        with torch.enable_grad():
            outputs = h if mse else h.detach().requires_grad_()
            residuals = loss_fn.residuals(outputs, targets)
            batch, per_sample = residuals.shape[0], residuals[0].numel() if residuals.shape[0] else 1
            if batch * per_sample != out.shape[0]:
                raise ValueError(
                    f"{batch} samples x {per_sample} residuals do not fill the {out.shape[0]} rows expected"
                )
            flat_r = residuals.reshape(batch, per_sample)
        rows = out.view(batch, per_sample, out.shape[1])
        rows[:, :, -1].copy_(flat_r)
        first = next(i for i, (m, _, _) in enumerate(steps) if type(m) in (nn.Linear, nn.Conv2d))
        for o in range(per_sample):
            if mse:
                delta = h.new_zeros(h.shape)
                delta.view(batch, -1)[:, o] = 1
            else:
                with torch.enable_grad():
                    (delta,) = torch.autograd.grad(flat_r[:, o].sum(), outputs, retain_graph=o + 1 < per_sample)
            target = rows[:, o, :]
            fused = -1  # the step whose backward the last input delta included
            for i in range(len(steps) - 1, first - 1, -1):
                if i == fused:
                    continue
                m, a, y = steps[i]
                if type(m) in (nn.Linear, nn.Conv2d):
                    self._write_layer(m, a, delta, target)
                    if i == first:
                        break  # no delta is needed below the first layer
                    if type(m) is nn.Linear:
                        delta = delta.matmul(m.weight)
                        continue
                    conv = cast(nn.Conv2d, m)
                    with_activation = self._fused_input_delta(
                        conv, delta, a, steps[i - 1], inputs, overwrite=o + 1 == per_sample
                    )
                    if with_activation is None:
                        delta = _conv_input_delta(conv, delta, a)
                    else:
                        delta, fused = with_activation, i - 1
                else:
                    backward = _BACKWARDS[type(m)]
                    if backward is not None:
                        delta = backward(m, delta, a, y)
        return out

    def _write_layer(self, m: nn.Module, a: Tensor, delta: Optional[Tensor], rows: Tensor) -> None:
        batch = rows.shape[0]
        if type(m) is nn.Conv2d:
            self._write_conv(m, a, delta, rows)
            return
        for name in ("weight", "bias"):
            p = getattr(m, name)
            block = self._columns(p, rows)
            if block is None:
                continue  # no bias, or a frozen parameter (not in the flat vector)
            if delta is None:  # this layer does not reach the residual
                block.zero_()
                continue
            if name == "bias":
                if delta.dim() == 2:  # (B, out): the rows themselves
                    block.copy_(delta)
                else:  # summed over any dimensions between batch and features
                    block.copy_(delta.reshape(batch, -1, p.numel()).sum(1))
            elif delta.dim() == 2:  # (B, out) x (B, in): the outer product, written in place
                torch.mul(delta[:, :, None], a[:, None, :], out=block.view(batch, *p.shape))
            else:
                block.copy_(torch.einsum("b...o,b...i->boi", delta, a).reshape(batch, -1))

    def _columns(self, p: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
        """The columns of parameter ``p`` in ``rows``; None for no parameter (no bias) or a frozen
        one (not in the flat vector)."""
        if p is None or id(p) not in self.offsets:
            return None
        start = self.offsets[id(p)]
        return rows[:, start : start + p.numel()]

    def _write_conv(self, conv: nn.Conv2d, a: Tensor, delta: Optional[Tensor], rows: Tensor) -> None:
        """Per-sample weight and bias gradients of a convolution, by the op fastopt.backends picks
        for the tensors (csrc/lm_conv_cpu.cpp on the CPU; fastopt/reference/conv_grads.py)."""
        weight_out, bias_out = self._columns(conv.weight, rows), self._columns(conv.bias, rows)
        if delta is None:  # this layer does not reach the residual
            for block in (weight_out, bias_out):
                if block is not None:
                    block.zero_()
            return
        self._conv_op("conv2d_per_sample_grads", a)(
            a,
            delta,
            weight_out,
            bias_out,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=_conv_padding(conv),
            dilation=conv.dilation,
        )

    def _conv_op(self, name: str, a: Tensor) -> Callable[..., Any]:
        """The function fastopt.backends picks for op ``name`` on ``a``'s device and dtype, cached."""
        key = (name, a.device, a.dtype)
        op = self._conv_ops.get(key)
        if op is None:
            op = self._conv_ops[key] = backends.select(name, a.device, a.dtype)
        return op

    def _fused_input_delta(
        self, conv: nn.Conv2d, delta: Tensor, a: Tensor, below: _Step, inputs: Tensor, overwrite: bool
    ) -> Optional[Tensor]:
        """The delta of the activation's input below ``conv`` in one op (conv2d_input_delta), where
        the module ``below`` is an activation of :data:`_FUSED_ACTIVATIONS` whose output is ``a``
        (a float32 / float64 CPU tensor); else None. ``overwrite``: the result may be written over
        ``a`` (its last reader, the layer's weight gradients, has run and no residual component is
        left), unless ``a`` shares memory with the caller's ``inputs``."""
        m, _, y = below
        activation = _FUSED_ACTIVATIONS.get(type(m))
        # The C++ op's devices and dtypes only: elsewhere its spec would stand in for aten's ops,
        # which nothing measured there.
        if activation is None or y is not a or not _has_backward(m) or a.device.type != "cpu":
            return None
        if a.dtype not in (torch.float32, torch.float64):
            return None
        in_place = overwrite and a.untyped_storage().data_ptr() != inputs.untyped_storage().data_ptr()
        return self._conv_op("conv2d_input_delta", a)(
            delta,
            conv.weight.detach(),
            a,
            input_size=tuple(a.shape[2:]),
            stride=conv.stride,
            padding=_conv_padding(conv),
            dilation=conv.dilation,
            activation=activation,
            alpha=float(getattr(m, "alpha", 0.0)),
            out=a if in_place else None,
        )
