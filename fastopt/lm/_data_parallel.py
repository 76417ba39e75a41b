"""Data-parallel Levenberg-Marquardt: every rank holds a shard of the batch, all take the same step.

The Gauss-Newton system is a sum over samples, so ranks can build it from their own shards and
add them up::

    J^T J = sum_ranks J_k^T J_k,   J^T r = sum_ranks J_k^T r_k,   B = sum_ranks B_k

Per step, :meth:`DataParallel.reduce_system` packs the rank's unscaled ``[J | r]^T [J | r]``
(lower triangle, panel by panel: rows s..e up to column e, as the products write it), its
weighted loss and its sample count into one flat buffer and all-reduces it once; the sums come
back divided by the global B. Every rank then solves the same system. Each attempt of the retry
loop all-reduces the rank's weighted trial loss together with a flag for a failed local solve
(:meth:`DataParallel.trial_loss`), so every rank sees the same loss and takes the same
accept/reject decision, hence the same damping path.

The loss of a batch is the sample-weighted mean of the shards' losses,
``sum_k B_k loss_k / B``: the loss of the whole batch for a loss that is a mean over samples
(or over residuals, with as many per sample): every built-in loss. An empty shard adds nothing.

Not supported: the underdetermined form (fewer residuals than parameters, ``J J^T``, N x N):
its matrix couples every pair of samples across ranks, so it is not a sum of per-rank pieces.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference.lm import gram_column_blocks
from ._engine import Workspace

# The buffer's head: the weighted loss sum, the sample count, the residual count.
_HEAD = 3


def check_process_group(process_group):
    """``process_group`` if it is a usable torch.distributed group (or None: single process)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
            f"or None; got {type(process_group).__name__}"
        )
    return process_group


class DataParallel:
    """The collectives of data-parallel LM on ``group``; tensors live on ``device``."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, workspace: Workspace):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.device, self.dtype, self.workspace = device, dtype, workspace
        self.global_rows = 0  # the samples of the current step, over all ranks

    def broadcast_parameters(self, flat: Tensor) -> None:
        """Rank 0's parameters on every rank (as DDP does when it wraps a model)."""
        self.dist.broadcast(flat, group=self.group, group_src=0)

    def broadcast_indices(self, indices: Tensor) -> Tensor:
        """Rank 0's parameter selection (strategies may draw at random) on every rank."""
        count = torch.tensor([indices.numel()], dtype=torch.int64, device=self.device)
        self.dist.broadcast(count, group=self.group, group_src=0)
        out = indices.to(self.device, torch.int64)
        if self.dist.get_rank(self.group) != 0:
            out = torch.empty(int(count), dtype=torch.int64, device=self.device)
        self.dist.broadcast(out, group=self.group, group_src=0)
        return out

    def _weighted(self, loss: Tensor, rows: int) -> Tensor:
        # An empty shard's mean loss is NaN; it contributes nothing.
        return loss.to(self.dtype) * rows if rows > 0 else torch.zeros((), dtype=self.dtype, device=self.device)

    def reduce_system(
        self, gram: Tensor, loss: Tensor, rows: int, residuals: int, batch_size: Optional[int] = None
    ) -> Tuple[Tensor, int, int]:
        """All-reduce the rank's unscaled ``[J | r]^T [J | r]`` in ``gram`` (lower panels), its loss
        and counts in one call; ``gram`` becomes the global sum / B, with B = ``batch_size`` or,
        when None, the global sample count. Returns (global loss, global samples, global residuals).
        """
        blocks = gram_column_blocks(gram.shape[0])
        sizes = [(end - start) * end for start, end in blocks]
        packed = self.workspace.get("all_reduce", (_HEAD + sum(sizes),), gram.dtype, gram.device)
        packed[0] = self._weighted(loss, rows)
        packed[1], packed[2] = rows, residuals  # exact in float up to 2^24 (fp32) / 2^53 (fp64)
        for (start, end), piece in zip(blocks, torch.split(packed[_HEAD:], sizes)):
            piece.view(end - start, end).copy_(gram[start:end, :end])
        self.dist.all_reduce(packed, group=self.group)
        head = packed[:_HEAD].tolist()
        self.global_rows = int(round(head[1]))
        scale = 1.0 / (batch_size if batch_size is not None else max(1, self.global_rows))
        for (start, end), piece in zip(blocks, torch.split(packed[_HEAD:], sizes)):
            torch.mul(piece.view(end - start, end), scale, out=gram[start:end, :end])
        total = torch.tensor(head[0] / max(1, self.global_rows), dtype=loss.dtype, device=loss.device)
        return total, self.global_rows, int(round(head[2]))

    def trial_loss(self, loss: Optional[Tensor], rows: int) -> Optional[Tensor]:
        """The global loss at the trial parameters, or None when any rank could not form its update
        (``loss`` None: a failed solve or a non-finite update there), which rejects the attempt
        everywhere."""
        packed = torch.zeros(2, dtype=self.dtype, device=self.device)
        if loss is None:
            packed[1] = 1
        else:
            packed[0] = self._weighted(loss, rows)
        self.dist.all_reduce(packed, group=self.group)
        total, failed = packed.tolist()
        if failed:
            return None
        return torch.tensor(total / max(1, self.global_rows), dtype=self.dtype, device=self.device)
