"""Row-sharded parameters (FSDP2's DTensors with ``Shard(0)``): the Laplacian across shards.

FSDP2 splits each parameter along dim 0, i.e. into blocks of rows of the ``(shape[0], -1)`` grid
the stencil runs on (into blocks of elements for 1-D parameters). Everything but the Laplacian is
elementwise and runs on the local shard. For the Laplacian, each rank extends its shard by
``K`` halo rows above and below (K = 1 on 2-D grids, 2 on 1-D ones so that an extended block of
one element still has the 4 the 1-D stencil needs), taken from the neighbouring non-empty shards
with the circular wrap from the last shard to the first. The step then runs on the extended
copies: halo rows get their new moments from their own old moments and gradients (the same
recompute the fused kernels do at tile borders), interior rows see exactly the neighbours they
would see unsharded, and only the interior rows are copied back. Columns wrap within a row,
which no shard boundary cuts.

Cost per step and parameter that uses the Laplacian: one all_gather (for all such parameters of
a process group together) of 2K boundary rows of p, g and each state tensor per rank, and an
extended copy of the local shard of each of those tensors (memory: one shard's worth per tensor
kind, transient).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist

from ..reference.laplacian import stencil_layout

if TYPE_CHECKING:  # both for annotations only (see is_dtensor for why DTensor is not imported)
    from torch.distributed.tensor import DTensor, Shard
    from typing_extensions import TypeGuard


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    # A DTensor exists only once torch.distributed.tensor is imported; importing it here would
    # add seconds to `import fastopt` for everyone.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def row_group(p: torch.Tensor) -> Optional[dist.ProcessGroup]:
    """The process group across which ``p`` is split by rows, or None if it is not split.

    Supported placements: ``Shard(0)`` on one mesh dimension and ``Replicate()`` on the others
    (FSDP2, HSDP). Anything else raises NotImplementedError naming the placement.
    """
    if not is_dtensor(p):
        return None
    placements = p.placements
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    # placements[shard_dims[0]] is a Shard: is_shard() picked it.
    if (
        any(not (pl.is_shard() or pl.is_replicate()) for pl in placements)
        or len(shard_dims) > 1
        or (shard_dims and cast("Shard", placements[shard_dims[0]]).dim != 0)
    ):
        raise NotImplementedError(
            f"the LAdam family supports DTensor parameters sharded by rows (Shard(0), as FSDP2 does) "
            f"or replicated; got placements {placements} for a parameter of shape {tuple(p.shape)}"
        )
    if not shard_dims or p.device_mesh.size(shard_dims[0]) == 1:
        return None
    return p.device_mesh.get_group(shard_dims[0])


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """The local block as a (rows, cols) matrix: rows of the stencil grid (elements for 1-D)."""
    return t.reshape(t.shape[0], cols)


class HaloExtension:
    """Extended copies of row-sharded tensors for one step, and the copy back of their interiors."""

    def __init__(
        self,
        tensors_per_param: Sequence[Sequence[torch.Tensor]],
        global_shapes: Sequence[torch.Size],
        group: dist.ProcessGroup,
    ):
        """``tensors_per_param[i]``: the local shards of parameter i's tensors (p, g, state ...)."""
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.items = []  # (local tensors, halo rows, columns of the grid)
        for tensors, shape in zip(tensors_per_param, global_shapes):
            cols = 1 if len(shape) == 1 else torch.Size(shape[1:]).numel()
            self.items.append((list(tensors), 2 if len(shape) == 1 else 1, cols))
        counts = torch.tensor([ts[0].shape[0] for ts, _, _ in self.items], dtype=torch.int64)
        gathered = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(gathered, counts, group=group)
        self.counts = torch.stack(gathered).tolist()  # [rank][param] local row counts
        self.extended = self._exchange(group)

    def _boundary(self, t: torch.Tensor, halo: int, cols: int) -> torch.Tensor:
        """First and last ``halo`` rows (zero-padded when the shard has fewer), flattened."""
        rows = _rows(t, cols)
        pad = rows.new_zeros(halo, rows.shape[1])
        first = torch.cat([rows[:halo], pad[: max(0, halo - rows.shape[0])]])
        last = torch.cat([pad[: max(0, halo - rows.shape[0])], rows[-halo:] if rows.shape[0] else rows])
        return torch.cat([first, last]).reshape(-1)

    def _exchange(self, group) -> List[Optional[List[torch.Tensor]]]:
        mine = torch.cat([self._boundary(t, halo, cols) for ts, halo, cols in self.items for t in ts])
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine.contiguous(), group=group)
        extended, offset = [], 0
        for i, (tensors, halo, cols) in enumerate(self.items):
            n = tensors[0].shape[0]
            per_tensor = 2 * halo * cols
            out = []
            for k, t in enumerate(tensors):
                start = offset + k * per_tensor
                blocks = [e[start : start + per_tensor].reshape(2 * halo, cols) for e in everyone]
                above = self._collect(i, blocks, halo, backwards=True)
                below = self._collect(i, blocks, halo, backwards=False)
                ext = torch.cat([above, _rows(t, cols), below])
                out.append(ext.reshape((n + 2 * halo,) + tuple(t.shape[1:])))
            offset += per_tensor * len(tensors)
            extended.append(out if n else None)  # an empty shard has no rows to update
        return extended

    def _collect(self, i: int, blocks: List[torch.Tensor], halo: int, backwards: bool) -> torch.Tensor:
        """The ``halo`` rows that precede (follow) this rank's shard in the circular row order."""
        rows: List[torch.Tensor] = []
        need = halo
        for step in range(1, self.world + 1):
            q = (self.rank - step) % self.world if backwards else (self.rank + step) % self.world
            valid = min(self.counts[q][i], halo)
            if valid == 0:
                continue
            take = min(valid, need)
            if backwards:  # the last rows of shard q, nearest last
                rows.insert(0, blocks[q][2 * halo - take : 2 * halo])
            else:  # the first rows of shard q
                rows.append(blocks[q][:take])
            need -= take
            if need == 0:
                break
        if need:  # needs_halo admits only tensors with a stencil, which have >= 3 rows (>= 4 in 1-D)
            raise RuntimeError(f"fastopt: a sharded tensor has fewer rows than its halo ({halo})")
        return torch.cat(rows)

    def copy_back(self, which: Sequence[int]) -> None:
        """Write the interior rows of the extended copies at positions ``which`` (p and state,
        not g) back into the local shards."""
        for (tensors, halo, _), ext in zip(self.items, self.extended):
            if ext is None:
                continue
            for k in which:
                n = tensors[k].shape[0]
                tensors[k].copy_(ext[k][halo : halo + n].reshape(tensors[k].shape))


