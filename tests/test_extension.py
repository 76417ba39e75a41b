"""The extension fastopt._C as a whole: its torch.library ops, its errors, how fastopt copes when
it is missing (falls back to "torch" under auto with a one-line warning, raises when named, builds
it at run time), and the CUDA sources, compile-checked with nvcc (nothing CUDA runs here).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from fastopt import _extension_build as build
from fastopt import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cpu = pytest.mark.skipif(not backends.available("cpu"), reason=str(backends.why_not("cpu")))


def ladam_inputs(n=3, shape=(6, 5), dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.zeros_like(p) for p in params],
        exp_avg_sqs=[torch.rand_like(p) for p in params],
        steps=[torch.tensor(3.0) for _ in params],
        use_laps=[True] * n,
    )


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, c2=1e-2, stencil="9point")


# -- torch.library registration ---------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("op", ["ladam_step", "ladagrad_step", "lrmsprop_step"])
def test_ops_are_registered_with_their_mutations(op):
    schema = getattr(torch.ops.fastopt, op).default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    expected = {
        "ladam_step": ["params", "exp_avgs", "exp_avg_sqs"],
        "ladagrad_step": ["params", "state_sums"],
        "lrmsprop_step": ["params", "square_avgs", "momentum_buffers"],
    }[op]
    assert mutated == expected
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CPU")


@needs_cpu
def test_gram_ops_are_registered_with_their_mutations():
    schemas = {op: getattr(torch.ops.fastopt, op).default._schema for op in ("jacobian_products", "batched_gram")}
    written = {
        op: [a.name for a in s.arguments if a.alias_info is not None and a.alias_info.is_write]
        for op, s in schemas.items()
    }
    assert written == {"jacobian_products": ["out"], "batched_gram": []}
    assert len(schemas["batched_gram"].returns) == 2
    for op in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CPU")


@needs_cpu
def test_opcheck_gram_ops():
    """opcheck of jacobian_products (in place into out, with and without a shift, and a transposed
    bf16 input) and batched_gram (new outputs, through its fake implementation)."""
    torch.manual_seed(0)
    a = torch.randn(9, 6)
    torch.library.opcheck(
        torch.ops.fastopt.jacobian_products.default, (a, torch.zeros(6, 6)), dict(scale=0.5, shift=torch.rand(6))
    )
    torch.library.opcheck(
        torch.ops.fastopt.jacobian_products.default,
        (torch.randn(6, 9, dtype=torch.bfloat16).t(), torch.zeros(6, 6)),
        dict(scale=1.0),
    )
    jac = torch.randn(3, 7, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastopt.batched_gram.default, (jac, torch.randn(3, 7, dtype=torch.float64)))


@needs_cpu
def test_a_build_without_cuda_kernels_says_so_for_backend_cuda():
    if "cuda" in torch.ops.fastopt.build_info().split():
        pytest.skip("this build has CUDA kernels")
    reason = backends.why_not("cuda")
    assert reason.startswith("backend='cuda' needs the C++/CUDA extension fastopt._C built with CUDA"), reason
    assert "has no CUDA kernels" in reason, reason


@needs_cpu
def test_opcheck_ladam_step():
    """torch.library.opcheck: schema, fake implementation, and AOT dispatch as torch.compile uses it."""
    inputs = ladam_inputs()
    torch.library.opcheck(torch.ops.fastopt.ladam_step.default, tuple(inputs.values()), HYPER)


@needs_cpu
def test_opcheck_siblings():
    inputs = ladam_inputs()
    p, g, s = inputs["params"], inputs["grads"], inputs["exp_avg_sqs"]
    common = dict(eps=1e-10, weight_decay=0.0, c2=1e-2, stencil="5point")
    torch.library.opcheck(
        torch.ops.fastopt.ladagrad_step.default,
        (p, g, s, inputs["steps"], inputs["use_laps"]),
        dict(lr=1e-2, lr_decay=0.01, **common),
    )
    torch.library.opcheck(
        torch.ops.fastopt.lrmsprop_step.default,
        (p, g, s, inputs["exp_avgs"], inputs["steps"], inputs["use_laps"]),
        dict(lr=1e-2, alpha=0.99, momentum=0.9, **common),
    )


@needs_cpu
def test_torch_compile_traces_the_op_in_one_graph():
    from fastopt.extension import ladam_step_cpu
    from fastopt.reference import ladam_step_reference

    inputs = ladam_inputs()
    expected = {k: [t.clone() if torch.is_tensor(t) else t for t in v] for k, v in inputs.items()}
    compiled = torch.compile(lambda kw: ladam_step_cpu(**kw, **HYPER), backend="aot_eager", fullgraph=True)
    compiled(inputs)
    ladam_step_reference(**expected, **HYPER)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, e in zip(inputs[key], expected[key]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda kw: kw["grads"].pop(), r"got 3 params but 2 grads"),
        (lambda kw: kw["use_laps"].pop(), r"got 3 params but 2 use_laps"),
        (
            lambda kw: kw["exp_avgs"].__setitem__(1, torch.zeros(5, 6)),
            r"exp_avgs\[1\] has shape \[5, 6\] but params\[1\]",
        ),
        (lambda kw: kw["exp_avg_sqs"].__setitem__(2, torch.zeros(5, 6).t()), r"exp_avg_sqs\[2\] is not contiguous"),
        (
            lambda kw: kw["grads"].__setitem__(0, torch.zeros(6, 5, dtype=torch.float64)),
            r"grads\[0\] has dtype Double but params\[0\] has dtype Float",
        ),
        (
            lambda kw: kw["params"].__setitem__(1, torch.zeros(6, 5, dtype=torch.float64)),
            r"params\[1\] is Double on cpu but params\[0\] is Float",
        ),
        (lambda kw: kw["steps"].__setitem__(2, torch.tensor(3)), r"steps\[2\] must be a float32 tensor"),
        (lambda kw: kw.__setitem__("stencil", "7point"), r"invalid stencil '7point'. Choose from: 9point, 5point"),
    ],
)
def test_bad_input_names_the_argument_and_changes_nothing(break_it, message):
    from fastopt.extension import ladam_step_cpu

    kw = {**ladam_inputs(), **HYPER}
    break_it(kw)
    before = {k: [t.clone() for t in v] for k, v in kw.items() if k in ("params", "exp_avgs", "exp_avg_sqs")}
    with pytest.raises(RuntimeError, match=message):
        ladam_step_cpu(**kw)
    for key, tensors in before.items():
        for a, b in zip(kw[key], tensors):
            assert torch.equal(a, b), key


@needs_cpu
def test_integer_parameters_are_refused():
    from fastopt.extension import ladam_step_cpu

    kw = {**ladam_inputs(n=1), **HYPER}
    kw = {
        k: ([t.long() for t in v] if k in ("params", "grads", "exp_avgs", "exp_avg_sqs") else v) for k, v in kw.items()
    }
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype Long; supported: float32, float64, bfloat16"):
        ladam_step_cpu(**kw)


# -- a missing extension -------------------------------------------------------------------------
# Each scenario runs in a fresh interpreter: ``sys.modules["fastopt._C"] = None`` makes the import
# of the installed build fail as if it had never been built.
PROBE = r"""
import sys, warnings
sys.modules["fastopt._C"] = None
{patch}
import torch, fastopt
from fastopt import backends
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    print("AUTO", backends.resolve("ladam_step", "cpu", torch.float32))
    backends.resolve("lrmsprop_step", "cpu", torch.bfloat16)
