"""The layer-by-layer Jacobian of convolutional models: the per-sample convolution gradient op
(csrc/lm_conv_cpu.cpp) against its spec fastopt.reference.conv2d_per_sample_grads_reference, the
input-delta op fused with the activation's backward (csrc/lm_conv_delta_cpu.cpp, spec
conv2d_input_delta_reference) against aten's convolution_backward and activation backward ops, and
the Jacobian of conv nets against torch.func's vmap(jacrev) over odd shapes and both dtypes."""

import pytest
import torch
from torch import nn

import fastopt.lm as flm
from fastopt import backends
from fastopt.lm._engine.jacobian import ResidualJacobian
from fastopt.lm._engine.parameters import FlatParameters
from fastopt.lm._layerwise import (
    LayerwiseJacobian,
    channels_last_view,
    opens_with_single_channel_conv,
    unsupported_reason,
)
from fastopt.reference import conv2d_input_delta_reference, conv2d_per_sample_grads_reference
from fastopt.testing import assert_close

OP = "conv2d_per_sample_grads"
HAS_CPU_OP = backends.available("cpu", OP, "cpu", torch.float32)
IMPLEMENTATIONS = [
    pytest.param("torch", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not HAS_CPU_OP, reason=str(backends.why_not("cpu", OP)))),
]
DTYPES = [torch.float32, torch.float64]

# (batch, channels, height, width, out_channels, kernel, stride, padding, dilation)
SHAPES = [
    (5, 1, 28, 28, 8, (4, 4), (2, 2), (0, 0), (1, 1)),  # the MNIST example's first layer
    (3, 8, 13, 13, 4, (4, 4), (2, 2), (0, 0), (1, 1)),  # ... and its second
    (7, 3, 9, 7, 5, (2, 3), (1, 2), (1, 2), (1, 1)),  # odd sizes, asymmetric stride and padding
    (2, 2, 10, 11, 3, (3, 2), (2, 1), (1, 0), (2, 3)),  # dilation
    (1, 4, 2, 2, 6, (2, 2), (1, 1), (0, 0), (1, 1)),  # a batch of 1, a 1 x 1 output
    (4, 2, 5, 6, 1, (1, 1), (3, 2), (2, 1), (1, 1)),  # 1 x 1 kernel, stride past the kernel
    # The run kernels (csrc/lm_conv_cpu.cpp): rows of 4 taps (NCHW) or 4k channels (channels-last)
    # with height padding, a channel count that is no multiple of the register block, and dilation.
    (3, 4, 7, 9, 5, (3, 4), (2, 1), (2, 0), (1, 1)),
    (2, 8, 6, 5, 3, (2, 2), (1, 2), (1, 1), (2, 1)),
    (2, 4, 6, 6, 10, (2, 2), (1, 1), (1, 1), (1, 1)),  # 8-channel blocks and a remainder
    (2, 2, 7, 8, 9, (2, 4), (1, 2), (1, 0), (1, 1)),
]


def _inputs(shape, dtype, layout, seed=0):
    b, c, h, w, o, k, s, p, d = shape
    gen = torch.Generator().manual_seed(seed)
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    a = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    delta = torch.randn(b, o, oh, ow, generator=gen, dtype=dtype)
    if layout == "channels_last":
        a, delta = (t.contiguous(memory_format=torch.channels_last) for t in (a, delta))
    elif layout == "transposed":  # H and W swapped in memory: neither layout's strides
        a, delta = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (a, delta))
    return a, delta, dict(kernel_size=k, stride=s, padding=p, dilation=d)