def needs_halo(p: torch.Tensor, use_lap: bool) -> bool:
    """Whether ``p``'s step needs rows of other shards: it uses a Laplacian and is row-sharded."""
    return bool(use_lap) and stencil_layout(p.shape) is not None and row_group(p) is not None


def shard_views(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[Dict[str, Any]]
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Dict[str, Any]], List[HaloExtension], List]:
    """Local (or halo-extended) stand-ins for a bucket of parameters, gradients and states.

    Returns (params, grads, states, extensions, write_backs): the stand-ins go to the step
    implementation unchanged; afterwards ``finish(extensions, write_backs)`` copies the
    extended interiors back.
    """
    out_p = [local(p) for p in params]
    out_g = [local(g) for g in grads]
    out_s = [{k: local(v) if torch.is_tensor(v) else v for k, v in s.items()} for s in states]
    by_group: Dict[Any, List[int]] = {}
    for i, (p, s) in enumerate(zip(params, states)):
        if needs_halo(p, s.get("use_lap", False)):
            by_group.setdefault(row_group(p), []).append(i)
    extensions, write_backs = [], []
    for group, idx in by_group.items():
        keys = [k for k, v in out_s[idx[0]].items() if torch.is_tensor(v) and v.dim() > 0]
        tensors = [[out_p[i]] + [out_s[i][k] for k in keys] + [out_g[i]] for i in idx]
        ext = HaloExtension(tensors, [params[i].shape for i in idx], group)
        for i, e in zip(idx, ext.extended):
            if e is None:
                continue
            out_p[i], out_g[i] = e[0], e[-1]
            out_s[i] = {**out_s[i], **dict(zip(keys, e[1:-1]))}
        extensions.append(ext)
        write_backs.append(list(range(1 + len(keys))))  # p and the state tensors, not g
    return out_p, out_g, out_s, extensions, write_backs


def finish(extensions: Sequence[HaloExtension], write_backs: Sequence[Sequence[int]]) -> None:
    for ext, which in zip(extensions, write_backs):
        ext.copy_back(which)
