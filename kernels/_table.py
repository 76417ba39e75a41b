"""The tile table: how a list of tensors is cut into programs and described to the kernels
(the columns of ``meta``, the launch settings, the cached :class:`TensorTable`). The layout of
a launch is explained in kernels/_multi_tensor.py."""

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

from fastopt.reference.laplacian import STENCILS, stencil_layout

from ._device import _amp_input, _capturing

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
# 1 where the tensor may take the vector path (kernels/_vector_tile.py): param and state contiguous
# and 16-byte aligned, stencil rows a multiple of 16 bytes, tiles of the launch's constexpr width.
VECTOR = tl.constexpr(16)
# Rows padded to 32 fields (256 bytes): with 17, ptxas gave ladam_weight_lap_step 128 registers and
# 56 bytes of spills, with 16, 24 or 32 166 registers and none (sm_90, bench/kernel_resources.py).
META_FIELDS = tl.constexpr(32)

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
        num_warps: warps per program (4-byte dtypes): 4 elements per thread, one 128-bit access.
        num_warps_16bit: warps per program for 2-byte dtypes (bf16, fp16) in launches that take the
            vector path (VECTOR 1 or 2; generic-only launches keep num_warps): 8 elements per
            thread, so that a thread's contiguous elements fill one 128-bit access
            (bench/kernel_model.py: 9.1 instead of 11.1 warp-instructions per element for
            ladam_step when introduced, at 168 registers).
    """

    tile: int = 1024
    tile_width: int = 32
    num_warps: int = 8
    num_warps_16bit: int = 4

    def warps(self, itemsize: int, vector_mode: int = 0) -> int:
        """Warps per program of a launch over elements of ``itemsize`` bytes whose VECTOR constexpr
        is ``vector_mode`` (0 where the kernel has no vector path): num_warps_16bit for 2-byte
        elements on a vector path, else num_warps."""
        return self.num_warps_16bit if vector_mode and itemsize == 2 else self.num_warps

    def __post_init__(self):
        for name in ("tile", "tile_width", "num_warps", "num_warps_16bit"):
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


def _vector_ready(p: torch.Tensor, layout: List[int], states, cut: "TileGrid", settings: LaunchSettings) -> bool:
    """Whether ``p`` (with its ``states``) meets the vector path's preconditions (see
    kernels/_vector_tile.py); its grads are checked per step (TensorTable.grads)."""
    vec = 16 // p.element_size()
    addresses = [p.data_ptr(), *(s.data_ptr() for s in states)]
    width = settings.tile if cut.rows == 1 else settings.tile_width
    return (
        p.numel() > 0
        and layout[0] == 0
        and not any(a & 15 for a in addresses)
        and cut.cols % vec == 0
        and cut.width == width
    )


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
            row[VECTOR.value] = int(_vector_ready(p, layout, [s[i] for s in states], cut, settings))
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
        self.vector_tensors = sum(row[VECTOR.value] for row in meta)
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
        self._grads_contiguous = self._grads_aligned = self._grads_vector = False
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
            self._grads_contiguous = not any(row[0] for row in rows)
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
            self._grads_aligned = not any(ptr & 15 for ptr in ptrs)
        self._grads_vector = self._grads_contiguous and self._grads_aligned
        # Both were uploaded above on the first call (None never equals a list of strides or addresses).
        assert self._grad_ptr_table is not None and self._grad_layouts is not None
        return self._grad_ptr_table, self._grad_layouts, self.index_64 or self._grad_index_64

    def vector_mode(self) -> int:
        """The VECTOR constexpr of a launch after :meth:`grads`: 0 every tensor takes the generic
        path (no tensor qualifies, or some grad is not contiguous and 16-byte aligned), 1 every
        tensor the vector path, 2 each its own (a per-program branch on the table's column)."""
        if not self._grads_vector or self.vector_tensors == 0:
            return 0
        return 1 if self.vector_tensors == self.n else 2

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
