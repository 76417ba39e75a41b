"""pytest-benchmark microbenchmarks: one LAdam step against its peers, a group per workload.

    pytest bench --benchmark-only                          # the table
    pytest bench --benchmark-only --benchmark-autosave     # ... saved in .benchmarks/, commit in the name
    pytest bench --benchmark-only --benchmark-compare      # ... against the last saved run

Providers: torch.optim.Adam(fused=True) and (foreach=True), ladam.LAdamW, and fastopt.LAdam on
every backend (those that cannot run here are SKIPPED with the reason), built by
:func:`fastopt.benchmarking.providers` on the workloads of :data:`fastopt.benchmarking.WORKLOADS`,
fp32, as bench/bench_ladam.py times them for its ratio tables.
"""

from __future__ import annotations

import pytest
import torch

from fastopt import backends, benchmarking

FAMILY = "ladam"
SPEC = benchmarking.FAMILY[FAMILY]
WORKLOADS = ("4x1024x1024", "convnet200")
FASTOPT = {f"fastopt.{SPEC['cls']}[{b}]": b for b in backends.BACKENDS}
# What a peer missing from benchmarking.providers() lacks here.
PEERS = {
    **{name: f"{name} does not take these tensors here" for name in SPEC["torch_peers"]},
    f"ladam.{SPEC['ladam']}": "ladam is not installed: pip install ladam==0.4.1",
}


@pytest.mark.parametrize("provider", [*PEERS, *FASTOPT])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_ladam_step(timed, require_backend, device, workload, provider):
    dtype = torch.float32
    if provider in FASTOPT:
        require_backend(FASTOPT[provider], SPEC["op"], dtype)
    ctor = benchmarking.providers(FAMILY, device, dtype).get(provider)
    if ctor is None:
        pytest.skip(f"{provider} on {device} {dtype}: {PEERS[provider]}")
    shapes = benchmarking.WORKLOADS[workload]()
    opt = ctor(benchmarking._make_params(shapes, device, dtype))
    timed(
        opt.step,
        f"{SPEC['op']} {workload} fp32 {device.type}",
        n_tensors=len(shapes),
        n_params=sum(torch.Size(s).numel() for s in shapes),
    )
