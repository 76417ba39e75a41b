"""Checks of kernels/batched_gram.py that must run in a process of their own, started by
tests/test_lsq_gram.py (not collected by pytest itself):

    TRITON_INTERPRET=1 python tests/lsq_triton_checks.py interpreter
        the kernel on CPU tensors in Triton's interpreter against fastopt.reference, and
        least_squares(backend="triton") against backend="torch";
    python tests/lsq_triton_checks.py compile
        the kernel compiled for NVIDIA sm_80 and sm_90 (to a cubin; no GPU needed).

Triton reads TRITON_INTERPRET when it is imported, so the interpreter checks need a fresh process
with the variable set; running them apart also leaves the test process without triton imported.
Prints one line per check and exits non-zero on the first failure.
"""

import os
import sys

import torch


def interpreter() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from lsq_problems import assert_backend_fits_like_torch

    from fastopt import backends
    from fastopt.kernels import batched_gram_triton
    from fastopt.reference import batched_gram_reference

    gen = torch.Generator().manual_seed(0)
    cases = [
        ((5, 64, 4), False),
        ((3, 70, 5), False),
        ((2, 9, 37), False),
        ((2, 130, 3), True),
        ((4, 0, 3), False),
        ((1, 1, 1), False),
    ]
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.float64, dict(rtol=1e-12, atol=1e-12))):
        for shape, transposed in cases:
            b, n, p = shape
            jac = torch.randn(b, n, p, generator=gen, dtype=torch.float64).to(dtype)
            if transposed:  # a (B, N, P) view of P-major storage, as torch.func.jacfwd returns
                jac = torch.randn(p, b, n, generator=gen, dtype=torch.float64).to(dtype).permute(1, 2, 0)
            res = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dtype)[:, :n]
            jtj, jtr = batched_gram_triton(jac, res)
            ref_jtj, ref_jtr = batched_gram_reference(jac, res)
            assert jtj.dtype == dtype and jtj.shape == (b, p, p) and jtr.shape == (b, p)
            torch.testing.assert_close(jtj, ref_jtj, **tol)
            torch.testing.assert_close(jtr, ref_jtr, **tol)
            print(f"ok gram {dtype} {shape} {'p-major' if transposed else 'contiguous'}")
    assert backends.resolve("batched_gram", "cpu", torch.float32, "triton") == "triton"

    assert_backend_fits_like_torch("triton")
    print("ok least_squares backend=triton")


def compile_for_gpus() -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    from fastopt.kernels.batched_gram import _batched_gram_kernel

    for ptr in ("*fp32", "*fp64"):
        signature = {"j_ptr": ptr, "r_ptr": ptr, "a_ptr": ptr, "g_ptr": ptr, "N": "i32", "P": "i32"}
        signature.update(
            {
                name: "i64"
                for name in (
                    "stride_jb",
                    "stride_jn",
                    "stride_jp",
                    "stride_rb",
                    "stride_rn",
                    "stride_ab",
                    "stride_ap",
                    "stride_aq",
                    "stride_gb",
                    "stride_gp",
                )
            }
        )
        signature.update(BLOCK_N="constexpr", BLOCK_P="constexpr")
        for capability in (80, 90):
            src = triton.compiler.ASTSource(
                fn=_batched_gram_kernel, signature=signature, constexprs={"BLOCK_N": 64, "BLOCK_P": 16}
            )
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 2})
            assert kernel.asm.get("cubin"), "no cubin"
            print(f"ok compile {ptr} sm_{capability}")


if __name__ == "__main__":
    {"interpreter": interpreter, "compile": compile_for_gpus}[sys.argv[1]]()
