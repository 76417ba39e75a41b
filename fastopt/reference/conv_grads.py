"""Per-sample weight and bias gradients of a 2-D convolution, written into rows of ``[J | r]``.

For sample n with input ``a[n]`` (C, H, W) and delta ``d[n] = dL/dz[n]`` (C_out, OH, OW) of the
convolution's output z, the gradients of that sample's L with respect to the weight and bias are

    dW[n, o, c, i, j] = sum_{y, x} d[n, o, y, x] * a[n, c, y*sh - ph + i*dh, x*sw - pw + j*dw]
    db[n, o]          = sum_{y, x} d[n, o, y, x]

(the input reads as zero in the padding): ``d[n]`` times the transposed unfolded input
(im2col). This is the executable spec of ``fastopt._C``'s ``conv2d_per_sample_grads`` and the
path on devices (or builds) without it. fastopt.lm's layer-by-layer Jacobian calls it with
``weight_out`` / ``bias_out`` the columns of the layer's parameters in the rows of ``[J | r]``.

The chain rule below such a layer needs the delta of its input ``a = act(u)`` with respect to the
activation's input u: the transposed convolution of d, times act'(u) written from ``y = act(u)``
(``conv2d_input_delta_reference``, the spec of ``fastopt._C``'s ``conv2d_input_delta``):

    da[n, c, h, w] = sum_{o, i, j : h = y*sh - ph + i*dh, w = x*sw - pw + j*dw} weight[o, c, i, j] * d[n, o, y, x]
    du[n, c, h, w] = da[n, c, h, w] * act'(y[n, c, h, w])
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "conv2d_input_delta_reference", "conv2d_per_sample_grads_reference", "unfolded_input"]


def _output_extent(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output extent of a convolution along one dimension, as F.conv2d's."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def unfolded_input(
    a: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """``F.unfold(a, ...)``: (B, C * kh * kw, OH * OW), the same values. Without dilation it is a
    strided view of the (padded) input copied once: measured on this project's CPU, 5000 samples
    of the MNIST example's convolutions, 27 ms against F.unfold's 65 ms (1 x 28 x 28, k 4, s 2),
    37 against 57 (8 x 13 x 13) and 0.6-1.5 against 7-9 ms (the 2 x 2 kernels): F.unfold (im2col)
    works through the batch sample by sample."""
    kernel, step, pad, dil = (tuple(int(v) for v in t) for t in (kernel_size, stride, padding, dilation))
    if dil != (1, 1):
        return F.unfold(a, kernel, dilation=dil, padding=pad, stride=step)
    if pad != (0, 0):
        a = F.pad(a, (pad[1], pad[1], pad[0], pad[0]))
    (kh, kw), (sh, sw) = kernel, step
    windows = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, OH, OW, kh, kw), a view
    b, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, oh * ow)


def _pair(values: Sequence[int], name: str) -> Tuple[int, int]:
    if len(values) != 2:
        raise ValueError(f"conv2d_per_sample_grads: {name} must have 2 values, got {list(values)}")
    return int(values[0]), int(values[1])


def conv2d_per_sample_grads_reference(
    input: Tensor,
    delta: Tensor,
    weight_out: Optional[Tensor],
    bias_out: Optional[Tensor],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> None:
    """Write sample n's weight gradient into ``weight_out[n]`` (C_out * C * kh * kw values, in the
    weight's (o, c, i, j) order) and its bias gradient into ``bias_out[n]`` (C_out); either may be
    None (not wanted). ``input``: (B, C, H, W), ``delta``: (B, C_out, OH, OW), any strides."""
    geometry = [_pair(v, name) for v, name in ((kernel_size, "kernel_size"), (stride, "stride"))]
    geometry += [_pair(v, name) for v, name in ((padding, "padding"), (dilation, "dilation"))]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if input.dim() != 4 or delta.dim() != 4:
        raise ValueError(
            "conv2d_per_sample_grads: input must have shape (B, C, H, W) and delta (B, C_out, OH, OW), got "
            f"{tuple(input.shape)} and {tuple(delta.shape)}"
        )
    batch, channels = input.shape[:2]
    out_channels = delta.shape[1]
    oh, ow = _output_extent(input.shape[2], kh, sh, ph, dh), _output_extent(input.shape[3], kw, sw, pw, dw)
    if tuple(delta.shape) != (batch, out_channels, oh, ow):
        raise ValueError(
            f"conv2d_per_sample_grads: delta must have shape ({batch}, C_out, {oh}, {ow}) for input "
            f"{tuple(input.shape)}, got {tuple(delta.shape)}"
        )
    for name, out, columns in (
        ("weight_out", weight_out, out_channels * channels * kh * kw),
        ("bias_out", bias_out, out_channels),
    ):
        if out is not None and (out.dim() != 2 or tuple(out.shape) != (batch, columns)):
            raise ValueError(
                f"conv2d_per_sample_grads: {name} must have shape ({batch}, {columns}), got {tuple(out.shape)}"
            )
        if out is not None and out.dtype != input.dtype:
            raise TypeError(
                f"conv2d_per_sample_grads: {name} must have the input's dtype {input.dtype}, got {out.dtype}"
            )
    flat_delta = delta.reshape(batch, out_channels, oh * ow)
    if bias_out is not None:
        bias_out.copy_(flat_delta.sum(2))
    if weight_out is not None:
        cols = unfolded_input(input, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
        weight_out.copy_(flat_delta.bmm(cols.transpose(1, 2)).reshape(batch, -1))


# act'(u) from the activation's output y, as torch's backward ops compute it from their result
# (elu_backward with is_result=True, tanh_backward, sigmoid_backward, threshold_backward at 0).
ACTIVATIONS: Dict[str, Optional[Callable[[Tensor, float], Tensor]]] = {
    "identity": None,
    "elu": lambda y, alpha: (y > 0).to(y.dtype) + (y <= 0).to(y.dtype) * (y + alpha),
    "tanh": lambda y, alpha: 1 - y * y,
    "sigmoid": lambda y, alpha: (1 - y) * y,
    "relu": lambda y, alpha: (y > 0).to(y.dtype),
}


def conv2d_input_delta_reference(
    delta: Tensor,
    weight: Tensor,
    activation_output: Optional[Tensor],
    *,
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    alpha: float,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The delta of the activation's input below a convolution: ``delta`` (B, C_out, OH, OW) of the
    convolution's output through ``weight`` (C_out, C, kh, kw) back to its input of spatial size
    ``input_size`` (H, W), times the derivative of ``activation`` (one of :data:`ACTIVATIONS`;
    ``alpha``: ELU's) from its output ``activation_output`` (B, C, H, W; None for identity).
    Written into ``out`` where given (it may be ``activation_output`` itself) and returned."""
    op = "conv2d_input_delta"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    values = [tuple(int(v) for v in t) for t in (input_size, stride, padding, dilation)]
    if any(len(v) != 2 for v in values):
        raise ValueError(
            f"{op}: input_size, stride, padding and dilation must have 2 values each, got {[list(v) for v in values]}"
        )
    (h, w), (sh, sw), (ph, pw), (dh, dw) = values
    if delta.dim() != 4 or weight.dim() != 4 or weight.shape[0] != delta.shape[1]:
        raise ValueError(
            f"{op}: delta must have shape (B, C_out, OH, OW) and weight (C_out, C, kh, kw), got "
            f"{tuple(delta.shape)} and {tuple(weight.shape)}"
        )
    kh, kw = weight.shape[2:]
    oh, ow = _output_extent(h, kh, sh, ph, dh), _output_extent(w, kw, sw, pw, dw)
    if tuple(delta.shape[2:]) != (oh, ow):
        raise ValueError(f"{op}: delta's spatial size must be ({oh}, {ow}) for input_size {[h, w]}, got {delta.shape}")
    derivative = ACTIVATIONS[activation]
    if derivative is not None and activation_output is None:
        raise ValueError(f"{op}: activation {activation!r} needs activation_output")
    # output_padding: the rows and columns of the input past the last window (a stride > 1 drops them).
    extra = (h - ((oh - 1) * sh - 2 * ph + dh * (kh - 1) + 1), w - ((ow - 1) * sw - 2 * pw + dw * (kw - 1) + 1))
    result = F.conv_transpose2d(delta, weight, None, (sh, sw), (ph, pw), extra, 1, (dh, dw))
    if derivative is not None:
        assert activation_output is not None
        result = result * derivative(activation_output, alpha)
    if out is None:
        return result
    return out.copy_(result)
