"""The batched_gram op (J^T J and J^T r of many small problems): the reference against float64
products, its dispatch, and the Triton kernel in Triton's interpreter and compiled for GPUs.

The Triton checks run in subprocesses (tests/lsq_triton_checks.py): the interpreter needs
TRITON_INTERPRET=1 before triton is imported, and the compile checks need it unset."""

import os
import subprocess
import sys

import pytest
import torch
from lsq_problems import assert_backend_fits_like_torch

from fastopt import backends
from fastopt.reference import batched_gram_reference

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(7, 64, 4), (3, 5, 9), (1, 1, 1), (4, 0, 3), (0, 6, 2), (2, 33, 40)]
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_products(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    jac = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    res = torch.randn(*shape[:2], generator=gen, dtype=torch.float64).to(dtype)
    jtj, jtr = batched_gram_reference(jac, res)
    j, r = jac.double(), res.double()
    expected = (torch.einsum("bnp,bnq->bpq", j, j), torch.einsum("bnp,bn->bp", j, r))
    assert jtj.dtype == jtr.dtype == dtype and jtj.shape == shape[:1] + shape[2:] * 2
    # fp32 math for bf16/fp16 inputs, rounded once: within a unit or two of the last place.
    torch.testing.assert_close(jtj.double(), expected[0].to(dtype).double(), **TOL[dtype])
    torch.testing.assert_close(jtr.double(), expected[1].to(dtype).double(), **TOL[dtype])


def test_reference_takes_any_strides():
    gen = torch.Generator().manual_seed(1)
    storage = torch.randn(4, 10, 30, generator=gen, dtype=torch.float64)
    jac = storage.permute(1, 2, 0)  # (10, 30, 4), P-major as torch.func.jacfwd returns
    res = torch.randn(30, 10, generator=gen, dtype=torch.float64).t()
    jtj, jtr = batched_gram_reference(jac, res)
    jtj_c, jtr_c = batched_gram_reference(jac.contiguous(), res.contiguous())
    torch.testing.assert_close(jtj, jtj_c, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(jtr, jtr_c, rtol=1e-14, atol=1e-14)


def test_bad_inputs_name_them():
    with pytest.raises(ValueError, match=r"jac must have shape \(B, N, P\)"):
        batched_gram_reference(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"res must have shape \(B, N\) = \(2, 3\)"):
        batched_gram_reference(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="must share dtype and device"):
        batched_gram_reference(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.float64))


def test_dispatch():
    assert "batched_gram" in backends.OPS
    assert backends.select("batched_gram", "cpu", torch.float32, "torch") is batched_gram_reference
    assert backends.resolve("batched_gram", "cpu", torch.float64) in ("cpu", "torch")


def _run_checks(mode, interpret):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "lsq_triton_checks.py"), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


needs_triton = pytest.mark.skipif(backends.why_not("triton") is not None, reason=str(backends.why_not("triton")))


@needs_triton
def test_triton_kernel_in_the_interpreter_matches_the_reference():
    out = _run_checks("interpreter", interpret=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok gram") == 12 and "ok least_squares backend=triton" in out.stdout


@needs_triton
def test_triton_kernel_compiles_for_sm80_and_sm90():
    out = _run_checks("compile", interpret=False)
    if out.returncode != 0 and "ptxas" in out.stderr.lower() and "not found" in out.stderr.lower():
        pytest.skip("triton's ptxas is not available here")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok compile") == 4


# -- backend "cpu": the C++ kernel of fastopt._C -------------------------------------------------------
needs_cpu = pytest.mark.skipif(
    not backends.available("cpu", "batched_gram", "cpu", torch.float32),
    reason=str(backends.why_not("cpu", "batched_gram", "cpu", torch.float32)),
)
# P = 40 and 9 cross the kernel's 2 x 4 column blocks; N = 300 its 256-row chunks; P = 130 takes
# the gemm path of large problems (csrc/gram_cpu.cpp: kGemmFromParams).
CPU_SHAPES = SHAPES + [(3, 300, 7), (2, 1, 9), (2, 50, 130)]


@needs_cpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "p-major"])
def test_cpu_kernel_matches_the_reference(shape, dtype, layout):
    b, n, p = shape
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    if layout == "p-major":  # a (B, N, P) view of P-major storage, as torch.func.jacfwd returns
        jac = torch.randn(p, b, n, generator=gen, dtype=torch.float64).to(dtype).permute(1, 2, 0)
    else:
        jac = torch.randn(b, n, p, generator=gen, dtype=torch.float64).to(dtype)
    res = torch.randn(b, 2 * n, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]  # strided residuals
    gram = backends.select("batched_gram", "cpu", dtype, "cpu")
    jtj, jtr = gram(jac, res)
    ref_jtj, ref_jtr = batched_gram_reference(jac, res)
    assert jtj.dtype == jtr.dtype == dtype and jtj.shape == (b, p, p) and jtr.shape == (b, p)
    assert jtj.is_contiguous() and jtr.is_contiguous()
    assert torch.equal(jtj, jtj.transpose(1, 2)), "J^T J must be exactly symmetric (one triangle, mirrored)"
    # Both round once from fp32 (fp64) sums taken in different orders: a unit in the last place
    # of the input dtype apart at most, beyond fp32 round-off.
    torch.testing.assert_close(jtj.double(), ref_jtj.double(), **TOL[dtype])
    torch.testing.assert_close(jtr.double(), ref_jtr.double(), **TOL[dtype])


@needs_cpu
def test_cpu_kernel_rejects_bad_inputs_naming_them():
    gram = backends.select("batched_gram", "cpu", torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"res must have shape \(B, N\) = \(2, 3\)"):
        gram(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"batched_gram: jac must have shape \(B, N, P\)"):
        torch.ops.fastopt.batched_gram(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"batched_gram: res must have shape \(B, N\) = \(2, 3\)"):
        torch.ops.fastopt.batched_gram(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"batched_gram: jac has dtype Long"):
        torch.ops.fastopt.batched_gram(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


@needs_cpu
def test_least_squares_on_the_cpu_backend_matches_the_torch_backend():
    assert_backend_fits_like_torch("cpu")
