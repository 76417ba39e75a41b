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

Cost (per element of a tensor with a Laplacian, ``th x tw = 32 x 32`` tiles): the border is
``(2 tw + 2 th - 4) / (th tw)`` = 12.1% of the elements, so the stash moves 2 x 12.1% of each
stashed array (written by the owner, read by the committer, both mostly in L2) and needs that much
scratch for the length of the launch (torch's caching allocator hands the same block back each
step); halo reads are another 12.9% of the arrays read at neighbours, from L1/L2; counters are 4
bytes per tile. For LAdam (variance_lap, fp32) that is at most 7.1% on top of the 28 bytes per
parameter of the roofline, if none of it hit in L2 (``bench/stencil_cost.py``,
``bench/results/triton_stencil_cost.md``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import operator
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastopt.reference._amp import check_lr
from fastopt.reference.laplacian import STENCILS, stencil_layout

# -- the table's columns (int64) -------------------------------------------------------------------
# Addresses: the parameter, up to three state arrays (what they mean is the op's business), the
# 0-dim float32 step count and a 0-dim scalar (LAdam wave_variance's recorded background level).
PARAM = tl.constexpr(0)
STATE0 = tl.constexpr(1)
STATE1 = tl.constexpr(2)
STATE2 = tl.constexpr(3)
STEP = tl.constexpr(4)
SCALAR = tl.constexpr(5)
# Geometry: the stencil grid (rows, cols) (a flat (1, numel) row without a Laplacian), the tensor's
# first tile (= its first program and its counters' offset), the tile grid (TILE_ROWS x TILE_COLS),
# log2 of the tile width, the Laplacian's mode (below), where its stash starts and how many stash
# slots one of its tiles has per stashed array.
ROWS = tl.constexpr(6)
COLS = tl.constexpr(7)
NUMEL = tl.constexpr(8)
FIRST_TILE = tl.constexpr(9)
TILE_ROWS = tl.constexpr(10)
TILE_COLS = tl.constexpr(11)
TILE_WIDTH_LOG2 = tl.constexpr(12)
LAPLACIAN = tl.constexpr(13)
STASH_START = tl.constexpr(14)
STASH_SLOTS = tl.constexpr(15)
META_FIELDS = tl.constexpr(16)

# Laplacian modes: off (use_lap False); use_lap True on a tensor whose stencil_layout is None (the
# reference's smooth() still clamps: its Laplacian is 0); the stencil.
LAP_OFF = tl.constexpr(0)
LAP_ZERO = tl.constexpr(1)
LAP_STENCIL = tl.constexpr(2)

# Strided layouts (params and grads that are not contiguous): [ndim, sizes..., strides...], dims
# innermost first after merging the dims that can be merged; ndim 0 means contiguous.
MAX_DIMS = tl.constexpr(8)
LAYOUT_FIELDS = tl.constexpr(1 + 2 * 8)

_INT32_LIMIT = 2**31
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


# -- launch settings -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How tensors are cut into programs. Not tuned on a GPU yet (none was available): the defaults
    follow from the reasoning in the module docstring.

    Attributes:
        tile: lanes (elements) per program, a power of 2. The 9-point stencil recomputes 8
            neighbours per element and keeps their values and 64-bit addresses live: ptxas (sm_90)
            gives the LAdam kernel 128 registers at 4 elements per thread (254 at 8), so 1024 lanes
            on 8 warps let 2 programs share an SM.
        tile_width: widest 2-D tile, a power of 2 <= tile. 32 x 32 tiles: rows of 128 bytes (fp32,
            one cache line) and the smallest border for 1024 lanes, 12.1% of the elements.
        num_warps: warps per program.
    """

    tile: int = 1024
    tile_width: int = 32
    num_warps: int = 8

    def __post_init__(self):
        for name in ("tile", "tile_width", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Invalid {name}: {value!r} (must be a power of 2)")
        if self.tile < 4 or self.tile > 2**16:
            raise ValueError(f"Invalid tile: {self.tile} (must be in [4, 65536])")
        if self.tile_width > self.tile:
            raise ValueError(f"Invalid tile_width: {self.tile_width} (must be <= tile={self.tile})")

    @property
    def border_lanes(self) -> int:
        """Lanes that cover the largest tile border: 2 rows of ``tile_width`` + 2 columns."""
        return triton.next_power_of_2(2 * self.tile_width + 2 * (self.tile // self.tile_width))


_settings = LaunchSettings()


def settings() -> LaunchSettings:
    """The settings launches use now."""
    return _settings


@contextlib.contextmanager
def use_settings(**changes):
    """Launch with other settings inside the block (tests use tiny tiles to cross many borders)."""
    global _settings
    previous = _settings
    _settings = dataclasses.replace(previous, **changes)
    try:
        yield _settings
    finally:
        _settings = previous


# -- the table -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileGrid:
    """How one tensor is cut into tiles: its stencil grid ``rows x cols`` (``(1, numel)`` without a
    stencil), tiles of ``height x width`` elements, ``tile_rows x tile_cols`` of them, ``slots``
    stash slots per tile and stashed array (0 without a stencil or with a single tile), the
    Laplacian mode (LAP_OFF, LAP_ZERO, LAP_STENCIL)."""

    rows: int
    cols: int
    height: int
    width: int
    tile_rows: int
    tile_cols: int
    slots: int
    mode: int

    @property
    def tiles(self) -> int:
        return self.tile_rows * self.tile_cols

    def _extents(self):
        for tr in range(self.tile_rows):
            for tc in range(self.tile_cols):
                yield min(self.height, self.rows - tr * self.height), min(self.width, self.cols - tc * self.width)

    def border_elements(self) -> int:
        """Elements that other tiles read (they go through the stash), over all tiles."""
        if self.slots == 0:
            return 0
        total = 0
        for h, w in self._extents():
            row_part = min(h, 2) * w if self.tile_rows > 1 else 0
            rows_left = h - (min(h, 2) if self.tile_rows > 1 else 0)
            total += row_part + (rows_left * min(w, 2) if self.tile_cols > 1 else 0)
        return total

    def halo_elements(self, stencil: str) -> int:
        """Elements of other tiles that the tiles read for the stencil, over all tiles."""
        if self.mode != LAP_STENCIL.value or self.tiles == 1:
            return 0
        corners = 2 if stencil == "9point" and self.tile_cols > 1 else 0
        total = 0
        for h, w in self._extents():
            total += (2 * (w + corners) if self.tile_rows > 1 else 0) + (2 * h if self.tile_cols > 1 else 0)
        return total


def tile_grid(shape: Sequence[int], use_lap: bool, settings: LaunchSettings) -> TileGrid:
    """The :class:`TileGrid` of a tensor of ``shape`` (see the module docstring)."""
    grid = stencil_layout(shape) if use_lap else None
    numel = 1
    for size in shape:
        numel *= int(size)
    rows, cols = grid if grid else (1, numel)
    width = settings.tile if rows == 1 else min(settings.tile_width, triton.next_power_of_2(cols))
    height = settings.tile // width
    tile_rows, tile_cols = triton.cdiv(rows, height), triton.cdiv(cols, width)
    slots = ((2 * width if tile_rows > 1 else 0) + (2 * height if tile_cols > 1 else 0)) if grid else 0
    mode = LAP_STENCIL if grid else LAP_ZERO if use_lap else LAP_OFF
    return TileGrid(rows, cols, height, width, tile_rows, tile_cols, slots, mode.value)


def _layout(t: torch.Tensor) -> Tuple[List[int], int]:
    """(layout row, largest element offset) of ``t``; see LAYOUT_FIELDS. Dims of size 1 are dropped
    and a dim is merged into the next outer one where the pair walks memory like one dim."""
    merged: List[List[int]] = []  # [size, stride], outermost first
    for size, stride in zip(t.shape, t.stride()):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    max_offset = sum((s - 1) * st for s, st in merged)
    row = [0] * LAYOUT_FIELDS.value
    if not merged or (len(merged) == 1 and merged[0][1] == 1):
        return row, max_offset  # contiguous in logical order
    if len(merged) > MAX_DIMS.value:
        raise ValueError(
            f"backend='triton' addresses tensors of up to {MAX_DIMS.value} dimensions that cannot be "
            f"merged; got shape {tuple(t.shape)} with strides {t.stride()}. Pass a contiguous "
            "tensor or use backend='torch'"
        )
    row[0] = len(merged)
    for d, (size, stride) in enumerate(reversed(merged)):  # innermost first
        row[1 + d] = size
        row[1 + MAX_DIMS.value + d] = stride
    return row, max_offset


def _overlaps(t: torch.Tensor) -> bool:
    """True if two elements of ``t`` share memory (an expanded view): it cannot be written."""
    if t.numel() == 0:  # no elements, nothing shared (the strides of empty tensors are arbitrary)
        return False
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * (size - 1) + 1
    return False


def _check_same(
    what: str,
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    shapes: Optional[Sequence[torch.Size]] = None,
    contiguous: bool = False,
) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
        if t.device != device or t.dtype != dtype:
            raise ValueError(
                f"{what}[{i}] is {t.dtype} on {t.device}; expected {dtype} on {device} (the params' device and dtype)"
            )
        if shapes is not None and t.shape != shapes[i]:
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}; expected {tuple(shapes[i])} (its param's)")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{what}[{i}] must be contiguous (state is kept in logical order)")


class TensorTable:
    """The device-side description of one list of tensors (see the module docstring).

    Built by :func:`table_for` on first sight of a list and cached; holds no reference to the
    tensors (weak references drop the table when any of them dies).
    """

    key: Tuple[Any, ...]  # the cache key, set by table_for once the table is built

    def __init__(self, params, states, steps, scalars, use_laps, stashed: int, settings: LaunchSettings):
        self.device, self.dtype = params[0].device, params[0].dtype
        self.settings = settings
        self.n = len(params)
        shapes = [p.shape for p in params]
        self.shapes = shapes
        self._device_index = params[0].get_device()
        _check_same("params", params, self.device, self.dtype)
        for k, state in enumerate(states):
            if len(state) != self.n:
                raise ValueError(f"state list {k} has {len(state)} tensors for {self.n} params")
            _check_same(f"state list {k}", state, self.device, self.dtype, shapes, contiguous=True)
        if len(steps) != self.n or len(use_laps) != self.n:
            raise ValueError(f"got {self.n} params, {len(steps)} steps and {len(use_laps)} use_laps")
        for i, s in enumerate(steps):
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.numel() != 1 or s.device != self.device:
                raise ValueError(
                    f"steps[{i}] must be a 1-element float32 tensor on {self.device} (the params' "
                    f"device); got {getattr(s, 'dtype', type(s))} on {getattr(s, 'device', '-')}"
                )
        if scalars is not None:
            _check_same("scalars", scalars, self.device, self.dtype, [torch.Size([])] * self.n)
        meta: List[List[int]] = []
        layouts: List[List[int]] = []
        tiles: List[int] = []
        stash_len, self.index_64 = 0, False
        for i, p in enumerate(params):
            if _overlaps(p):
                raise ValueError(
                    f"params[{i}] has overlapping memory (an expanded view?) and cannot be updated in place"
                )
            layout, max_offset = _layout(p)
            cut = tile_grid(p.shape, use_laps[i], settings)
            n_tiles = cut.tiles if p.numel() else 0
            row = [0] * META_FIELDS.value
            row[PARAM.value] = p.data_ptr()
            for k, address in zip((STATE0.value, STATE1.value, STATE2.value), (s[i].data_ptr() for s in states)):
                row[k] = address
            row[STEP.value] = steps[i].data_ptr()
            row[SCALAR.value] = scalars[i].data_ptr() if scalars is not None else 0
            row[ROWS.value], row[COLS.value], row[NUMEL.value] = cut.rows, cut.cols, p.numel()
            row[FIRST_TILE.value] = len(tiles)
            row[TILE_ROWS.value], row[TILE_COLS.value] = cut.tile_rows, cut.tile_cols
            row[TILE_WIDTH_LOG2.value] = cut.width.bit_length() - 1
            row[LAPLACIAN.value] = cut.mode
            row[STASH_START.value], row[STASH_SLOTS.value] = stash_len, cut.slots
            meta.append(row)
            layouts.append(layout)
            tiles.extend([i] * n_tiles)
            stash_len += n_tiles * cut.slots * stashed
            # Masked lanes of the last tiles compute offsets up to (rows + th) x (cols + tw) too.
            self.index_64 |= (cut.rows + cut.height) * (cut.cols + cut.width) >= _INT32_LIMIT
            self.index_64 |= max_offset >= _INT32_LIMIT
        self.index_64 |= stash_len >= _INT32_LIMIT
        self.n_tiles = len(tiles)
        self.stash_len = stash_len
        device = self.device
        self.tiles = torch.tensor(tiles, dtype=torch.int32).to(device)
        self.meta = torch.tensor(meta, dtype=torch.int64).to(device)
        self.p_layouts = torch.tensor(layouts, dtype=torch.int64).to(device)
        # One arrival counter per tile, and per tensor (reductions over a whole tensor); each launch
        # leaves them at 0.
        self.counters = torch.zeros(max(self.n_tiles, 1), dtype=torch.int32, device=device)
        self.tensor_counters = torch.zeros(self.n, dtype=torch.int32, device=device)
        self.stashed = stashed
        self._grad_ptrs: Optional[List[int]] = None
        self._grad_ptr_table: Optional[torch.Tensor] = None
        self._grad_strides: Optional[List[Tuple[int, ...]]] = None
        self._grad_layouts: Optional[torch.Tensor] = None
        self._grad_index_64 = False
        self._refs: List[weakref.ref] = []
        # The stream that uploaded the arrays and last used them (CUDA): see grads().
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def grads(self, grads: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """(address table, layout table, needs 64-bit offsets) of this step's gradients.

        Grads are new tensors every step (zero_grad sets them to None): their addresses are
        uploaded each step unless they did not change; their layouts are re-derived (and they are
        re-validated against the params) only when their strides change.
        """
        if len(grads) != self.n:
            raise ValueError(f"got {len(grads)} grads for {self.n} params")
        # map() over unbound methods: half the time of a comprehension, for ~1000 tensors a step.
        strides = list(map(torch.Tensor.stride, grads))
        ptrs = list(map(torch.Tensor.data_ptr, grads))
        capturing = _capturing(self.device)
        if self._stream is not None and not capturing:
            # Uploads (and the counters' last use) are ordered on the stream that made them: a step
            # on another stream waits for that one first. (A capture's stream needs no wait:
            # torch.cuda.graph synchronizes the device on entry.)
            stream = torch.cuda.current_stream(self.device)
            if stream != self._stream:
                stream.wait_stream(self._stream)
                # ... and the allocator must not hand these arrays to the old stream's next
                # allocations while this stream may still read them (when they are freed).
                for array in self._device_arrays():
                    array.record_stream(stream)
                self._stream = stream
        if (strides != self._grad_strides or ptrs != self._grad_ptrs) and capturing:
            raise RuntimeError(
                "fastopt (triton): the gradients moved in memory since the last step, and their new addresses "
                "would have to be uploaded inside a CUDA-graph capture. Keep them in place: run a step before "
                "capture and clear them with optimizer.zero_grad(set_to_none=False) between steps"
            )
        if strides != self._grad_strides:
            _check_same("grads", grads, self.device, self.dtype, self.shapes)
            rows, extents = zip(*(_layout(g) for g in grads))
            self._grad_layouts = torch.tensor(rows, dtype=torch.int64).to(self.device)
            self._grad_index_64 = max(extents) >= _INT32_LIMIT
            self._grad_strides = strides
        elif (
            list(map(_shape, grads)) != self.shapes
            or set(map(_dtype, grads)) != {self.dtype}
            or set(map(torch.Tensor.get_device, grads)) != {self._device_index}
        ):
            _check_same("grads", grads, self.device, self.dtype, self.shapes)
        if ptrs != self._grad_ptrs:
            pinned = self.device.type == "cuda"
            host = torch.tensor(ptrs, dtype=torch.int64, pin_memory=pinned)
            self._grad_ptr_table = host.to(self.device, non_blocking=pinned)
            self._grad_ptrs = ptrs
        # Both were uploaded above on the first call (None never equals a list of strides or addresses).
        assert self._grad_ptr_table is not None and self._grad_layouts is not None
        return self._grad_ptr_table, self._grad_layouts, self.index_64 or self._grad_index_64

    def _device_arrays(self) -> List[torch.Tensor]:
        return [
            t
            for t in (
                self.tiles,
                self.meta,
                self.p_layouts,
                self.counters,
                self.tensor_counters,
                self._grad_ptr_table,
                self._grad_layouts,
            )
            if t is not None
        ]

    def stash(self) -> torch.Tensor:
        """Scratch for the borders, for the length of one launch (never read across launches)."""
        return torch.empty(max(self.stash_len, 1), dtype=self.dtype, device=self.device)


_TABLES: "collections.OrderedDict[tuple, TensorTable]" = collections.OrderedDict()
_MAX_TABLES = 64  # lists seen recently: a few per param group (grads that are None change the list)
# Tables a CUDA-graph capture used: every replay reads their device arrays (and counters), so they
# are kept for the rest of the process and taken out of _TABLES, so that no eager step changes
# their gradient table or shares their counters with a replay.
_CAPTURED: List["TensorTable"] = []


def table_for(params, states, steps, use_laps, *, scalars=None, stashed: int = 1) -> TensorTable:
    """The cached :class:`TensorTable` of these tensors, built on first sight.

    The key is the params' addresses and the identities of the state, step and scalar tensors
    (the objects an optimizer keeps from step to step), the use_lap flags and the launch settings.
    The table keeps weak references to those tensors and drops out of the cache when one dies, so a
    recycled ``id`` can never match a stale table.
    """
    key = (
        _settings,
        stashed,
        tuple(map(torch.Tensor.data_ptr, params)),
        *(tuple(map(id, s)) for s in states),
        tuple(map(id, steps)),
        tuple(map(id, scalars)) if scalars is not None else None,
        tuple(map(bool, use_laps)),
    )
    if _capturing(params[0].device):
        # The warm-up's table first: a captured one of the same key may be stale (its tensors died
        # and a new optimizer's recycled addresses and ids rebuilt the key).
        table = _TABLES.pop(key, None)
        if table is None:  # captured again without an eager step between: the last capture's table
            table = next(
                (t for t in reversed(_CAPTURED) if t.key == key and all(ref() is not None for ref in t._refs)), None
            )
        if table is None:
            raise RuntimeError(
                "fastopt (triton): these tensors have no tile table yet and one cannot be built "
                "inside a CUDA-graph capture; run one step before capture (warm-up)"
            )
        if not any(kept is table for kept in _CAPTURED):
            _CAPTURED.append(table)
        return table
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    table = TensorTable(params, states, steps, scalars, [bool(u) for u in use_laps], stashed, _settings)
    table.key = key
    # The AMP defaults exist before any capture (made inside one, they would hold nothing until
    # the first replay): a capture needs a table, which is only built here, outside captures.
    _amp_input(None, 1.0, "grad_scale", table.device)
    _amp_input(None, 0.0, "found_inf", table.device)

    def forget(_ref, key=key):
        _TABLES.pop(key, None)

    watched = [*params, *(t for s in states for t in s), *steps, *(scalars or ())]
    table._refs = [weakref.ref(t, forget) for t in watched]
    _TABLES[key] = table
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return table


def forget_table(table: TensorTable) -> None:
    """Drop ``table`` from the cache (after a failed launch its counters cannot be trusted)."""
    for key, cached in list(_TABLES.items()):
        if cached is table:
            del _TABLES[key]


def stencil_code(stencil: str) -> int:
    """The STENCIL constexpr of a stencil name: 9 or 5 (1-D tensors use [1, -2, 1] with either)."""
    if stencil not in STENCILS:
        raise ValueError(f"Invalid stencil: {stencil!r}. Choose from: {STENCILS}")
    return 9 if stencil == "9point" else 5


def _check_mode(kernel, device: torch.device) -> None:
    """The kernels run compiled on CUDA tensors and interpreted on CPU tensors; which one triton
    built was fixed by TRITON_INTERPRET when fastopt.kernels was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "backend='triton' runs on CPU tensors only in Triton's interpreter, but fastopt.kernels "
            "was imported without TRITON_INTERPRET=1: set it before importing fastopt.kernels"
        )
    if device.type != "cpu" and interpreted:
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors, but TRITON_INTERPRET=1 was set when "
            "fastopt.kernels was imported (the interpreter runs on CPU tensors only): unset it"
        )


