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


@pytest.mark.parametrize("op", backends.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_auto_on_cpu_takes_the_first_backend_that_can_run(op, dtype, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = next(b for b in ("cpu", "torch") if backends.available(b, op, "cpu", dtype))
    assert backends.resolve(op, "cpu", dtype) == expected


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
    monkeypatch.setitem(backends._SPECS, "cpu", backends._Spec(
        "fastopt._no_such_module", "cpu", frozenset({"cpu"}), False, "the moon"))
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
    module = types.ModuleType("fastopt._stub_extension")
    module.DTYPES = {"ladam_step": frozenset({torch.float32})}
    module.UNAVAILABLE = {"cpu": "built without the moon"}
    module.ladam_step_cpu = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends._SPECS, "cpu", backends._Spec(
        module.__name__, "cpu", frozenset({"cpu"}), False, "the stub"))
    backends._load.cache_clear()
    try:
        assert backends.why_not("cpu", "ladam_step", "cpu", torch.float32) == (
            "backend='cpu' needs the stub (built without the moon)")
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "torch"
        module.UNAVAILABLE = {}
        backends._load.cache_clear()
        assert backends.resolve("ladam_step", "cpu", torch.float32) == "cpu"
    finally:
        backends._load.cache_clear()
