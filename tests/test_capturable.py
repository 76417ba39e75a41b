"""capturable=True: the LAdam family's steps with step counts on the device and ``lr`` a device
tensor that the kernel reads, so a step can be captured into a CUDA graph and replayed with a
learning rate changed in place in between (as torch.optim.Adam(capturable=True)).

On the CPU (here): every backend takes the mode and gives the reference's result for a learning
rate that changes between steps (triton reads the tensor in-kernel, in the interpreter; the C++
ops take it as ``lr_tensor`` and their functors' ``set_lr``, which the CUDA kernels call in-kernel,
runs on the host; torch reads it on the host), the triton path never reads it on the host, and bad
input fails before anything changes. With a GPU: a captured step replayed gives the eager result
on triton and cuda, and the torch backend is refused.
"""

import copy

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.testing import CHECKS, TOLERANCES, assert_all_close, clone_params, grad_stream, make_params, set_grads

SHAPES = ["many", "1d_17", "3d", "transposed", "channels_last", "rows2"]
# Powers of two: the same number as a Python float and as a float32 tensor, so that the
# capturable run (tensor lr) and the reference run (float lr) see the same learning rates.
LRS = [2.0**-6, 2.0**-8, 2.0**-7, 2.0**-10]
COMMON = dict(c2=1e-2, weight_decay=0.1, min_spatial_size=4)


def _skip_unless(backend, op, device="cpu", dtype=torch.float32):
    reason = backends.why_not(backend, op, device, dtype)
    if reason:
        pytest.skip(reason)


def _train(cls_name, kwargs, params, backend, capturable, device_lr):
    """Steps with the learning rates LRS: a tensor lr filled in place (device_lr) or the group's
    float lr replaced, as an LR scheduler would."""
    lr = torch.tensor(LRS[0], device=params[0].device) if device_lr else LRS[0]
    opt = getattr(fastopt, cls_name)(params, lr=lr, backend=backend, capturable=capturable, **kwargs)
    for lr_now, grads in zip(LRS, grad_stream(params, len(LRS))):
        if device_lr:
            lr.fill_(lr_now)
        else:
            opt.param_groups[0]["lr"] = lr_now
        set_grads(params, grads)
        opt.step()
    return opt


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("label,cls_name,kw,op", CHECKS, ids=[c[0] for c in CHECKS])
def test_tensor_lr_changed_in_place_matches_reference(backend, label, cls_name, kw, op):
    _skip_unless(backend, op)
    kwargs = {**COMMON, **kw}
    params = make_params(torch.float32, SHAPES)
    expected = clone_params(params)
    opt = _train(cls_name, kwargs, params, backend, capturable=True, device_lr=True)
    ref = _train(cls_name, kwargs, expected, "torch", capturable=False, device_lr=False)
    tol = TOLERANCES[torch.float32]
    assert_all_close(params, expected, **tol, what=f"{backend} {label} params")
    for key in ref.state[expected[0]]:
        if torch.is_tensor(ref.state[expected[0]][key]):
            assert_all_close(
                [opt.state[p][key] for p in params],
                [ref.state[p][key] for p in expected],
                **tol,
                what=f"{backend} {label} state {key}",
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_never_reads_the_tensor_lr_on_the_host(monkeypatch, dtype):
    """A host read of lr would synchronize with the GPU (and fail under graph capture): make every
    host read of this tensor raise, and step."""
    _skip_unless("triton", "ladam_step", dtype=dtype)
    params = make_params(dtype, SHAPES)
    lr = torch.tensor(1e-2)
    reads = []

    def guard(original):
        def read(self, *args, **kwargs):
            if self is lr:
                reads.append(original.__name__)
                raise AssertionError(f"lr was read on the host ({original.__name__})")
            return original(self, *args, **kwargs)

        return read

    for name in ("__float__", "item", "tolist", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name)))
    opt = fastopt.LAdam(params, lr=lr, backend="triton", capturable=True, **COMMON)
    before = [p.detach().clone() for p in params]
    for grads in grad_stream(params, 2, none_every=0):
        set_grads(params, grads)
        opt.step()
    assert reads == []
    assert all(not torch.equal(p, b) for p, b in zip(params, before)), "the step changed nothing"