_AMP_DEFAULTS: dict = {}


def _amp_input(t: Optional[torch.Tensor], default: float, name: str, device: torch.device) -> torch.Tensor:
    """An AMP input as the kernels read it: the caller's 0-dim float32 tensor on ``device``, or a
    cached constant (1 for grad_scale, 0 for found_inf) when the step has none."""
    if t is None:
        key = (device, default)
        if key not in _AMP_DEFAULTS:
            _AMP_DEFAULTS[key] = torch.full((), default, dtype=torch.float32, device=device)
        return _AMP_DEFAULTS[key]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        raise ValueError(
            f"{name} must be a 1-element float32 tensor on {device} (the params' device); got "
            f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '-')}"
        )
    return t


def _lr_and_decay(lr, weight_decay: float, device: torch.device) -> Tuple[Any, float, bool]:
    """The kernels' ``lr`` and ``decay`` arguments and their ``LR_ON_DEVICE`` flag (see
    :func:`learning_rate`) for an op's ``lr``: a float, or a 1-element float32 tensor on the
    params' device that the kernel reads (so a step under CUDA-graph capture never reads it on the
    host, and a replay sees the value written into it since)."""
    if not isinstance(lr, torch.Tensor):
        return lr, 1 - lr * weight_decay, False
    check_lr(lr, device)
    return lr, weight_decay, True


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one for the launch (as
    torch's fused optimizers do); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch(
    kernel,
    table: TensorTable,
    grads,
    lr,
    weight_decay: float,
    args: tuple,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    **constexprs,
) -> None:
    """Launch ``kernel`` once over every tile of ``table``: the table arrays, this step's grads, the
    stash, the AMP inputs (read in-kernel, see fastopt/reference/_amp.py: ``g * (1 / grad_scale)``,
    nothing written where ``found_inf`` is nonzero), ``lr`` and ``decay`` (:func:`learning_rate`:
    ``lr`` a float, or a device tensor read in-kernel, constexpr ``LR_ON_DEVICE``), then ``args``
    (the op's other scalars) and the op's constexprs."""
    if table.n_tiles == 0:
        return
    lr, decay, lr_on_device = _lr_and_decay(lr, weight_decay, table.device)
    grad_scale = _amp_input(grad_scale, 1.0, "grad_scale", table.device)
    found_inf = _amp_input(found_inf, 0.0, "found_inf", table.device)
    _check_mode(kernel, table.device)
    grad_ptrs, grad_layouts, index_64 = table.grads(grads)
    s = table.settings
    try:
        with on_device(table.device):
            kernel[(table.n_tiles,)](
                table.tiles,
                table.meta,
                table.p_layouts,
                grad_ptrs,
                grad_layouts,
                table.counters,
                table.tensor_counters,
                table.stash(),
                grad_scale,
                found_inf,
                lr,
                decay,
                *args,
                TILE=s.tile,
                BORDER_LANES=s.border_lanes,
                IDX=tl.int64 if index_64 else tl.int32,
                LR_ON_DEVICE=lr_on_device,
                **constexprs,
                num_warps=s.num_warps,
                enable_fp_fusion=False,
            )
    except BaseException:
        forget_table(table)  # a launch that failed part-way may leave counters off 0
        raise


