"""The jacobian_products op: the reference against a plain matmul, every other backend (Triton in
its interpreter on CPU) against the reference, argument errors, and dispatch.

TRITON_INTERPRET=1 must be in the environment before triton is first imported. Without CUDA this
module sets it when it is collected, unless triton was already imported (then the Triton tests
skip and say why); a tests/conftest.py that sets it for the whole session makes this a no-op.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastopt  # noqa: E402
from fastopt import backends  # noqa: E402
from fastopt.reference.lm import jacobian_products_reference, symmetrize_lower  # noqa: E402
from fastopt.testing import assert_close  # noqa: E402

OP = "jacobian_products"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACC = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
# The sum order differs (panels, tiles): fp32 round-off on sums of up to ~100 products; fp64 too.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _exact(a: torch.Tensor, scale: float, shift=None) -> torch.Tensor:
    """scale * a^T a (+ diag(shift)) in fp64: the value every implementation approximates."""
    a64 = a.double()
    out = scale * (a64.t() @ a64)
    if shift is not None:
        out.diagonal().add_(shift.double())
    return out


def _inputs(k, m, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=gen, dtype=torch.float64).to(dtype).to(device)
    out = torch.randn(m, m, generator=gen, dtype=torch.float64).to(ACC[dtype]).to(device)
    shift = torch.rand(m, generator=gen, dtype=torch.float64).to(ACC[dtype]).to(device)
    return a, out, shift


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,m", [(1, 1), (7, 3), (100, 63), (64, 700), (300, 1030)])
def test_reference_lower_triangle_matches_the_matmul(dtype, k, m):
    a, out, shift = _inputs(k, m, dtype)
    start = out.clone()
    jacobian_products_reference(a, out, scale=0.25, shift=shift)
    expected = start.double() + _exact(a, 0.25, shift)
    tol = TOL[ACC[dtype]]
    assert_close(out.tril(), expected.tril(), rtol=tol["rtol"], atol=tol["atol"] * max(1, k), what="lower triangle")


def test_reference_accumulates_slices_into_one_output():
    a, _, _ = _inputs(90, 40, torch.float64, seed=3)
    whole = torch.zeros(40, 40, dtype=torch.float64)
    jacobian_products_reference(a, whole, scale=1 / 90)
    sliced = torch.zeros(40, 40, dtype=torch.float64)
    for s in range(0, 90, 25):
        jacobian_products_reference(a[s : s + 25], sliced, scale=1 / 90)
    assert_close(sliced.tril(), whole.tril(), rtol=1e-13, atol=1e-14, what="sliced vs whole")


def test_augmented_matrix_gives_all_three_products():
    gen = torch.Generator().manual_seed(5)
    j = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    r = torch.randn(50, generator=gen, dtype=torch.float64)
    out = torch.zeros(10, 10, dtype=torch.float64)
    jacobian_products_reference(torch.cat([j, r[:, None]], 1), out, scale=0.5)
    assert_close(symmetrize_lower(out[:9, :9]), 0.5 * j.t() @ j, rtol=1e-13, atol=1e-13, what="J^T J")
    assert_close(out[9, :9], 0.5 * j.t() @ r, rtol=1e-13, atol=1e-13, what="J^T r")
    assert_close(out[9, 9], 0.5 * r @ r, rtol=1e-13, atol=1e-13, what="r^T r")


def test_transposed_view_gives_j_jt():
    gen = torch.Generator().manual_seed(6)
    j = torch.randn(12, 80, generator=gen, dtype=torch.float64)
    out = torch.zeros(12, 12, dtype=torch.float64)
    jacobian_products_reference(j.t(), out, scale=1.0)
    assert_close(symmetrize_lower(out), j @ j.t(), rtol=1e-13, atol=1e-12, what="J J^T")


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(a=torch.zeros(3)), "2-D"),
        (dict(a=torch.zeros(3, 4, dtype=torch.int64)), "floating-point"),
        (dict(out=torch.zeros(3, 3)), r"\(4, 4\)"),
        (dict(out=torch.zeros(4, 4, dtype=torch.float64)), "must be torch.float32"),
        (dict(shift=torch.zeros(3)), r"shift must be a \(4,\)"),
        (dict(scale=torch.tensor(1.0)), "scale must be a Python number"),
    ],
)
def test_errors_name_the_argument(bad, match):
    args = dict(a=torch.zeros(3, 4), out=torch.zeros(4, 4), shift=None, scale=1.0)
    args.update(bad)
    out_before = args["out"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        jacobian_products_reference(args["a"], args["out"], scale=args["scale"], shift=args["shift"])
    assert torch.equal(args["out"], out_before)


def test_the_op_is_registered_with_the_backends():
    assert OP in backends.OPS
    assert backends.select(OP, "cpu", torch.float32, "torch") is fastopt.reference.jacobian_products_reference
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert backends.available("torch", OP, "cpu", dtype)


# -- other backends against the reference ------------------------------------------------------------
def _backend_params():
    out = []
    for name in ("triton", "cpu", "cuda"):
        reason = backends.why_not(name, OP, DEVICE, torch.float32)
        if name == "triton" and reason is None and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "triton was imported before TRITON_INTERPRET=1 could be set"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


# Small shapes: the interpreter runs ~0.5M elements/s. 70 columns cross tile edges (64 fp32,
# 32 fp64 wide); 1 and 5 rows/columns are smaller than a tile; the strided cases read a[:, ::2]
# and a transposed view (the underdetermined J J^T).
CASES = [
    (37, 70, "contiguous"),
    (5, 1, "contiguous"),
    (1, 5, "contiguous"),
    (40, 33, "every_other_column"),
    (29, 45, "transposed"),
]


def _layout(a, layout):
    if layout == "every_other_column":
        wide = torch.zeros(a.shape[0], 2 * a.shape[1], dtype=a.dtype, device=a.device)
        wide[:, ::2] = a
        return wide[:, ::2]
    if layout == "transposed":
        return a.t().contiguous().t()
    return a


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,m,layout", CASES)
def test_backend_matches_reference(backend, dtype, k, m, layout):
    if not backends.available(backend, OP, DEVICE, dtype):
        pytest.skip(backends.why_not(backend, OP, DEVICE, dtype))
    a, out, shift = _inputs(k, m, dtype, seed=k + m, device=DEVICE)
    a = _layout(a, layout)
    expected = out.clone()
    jacobian_products_reference(a, expected, scale=1 / 3, shift=shift)
    fn = backends.select(OP, DEVICE, dtype, backend)
    upper_before = out.triu(1).clone()
    fn(a, out, scale=1 / 3, shift=shift)
    tol = TOL[ACC[dtype]]
    assert_close(out.tril(), expected.tril(), rtol=tol["rtol"], atol=tol["atol"] * max(1, k), what=f"{backend} lower")
    if backend == "triton":  # the kernel writes nothing above the diagonal
        assert torch.equal(out.triu(1), upper_before)


needs_cpu_op = pytest.mark.skipif(
    not backends.available("cpu", OP, "cpu", torch.float32),
    reason=str(backends.why_not("cpu", OP, "cpu", torch.float32)),
)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "k,m,layout", [(40, 1300, "contiguous"), (1300, 24, "transposed"), (20, 700, "every_other_column")]
)
def test_cpu_op_matches_reference_across_its_blocks(dtype, k, m, layout):
    """Wide enough for the CPU op's blocks below the diagonal (1300 columns: halves of 656 and
    644, then squares of up to 512), into an output with 64-byte aligned rows as fastopt.lm's;
    the transposed case is the underdetermined J J^T of J (24 x 1300), into a column-major out."""
    from fastopt.lm._engine import Workspace

    a, _, shift = _inputs(k, m, dtype, seed=k * m)
    a = _layout(a, layout)
    start = torch.randn(m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ACC[dtype])
    if layout == "transposed":  # and a column-major out: any strides are fine
        out = torch.empty(m, m, dtype=ACC[dtype]).t()
    else:
        out = Workspace().matrix("gram", m, m, ACC[dtype], torch.device("cpu"))
    out.copy_(start)
    expected = start.clone()
    jacobian_products_reference(a, expected, scale=0.5, shift=shift)
    fastopt.extension.jacobian_products_cpu(a, out, scale=0.5, shift=shift)
    tol = TOL[ACC[dtype]]
    assert_close(out.tril(), expected.tril(), rtol=tol["rtol"], atol=tol["atol"] * max(1, k), what="cpu op lower")


@needs_cpu_op
@pytest.mark.parametrize(
    "bad,match,error",
    [
        (dict(out=torch.zeros(3, 3)), r"jacobian_products: out must be a \(4, 4\) tensor", ValueError),
        (dict(out=torch.zeros(4, 4, dtype=torch.float64)), r"jacobian_products: out must be Float", TypeError),
        (dict(shift=torch.zeros(3)), r"jacobian_products: shift must be a \(4,\) tensor", ValueError),
        (dict(a=torch.zeros(3, 4, 1)), r"jacobian_products: a must be a 2-D tensor", ValueError),
        (dict(a=torch.zeros(3, 4, dtype=torch.int32)), r"jacobian_products: a has dtype Int", TypeError),
    ],
)
def test_cpu_op_itself_rejects_bad_arguments_naming_them(bad, match, error):
    """The C++ op's own checks (torch.ops.fastopt.jacobian_products called directly, without the
    Python wrapper's): the kernels take raw pointers, so nothing wrong may reach them."""
    args = dict(a=torch.zeros(3, 4), out=torch.zeros(4, 4), shift=None)
    args.update(bad)
    before = args["out"].clone()
    with pytest.raises(error, match=match):
        torch.ops.fastopt.jacobian_products(args["a"], args["out"], scale=1.0, shift=args["shift"])
    assert torch.equal(args["out"], before)