print("WARNINGS", len([w for w in caught if "C++ extension unavailable" in str(w.message)]))
for w in caught:
    print("WARNING", str(w.message).replace("\n", " "))
print("WHY", backends.why_not("cpu"))
try:
    fastopt.LAdam([torch.zeros(4, requires_grad=True)], backend="cpu")
except backends.BackendUnavailableError as err:
    print("RAISED", err)
p = torch.zeros(8, requires_grad=True)
p.grad = torch.ones(8)
fastopt.LAdam([p], lr=0.1).step()
print("STEPPED", bool((p < 0).all()))
"""


def probe(patch="", **env):
    full_env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(patch=patch)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()}, out.stdout


def test_missing_extension_without_run_time_build_falls_back_to_torch():
    lines, out = probe(**{"FASTOPT_JIT_BUILD": "0"})
    assert lines["AUTO"] == "torch", out
    assert lines["WARNINGS"] == "1", out  # once, however many ops and dtypes are resolved
    assert "\n" not in lines["WARNING"] and "FASTOPT_JIT_BUILD=0" in lines["WARNING"], out
    assert "fastopt._C is not built" in lines["WHY"] and "FASTOPT_JIT_BUILD=0" in lines["WHY"], out
    assert lines["RAISED"].startswith("backend='cpu' needs the C++ extension fastopt._C"), out
    assert "FASTOPT_JIT_BUILD=0" in lines["RAISED"], out
    assert lines["STEPPED"] == "True", out


def test_failed_run_time_build_falls_back_to_torch_and_says_why():
    patch = (
        "import torch.utils.cpp_extension as ce\n"
        "def load(*a, **k): raise RuntimeError('Ninja is required to load C++ extensions (simulated)')\n"
        "ce.load = load"
    )
    lines, out = probe(patch=patch, FASTOPT_JIT_BUILD="1")
    assert lines["AUTO"] == "torch", out
    assert lines["WARNINGS"] == "1", out
    assert "building it failed" in lines["WHY"] and "Ninja is required" in lines["WHY"], out
    assert "Ninja is required" in lines["RAISED"], out
    assert lines["STEPPED"] == "True", out


JIT_PROBE = r"""
import sys
sys.modules["fastopt._C"] = None
import torch, fastopt
from fastopt import backends, extension, reference
assert backends.resolve("ladam_step", "cpu", torch.float32) == "cpu"
print("BUILD", extension.BUILD)
torch.manual_seed(0)
p = [torch.randn(9, 7, dtype=torch.float64)]
g = [torch.randn(9, 7, dtype=torch.float64)]
state = [[torch.zeros(9, 7, dtype=torch.float64)] for _ in range(4)]
q = [p[0].clone()]
kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, c2=0.1, stencil="9point")
extension.ladam_step_cpu(p, g, state[0], state[1], [torch.tensor(1.0)], [True], **kw)
reference.ladam_step_reference(q, g, state[2], state[3], [torch.tensor(1.0)], [True], **kw)
print("DIFF", float((p[0] - q[0]).abs().max()))
"""


@pytest.mark.skipif(
    shutil.which("ninja") is None and not os.path.exists(os.path.join(sys.prefix, "bin", "ninja")),
    reason="the run-time build needs ninja (pip install ninja)",
)
def test_missing_extension_is_built_at_run_time_once():
    """The real thing: compile csrc/ with torch.utils.cpp_extension.load into a fresh cache; a
    second process loads the cached library without compiling."""
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ,
            "TORCH_EXTENSIONS_DIR": cache,
            "FASTOPT_JIT_BUILD": "1",
            "PATH": os.path.join(sys.prefix, "bin") + os.pathsep + os.environ.get("PATH", ""),
        }
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", JIT_PROBE], capture_output=True, text=True, env=env, cwd=REPO, timeout=1200
            )
            assert out.returncode == 0, out.stderr[-3000:]
            libs = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files if f.endswith(".so")]
            assert len(libs) == 1, libs
            runs.append((out.stdout, os.stat(libs[0]).st_mtime_ns))
        (first, built_at), (second, loaded_at) = runs
        assert "BUILD built at run time from csrc/" in first and "BUILD built at run time" in second
        assert float(first.split("DIFF ")[1]) < 1e-12, first
        assert loaded_at == built_at, "the second process rebuilt the cached extension"


# -- CUDA sources: compile checks (no GPU here) -------------------------------------------------------
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME)")


def compile_all(commands, warnings_ok):
    """Run the compiler commands concurrently; each must succeed (and, unless warnings_ok, say
    nothing about warnings: torch's own headers warn under -std=c++20 with this GCC)."""
    jobs = [
        (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for cmd in commands
    ]
    for cmd, job in jobs:
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"{' '.join(cmd)}:\n{output[-5000:]}"
        assert warnings_ok or "warning" not in output.lower(), f"{' '.join(cmd)}:\n{output}"


@needs_nvcc
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Every csrc/*.cu compiles to an object file (host code, device code, ptxas): they include no
    torch header, so the torch at hand (CPU-only here) does not matter. Compiled in parallel."""
    _, cu = build.sources()
    assert cu, "no CUDA sources"
    compile_all(
        [
            [
                NVCC,
                "-c",
                src,
                "-o",
                str(tmp_path / (os.path.basename(src) + ".o")),
                "-I",
                build.CSRC,
                *build.NVCC_FLAGS,
                "-std=c++17",
            ]
            for src in cu
        ],
        warnings_ok=False,
    )


@needs_nvcc
def test_cuda_host_code_compiles(tmp_path):
    """The CUDA host entries (csrc/cuda_host.cpp) and the bindings with FASTOPT_WITH_CUDA compile
    against torch's c10/cuda headers (nvcc drives the host compiler and adds the CUDA headers; not
    linked: this torch has no CUDA libraries). CPU wheels lack one CMake-generated header, stubbed
    here."""
    import sysconfig

    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [build.CSRC, str(tmp_path), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    compile_all(
        [
            [
                NVCC,
                "-x",
                "c++",
                "-std=c++20",
                "-c",
                os.path.join(build.CSRC, src),
                "-o",
                str(tmp_path / (src + ".o")),
                "-DFASTOPT_WITH_CUDA",
                "-DTORCH_EXTENSION_NAME=_C",
                *[f"-I{i}" for i in includes],
            ]
            for src in ("cuda_host.cpp", "bindings.cpp")
        ],
        warnings_ok=True,
    )


@needs_cpu
@pytest.mark.parametrize("op", ["ladam_step_cpu", "ladagrad_step_cpu", "lrmsprop_step_cpu"])
def test_empty_lists_do_nothing(op):
    """No tensors: the step returns None, leaves the lists it was given empty, and runs no torch
    op at all (not even the fastopt kernel, which the dispatcher could not place without a tensor);
    also with a tensor learning rate and AMP's grad_scale / found_inf, which stay unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastopt import extension

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    sibling = dict(eps=1e-10, weight_decay=0.0, c2=1e-2, stencil="9point")
    # (number of tensor lists, hyperparameters); LRMSProp without momentum takes None for its buffers.
    calls = {
        "ladam_step_cpu": [(6, HYPER)],
        "ladagrad_step_cpu": [(5, dict(lr=1e-2, lr_decay=0.0, **sibling))],
        "lrmsprop_step_cpu": [
            (6, dict(lr=1e-2, alpha=0.99, momentum=0.0, **sibling)),
            (6, dict(lr=1e-2, alpha=0.99, momentum=0.9, **sibling)),
        ],
    }[op]
    amp = dict(lr=torch.tensor([1e-2]), grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([0.0]))
    for n_lists, hyper in calls:
        for kwargs in (hyper, {**hyper, **amp}):
            lists = [[] for _ in range(n_lists)]
            if kwargs.get("momentum") == 0.0:
                lists[3] = None
            before = {key: value.clone() for key, value in kwargs.items() if torch.is_tensor(value)}
            with Record() as record:
                returned = getattr(extension, op)(*lists, **kwargs)
            assert returned is None
            assert all(tensors is None or tensors == [] for tensors in lists), lists
            assert record.ops == [], record.ops
            for key, value in before.items():
                assert torch.equal(kwargs[key], value), key