# -- in-kernel helpers -----------------------------------------------------------------------------
# On the GPU these are inlined. In the interpreter each call of a @triton.jit helper costs ~1 ms
# (it re-patches triton.language), so per-element paths call few of them.
@triton.jit
def locate(tiles, meta, TILE: tl.constexpr, IDX: tl.constexpr):
    """Where this program works: ``(geo, elem)``.

    ``geo`` = (tensor index, table row, rows, cols, first tile, tile rows, tile cols, tile row,
    tile col, tile height, tile width, stash slots per tile): the tensor's stencil grid and tile
    grid and this tile's place in it. ``elem`` = (r, c, flat, valid, lr, lc): each lane's grid row
    and column, its flat logical index ``r * cols + c`` (type IDX: int64 where a tensor may exceed
    2**31 elements), whether it is inside the tensor, and its row and column in the tile.
    """
    pid = tl.program_id(0)
    t = tl.load(tiles + pid)
    row = meta + t.to(tl.int64) * META_FIELDS
    rows = tl.load(row + ROWS).to(IDX)
    cols = tl.load(row + COLS).to(IDX)
    tile_rows = tl.load(row + TILE_ROWS).to(tl.int32)
    tile_cols = tl.load(row + TILE_COLS).to(tl.int32)
    width_log2 = tl.load(row + TILE_WIDTH_LOG2).to(tl.int32)
    first = tl.load(row + FIRST_TILE).to(tl.int32)
    slots = tl.load(row + STASH_SLOTS).to(tl.int32)
    tr = (pid - first) // tile_cols
    tc = (pid - first) - tr * tile_cols
    height = TILE >> width_log2
    width = 1 << width_log2
    lanes = tl.arange(0, TILE)
    lr = lanes >> width_log2
    lc = lanes & (width - 1)
    r = tr.to(IDX) * height + lr
    c = tc.to(IDX) * width + lc
    geo = (t, row, rows, cols, first, tile_rows, tile_cols, tr, tc, height, width, slots)
    return geo, (r, c, r * cols + c, (r < rows) & (c < cols), lr, lc)


