"""torch.distributed on CPU (gloo, spawned processes): DDP and FSDP2 give the single-process result.

Data-parallel Levenberg-Marquardt (``process_group=``) takes, on every rank, the steps of one
process on the concatenated batch: same parameters, losses and damping path.

FSDP2 (fully_shard) splits every weight by rows across ranks; the Laplacian must still see the
whole tensor (halo rows from the neighbouring shards, circular wrap from the last shard to the
first), so sharded training equals unsharded training to round-off. The shapes are chosen so
that shards are uneven, one row thin, and empty on some ranks.
"""

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
from fastopt.testing import TOLERANCES, assert_all_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

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
    return torch.randn(12, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randn(
        12, 3, generator=gen, dtype=torch.float64
    )


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


def _spawn(worker, world, tmp_path, *args):
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined in one gloo group.

    gloo sometimes aborts a rank in its teardown ("terminate called without an active exception"),
    after every rank has finished its work: that abort is let through only when every rank wrote
    its done-marker, i.e. returned from ``worker`` (its results are on disk); any other failure,
    or an abort before that, fails the test."""
    init_file = str(tmp_path / "init")
    try:
        mp.spawn(_joined, args=(world, init_file, worker, args), nprocs=world, join=True)
    except mp.ProcessExitedException as err:
        finished = all(os.path.exists(f"{init_file}.done.{rank}") for rank in range(world))
        if not (finished and err.signal_name == "SIGABRT"):
            raise
        warnings.warn(f"gloo aborted a rank in teardown after every rank had finished: {err}", stacklevel=2)


def _joined(rank, world, init_file, worker, args):
    # A timeout, so that ranks whose collectives disagree fail instead of hanging the test run.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        worker(rank, world, *args)
        open(f"{init_file}.done.{rank}", "w").close()  # this rank's work is done (see _spawn)
        # Every rank past its last collective before any tears gloo down: without it a rank
        # sometimes aborted in teardown ("terminate called without an active exception"; FSDP2 on
        # 3 ranks, 2 cores: 5 failures in 14 runs, none in 8 with the barrier).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank, world, kind, out_dir):
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


@pytest.mark.parametrize("kind,world", [("ddp", 2), ("fsdp2", 2), ("fsdp2", 3)])
def test_sharded_training_equals_single_process(kind, world, tmp_path):
    _spawn(_worker, world, tmp_path, kind, str(tmp_path))
    for config in CONFIGS:
        sharded = torch.load(tmp_path / f"{config}.pt")
        # fp64, so that a wrong neighbour (a missing halo) shows far above round-off.
        assert_all_close(
            sharded, _single_process(config), **TOLERANCES[torch.float64], what=f"{kind} x{world} {config}"
        )


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
        with pytest.raises(ValueError, match="capturable=True does not take FSDP2-sharded"):
            fastopt.LAdam([sharded[0]], c2=1e-2, capturable=True).step()
        dist.destroy_process_group()


# -- data-parallel Levenberg-Marquardt --------------------------------------------------------------
LM_SAMPLES = 40
LM_STEPS = 5


def _lm_data():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(LM_SAMPLES, 2, generator=gen, dtype=torch.float64) * 4 - 2
    return x, torch.sin(x[:, :1] * 2) * torch.cos(x[:, 1:])


def _lm_runs(shard, process_group=None):
    """Histories of fastopt.LM and of LevenbergMarquardtModule (max_batch_size slices, a random
    parameter selection drawn from seed 100 + rank) training a 33-parameter MLP on ``shard``."""
    import fastopt.lm as lm

    x, y = _lm_data()
    rank = dist.get_rank() if process_group is not None else 0
    runs = {}
    for front in ("LM", "module"):
        # Only rank 0's initial parameters count: the others start elsewhere and get them by broadcast.
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        if front == "LM":
            trainer = fastopt.LM(model, torch.nn.MSELoss(), damping=1e-4, process_group=process_group)
        else:
            torch.manual_seed(100 + rank)  # the selection is rank 0's, broadcast
            trainer = lm.LevenbergMarquardtModule(
                model,
                damping_strategy=lm.StandardDampingStrategy(starting_value=1e-4, damping_mode="adaptive"),
                solve_method="cholesky",
                max_batch_size=8,
                process_group=process_group,
                param_selection_strategy=lm.RandomSelectionStrategy(model.parameters(), subset_size=25),
            )
        history = []
        for _ in range(LM_STEPS):
            _, loss, _, logs = trainer.training_step(x[shard], y[shard])
            history.append([float(loss), float(logs["damping"]), float(logs["attempts"])])
        runs[front] = (torch.tensor(history, dtype=torch.float64), [p.detach().clone() for p in model.parameters()])
    return runs


# Sample boundaries of the shards: 3 ranks with an empty one, and 2 ranks (a subgroup) uneven.
LM_SHARDS = {3: (0, 23, 23, 40), 2: (0, 15, 40)}


def _lm_worker(rank, world, out_dir):
    # One spawn for every case (starting processes is most of the cost): the 3-rank world, then
    # ranks 0 and 1 as their own group (new_group is called by every rank), then the refusals.
    pair = dist.new_group([0, 1])
    for size, group in ((3, dist.group.WORLD), (2, pair)):
        if rank < size:
            bounds = LM_SHARDS[size]
            runs = _lm_runs(slice(bounds[rank], bounds[rank + 1]), group)
            torch.save(runs, os.path.join(out_dir, f"lm{size}_{rank}.pt"))
    if rank < 2:
        _lm_refusals(pair)


def _lm_refusals(group):
    model = torch.nn.Linear(4, 3).double()  # 15 parameters; 2 ranks x 2 samples x 3 outputs = 12 residuals
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fastopt.LM(model, process_group="world")
    lm = fastopt.LM(model, process_group=group)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="process_group.*12 residuals for 15 parameters"):
        lm.step(x, torch.zeros(2, 3, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_data_parallel_lm_takes_the_single_process_steps(tmp_path):
    """Every rank, of 3 (one shard empty) and of 2 (uneven shards), takes the steps of one process
    on the whole batch; an underdetermined step and a wrong process_group raise clear errors,
    leaving the parameters unchanged."""
    _spawn(_lm_worker, 3, tmp_path, str(tmp_path))
    single = _lm_runs(slice(0, LM_SAMPLES))
    for front, (history, params) in single.items():
        assert (history[:, 2] > 1).any(), f"{front}: no step retried, the damping path is not exercised"
        for world in LM_SHARDS:
            for rank in range(world):
                got_history, got_params = torch.load(tmp_path / f"lm{world}_{rank}.pt")[front]
                what = f"{front} rank {rank} of {world}"
                # The ranks agree bitwise: they solve the same all-reduced system.
                first_history, first_params = torch.load(tmp_path / f"lm{world}_0.pt")[front]
                assert torch.equal(got_history, first_history), what
                assert all(torch.equal(a, b) for a, b in zip(got_params, first_params)), what
                # The damping path and the attempts exactly (the same decisions), losses and
                # parameters to fp64 round-off (the ranks' sums add in another order).
                assert torch.equal(got_history[:, 1:], history[:, 1:]), f"{what}: {got_history} vs {history}"
                assert_all_close(
                    [got_history[:, 0]] + got_params, [history[:, 0]] + params, **TOLERANCES[torch.float64], what=what
                )
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialized"):
        fastopt.LM(torch.nn.Linear(2, 1).double(), process_group=object())