def _exact(a, delta, geometry):
    """sample-wise dW and db in float64 from the definition: autograd of each sample's conv."""
    a64, d64 = a.double(), delta.double()
    rows_w, rows_b = [], []
    o = delta.shape[1]
    for n in range(a.shape[0]):
        weight = torch.zeros(o, a.shape[1], *geometry["kernel_size"], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(o, dtype=torch.float64, requires_grad=True)
        z = torch.nn.functional.conv2d(
            a64[n : n + 1], weight, bias, geometry["stride"], geometry["padding"], geometry["dilation"]
        )
        gw, gb = torch.autograd.grad((z * d64[n : n + 1]).sum(), (weight, bias))
        rows_w.append(gw.flatten())
        rows_b.append(gb)
    return torch.stack(rows_w), torch.stack(rows_b)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_per_sample_grads_equal_the_definition(implementation, dtype, layout, shape):
    # Written into the columns of a wider [J | r]-like buffer (strided rows): only those change.
    a, delta, geometry = _inputs(shape, dtype, layout)
    fn = backends.select(OP, "cpu", dtype, implementation)
    weights = delta.shape[1] * a.shape[1] * geometry["kernel_size"][0] * geometry["kernel_size"][1]
    out = torch.full((a.shape[0], 3 + weights + delta.shape[1] + 2), float("nan"), dtype=dtype)
    weight_out, bias_out = out[:, 3 : 3 + weights], out[:, 3 + weights : 3 + weights + delta.shape[1]]
    fn(a, delta, weight_out, bias_out, **geometry)
    expected_w, expected_b = _exact(a, delta, geometry)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_close(weight_out, expected_w.to(dtype), **tol, what=f"{implementation} weight")
    assert_close(bias_out, expected_b.to(dtype), **tol, what=f"{implementation} bias")
    assert out[:, :3].isnan().all() and out[:, 3 + weights + delta.shape[1] :].isnan().all()


@pytest.mark.skipif(not HAS_CPU_OP, reason=str(backends.why_not("cpu", OP)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_cpu_op_equals_its_reference(dtype, shape):
    # The C++ op against the Python spec on the same inputs: equal to the rounding of the
    # summation order (float64 to ~1e-15, float32 to ~1e-6 of the terms' size), with one of the
    # two outputs absent, channels-last inputs too.
    for layout in ("contiguous", "channels_last"):
        a, delta, geometry = _inputs(shape, dtype, layout, seed=3)
        weights = delta.shape[1] * a.shape[1] * geometry["kernel_size"][0] * geometry["kernel_size"][1]
        results = []
        for implementation in ("cpu", "torch"):
            fn = backends.select(OP, "cpu", dtype, implementation)
            w = torch.full((a.shape[0], weights), float("nan"), dtype=dtype)
            b = torch.full((a.shape[0], delta.shape[1]), float("nan"), dtype=dtype)
            fn(a, delta, w, b, **geometry)
            only_w = torch.full_like(w, float("nan"))
            fn(a, delta, only_w, None, **geometry)
            only_b = torch.full_like(b, float("nan"))
            fn(a, delta, None, only_b, **geometry)
            assert torch.equal(only_w, w) and torch.equal(only_b, b)
            results.append((w, b))
        scale = delta.abs().flatten(2).sum(2).max() * a.abs().max()  # bounds every sum's terms
        eps = torch.finfo(dtype).eps
        for got, want in zip(*results):
            assert not got.isnan().any()
            assert (got - want).abs().max() <= 8 * eps * scale, (layout, (got - want).abs().max(), scale)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_arguments_are_named(implementation):
    a, delta, geometry = _inputs(SHAPES[2], torch.float64, "contiguous")
    fn = backends.select(OP, "cpu", torch.float64, implementation)
    w = torch.zeros(a.shape[0], delta.shape[1] * a.shape[1] * 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="delta must have shape"):
        fn(a, delta[:, :, :-1], w, None, **geometry)
    with pytest.raises(ValueError, match="weight_out must have shape"):
        fn(a, delta, w[:, :-1], None, **geometry)
    with pytest.raises(ValueError, match="bias_out must have shape"):
        fn(a, delta, None, w[:, :2], **geometry)
    with pytest.raises(ValueError, match="kernel_size must have 2 values"):
        fn(a, delta, w, None, **{**geometry, "kernel_size": (2,)})
    with pytest.raises(TypeError, match="weight_out must have the input's dtype"):
        fn(a, delta, w.float(), None, **geometry)


def test_backend_choice():
    assert backends.resolve(OP, "cpu", torch.float16) == "torch"
    assert backends.resolve(OP, "cpu", torch.float32) == ("cpu" if HAS_CPU_OP else "torch")
    assert backends.select(OP, "cpu", torch.float64, "torch") is conv2d_per_sample_grads_reference


# -- the input delta through a convolution and the activation below it ------------------------

DELTA_OP = "conv2d_input_delta"
HAS_DELTA_OP = backends.available("cpu", DELTA_OP, "cpu", torch.float32)
DELTA_IMPLEMENTATIONS = [
    pytest.param("torch", id="reference"),
    pytest.param(
        "cpu", id="cpu", marks=pytest.mark.skipif(not HAS_DELTA_OP, reason=str(backends.why_not("cpu", DELTA_OP)))
    ),
]
_aten = torch.ops.aten
# activation: (its forward, aten's backward from its output, as autograd calls it)
ACTIVATIONS = {
    "identity": (lambda u: u, lambda g, y: g),
    "elu": (lambda u: torch.nn.functional.elu(u, 0.7), lambda g, y: _aten.elu_backward(g, 0.7, 1, 1, True, y)),
    "tanh": (torch.tanh, _aten.tanh_backward),
    "sigmoid": (torch.sigmoid, _aten.sigmoid_backward),
    "relu": (torch.relu, lambda g, y: _aten.threshold_backward(g, y, 0)),
}


def _aten_input_delta(a, delta, weight, geometry, activation):
    """What the chain rule computed before the fused op: convolution_backward's input half, then
    the activation's backward op from its output a."""
    g = _aten.convolution_backward(
        delta,
        a,
        weight,
        None,
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
        False,
        (0, 0),
        1,
        (True, False, False),
    )[0]
    return ACTIVATIONS[activation][1](g, a)


@pytest.mark.parametrize("implementation", DELTA_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_input_delta_equals_aten(implementation, dtype, activation, shape):
    # a: the activation's output (the convolution's input), in every layout; the result fresh and
    # written over a itself (as the chain rule does), equal to each other bit for bit and to aten's
    # ops to the rounding of the summation order.
    fn = backends.select(DELTA_OP, "cpu", dtype, implementation)
    for layout in ("contiguous", "channels_last", "transposed"):
        u, delta, geometry = _inputs(shape, dtype, layout, seed=5)
        a = ACTIVATIONS[activation][0](u)
        if layout == "channels_last":
            a = a.contiguous(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(6)
        weight = torch.randn(delta.shape[1], a.shape[1], *geometry["kernel_size"], generator=gen, dtype=dtype)
        del geometry["kernel_size"]
        kwargs = dict(geometry, input_size=tuple(a.shape[2:]), activation=activation, alpha=0.7)
        want = _aten_input_delta(a.double(), delta.double(), weight.double(), geometry, activation)
        got = fn(delta, weight, a, **kwargs)
        over_a = a.clone()
        returned = fn(delta, weight, over_a, **kwargs, out=over_a)
        assert returned.data_ptr() == over_a.data_ptr() and torch.equal(over_a, got), layout
        # Every sum has at most C_out * kh * kw terms, each bounded by |w| |delta| (times the
        # activation's factor, at most 1 here: ELU's y + alpha < alpha < 1, tanh, sigmoid, relu).
        scale = weight.abs().max() * delta.abs().max() * weight[:, 0].numel()
        eps = torch.finfo(dtype).eps
        assert not got.isnan().any()
        assert (got.double() - want).abs().max() <= 8 * eps * scale, (layout, (got.double() - want).abs().max())
        if implementation == "cpu":
            assert got.is_contiguous(memory_format=torch.channels_last) or got.shape[1] == 1


@pytest.mark.parametrize("implementation", DELTA_IMPLEMENTATIONS)
def test_input_delta_bad_arguments_are_named(implementation):
    u, delta, geometry = _inputs(SHAPES[2], torch.float64, "contiguous")
    weight = torch.zeros(delta.shape[1], u.shape[1], *geometry.pop("kernel_size"), dtype=torch.float64)
    fn = backends.select(DELTA_OP, "cpu", torch.float64, implementation)
    kwargs = dict(geometry, input_size=tuple(u.shape[2:]), activation="elu", alpha=1.0)
    with pytest.raises(ValueError, match="activation must be one of identity, elu, tanh, sigmoid, relu"):
        fn(delta, weight, u, **{**kwargs, "activation": "gelu"})
    with pytest.raises(ValueError, match="spatial size must be"):
        fn(delta, weight, u, **{**kwargs, "input_size": (u.shape[2] + 3, u.shape[3])})
    with pytest.raises(ValueError, match="needs activation_output"):
        fn(delta, weight, None, **kwargs)
    with pytest.raises(ValueError, match="stride, padding and dilation must have 2 values"):
        fn(delta, weight, u, **{**kwargs, "stride": (1,)})
    with pytest.raises(ValueError, match="weight"):
        fn(delta, weight[:1] if delta.shape[1] > 1 else weight.repeat(2, 1, 1, 1), u, **kwargs)
    if implementation == "cpu":  # the reference computes in any dtype torch does
        with pytest.raises(TypeError, match="weight must have delta's dtype"):
            fn(delta, weight.float(), u, **kwargs)
        with pytest.raises(ValueError, match="out must have shape"):
            fn(delta, weight, u, **kwargs, out=u[:1])


def test_input_delta_backend_choice():
    assert backends.resolve(DELTA_OP, "cpu", torch.bfloat16) == "torch"
    assert backends.resolve(DELTA_OP, "cpu", torch.float32) == ("cpu" if HAS_DELTA_OP else "torch")
    assert backends.select(DELTA_OP, "cpu", torch.float64, "torch") is conv2d_input_delta_reference


# -- the Jacobian of conv nets -------------------------------------------------------------------


def _conv_nets():
    """(name, model factory, input shape (C, H, W), loss): odd layer settings of each kind."""
    return [
        (
            "mnist-like",
            lambda: nn.Sequential(
                nn.Conv2d(1, 4, 4, stride=2),
                nn.ELU(),
                nn.Conv2d(4, 3, 3, stride=2),
                nn.ELU(),
                nn.Conv2d(3, 2, 2),
                nn.ELU(),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            (1, 17, 17),
            flm.loss.CrossEntropyLoss(),
        ),
        (
            "padding-dilation-nobias",
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 2)),
                nn.Tanh(),
                nn.Conv2d(3, 2, 2, dilation=(2, 1), bias=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(12, 2),
            ),
            (2, 9, 7),
            flm.loss.MSELoss(),  # several residuals per sample
        ),
        (
            "valid-then-linear-on-maps",
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding="valid"), nn.Sigmoid(), nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(48, 4)
            ),
            (1, 6, 6),
            flm.loss.MSELoss(),
        ),
    ]


def _jacobians(model, x, y, loss):
    """[J | r] by the layer-by-layer path and by torch.func's vmap(jacrev)."""
    params = FlatParameters(model)
    per_sample = loss.residuals(model(x), y)[0].numel()
    columns = params.numel + 1
    layerwise = ResidualJacobian(model, loss, params, mode="layerwise")
    out = torch.full((x.shape[0] * per_sample, columns), float("nan"), dtype=x.dtype)
    got = layerwise(x, y, None, per_sample, out=out)
    want = ResidualJacobian(model, loss, params, mode="jacrev")(x, y, None, per_sample)
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("net", range(3), ids=[name for name, *_ in _conv_nets()])
@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-weight"])
def test_conv_jacobian_equals_torch_func(dtype, batch, net, frozen):
    name, make, shape, loss = _conv_nets()[net]
    torch.manual_seed(net)
    model = make().to(dtype)
    if frozen:
        model[2].weight.requires_grad_(False)  # the second convolution's weight is not trained
    assert unsupported_reason(model) is None
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *shape, generator=gen, dtype=dtype)
    outputs = model(x)
    if isinstance(loss, flm.loss.CrossEntropyLoss):
        y = torch.randint(0, outputs.shape[1], (batch,), generator=gen)
    else:
        y = torch.randn(outputs.shape, generator=gen, dtype=dtype)
    got, want = _jacobians(model, x, y, loss)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    assert_close(got, want, **tol, what=f"{name}: layer by layer vs vmap(jacrev)")


def test_single_channel_input_is_viewed_channels_last_without_a_copy():
    x = torch.randn(6, 1, 9, 8)
    view = channels_last_view(x)
    assert view.data_ptr() == x.data_ptr() and torch.equal(view, x)
    assert view.is_contiguous(memory_format=torch.channels_last) and view.stride(1) == 1
    for other in (torch.randn(6, 2, 9, 8), torch.randn(6, 9)):
        assert channels_last_view(other) is other
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ELU(), nn.Flatten(), nn.Linear(3 * 7 * 6, 2))
    assert opens_with_single_channel_conv(net)
    assert opens_with_single_channel_conv(nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(1, 2, 2))))
    assert not opens_with_single_channel_conv(nn.Sequential(nn.Conv2d(2, 3, 3)))
    assert not opens_with_single_channel_conv(nn.Sequential(nn.Linear(2, 3), nn.Conv2d(1, 3, 3)))
    # The trial forward: the model's outputs up to the round-off of another summation order.
    jacobian = ResidualJacobian(net, flm.loss.MSELoss(), FlatParameters(net))
    with torch.no_grad():
        assert_close(jacobian.forward(x), net(x), rtol=1e-5, atol=1e-6, what="channels-last forward")