@triton.jit
def load_tile(tiles, meta, p_layouts, g_ptrs, g_layouts, stash, grad_scale, TILE: tl.constexpr, IDX: tl.constexpr):
    """Locate this program's tile (:func:`locate`) and load its param and grad, in fp32, the grad
    unscaled (AMP: times ``g_factor``, GradScaler.unscale_'s float32(1 / grad_scale); 1 without).

    Returns ``(geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor)``: pointers =
    (param, grad, state 0, state 1, state 2) of the tensor (unused state columns hold 0), the layout
    rows of its param and grad (:func:`offsets`), the param's memory offsets at the lanes.
    """
    geo, elem = locate(tiles, meta, TILE, IDX)
    t, row, flat, valid = geo[0], geo[1], elem[2], elem[3]
    ptr = tl.pointer_type(stash.dtype.element_ty)
    pointers = (
        tl.load(row + PARAM).to(ptr),
        tl.load(g_ptrs + t).to(ptr),
        tl.load(row + STATE0).to(ptr),
        tl.load(row + STATE1).to(ptr),
        tl.load(row + STATE2).to(ptr),
    )
    p_layout = p_layouts + t.to(tl.int64) * LAYOUT_FIELDS
    g_layout = g_layouts + t.to(tl.int64) * LAYOUT_FIELDS
    p_at = offsets(flat, p_layout)
    p = tl.load(pointers[0] + p_at, mask=valid, other=0.0).to(tl.float32)
    g_factor = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)  # fp64 division: IEEE-exact
    g = tl.load(pointers[1] + offsets(flat, g_layout), mask=valid, other=0.0).to(tl.float32) * g_factor
    return geo, elem, pointers, p_layout, g_layout, p_at, p, g, g_factor