def test_tensor_lr_value_is_checked_only_without_capturable():
    """The default mode reads a tensor lr on the host every step, so it validates its value;
    capturable mode does not read it."""
    params = make_params(torch.float32, ["many"])
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    with pytest.raises(ValueError, match="Invalid lr"):
        fastopt.LAdam(params, lr=torch.tensor(-1.0), capturable=False)
    lr = torch.tensor(1e-2)
    opt = fastopt.LAdam(params, lr=lr, capturable=True)
    lr.fill_(-1.0)  # capturable: the value is not read on the host, so not checked (torch does the same)
    opt.step()


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor(1e-2, dtype=torch.float64), "1-element float32 tensor"),
        (torch.tensor([1e-2, 1e-3]), "1-element float32 tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_bad_tensor_lr_fails_before_anything_changes(backend, bad, match):
    _skip_unless(backend, "ladam_step")
    params = make_params(torch.float32, ["many", "1d_17"])
    opt = fastopt.LAdam(params, lr=bad, backend=backend, capturable=True, **COMMON)
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match) as err:
        opt.step()
    assert "lr" in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


def test_capturable_must_be_a_bool():
    params = make_params(torch.float32, ["many"])
    with pytest.raises(TypeError, match="capturable must be a bool"):
        fastopt.LAdam(params, capturable=1)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        fastopt.LRMSProp(params, capturable="yes")


def test_which_backends_can_be_captured():
    """The rule lives in fastopt.backends (no GPU needed to ask)."""
    assert backends.why_not_capturable("triton", "cuda") is None
    assert backends.why_not_capturable("cuda", "cuda") is None
    reason = backends.why_not_capturable("torch", "cuda")
    assert reason is not None and "backend='triton' or backend='cuda'" in reason
    for backend in backends.BACKENDS:  # no graphs on the CPU: nothing to refuse
        assert backends.why_not_capturable(backend, "cpu") is None


@pytest.mark.parametrize("op", ["ladam_step", "ladagrad_step", "lrmsprop_step"])
def test_cpp_ops_take_the_lr_as_a_tensor(op):
    """The C++ ops' ``lr_tensor`` (what the cuda backend reads in-kernel) gives the float lr's
    result bit for bit on CPU, and a bad one is refused by the op itself, naming it."""
    _skip_unless("cpu", op)
    from fastopt import extension

    hyper = {
        "ladam_step": dict(beta1=0.9, beta2=0.999),
        "ladagrad_step": dict(lr_decay=0.01),
        "lrmsprop_step": dict(alpha=0.99, momentum=0.9),
    }[op]
    n_states = {"ladam_step": 2, "ladagrad_step": 1, "lrmsprop_step": 2}[op]
    results = []
    for lr in (2.0**-7, torch.tensor(2.0**-7)):
        params = [p.detach() for p in make_params(torch.float32, ["many", "1d_17"])]
        grads = [torch.randn_like(p) for p in params]
        states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
        steps = [torch.ones(()) for _ in params]
        fn = getattr(extension, f"{op}_cpu")
        fn(
            params,
            grads,
            *states,
            steps,
            [True, True],
            lr=lr,
            eps=1e-8,
            weight_decay=0.1,
            c2=1e-2,
            stencil="9point",
            **hyper,
        )
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    params = [torch.zeros(5, 5)]
    raw = getattr(torch.ops.fastopt, op)
    args = [params, [torch.ones(5, 5)]] + [[torch.zeros(5, 5)] for _ in range(n_states)]
    with pytest.raises(RuntimeError, match="lr_tensor must be a float32 tensor of one element"):
        raw(
            *args,
            [torch.ones(())],
            [True],
            lr=0.1,
            eps=1e-8,
            weight_decay=0.0,
            c2=0.0,
            stencil="9point",
            lr_tensor=torch.ones((), dtype=torch.float64),
            **hyper,
        )
    assert torch.equal(params[0], torch.zeros(5, 5))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_capturable_round_trips_through_state_dict(backend):
    _skip_unless(backend, "ladagrad_step")
    params = make_params(torch.float32, ["many"])
    opt = fastopt.LAdaGrad(params, backend=backend, capturable=True)
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["capturable"] is True
    other = fastopt.LAdaGrad(clone_params(params), backend=backend)
    other.load_state_dict(saved)
    assert other.param_groups[0]["capturable"] is True
    # A state_dict without the key (ladam's, or fastopt's before the option) keeps the current value.
    del saved["param_groups"][0]["capturable"]
    third = fastopt.LAdaGrad(clone_params(params), backend=backend, capturable=True)
    third.load_state_dict(saved)
    assert third.param_groups[0]["capturable"] is True


