"""fastopt.backends: the one place a backend is chosen."""

import sys
import types

import pytest
import torch

import fastopt
from fastopt import backends


def test_every_op_has_a_reference_implementation():
    for op in backends.OPS:
        fn = backends.select(op, "cpu", torch.float32, "torch")
        assert fn is getattr(fastopt.reference, f"{op}_reference")


# The ops csrc/ implements for the CPU (fastopt.extension: every LAdam mode, LAdaGrad, LRMSProp
# and the two least-squares products), each in all four dtypes: every op has a CPU kernel.
CPU_OPS = (
    "ladam_step",
    "ladam_update_lap_step",
    "ladam_weight_lap_step",
    "ladam_wave_step",
    "ladagrad_step",
    "lrmsprop_step",
    "jacobian_products",
    "batched_gram",
    "lsq_propose",
    "lsq_update",
    "lm_small_solve",
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# least_squares' step ops (csrc/lsq_step_cpu.cpp and the reference) take its dtypes only; so does
# the LM small-system QR solve (csrc/lm_small_solve_cpu.cpp: LAPACK's dtypes)
LSQ_STEP_OPS = ("lsq_propose", "lsq_update", "lm_small_solve")
# CPU kernels in float32 and float64 only, the reference in every dtype (csrc/lm_conv_cpu.cpp, lm_conv_delta_cpu.cpp)
CPU_FLOAT_OPS = ("conv2d_per_sample_grads", "conv2d_input_delta")


@pytest.mark.parametrize("op", backends.OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_on_cpu_takes_the_extension_where_it_has_the_op(op, dtype, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if backends.why_not("cpu") is not None:
        pytest.skip(f"the C++ extension does not load here: {backends.why_not('cpu')}")
    if op in LSQ_STEP_OPS and dtype not in (torch.float32, torch.float64):
        with pytest.raises(backends.BackendUnavailableError, match=f"runs '{op}' on float32, float64"):
            backends.resolve(op, "cpu", dtype)
        return
    if op in CPU_FLOAT_OPS:
        assert backends.resolve(op, "cpu", dtype) == ("cpu" if dtype in (torch.float32, torch.float64) else "torch")
        return
    assert backends.resolve(op, "cpu", dtype) == ("cpu" if op in CPU_OPS else "torch")


def _stub_cpu_backend(monkeypatch, dtypes, attributes):
    """Serve backend "cpu" from a stub module with the given DTYPES and attributes (functions, UNAVAILABLE)."""
    module = types.ModuleType("fastopt._stub_cpu")
    module.DTYPES = dtypes
    for name, value in attributes.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(
        backends._SPECS, "cpu", backends._Spec(module.__name__, "cpu", frozenset({"cpu"}), False, "the stub")
    )
    backends._load.cache_clear()
    return module


def test_auto_falls_through_to_torch_for_a_missing_op_or_dtype(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    try:
        module = _stub_cpu_backend(
            monkeypatch, {"ladam_step": frozenset({torch.float32})}, {"ladam_step_cpu": lambda *a, **k: None}
        )
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "cpu"
        assert backends.select("ladam_step", "cpu", torch.float32) is module.ladam_step_cpu
        assert backends.resolve("ladam_step", "cpu", torch.float64) == "torch"  # dtype not declared
        assert backends.resolve("ladagrad_step", "cpu", torch.float32) == "torch"  # no function
        assert backends.select("ladagrad_step", "cpu", torch.float32) is fastopt.reference.ladagrad_step_reference
    finally:
        backends._load.cache_clear()


def test_choose_gives_the_name_the_function_and_the_traits(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    # The table's fused GPU backends keep steps on the device and can be captured; only torch fuses.
    assert {name: (s.device_steps, s.capturable, s.fuses_reduce) for name, s in backends._SPECS.items()} == {
        "triton": (True, True, False),
        "cuda": (True, True, False),
        "cpu": (False, False, False),
        "torch": (False, False, True),
    }
    torch_choice = backends.choose("batched_gram", "cpu", torch.float64, "torch")
    assert torch_choice.name == "torch" and torch_choice.op == "batched_gram"
    assert torch_choice.fn is fastopt.reference.batched_gram_reference
    # Step counts on the host, not capturable on CUDA; eager code that torch.compile can fuse.
    assert (torch_choice.device_steps, torch_choice.capturable, torch_choice.fuses_reduce) == (False, False, True)
    try:
        _stub_cpu_backend(
            monkeypatch, {"batched_gram": frozenset({torch.float64})}, {"batched_gram_cpu": lambda *a, **k: None}
        )
        cpu_choice = backends.choose("batched_gram", "cpu", torch.float64)
        assert cpu_choice.name == "cpu"
        assert (cpu_choice.device_steps, cpu_choice.capturable, cpu_choice.fuses_reduce) == (False, False, False)
    finally:
        backends._load.cache_clear()


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("ladam_step", "cpu", torch.float32) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        backends.resolve("ladam_step", "cpu", torch.float32)
    assert backends.resolve("ladam_step", "cpu", torch.float32, backend="torch") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR}.*Choose from"):
        backends.resolve("ladam_step", "cpu", torch.float32)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backends.why_not("triton", "ladam_step", "cpu", torch.float32)


def test_reasons_name_device_dtype_and_op(monkeypatch):
    assert "cuda tensors" in backends.why_not("cuda", "ladam_step", "cpu", torch.float32)
    monkeypatch.setitem(fastopt.reference.DTYPES, "ladam_step", frozenset({torch.float32}))
    assert "runs 'ladam_step' on float32; got float16" in backends.why_not("torch", "ladam_step", "cpu", torch.float16)
    with pytest.raises(ValueError, match="Invalid op"):
        backends.why_not("torch", "adam_step")
    with pytest.raises(ValueError, match="Invalid backend"):
        backends.why_not("fast")


def test_a_missing_module_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(
        backends._SPECS, "cpu", backends._Spec("fastopt._no_such_module", "cpu", frozenset({"cpu"}), False, "the moon")
    )
    backends._load.cache_clear()
    try:
        reason = backends.why_not("cpu", "ladam_step", "cpu", torch.float32)
        assert "needs the moon" in reason and "ModuleNotFoundError" in reason
        with pytest.raises(backends.BackendUnavailableError, match="the moon"):
            fastopt.LAdam([torch.zeros(4, requires_grad=True)], backend="cpu")
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "torch"  # auto falls through
    finally:
        backends._load.cache_clear()


def test_missing_op_in_a_loaded_backend(monkeypatch):
    monkeypatch.setattr(fastopt.reference, "ladagrad_step_reference", None)
    assert "no implementation of 'ladagrad_step'" in backends.why_not("torch", "ladagrad_step", "cpu", torch.float32)


def test_a_module_can_declare_a_backend_it_cannot_serve(monkeypatch):
    # fastopt.extension serves "cpu" and "cuda"; built without CUDA kernels it declares "cuda"
    # unavailable, and the reason reaches the user instead of a failing kernel call.
    try:
        module = _stub_cpu_backend(
            monkeypatch,
            {"ladam_step": frozenset({torch.float32})},
            {"ladam_step_cpu": lambda *args, **kwargs: None, "UNAVAILABLE": {"cpu": "built without the moon"}},
        )
        assert backends.why_not("cpu", "ladam_step", "cpu", torch.float32) == (
            "backend='cpu' needs the stub (built without the moon)"
        )
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "torch"
        module.UNAVAILABLE = {}
        backends._load.cache_clear()
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "cpu"
    finally:
        backends._load.cache_clear()