@triton.jit
def step_of(geo):
    """This tensor's step count (fp32, already incremented for this step)."""
    return tl.load(tl.load(geo[1] + STEP).to(tl.pointer_type(tl.float32)))


@triton.jit
def offsets(flat, layout):
    """Memory offsets of logical elements ``flat`` of a tensor with this layout row
    (LAYOUT_FIELDS): ``flat`` if contiguous, else the multi-index dotted with the strides."""
    offset = flat
    ndim = tl.load(layout)
    if ndim != 0:
        offset = tl.zeros_like(flat)
        rest = flat
        for d in range(ndim):
            size = tl.load(layout + 1 + d).to(flat.dtype)
            stride = tl.load(layout + 1 + MAX_DIMS + d).to(flat.dtype)
            quotient = rest // size
            offset += (rest - quotient * size) * stride
            rest = quotient
    return offset


@triton.jit
def store(ptrs, x, mask):
    """Store fp32 ``x`` at ``ptrs``, rounded once to nearest (ties to even) in their dtype, as
    torch rounds. bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16 (the GPU's
    cvt.rn rounds), and the same bit arithmetic on both keeps the tested path the GPU's."""
    dtype: tl.constexpr = ptrs.dtype.element_ty
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        half = tl.where(x != x, (bits >> 16) | 0x40, nearest)  # NaN stays a (quiet) NaN
        tl.store(ptrs, half.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(dtype), mask=mask)


