"""pytest-benchmark microbenchmark of Levenberg-Marquardt's ``jacobian_products`` op against
``J.T @ J``, as bench/bench_lm.py's ``products`` problem calls it: the lower triangle of
``[J | r]^T [J | r] / n`` into a matrix with 64-byte aligned rows (fastopt.lm's workspace), on
every backend that can run it here.

    pytest bench --benchmark-only -k jacobian_products

Size: one 1000-row slice of J of bench_lm.py's split1153 problem (1153 parameters,
max_batch_size=1000); bench_lm.py times the 8000 x 4353 product, too slow for this suite's rounds.
"""

from __future__ import annotations

import pytest
import torch

import fastopt.lm as flm
from fastopt import backends

ROWS, PARAMS = 1000, 1153
OP = "jacobian_products"
FASTOPT = {f"fastopt.{OP}[{b}]": b for b in backends.BACKENDS}


@pytest.mark.parametrize("provider", ["torch: J.T @ J", *FASTOPT])
def test_jacobian_products(timed, require_backend, device, provider):
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(ROWS, PARAMS + 1, generator=gen).to(device, dtype)  # [J | r]
    if provider in FASTOPT:
        require_backend(FASTOPT[provider], OP, dtype)
        impl = backends.implementation(OP, FASTOPT[provider])
        out = flm._engine.Workspace().matrix("gram", PARAMS + 1, PARAMS + 1, dtype, device)
        fn = lambda: impl(a, out.zero_(), scale=1.0 / ROWS)  # noqa: E731
    else:
        j = a[:, :PARAMS].contiguous()
        fn = lambda: j.t() @ j  # noqa: E731
    timed(fn, f"{OP} {ROWS}x{PARAMS} fp32 {device.type}", rows=ROWS, params=PARAMS)
