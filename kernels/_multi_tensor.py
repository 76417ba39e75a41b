"""Many tensors, one launch: the tile table all fastopt Triton kernels run on, and the in-kernel
pieces they share (tile geometry, strided addressing, the circular Laplacian, the border protocol
that makes an in-place stencil race-free).

Layout of a launch
------------------
Every tensor of a (device, dtype) group is cut into tiles of ``TILE`` lanes; program ``pid`` of the
1-D grid owns one tile. A tensor with a Laplacian is tiled on its stencil grid ``(rows, cols)``
(:func:`fastopt.reference.stencil_layout`, logical row-major order) with tiles of ``th x tw``
elements, ``tw = min(tile_width, next_pow2(cols))`` and ``th = TILE / tw`` (1-D stencils: one row of
``TILE``); a tensor without one is tiled as a flat ``(1, numel)`` row. Lane ``i`` of a tile is
element ``(i >> log2(tw), i & (tw - 1))`` of it: no integer division, consecutive lanes on
consecutive columns, so loads of contiguous state are coalesced.

The table, built once per list of tensors and cached (see :class:`TensorTable`), is three device
arrays: ``tiles[pid]`` = index of the tensor the program works on; ``meta[t]`` = that tensor's
addresses (param, up to three state tensors, step count, a 0-dim scalar) and geometry; and
``p_layouts[t]`` = the param's strides when it is not contiguous. Per step only the gradients'
addresses are uploaded (8 bytes per tensor, one host-to-device copy, skipped when they did not
change), plus their strides when those change. This is the pattern of Triton's grouped-GEMM
tutorial (a device array of pointers, read by each program), with a per-tile index instead of a
search so that a program finds its tensor with one load.

The in-place stencil race, and the border protocol
--------------------------------------------------
A kernel that updates a state array ``x`` in place and reads its neighbours' ``x`` for the Laplacian
races: a program may overwrite an element that a neighbouring program still has to read as its old
value. Each program recomputes the new values of its halo from old state and gradient (so it never
needs a neighbour's *result*), and old values stay readable because no program writes an element
that another program reads until every reader is done:

* an element another tile reads is on its own tile's *border*: the first/last row of the tile
  when the tensor has more than one row of tiles, the first/last column when it has more than one
  column of tiles (the halo is one element deep);
* the owner writes its *interior* in place, and the new values of its border to a *stash* (scratch
  memory, ``K`` values per border element for the ``K`` arrays the op updates and reads at its
  neighbours);
* then it *arrives* at the counter of each tile whose border it read (its neighbours in the tile
  grid, circularly, and itself): an atomic increment. The program whose arrival completes a
  tile's count (it knows how many readers a tile has) copies that tile's stash into place and
  resets the counter to 0 for the next launch.

A ``tl.debug_barrier()`` (``bar.sync``) separates each program's reads from its first in-place
write (threads of one program race too) and precedes its arrivals, one vector of
``atomic_add(..., sem="acq_rel", scope="gpu")`` (one round trip to L2); the committer reads the
stash after a barrier, bypassing L1 (``.cg``). A tensor of a single tile has no border and skips
all of it. Counters are 0 between launches whatever happened to the tensors in between, so nothing
goes stale (a failed launch drops its table). Triton's interpreter runs programs one after
another: a protocol bug (a reader served new values) shows there as a wrong answer, which the tests
with tiles smaller than the tensors look for; the GPU memory-ordering argument above is not
something the interpreter can test.

The vector path (kernels/_vector_tile.py, ladam_step) keeps the protocol's arrivals but needs no
stash: its tensors' in-place store writes every lane 128 bits wide, border lanes storing the old
value they hold (what other programs may still be reading, unchanged), and the last reader of a
tile recomputes that tile's border from the old state left in place and the grad, with the
owner's own operations (``_commit_accumulator`` in kernels/_border.py). That works because the
stashed array there is an accumulator of old state and grad alone; the generic path, and the
ops whose stencil reads p or an update, stash.

Cost (per element of a tensor with a Laplacian, ``th x tw = 32 x 32`` tiles): the border is
``(2 tw + 2 th - 4) / (th tw)`` = 12.1% of the elements, so the stash moves 2 x 12.1% of each
stashed array (written by the owner, read by the committer, both mostly in L2) and needs that much
scratch for the length of the launch (torch's caching allocator hands the same block back each
step); halo reads are another 12.9% of the arrays read at neighbours, from L1/L2; counters are 4
bytes per tile. For LAdam (variance_lap, fp32) that is at most 7.1% on top of the 28 bytes per
parameter of the roofline, if none of it hit in L2 (``bench/stencil_cost.py``,
``bench/results/triton_stencil_cost.md``; the generic path).

Files: the table and launch settings (``_table.py``), where a launch runs (``_device.py``), the
launch (``_launch.py``), the generic path's in-kernel tile helpers (``_tile.py``), the Laplacian
(``_stencil.py``), the border protocol (``_border.py``), the vector path (``_vector_tile.py``).
"""

# The pieces, one concern per file; re-exported here for the tests and bench scripts.
from ._border import _border, _commit, _extent, _neighbour_tile, arrive, store_shared  # noqa: F401
from ._device import _amp_input, _capturing, _check_mode, on_device  # noqa: F401
from ._launch import _lr_and_decay, launch  # noqa: F401
from ._stencil import has_stencil, laplacian, smoothed  # noqa: F401
from ._table import *  # noqa: F401,F403
from ._table import _CAPTURED, _TABLES, _layout, _overlaps, _vector_ready, settings, use_settings  # noqa: F401
from ._tile import learning_rate, load_tile, locate, offsets, one_minus_powers, step_of, store  # noqa: F401