@triton.jit
def learning_rate(lr, decay, LR_ON_DEVICE: tl.constexpr):
    """``(lr, 1 - lr wd)`` as the kernel uses them. The launch passes both (:func:`_lr_and_decay`),
    or, with ``LR_ON_DEVICE``, a pointer to lr and wd itself in ``decay``: the product is then
    formed here, in fp32 (the host forms it in fp64: they may differ by an ulp of ``decay``)."""
    if LR_ON_DEVICE:
        lr = tl.load(lr).to(tl.float32)
        decay = 1.0 - lr * decay
    return lr, decay


@triton.jit
def one_minus_powers(delta1, delta2, step):
    """``(1 - (1 - delta1)**step, 1 - (1 - delta2)**step)`` for a whole step count, to a few ulps,
    without the cancellation of ``1 - beta**t`` in fp32 (Adam's bias corrections: 1 - 0.999 in
    fp32 keeps 4 digits fewer than the reference's fp64 value rounded to fp32).

    Square-and-multiply over the bits of ``step`` on pairs ``(a, b) = (beta**n, 1 - beta**n)``:
    doubling ``b <- b (2 - b)``, ``a <- a**2``; increment ``b <- b + delta a``, ``a <- a - delta a``.
    """
    n = step.to(tl.int32)
    bits = ((step.to(tl.int32, bitcast=True) >> 23) & 255) - 126  # floor(log2(step)) + 1, step >= 1
    a1 = step * 0.0 + 1.0
    a2 = a1
    b1 = step * 0.0
    b2 = b1
    for i in range(bits):
        odd = ((n >> (bits - 1 - i)) & 1) == 1
        b1 = b1 * (2.0 - b1)
        a1 = a1 * a1
        b1 = tl.where(odd, b1 + delta1 * a1, b1)
        a1 = tl.where(odd, a1 - delta1 * a1, a1)
        b2 = b2 * (2.0 - b2)
        a2 = a2 * a2
        b2 = tl.where(odd, b2 + delta2 * a2, b2)
        a2 = tl.where(odd, a2 - delta2 * a2, a2)
    return b1, b2


@triton.jit
def laplacian(field: tl.constexpr, args, center, elem, rows, cols, STENCIL: tl.constexpr):
    """The circular Laplacian of the field ``field(flat, mask, args)`` at each lane, whose own value
    is ``center``: fastopt.reference.laplacian's sums in its order, 1-D ``L + R - 2C`` (rows == 1),
    5-point ``N + S + W + E - 4C``, 9-point ``(4 (N + S + W + E) + NW + NE + SW + SE - 20 C) / 6``.

    ``field`` computes this step's value at the neighbours from old state and the gradient (see
    the module docstring): never from a neighbour program's result.
    """
    r, c, mask = elem[0], elem[1], elem[3]
    c_prev = tl.where(c == 0, cols - 1, c - 1)
    c_next = tl.where(c == cols - 1, 0, c + 1)
    here = r * cols
    left = field(here + c_prev, mask, args)
    right = field(here + c_next, mask, args)
    if rows == 1:
        lap = left + right - 2.0 * center
    else:
        up = tl.where(r == 0, rows - 1, r - 1) * cols
        down = tl.where(r == rows - 1, 0, r + 1) * cols
        faces = field(up + c, mask, args) + field(down + c, mask, args) + left + right
        if STENCIL == 5:
            lap = faces - 4.0 * center
        else:
            corners = (
                field(up + c_prev, mask, args)
                + field(up + c_next, mask, args)
                + field(down + c_prev, mask, args)
                + field(down + c_next, mask, args)
            )
            lap = tl.div_rn(4.0 * faces + corners - 20.0 * center, 6.0)
    return lap