def test_an_optimizer_pickled_before_the_option_steps():
    """A pickle (or torch.save of the optimizer) from before ``capturable`` existed lacks the key."""
    params = make_params(torch.float32, ["many"])
    opt = fastopt.LAdam(params, **COMMON)
    state = opt.__getstate__()
    del state["defaults"]["capturable"]
    for group in state["param_groups"]:
        del group["capturable"]
    old = fastopt.LAdam.__new__(fastopt.LAdam)
    old.__setstate__(state)
    assert old.param_groups[0]["capturable"] is False and old.defaults["capturable"] is False
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    old.step()


def test_chi_anneal_fills_a_tensor_lr_in_place():
    """A schedule must write into the tensor a capturable step (or a captured graph) reads."""
    params = make_params(torch.float32, ["many"])
    lr = torch.tensor(1e-2)
    opt = fastopt.LAdam(params, lr=lr, capturable=True)
    sched = fastopt.ChiAnnealScheduler(opt, total_steps=10, warmup_frac=0.5)
    sched.step()
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(1e-2 * 1 / 5)
    assert sched.get_last_lr() == [float(lr)]


# -- on a GPU ------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA-graph capture)")


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("label,cls_name,kw,op", CHECKS, ids=[c[0] for c in CHECKS])
def test_captured_step_replayed_matches_eager(backend, label, cls_name, kw, op):
    _skip_unless(backend, op, "cuda")
    kwargs = {**COMMON, **kw}
    # The cuda backend steps non-contiguous parameters through contiguous copies, new every step:
    # not capturable (documented); contiguous shapes only there.
    shapes = SHAPES if backend == "triton" else ["many", "1d_17", "3d", "rows2"]
    params = make_params(torch.float32, shapes, device="cuda")
    expected = clone_params(params)
    lr = torch.tensor(LRS[0], device="cuda")
    opt = getattr(fastopt, cls_name)(params, lr=lr, backend=backend, capturable=True, **kwargs)
    ref = getattr(fastopt, cls_name)(expected, lr=LRS[0], backend=backend, **kwargs)
    grads = list(grad_stream(params, len(LRS) + 1, none_every=0))
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradients: the captured step reads these addresses
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (builds the tile table), outside the capture
        for p, g in zip(params, grads[0]):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    set_grads(expected, grads[0])
    ref.step()
    for lr_now, step_grads in zip(LRS, grads[1:]):
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)
        lr.fill_(lr_now)
        graph.replay()
        set_grads(expected, step_grads)
        ref.param_groups[0]["lr"] = lr_now
        ref.step()
    torch.cuda.synchronize()
    assert_all_close(params, expected, **TOLERANCES[torch.float32], what=f"captured {backend} {label}")
    assert all(float(opt.state[p]["step"]) == len(LRS) + 1 for p in params)


@needs_cuda
def test_the_torch_backend_is_refused_on_cuda():
    backend = "torch"
    _skip_unless(backend, "ladam_step", "cuda")
    params = make_params(torch.float32, ["many"], device="cuda")
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    opt = fastopt.LAdam(params, lr=torch.tensor(1e-2, device="cuda"), backend=backend, capturable=True)
    with pytest.raises(ValueError, match="capturable=True"):
        opt.step()
    assert len(opt.state) == 0


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gradients_that_move_during_capture_are_refused(backend):
    _skip_unless(backend, "ladam_step", "cuda")
    params = make_params(torch.float32, ["many"], device="cuda")
    opt = fastopt.LAdam(params, lr=torch.tensor(1e-2, device="cuda"), backend=backend, capturable=True)
    set_grads(params, next(grad_stream(params, 1, none_every=0)))
    opt.step()
    torch.cuda.synchronize()
    set_grads(params, next(grad_stream(params, 1, seed=2, none_every=0)))  # new gradient tensors
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="zero_grad\\(set_to_none=False\\)"):
        with torch.cuda.graph(graph):
            opt.step()


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_steps_on_alternating_streams_match_one_stream(backend):
    """Cached tables are uploaded on one stream and may be used on another: each switch waits
    (triton) or uploads anew (cuda), so the result is that of a single stream."""
    _skip_unless(backend, "ladam_step", "cuda")
    params = make_params(torch.float32, ["many", "1d_17", "3d"], device="cuda")
    expected = clone_params(params)
    opt = fastopt.LAdam(params, backend=backend, **COMMON)
    ref = fastopt.LAdam(expected, backend=backend, **COMMON)
    side = torch.cuda.Stream()
    for i, grads in enumerate(grad_stream(params, 6, none_every=0)):
        set_grads(params, grads)
        set_grads(expected, grads)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side if i % 2 else torch.cuda.current_stream()):
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        ref.step()
    torch.cuda.synchronize()
    assert_all_close(params, expected, **TOLERANCES[torch.float32], what=f"{backend} on two streams")
