"""Fixtures of the pytest-benchmark microbenchmarks (bench/test_microbench_*.py).

``FASTOPT_BENCH_DEVICE`` picks the device (default: cuda when available, else cpu). A provider
that cannot run here is SKIPPED with the reason fastopt.backends gives.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastopt import backends, benchmarking


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("FASTOPT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def require_backend(device):
    """``require_backend(backend, op, dtype)``: skip the test, saying why, unless fastopt's
    ``backend`` runs ``op`` on this device and dtype fast enough to time."""

    def check(backend: str, op: str, dtype: torch.dtype) -> None:
        if backend == "triton" and device.type == "cpu":
            # Measured here: 42 s per LAdam step on one 1024 x 1024 tensor (the cpu backend: 8-12 ms for four).
            pytest.skip(
                "triton on CPU tensors runs only in TRITON_INTERPRET=1's interpreter, far too slow "
                "to time; it is timed where CUDA is (FASTOPT_BENCH_DEVICE=cuda)"
            )
        reason = backends.why_not(backend, op, device, dtype)
        if reason:
            pytest.skip(reason)

    return check


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, group, **extra_info)``: benchmark ``fn`` in ``group``, synchronising the device
    after each call (pytest-benchmark reads the wall clock)."""

    def run(fn, group: str, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(device=str(device), **extra_info)

        def call():
            fn()
            benchmarking._sync(device)

        call()  # first call outside the timing: optimizer state, workspaces, kernel compilation
        return benchmark(call)

    return run