def test_failed_conv_step_leaves_parameters_unchanged():
    # A batch with a non-finite input: every attempt's solve fails, the parameters stay as they were.
    torch.manual_seed(0)
    model = _conv_nets()[0][1]()
    lm = flm.LevenbergMarquardtModule(model, loss_fn=flm.loss.CrossEntropyLoss(), solve_method="cholesky")
    x = torch.randn(9, 1, 17, 17)
    y = torch.randint(0, 3, (9,))
    lm.training_step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    x[3, 0, 2, 2] = float("nan")
    lm.training_step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_trial_forward_records_serve_the_next_jacobian_only_while_valid(monkeypatch):
    # ResidualJacobian.forward (the trial forwards) keeps each layer's input and output; the next
    # Jacobian reuses them if it gets the same inputs tensor, unchanged, at the same parameters.
    # Any change in between (a parameter update, an in-place edit of the inputs, other inputs)
    # makes it run its own forward. Each result is checked against vmap(jacrev).
    from fastopt.lm import _layerwise

    name, make, shape, loss = _conv_nets()[0]
    torch.manual_seed(0)
    model = make().double()
    params = FlatParameters(model)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    jacobian = ResidualJacobian(model, loss, params)
    reference = ResidualJacobian(model, loss, params, mode="jacrev")
    forwards = []
    steps = _layerwise.LayerwiseJacobian._steps
    monkeypatch.setattr(_layerwise.LayerwiseJacobian, "_steps", lambda self, h: forwards.append(1) or steps(self, h))

    def check(inputs, expect_forwards):
        forwards.clear()
        out = torch.full((inputs.shape[0], params.numel + 1), float("nan"), dtype=torch.float64)
        jacobian(inputs, y[: inputs.shape[0]], None, 1, out=out)
        assert len(forwards) == expect_forwards
        want = reference(inputs, y[: inputs.shape[0]], None, 1)
        assert_close(out, want, rtol=1e-11, atol=1e-13, what=f"{expect_forwards} forwards")

    def trial_forward(inputs):
        with torch.no_grad():  # as the training step runs its trial forwards
            return jacobian.forward(inputs)

    check(x, 1)  # nothing recorded yet
    with torch.no_grad():
        assert_close(trial_forward(x), model(x), rtol=1e-12, atol=1e-14, what="recorded trial forward")
    check(x, 0)  # the trial forward's records, same parameters
    check(x, 1)  # used once
    trial_forward(x)
    with torch.no_grad():
        params.flat.add_(0.05)  # an accepted attempt after the forward (or a restore)
    check(x, 1)
    trial_forward(x)
    with torch.no_grad():
        x.mul_(1.5)  # the inputs edited in place
    check(x, 1)
    trial_forward(x)
    check(x.clone(), 1)  # other inputs, equal values
    trial_forward(x)
    with torch.no_grad():
        model[2].weight.mul_(0.9)  # one parameter edited in place, not through the flat vector
    check(x, 1)
    handle = model[0].register_forward_hook(lambda m, i, o: None)
    trial_forward(x)  # with a hook, the model's own forward: nothing recorded
    check(x, 1)
    handle.remove()
    outputs = jacobian.forward(x)  # autograd on: the model's forward, a graph, nothing recorded
    assert outputs.requires_grad
    check(x, 1)


