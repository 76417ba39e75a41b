"""torch.compile: an optimizer step traces into one graph (fullgraph=True, no graph break) in which
each backend's kernel is one opaque op (the C++ ops torch.ops.fastopt.*, the Triton launchers
torch.ops.fastopt_triton.*; the torch backend's reference math is traced op by op), and compiled
steps give the eager results.

Compiler backend: "aot_eager" (dynamo + AOTAutograd, functionalization of the in-place ops
included, then eager kernels): it runs everything inductor's front end does to the graph without
generating and compiling C++ for the CPU, which costs tens of seconds per graph on this machine.
The Triton kernels run in Triton's interpreter on CPU tensors (tests/conftest.py); dynamo only
sees the custom op, so the interpreter makes no difference to tracing.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import fastopt
from fastopt import backends

# (backend, optimizer, hyperparameters, the op the graph must call as one node; None: traced math)
CASES = [
    ("cpu", "LAdam", {}, "fastopt.ladam_step"),
    ("cpu", "LAdaGrad", {"lr_decay": 1e-3}, "fastopt.ladagrad_step"),
    ("cpu", "LRMSProp", {"momentum": 0.9}, "fastopt.lrmsprop_step"),
    ("triton", "LAdam", {}, "fastopt_triton.ladam_step"),
    ("triton", "LAdam", {"mode": "update_lap"}, "fastopt_triton.ladam_update_lap_step"),
    ("triton", "LAdaGrad", {}, "fastopt_triton.ladagrad_step"),
    ("triton", "LRMSProp", {}, "fastopt_triton.lrmsprop_step"),  # no momentum: an empty buffer list
    ("torch", "LAdam", {}, None),
    ("torch", "LRMSProp", {"momentum": 0.9}, None),
]
STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _optimizer(model, backend, cls_name, kwargs):
    return getattr(fastopt, cls_name)(
        model.parameters(), lr=1e-2, c2=1e-2, min_spatial_size=4, backend=backend, **kwargs
    )


class _Recording:
    """A compiler backend: aot_eager, keeping the FX graphs dynamo hands it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def targets(self):
        return {str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"}


def _assert_same_training(model, opt, ref, ref_opt, backend):
    # The C++ and Triton kernels run the same code compiled or not: identical results. The torch
    # backend's traced math may be decomposed differently by AOTAutograd: round-off.
    tol = dict(rtol=0, atol=0) if backend != "torch" else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{backend} param {name}: {m}")
        for key, val in opt.state[p].items():
            other = ref_opt.state[q][key]
            if torch.is_tensor(val):
                torch.testing.assert_close(val, other, **tol, msg=lambda m: f"{backend} state {name}.{key}: {m}")
            else:
                assert val == other, (name, key)
    assert float(opt.state[next(iter(model.parameters()))]["step"]) == STEPS


def _needs(backend):
    reason = backends.why_not(backend, None, "cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend,cls_name,kwargs,op", CASES, ids=lambda c: str(c) if not isinstance(c, dict) else "")
def test_compiled_step_has_no_graph_break_and_matches_eager(backend, cls_name, kwargs, op):
    _needs(backend)
    torch._dynamo.reset()
    counters.clear()
    model, ref = _model(), _model()
    opt, ref_opt = _optimizer(model, backend, cls_name, kwargs), _optimizer(ref, backend, cls_name, kwargs)
    compiler = _Recording()
    compiled_step = torch.compile(opt.step, backend=compiler, fullgraph=True)  # fullgraph: a break raises
    x, y = _data()
    for _ in range(STEPS):
        for m, o, step in ((model, opt, compiled_step), (ref, ref_opt, ref_opt.step)):
            o.zero_grad()
            _loss(m, x, y).backward()
            step()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiler.graphs, "nothing was compiled"
    if op is not None:  # the kernel is one opaque node, not traced into
        assert op in compiler.targets(), compiler.targets()
    _assert_same_training(model, opt, ref, ref_opt, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_compiled_training_step_matches_eager_without_breaks_in_the_optimizer(backend):
    """Forward, backward and LAdam.step in one compiled function. Dynamo breaks the graph at
    ``loss.backward()`` (autograd is not traced without compiled autograd); the optimizer's part
    must trace without a break of its own."""
    _needs(backend)
    torch._dynamo.reset()
    model, ref = _model(), _model()
    opt, ref_opt = _optimizer(model, backend, "LAdam", {}), _optimizer(ref, backend, "LAdam", {})

    def train_step(x, y):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        return loss

    x, y = _data()
    explanation = torch._dynamo.explain(train_step)(x, y)
    in_fastopt = [
        reason
        for reason in explanation.break_reasons
        if any("fastopt" in frame.filename or "kernels" in frame.filename for frame in reason.user_stack)
    ]
    assert not in_fastopt, [str(r.reason) for r in in_fastopt]
    # explain ran one step; run the rest compiled and compare with an eager run of all of them.
    torch._dynamo.reset()
    model.load_state_dict(ref.state_dict())
    opt = _optimizer(model, backend, "LAdam", {})
    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(STEPS):
        compiled(x, y)
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_opt.step()
    _assert_same_training(model, opt, ref, ref_opt, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_step_under_grad_scaler(backend):
    """GradScaler calls the compiled step with grad_scale/found_inf set on the optimizer: the fused
    backends take them as tensors in the graph (no break, no host read), skip the step with an inf
    gradient and give the eager results. (The torch backend reads found_inf on the host: under
    torch.compile that is a graph break, an error with fullgraph=True.)"""
    _needs(backend)
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (True, False):
        model = _model()
        opt = _optimizer(model, backend, "LAdam", {})
        if compiled:
            opt.step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = _data()
        for i in range(STEPS + 1):
            opt.zero_grad()
            loss = _loss(model, x, y) * (float("inf") if i == 1 else 1.0)  # step 1 is skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((model, opt))
    assert not counters["graph_break"], dict(counters["graph_break"])
    (model, opt), (ref, ref_opt) = runs
    _assert_same_training(model, opt, ref, ref_opt, backend)  # STEPS steps taken, one skipped