@pytest.mark.parametrize("backend", _backend_params())
def test_backend_accumulates_and_rejects_bad_arguments(backend):
    a, _, _ = _inputs(30, 20, torch.float32, seed=9, device=DEVICE)
    fn = backends.select(OP, DEVICE, torch.float32, backend)
    out = torch.zeros(20, 20, device=DEVICE)
    fn(a[:13], out, scale=0.5)
    fn(a[13:], out, scale=0.5)
    assert_close(out.tril(), (0.5 * a.double().t() @ a.double()).tril(), rtol=1e-5, atol=1e-5, what="accumulated")
    with pytest.raises(ValueError, match=r"out must be a \(20, 20\)"):
        fn(a, torch.zeros(19, 19, device=DEVICE), scale=1.0)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lm_steps_on_a_backend_match_the_torch_backend(backend, dtype):
    """End to end: fastopt.LM with the products on ``backend`` takes the torch backend's steps
    (over- and underdetermined: 40 and 12 residuals, 25 parameters)."""
    if not backends.available(backend, OP, DEVICE, dtype):
        pytest.skip(backends.why_not(backend, OP, DEVICE, dtype))
    for n in (40, 12):
        x = torch.linspace(-1, 1, n, dtype=dtype, device=DEVICE).unsqueeze(1)
        y = torch.sin(3 * x)
        finals = []
        for name in ("torch", backend):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DEVICE, dtype)
            lm = fastopt.LM(model, backend=name)
            steps = [lm.step(x, y) for _ in range(3)]
            finals.append(([(s.attempts, s.accepted) for s in steps], lm.flat_params.clone()))
        assert finals[0][0] == finals[1][0]
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
        assert_close(finals[1][1], finals[0][1], what=f"{backend} vs torch, {n} samples", **tol)