@triton.jit
def smoothed(field: tl.constexpr, args, x, geo, elem, scale, c2, floor, STENCIL: tl.constexpr, SCALED: tl.constexpr):
    """fastopt.reference.smooth of ``y = x / scale`` (``y = x`` without SCALED) where the tensor uses
    the Laplacian, else ``y``: ``clamp(y + c2 lap(y), min=floor)`` (NaN-propagating as
    torch.clamp), the Laplacian 0 where the tensor's layout has no stencil (the clamp stays, as in
    the reference). ``lap(x / scale)`` is taken as ``lap(x) / scale``: one division instead of nine.
    ``field``, ``args``: see :func:`laplacian`."""
    mode = tl.load(geo[1] + LAPLACIAN)
    out = x
    if SCALED:
        out = tl.div_rn(x, scale)
    if mode != LAP_OFF:
        lap = tl.zeros_like(x)
        if mode == LAP_STENCIL:
            lap = laplacian(field, args, x, elem, geo[2], geo[3], STENCIL)
            if SCALED:
                lap = tl.div_rn(lap, scale)
        out = tl.maximum(out + c2 * lap, floor, propagate_nan=tl.PropagateNan.ALL)
    return out


@triton.jit
def has_stencil(geo):
    """Whether this tensor's Laplacian is a stencil (use_lap and a stencil_layout): the modes that
    add ``c2 lap(.)`` without a clamp need nothing else (use_lap on a tensor without a layout adds
    ``c2 * 0``)."""
    return tl.load(geo[1] + LAPLACIAN) == LAP_STENCIL


@triton.jit
def _border(lr, lc, height, width, tile_rows, tile_cols, tile_h, tile_w):
    """(is a border element, its stash slot) of tile elements ``(lr, lc)`` of a tile with
    ``height x width`` valid elements. Slots: the first row, the last row (when there are several
    tile rows), then the first and the last column without the corners (several tile columns)."""
    # Conditions on the tile grid pick what the lanes compare with (-1 matches no lane): the
    # interpreter mis-types `scalar_bool & block_bool`.
    first_row = lr == tl.where(tile_rows > 1, 0, -1)
    last_row = (lr == tl.where(tile_rows > 1, height - 1, -1)) & (lr != 0)
    side = ((lc == tl.where(tile_cols > 1, 0, -1)) | (lc == tl.where(tile_cols > 1, width - 1, -1))) & ~(
        first_row | last_row
    )
    row_slots = tl.where(tile_rows > 1, 2 * tile_w, 0)
    slot = tl.where(first_row, lc, tl.where(last_row, tile_w + lc, row_slots + tl.where(lc == 0, lr, tile_h + lr)))
    return first_row | last_row | side, slot


@triton.jit
def _extent(geo, tr, tc):
    """(first row, first column, rows, columns) of tile (tr, tc) of the tensor of ``geo``."""
    rows, cols, tile_h, tile_w = geo[2], geo[3], geo[9], geo[10]
    r0 = tr.to(rows.dtype) * tile_h
    c0 = tc.to(cols.dtype) * tile_w
    return r0, c0, tl.minimum(rows - r0, tile_h), tl.minimum(cols - c0, tile_w)


@triton.jit
def store_shared(
    values,
    arrays,
    geo,
    elem,
    p_at,
    p_layout,
    stash,
    counters,
    STENCIL: tl.constexpr,
    STASHED: tl.constexpr,
    PARAM_FIRST: tl.constexpr,
    BORDER_LANES: tl.constexpr,
):
    """Store this tile's new ``values`` (fp32, rounded here to the arrays' dtype) of the ``arrays``
    that the op reads at neighbouring elements, without a race (see the module docstring):

    after a barrier (every thread of this program has done its neighbour reads), in place where no
    other program reads, to the stash on the tile's border, then :func:`arrive`. A tensor of one
    tile has no border and skips the protocol. With PARAM_FIRST, ``arrays[0]`` is the parameter,
    at offsets ``p_at`` (layout row ``p_layout``).
    """
    flat, valid = elem[2], elem[3]
    tl.debug_barrier()
    if geo[11] > 0:
        tile_rows, tile_cols, tr, tc, tile_h, tile_w, slots = geo[5], geo[6], geo[7], geo[8], geo[9], geo[10], geo[11]
        r0, c0, height, width = _extent(geo, tr, tc)
        border, slot = _border(elem[4], elem[5], height, width, tile_rows, tile_cols, tile_h, tile_w)
        tile = tr * tile_cols + tc
        base = stash + tl.load(geo[1] + STASH_START) + tile.to(tl.int64) * (STASHED * slots) + slot
        for a in tl.static_range(STASHED):
            if PARAM_FIRST and a == 0:
                store(arrays[a] + p_at, values[a], mask=valid & ~border)
            else:
                store(arrays[a] + flat, values[a], mask=valid & ~border)
            store(base + a * slots, values[a], mask=valid & border)
        arrive(geo, counters, stash, arrays, p_layout, STENCIL, STASHED, PARAM_FIRST, BORDER_LANES)
    else:
        for a in tl.static_range(STASHED):
            if PARAM_FIRST and a == 0:
                store(arrays[a] + p_at, values[a], mask=valid)
            else:
                store(arrays[a] + flat, values[a], mask=valid)