def _tanh_relu_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 2)),
        nn.Tanh(),
        nn.Conv2d(3, 5, 2, dilation=(2, 1), bias=False),
        nn.ReLU(),
        nn.Conv2d(5, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(12, 2),
    )


@pytest.mark.parametrize(
    "make, shape, loss, fused_per_residual",
    [
        (_conv_nets()[0][1], (1, 17, 17), flm.loss.CrossEntropyLoss(), 2),
        (_tanh_relu_net, (2, 9, 7), flm.loss.MSELoss(), 2),  # several residuals per sample
        (_conv_nets()[2][1], (1, 6, 6), flm.loss.MSELoss(), 1),
    ],
    ids=["elu", "tanh-relu", "sigmoid"],
)
def test_chain_rule_fuses_the_activation_between_convolutions(make, shape, loss, fused_per_residual, monkeypatch):
    # Each activation between two convolutions is taken by conv2d_input_delta (in place only for
    # the last residual component: MSE nets have several), and the Jacobian is still torch.func's.
    calls = []
    fused = LayerwiseJacobian._fused_input_delta

    def counted(self, *args, **kwargs):
        result = fused(self, *args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(LayerwiseJacobian, "_fused_input_delta", counted)
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    outputs = model(x)
    if isinstance(loss, flm.loss.CrossEntropyLoss):
        y = torch.randint(0, outputs.shape[1], (5,))
    else:
        y = torch.randn(outputs.shape, dtype=torch.float64)
    per_sample = loss.residuals(outputs, y)[0].numel()
    got, want = _jacobians(model, x, y, loss)
    assert sum(calls) == fused_per_residual * per_sample, calls
    assert_close(got, want, rtol=1e-10, atol=1e-12, what="layer-by-layer [J | r]")
