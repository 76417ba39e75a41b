"""On a GPU: the cuda and triton backends against fastopt.reference (on the CPU) on shapes that cut
into many CUDA tiles of every kind, every op, every dtype, several steps with gradients that are
None on some of them; and batched_gram's CUDA kernels against its reference.

The shape zoo of the other tests holds small tensors (one tile each on CUDA: 2-D tiles are up to
32 x 128, 1-D ones 4096 elements, csrc/cuda_launch.h; Triton's are 32 x 32): these shapes split
columns (halo columns between tiles), rows (halo rows), 1-D stencils over several tiles, and keep
the odd cases (3 x 3, two rows, 0 elements). Skipped without CUDA; bench/gpu_checks.sh runs it.

``FASTOPT_GPU_PARITY_DEVICE=cpu`` runs the same tests on CPU tensors without a GPU, the cpu
backend standing in for cuda and triton in its interpreter (about 30 s a test there), to
check the tests themselves.
"""

import os

import pytest
import torch

from fastopt import backends
from fastopt.reference import batched_gram_reference
from fastopt.testing import CHECKS, TOLERANCES, assert_all_close, step_side_by_side

DEVICE = os.environ.get("FASTOPT_GPU_PARITY_DEVICE", "cuda")
BACKENDS = ["triton", "cuda" if DEVICE == "cuda" else "cpu"]
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [
    (97, 385),
    (5, 1000),
    (1000, 5),
    (3, 300),
    (10000,),
    (8193,),
    (40, 257),
    (64, 3, 3, 3),
    (3, 3),
    (2, 50),
    (7,),
    (0, 4),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
COMMON = dict(lr=1e-2, c2=5e-2, weight_decay=0.01, min_spatial_size=4)
STEPS = 4


def _skip_unless(backend, op, dtype):
    reason = backends.why_not(backend, op, DEVICE, dtype)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,cls_name,kw,op", CHECKS, ids=[c[0] for c in CHECKS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tiles_match_the_reference(backend, label, cls_name, kw, op, dtype):
    """Params and every state entry, step counts included, against the reference on the CPU;
    TOLERANCES with atol scaled by each tensor's largest value (fastopt.testing.mismatch)."""
    _skip_unless(backend, op, dtype)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_() for s in SHAPES]
    step_side_by_side(
        cls_name,
        params,
        backend=backend,
        hyper={**COMMON, **kw},
        steps=STEPS,
        scale_atol=True,
        what=f"{backend} {label} {dtype}: ",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,rows,cols", [(3, 40, 5), (2, 33, 31), (1, 20, 70), (200, 16, 3), (4, 300, 130)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gram_matches_the_reference(backend, batch, rows, cols, dtype):
    _skip_unless(backend, "batched_gram", dtype)
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    res = torch.randn(batch, rows, generator=gen, dtype=torch.float64).to(dtype)
    # A column-major jac too (as torch.func's jacobians often come).
    for j in (jac, jac.transpose(1, 2).contiguous().transpose(1, 2)):
        got = backends.implementation("batched_gram", backend)(j.to(DEVICE), res.to(DEVICE))
        want = batched_gram_reference(j, res)
        tol = dict(rtol=2e-2, atol=1e-1) if dtype == torch.bfloat16 else TOLERANCES[dtype]
        if dtype == torch.float32:
            tol = dict(rtol=1e-5, atol=1e-4)  # sums of `rows` products, in another order
        assert_all_close([g.cpu() for g in got], list(want), **tol, what=f"{backend} batched_gram {dtype}")