@triton.jit
def _commit(
    geo, tile, stash, arrays, p_layout, STASHED: tl.constexpr, PARAM_FIRST: tl.constexpr, BORDER_LANES: tl.constexpr
):
    """Copy tile ``tile``'s stashed border into place in each stashed array (its readers are done).
    Lane s serves stash slot s: the inverse of :func:`_border`, checked by mapping back."""
    cols, tile_rows, tile_cols, tile_h, tile_w, slots = geo[3], geo[5], geo[6], geo[9], geo[10], geo[11]
    tr = tile // tile_cols
    r0, c0, height, width = _extent(geo, tr, tile - tr * tile_cols)
    s = tl.arange(0, BORDER_LANES)
    row_slots = tl.where(tile_rows > 1, 2 * tile_w, 0)
    k = s - row_slots
    in_rows = s < row_slots
    lr = tl.where(in_rows, tl.where(s < tile_w, 0, height - 1), tl.where(k < tile_h, k, k - tile_h))
    lc = tl.where(in_rows, tl.where(s < tile_w, s, s - tile_w), tl.where(k < tile_h, 0, width - 1))
    border, slot = _border(lr, lc, height, width, tile_rows, tile_cols, tile_h, tile_w)
    ok = border & (slot == s) & (lr >= 0) & (lr < height) & (lc >= 0) & (lc < width)
    flat = (r0 + lr) * cols + (c0 + lc)
    base = stash + tl.load(geo[1] + STASH_START) + tile.to(tl.int64) * (STASHED * slots) + s
    for a in tl.static_range(STASHED):
        value = tl.load(base + a * slots, mask=ok, cache_modifier=".cg")  # (L2: another SM wrote it)
        if PARAM_FIRST and a == 0:
            tl.store(arrays[a] + offsets(flat, p_layout), value, mask=ok)
        else:
            tl.store(arrays[a] + flat, value, mask=ok)


@triton.jit
def _neighbour_tile(k, geo, n_dr, n_dc, STENCIL: tl.constexpr):
    """The k-th tile whose border this tile reads (k < readers; scalar or vector k): tiles
    ``(tr + dr, tc + dc)`` mod the tile grid, dr and dc in (0, +1, -1)[:n_dr] and [:n_dc], all
    pairs for the 9-point stencil, no diagonals for the 5-point one (its halo has no corners)."""
    tile_rows, tile_cols, tr, tc = geo[5], geo[6], geo[7], geo[8]
    if STENCIL == 5:
        i = tl.where(k < n_dr, k, 0)
        j = tl.where(k < n_dr, 0, k - n_dr + 1)
    else:
        i = k // n_dc
        j = k - i * n_dc
    ytr = (tr + tl.where(i == 2, tile_rows - 1, i)) % tile_rows
    ytc = (tc + tl.where(j == 2, tile_cols - 1, j)) % tile_cols
    return ytr * tile_cols + ytc


@triton.jit
def arrive(
    geo,
    counters,
    stash,
    arrays,
    p_layout,
    STENCIL: tl.constexpr,
    STASHED: tl.constexpr,
    PARAM_FIRST: tl.constexpr,
    BORDER_LANES: tl.constexpr,
):
    """Tell each tile whose border this program read (and its own) that it is done reading; commit
    the stash of every tile for which this is the last arrival, and reset that tile's counter.

    Neighbours along a side of 1 or 2 tiles are counted once, so this program arrives at exactly
    the tiles that arrive at it, ``readers`` of them (see :func:`_neighbour_tile`). The arrivals
    are one vector of atomics (one round trip to L2, not one per neighbour).
    """
    first, tile_rows, tile_cols = geo[4], geo[5], geo[6]
    tl.debug_barrier()  # every thread of this program has read all it needs and written its stash
    n_dr = 1 + (tile_rows >= 2).to(tl.int32) + (tile_rows >= 3).to(tl.int32)
    n_dc = 1 + (tile_cols >= 2).to(tl.int32) + (tile_cols >= 3).to(tl.int32)
    if STENCIL == 5:
        readers = n_dr + n_dc - 1
    else:
        readers = n_dr * n_dc
    k = tl.arange(0, 16)
    reading = k < readers
    arrived = tl.atomic_add(
        counters + first + _neighbour_tile(k, geo, n_dr, n_dc, STENCIL), 1, mask=reading, sem="acq_rel", scope="gpu"
    )
    last = tl.sum(tl.where(reading & (arrived == readers - 1), 1 << k, 0), axis=0)  # bit k: tile k is complete
    tl.debug_barrier()  # every thread acts on what the atomics acquired
    for n in range(readers):
        if (last >> n) & 1:
            tile = _neighbour_tile(n, geo, n_dr, n_dc, STENCIL)
            tl.store(counters + first + tile, 0)
            _commit(geo, tile, stash, arrays, p_layout, STASHED, PARAM_FIRST, BORDER_LANES)
