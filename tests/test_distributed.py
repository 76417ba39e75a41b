"""torch.distributed on CPU (gloo, spawned processes): DDP and FSDP2 give the single-process result.

FSDP2 (fully_shard) splits every weight by rows across ranks; the Laplacian must still see the
whole tensor (halo rows from the neighbouring shards, circular wrap from the last shard to the
first), so sharded training equals unsharded training to round-off. The shapes are chosen so
that shards are uneven, one row thin, and empty on some ranks.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
from fastopt.testing import TOLERANCES, assert_all_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIGS = {
    "variance_lap": ("LAdam", dict(lr=1e-2, c2=5e-2, min_spatial_size=4)),
    "variance_lap_5point": ("LAdam", dict(lr=1e-2, c2=5e-2, stencil="5point", min_spatial_size=4)),
    "update_lap": ("LAdam", dict(lr=1e-2, c2=5e-2, mode="update_lap", min_spatial_size=4)),
    "weight_lap": ("LAdam", dict(lr=1e-2, c2=5e-2, mode="weight_lap", min_spatial_size=4)),
    "wave_variance": ("LAdam", dict(lr=1e-3, c2=5e-2, mode="wave_variance", wave_E0=0.0, min_spatial_size=4)),
    "LAdaGrad": ("LAdaGrad", dict(lr=1e-2, c2=5e-2, min_spatial_size=4)),
    "LRMSProp": ("LRMSProp", dict(lr=1e-3, c2=5e-2, momentum=0.9, min_spatial_size=4)),
}
STEPS = 4


class Net(torch.nn.Module):
    """Row counts 16, 5, 4, 3 and a 1-D bias of 5: uneven, thin and (3 ranks, 4 rows) empty shards."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = torch.nn.Linear(16 * 16, 5)
        self.fc2 = torch.nn.Linear(5, 4)
        self.fc3 = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3), keepdim=True).expand(-1, -1, 4, 4).flatten(1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(12, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randn(12, 3, generator=gen,
                                                                                     dtype=torch.float64)


def _train(model, opt, x, y):
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _single_process(config):
    cls, kw = CONFIGS[config]
    torch.manual_seed(0)
    model = Net().double()
    x, y = _data()
    _train(model, getattr(fastopt, cls)(model.parameters(), **kw), x, y)
    return [p.detach() for p in model.parameters()]


def _worker(rank, world, kind, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = _data()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    for config, (cls, kw) in CONFIGS.items():
        torch.manual_seed(0)
        model = Net().double()
        if kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            fully_shard(model)
            trained = model
        else:
            trained = torch.nn.parallel.DistributedDataParallel(model)
        _train(trained, getattr(fastopt, cls)(trained.parameters(), **kw), x[shard], y[shard])
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        if rank == 0:
            torch.save([p.detach() for p in params], os.path.join(out_dir, f"{config}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind,world", [("ddp", 2), ("fsdp2", 2), ("fsdp2", 3)])
def test_sharded_training_equals_single_process(kind, world, tmp_path):
    mp.spawn(_worker, args=(world, kind, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for config in CONFIGS:
        sharded = torch.load(tmp_path / f"{config}.pt")
        # fp64, so that a wrong neighbour (a missing halo) shows far above round-off.
        assert_all_close(sharded, _single_process(config), **TOLERANCES[torch.float64],
                         what=f"{kind} x{world} {config}")


def test_dtensors_on_one_rank_and_what_ladam_does_with_them():
    """Why the halo exchange exists: ladam's conv-based Laplacian raises on DTensors, even on a
    1-rank mesh; fastopt steps the DTensor exactly as it steps the plain tensor, and says which
    placements it does not support."""
    pytest.importorskip("ladam")
    mp.spawn(_ladam_on_dtensor, args=(), nprocs=1, join=True)


def _ladam_on_dtensor(rank):
    import tempfile
    import ladam
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        mesh = DeviceMesh("cpu", [0])
        torch.manual_seed(0)
        plain = torch.randn(8, 8, requires_grad=True)
        plain.grad = torch.randn(8, 8)
        sharded = [torch.nn.Parameter(distribute_tensor(plain.detach().clone(), mesh, [Shard(0)])) for _ in range(2)]
        for p in sharded:
            p.grad = distribute_tensor(plain.grad.clone(), mesh, [Shard(0)])
        fastopt.LAdam([sharded[0]], c2=1e-2).step()
        fastopt.LAdam([plain], c2=1e-2).step()
        assert torch.equal(sharded[0].full_tensor(), plain.detach())
        with pytest.raises(RuntimeError, match="DTensor"):
            ladam.LAdamW([sharded[1]], c2=1e-2).step()
        by_columns = torch.nn.Parameter(distribute_tensor(plain.detach().clone(), mesh, [Shard(1)]))
        by_columns.grad = distribute_tensor(plain.grad.clone(), mesh, [Shard(1)])
        with pytest.raises(NotImplementedError, match=r"Shard\(dim=1\)"):
            fastopt.LAdam([by_columns], c2=1e-2).step()
        dist.destroy_process_group()
