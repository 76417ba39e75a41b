// The CPU side of the multi-tensor helper: runs an op's functor (step_functors.h) over the tiles
// of multi_tensor.h, multi-threaded with at::parallel_for, one pass over memory per tensor.
//
// A tile of a 2-D grid walks its rows keeping the stencil's input (the new accumulator) of three
// consecutive rows in a ring of cache-resident buffers, each row padded with its left and right
// neighbours (the wrapped columns, or the halo). Row j's state is advanced in the same loop that
// updates row j-1's parameters, 64 columns behind (the row j-1 update needs row j's new values
// up to the column after it): one loop streams p, g and the state together, as fused Adam does,
// which measured faster here than a loop per half (the sqrt and division of the update overlap
// the memory traffic of the advance; a chunked variant, the update one 256-column chunk behind in
// a loop of its own, was slower still). Elementwise tensors (no Laplacian) take one plain loop.
// Every loop prefetches its streams in software (see kPrefetchBytes: the stencil's arithmetic
// halves how far ahead the out-of-order core reaches on its own).
//
// The loops are plain and auto-vectorise; every tile routine is compiled twice, for AVX2+FMA and
// for the baseline ISA, and picked at run time (ATEN_CPU_CAPABILITY=default forces the baseline,
// as it does for torch's own kernels).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "multi_tensor.h"
#include "step_functors.h"
#include "tensor_lists.h"

#if defined(__GNUC__)
#define FASTOPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTOPT_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTOPT_HAVE_AVX2_VARIANT 1
#define FASTOPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTOPT_HAVE_AVX2_VARIANT 0
#endif

namespace fastopt {
namespace cpu {

// Below this many elements a step runs on the calling thread: waking the pool costs more.
constexpr int64_t kDefaultSerialBelow = 1 << 15;
// Tiles: rows of up to 4096 columns (three padded fp32 rows and their aux: 100 KB, in L2), about
// 128K elements per tile, so that the halo pre-pass (2 rows per tile) adds under 2% to the reads.
constexpr TilingPolicy kDefaultPolicy{4096, 4096, 1 << 17, 0};
// How far the parameter update trails the state advance within a row, in columns: enough that
// the values it reads were stored several vector iterations earlier.
constexpr int64_t kLag = 64;

// The tiling in force: kDefaultPolicy and kDefaultSerialBelow, unless a test asked for tiny
// tiles, threads on small steps too (set_tiling), to put tile and thread boundaries everywhere in
// small tensors.
struct Tiling {
  TilingPolicy policy;
  int64_t serial_below;
};
Tiling tiling();
Tiling set_tiling(const Tiling& t);  // returns the previous one

bool use_avx2();  // the run-time ISA choice

// One tensor of a step: parameters, gradients, the op's state tensors (advance states first,
// then update states) and the values the op derives from its step count.
template <class Op>
struct TensorPtrs {
  using R = Raw<typename Op::Storage>;
  R* p;
  const R* g;
  R* state[3];
  typename Op::TensorScalars k;
};

template <class Op>
struct Step {
  using M = typename Op::Math;
  Op op;
  Coupling<M> coupling;
  const TensorPtrs<Op>* tensors;
};

// -- the loops ------------------------------------------------------------------------------------
// Row pointers are restrict parameters so that GCC vectorises without run-time alias checks; the
// functor and scalars come by value, so that their fields stay in registers (by reference they
// were reloaded and broadcast in every iteration: the stores might have changed them).

// Whether the update reads aux again from memory (row j-1's gradient or state, still in cache)
// instead of a buffer: one store and one buffer fewer per element.
template <class Op>
constexpr bool kReloadAux = Op::kAux == AuxSource::kGradient ||
                            std::is_same<Raw<typename Op::Storage>, typename Op::Math>::value;

// Software prefetch. The loops walk their streams (p, g and the state, in memory) in blocks of
// kBlockBytes, each block first prefetching the streams' lines kPrefetchBytes ahead. Why: a stencil
// loop does about twice fused Adam's arithmetic per element, so the out-of-order window reaches
// half as far ahead, half as many cache misses are in flight, and the hardware prefetchers alone
// left the 9-point step at 1.6x the time of the same loop without the stencil on one thread
// (1.1x with the prefetches; a one-thread C++ harness, not in the tree, 4 x 2048 x 2048 fp32; see
// bench/results/ladam_cpu.md for the step in bench_ladam.py). Prefetches never fault.
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kBlockBytes = 256;

// Elements of storage R in one block.
template <typename R>
constexpr int64_t kBlock = kBlockBytes / static_cast<int64_t>(sizeof(R));

// Prefetch the block at element ``i`` of ``x`` kPrefetchBytes ahead (Write: for a store, as p and the
// state), when Use (x may be null where not).
template <bool Use, bool Write, typename R>
FASTOPT_ALWAYS_INLINE void prefetch_ahead(const R* x, int64_t i) {
  if (!Use) return;
  const char* line = reinterpret_cast<const char*>(x + i) + kPrefetchBytes;
  for (int64_t b = 0; b < kBlockBytes; b += 64) __builtin_prefetch(line + b, Write ? 1 : 0, 3);
}

// The new state of n elements (the advance states written when Write), their stencil input (acc)
// and aux. p is read only (weight_lap's stencil input needs it; a dead load for the other ops).
template <bool Write, class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void advance_loop(const Op op, const typename Op::TensorScalars k, const Raw<T>* __restrict__ g,
                                        const Raw<T>* __restrict__ p, Raw<T>* __restrict__ s0,
                                        Raw<T>* __restrict__ s1, int64_t n, M* __restrict__ acc,
                                        M* __restrict__ aux) {
  for (int64_t b = 0; b < n; b += kBlock<Raw<T>>) {
    prefetch_ahead<true, false>(g, b);
    prefetch_ahead<Op::kAdvanceReadsParam, false>(p, b);
    prefetch_ahead<true, Write>(s0, b);
    prefetch_ahead<(Op::kAdvanceStates > 1), Write>(s1, b);
    const int64_t e = std::min(n, b + kBlock<Raw<T>>);
    for (int64_t i = b; i < e; ++i) {
      M s[2] = {load<T, M>(s0[i]), Op::kAdvanceStates > 1 ? load<T, M>(s1[i]) : M(0)};
      M a;
      acc[i] = op.advance(k, load<T, M>(g[i]), load<T, M>(p[i]), s, a);
      if (Write) {
        if (!kReloadAux<Op>) aux[i] = a;
        if (Op::kAdvanceWrites > 0) s0[i] = store<T>(s[0]);
        if (Op::kAdvanceWrites > 1) s1[i] = store<T>(s[1]);
      }
    }
  }
}

// The update states of one element: loaded, updated by op.update, stored (up to two: u0, u1).
template <class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void load_update_states(M* u, const Raw<T>* u0, const Raw<T>* u1, int64_t i) {
  u[0] = Op::kUpdateStates > 0 ? load<T, M>(u0[i]) : M(0);
  u[1] = Op::kUpdateStates > 1 ? load<T, M>(u1[i]) : M(0);
}
template <class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void store_update_states(const M* u, Raw<T>* u0, Raw<T>* u1, int64_t i) {
  if (Op::kUpdateStates > 0) u0[i] = store<T>(u[0]);
  if (Op::kUpdateStates > 1) u1[i] = store<T>(u[1]);
}

// The parameter update of n elements from the padded stencil-input rows (each pointer at the
// first element's left neighbour), aux and g.
template <Smooth S, class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void update_loop(const Op op, const typename Op::TensorScalars k, const Coupling<M> c,
                                       Raw<T>* __restrict__ p, Raw<T>* __restrict__ u0, Raw<T>* __restrict__ u1,
                                       int64_t n, const M* __restrict__ up, const M* __restrict__ mid,
                                       const M* __restrict__ down, const M* __restrict__ aux,
                                       const Raw<T>* __restrict__ aux_mem, const Raw<T>* __restrict__ g) {
  for (int64_t b = 0; b < n; b += kBlock<Raw<T>>) {
    prefetch_ahead<true, true>(p, b);
    prefetch_ahead<(Op::kUpdateStates > 0), true>(u0, b);
    prefetch_ahead<(Op::kUpdateStates > 1), true>(u1, b);
    const int64_t e = std::min(n, b + kBlock<Raw<T>>);
    for (int64_t i = b; i < e; ++i) {
      const M term = stencil_term<S>(op, up + i, mid + i, down + i, c);
      M u[2];
      load_update_states<Op, T, M>(u, u0, u1, i);
      const M a = kReloadAux<Op> ? load<T, M>(aux_mem[i]) : aux[i];
      p[i] = store<T>(op.update(k, load<T, M>(p[i]), a, term, u, load<T, M>(g[i])));
      store_update_states<Op, T, M>(u, u0, u1, i);
    }
  }
}

// Whether an advance state is also an update state (wave_variance's v: advance reads the old v,
// update writes the new one). The element-wise loop then reads it once, through u0: two restrict
// pointers must not reach the same element.
template <class Op>
constexpr bool kSharedState = Op::kUpdateFirst < Op::kAdvanceStates;

// Both halves at once on rows without a stencil: the fused-Adam loop.
template <Smooth S, class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void elementwise_loop(const Op op, const typename Op::TensorScalars k,
                                            Raw<T>* __restrict__ p, const Raw<T>* __restrict__ g,
                                            Raw<T>* __restrict__ s0, Raw<T>* __restrict__ s1,
                                            Raw<T>* __restrict__ u0, Raw<T>* __restrict__ u1, int64_t n) {
  for (int64_t b = 0; b < n; b += kBlock<Raw<T>>) {
    prefetch_ahead<true, true>(p, b);
    prefetch_ahead<true, false>(g, b);
    prefetch_ahead<true, true>(s0, b);
    prefetch_ahead<(!kSharedState<Op> && Op::kAdvanceStates > 1), true>(s1, b);
    prefetch_ahead<(Op::kUpdateStates > 0), true>(u0, b);
    prefetch_ahead<(Op::kUpdateStates > 1), true>(u1, b);
    const int64_t e = std::min(n, b + kBlock<Raw<T>>);
    for (int64_t i = b; i < e; ++i) {
      M u[2];
      load_update_states<Op, T, M>(u, u0, u1, i);
      M s[2] = {load<T, M>(s0[i]), !kSharedState<Op> && Op::kAdvanceStates > 1 ? load<T, M>(s1[i]) : u[0]};
      const M gi = load<T, M>(g[i]), pi = load<T, M>(p[i]);
      M a;
      const M x = op.advance(k, gi, pi, s, a);
      if (Op::kAdvanceWrites > 0) s0[i] = store<T>(s[0]);
      if (Op::kAdvanceWrites > 1) s1[i] = store<T>(s[1]);
      p[i] = store<T>(op.update(k, pi, a, pointwise_term<S>(op, x), u, gi));
      store_update_states<Op, T, M>(u, u0, u1, i);
    }
  }
}

// Columns [begin, end) of row j advanced, and columns [begin - kLag, end - kLag) of row j-1
// updated, in one loop. ``cur`` is row j's padded buffer: written at [1 + i], read (as row j-1's
// lower neighbours) kLag columns behind, so the reads see values stored long before. ``p`` is row
// j's parameters (read), ``p_prev`` row j-1's (written): different rows, so restrict holds.
template <Smooth S, class Op, typename T, typename M>
FASTOPT_ALWAYS_INLINE void advance_update_loop(const Op op, const typename Op::TensorScalars k,
                                               const Coupling<M> c, const Raw<T>* __restrict__ g,
                                               const Raw<T>* __restrict__ p, Raw<T>* __restrict__ s0,
                                               Raw<T>* __restrict__ s1, Raw<T>* __restrict__ p_prev,
                                               Raw<T>* __restrict__ u0, Raw<T>* __restrict__ u1, int64_t begin,
                                               int64_t end, M* cur, M* __restrict__ cur_aux, const M* __restrict__ up,
                                               const M* __restrict__ mid, const M* __restrict__ prev_aux,
                                               const Raw<T>* __restrict__ aux_mem, const Raw<T>* __restrict__ g_prev) {
  for (int64_t b = begin; b < end; b += kBlock<Raw<T>>) {
    prefetch_ahead<true, false>(g, b);
    prefetch_ahead<Op::kAdvanceReadsParam, false>(p, b);
    prefetch_ahead<true, true>(s0, b);
    prefetch_ahead<(Op::kAdvanceStates > 1), true>(s1, b);
    prefetch_ahead<true, true>(p_prev, b - kLag);
    prefetch_ahead<(Op::kUpdateStates > 0), true>(u0, b - kLag);
    prefetch_ahead<(Op::kUpdateStates > 1), true>(u1, b - kLag);
    const int64_t e = std::min(end, b + kBlock<Raw<T>>);
    // cur's reads trail its writes by kLag - 1 = 63 elements, more than a vector iteration, which
    // GCC cannot see through the stencil's pointer arithmetic: without ivdep it falls back to
    // scalar code at run time (measured 5x slower).
#pragma GCC ivdep
    for (int64_t i = b; i < e; ++i) {
      M s[2] = {load<T, M>(s0[i]), Op::kAdvanceStates > 1 ? load<T, M>(s1[i]) : M(0)};
      M a;
      cur[1 + i] = op.advance(k, load<T, M>(g[i]), load<T, M>(p[i]), s, a);
      if (!kReloadAux<Op>) cur_aux[i] = a;
      if (Op::kAdvanceWrites > 0) s0[i] = store<T>(s[0]);
      if (Op::kAdvanceWrites > 1) s1[i] = store<T>(s[1]);
      const int64_t j = i - kLag;
      const M term = stencil_term<S>(op, up + j, mid + j, cur + j, c);
      M u[2];
      load_update_states<Op, T, M>(u, u0, u1, j);
      const M prev_a = kReloadAux<Op> ? load<T, M>(aux_mem[j]) : prev_aux[j];
      p_prev[j] = store<T>(op.update(k, load<T, M>(p_prev[j]), prev_a, term, u, load<T, M>(g_prev[j])));
      store_update_states<Op, T, M>(u, u0, u1, j);
    }
  }
}

// -- a tile ----------------------------------------------------------------------------------------
// A thread's row buffers: 3 ring rows of stencil input, 3 of aux, and a copy of row 0. Each
// padded row starts one element before a 64-byte boundary, so that a row's own elements are
// aligned like the tensors' rows (and the stencil's shifted loads split fewer cache lines).
template <typename M>
struct Scratch {
  static constexpr int64_t kLine = 64 / sizeof(M);
  std::vector<M> data;
  int64_t stride = 0;  // elements from one row buffer to the next, a multiple of kLine
  M* row(int i) {
    M* base = data.data() + (kLine - reinterpret_cast<uintptr_t>(data.data()) / sizeof(M) % kLine) % kLine;
    return base + i * stride + kLine - 1;
  }
  M* ring(int i) { return row(i); }
  M* aux(int i) { return row(3 + i) + 1; }
  M* first() { return row(6); }
  void reserve(int64_t cols) {
    stride = (cols + 1 + 2 * kLine - 1) / kLine * kLine;  // room for kLine - 1 + cols + 2
    const size_t size = static_cast<size_t>(7 * stride + 2 * kLine);
    if (data.size() < size) data.resize(size);
  }
};

// Row and column addressing of one tensor, with the loops bound to its pointers.
template <class Op>
struct TensorRows {
  using M = typename Op::Math;
  using T = typename Op::Storage;
  const Step<Op>& step;
  const TensorPtrs<Op>& t;

  Raw<T>* s(int i, int64_t off) const { return i < Op::kAdvanceStates ? t.state[i] + off : nullptr; }
  const Raw<T>* aux_mem(int64_t off) const {
    return (Op::kAux == AuxSource::kGradient ? t.g : t.state[0]) + off;
  }
  Raw<T>* u(int i, int64_t off) const { return i < Op::kUpdateStates ? t.state[Op::kUpdateFirst + i] + off : nullptr; }

  template <bool Write>
  FASTOPT_ALWAYS_INLINE void advance(int64_t off, int64_t n, M* acc, M* aux) const {
    advance_loop<Write, Op, T, M>(step.op, t.k, t.g + off, t.p + off, s(0, off), s(1, off), n, acc, aux);
  }
  FASTOPT_ALWAYS_INLINE M peek(int64_t off) const {
    M acc;
    advance<false>(off, 1, &acc, nullptr);
    return acc;
  }
  template <Smooth S>
  FASTOPT_ALWAYS_INLINE void update(int64_t off, int64_t n, const M* up, const M* mid, const M* down,
                                    const M* aux) const {
    update_loop<S, Op, T, M>(step.op, t.k, step.coupling, t.p + off, u(0, off), u(1, off), n, up, mid, down, aux,
                             aux_mem(off), t.g + off);
  }
  template <Smooth S>
  FASTOPT_ALWAYS_INLINE void elementwise(int64_t off, int64_t n) const {
    elementwise_loop<S, Op, T, M>(step.op, t.k, t.p + off, t.g + off, s(0, off), kSharedState<Op> ? nullptr : s(1, off),
                                  u(0, off), u(1, off), n);
  }
  template <Smooth S>
  FASTOPT_ALWAYS_INLINE void advance_update(int64_t off, int64_t prev, int64_t begin, int64_t end, M* cur,
                                            M* cur_aux, const M* up, const M* mid, const M* prev_aux) const {
    advance_update_loop<S, Op, T, M>(step.op, t.k, step.coupling, t.g + off, t.p + off, s(0, off), s(1, off),
                                     t.p + prev, u(0, prev), u(1, prev), begin, end, cur, cur_aux, up, mid, prev_aux,
                                     aux_mem(prev), t.g + prev);
  }
};

// Pre-pass: the new stencil input of the tile's halo, from the old state. ``out`` is the tile's
// part of the scratch buffer (see HaloLayout).
template <class Op>
void tile_halo(const Step<Op>& step, const TensorGrid& g, const Tile& tile, typename Op::Math* out) {
  using M = typename Op::Math;
  const TensorRows<Op> rows{step, step.tensors[tile.tensor]};
  const HaloLayout h = halo_layout(g, tile);
  const int64_t C = g.cols, W = tile.ncols;
  const int64_t left_col = (tile.col0 - 1 + C) % C, right_col = (tile.col0 + W) % C;
  if (is_vertical(g.smooth)) {
    const int64_t rows_of[2] = {(tile.row0 - 1 + g.rows) % g.rows, (tile.row0 + tile.nrows) % g.rows};
    M* dst[2] = {out + h.top, out + h.bottom};
    for (int k = 0; k < 2; ++k) {
      const int64_t base = rows_of[k] * C;
      rows.template advance<false>(base + tile.col0, W, dst[k] + 1, nullptr);
      dst[k][0] = rows.peek(base + left_col);
      dst[k][W + 1] = rows.peek(base + right_col);
    }
  }
  if (W < C) {
    for (int64_t r = 0; r < tile.nrows; ++r) {
      const int64_t base = (tile.row0 + r) * C;
      out[h.left + r] = rows.peek(base + left_col);
      out[h.right + r] = rows.peek(base + right_col);
    }
  }
}

// The 2-D walk of a tile, for one stencil.
template <Smooth S, class Op>
FASTOPT_ALWAYS_INLINE void tile_rows(const TensorRows<Op>& rows, const TensorGrid& g, const Tile& tile,
                                     const typename Op::Math* halo, Scratch<typename Op::Math>& s) {
  using M = typename Op::Math;
  const HaloLayout h = halo_layout(g, tile);
  const int64_t C = g.cols, W = tile.ncols;
  const bool full_width = W == C;
  // The left and right neighbours of a row: wrapped from the row itself, or from the halo.
  auto pad = [&](M* row, int64_t r) {
    row[0] = full_width ? row[W] : halo[h.left + r];
    row[W + 1] = full_width ? row[1] : halo[h.right + r];
  };
  // Row j's buffers are ring slot (j - row0 + 1) % 3, so the row above the tile is slot 0.
  const int64_t row0 = tile.row0, row_end = tile.row0 + tile.nrows;
  auto slot = [row0](int64_t j) { return static_cast<int>((j - row0 + 1) % 3); };
  M* above = s.ring(0);
  if (halo) {
    std::memcpy(above, halo + h.top, sizeof(M) * (W + 2));
  } else {
    // The tile is the whole tensor: its last row still holds the old state.
    rows.template advance<false>((g.rows - 1) * C, W, above + 1, nullptr);
    pad(above, 0);
  }
  const bool fused = W > kLag + 1;
  for (int64_t j = row0; j <= row_end; ++j) {
    M* cur = s.ring(slot(j));
    M* cur_aux = s.aux(slot(j));
    const int64_t off = j * C + tile.col0, prev = off - C;
    if (j == row_end) {  // the row below the tile: from the halo, or row 0 (saved below)
      std::memcpy(cur, halo ? halo + h.bottom : s.first(), sizeof(M) * (W + 2));
    } else if (j == row0 || !fused) {
      rows.template advance<true>(off, W, cur + 1, cur_aux);
      pad(cur, j - row0);
    } else {
      // Row j's columns [0, kLag + 1) first: row j-1's update at column c needs row j up to c + 1.
      rows.template advance<true>(off, kLag + 1, cur + 1, cur_aux);
      rows.template advance_update<S>(off, prev, kLag + 1, W, cur, cur_aux, s.ring(slot(j - 2)),
                                      s.ring(slot(j - 1)), s.aux(slot(j - 1)));
      pad(cur, j - row0);
      // Left for row j-1: column 0 (its left neighbours wrap to row j's end) and the last kLag.
      rows.template update<S>(prev, 1, s.ring(slot(j - 2)), s.ring(slot(j - 1)), cur, s.aux(slot(j - 1)));
      rows.template update<S>(prev + W - kLag, kLag, s.ring(slot(j - 2)) + W - kLag, s.ring(slot(j - 1)) + W - kLag,
                              cur + W - kLag, s.aux(slot(j - 1)) + W - kLag);
    }
    if (!halo && j == 0) std::memcpy(s.first(), cur, sizeof(M) * (W + 2));  // row 0 is below the last
    if (j > row0 && (!fused || j == row_end)) {
      rows.template update<S>(prev, W, s.ring(slot(j - 2)), s.ring(slot(j - 1)), cur, s.aux(slot(j - 1)));
    }
  }
}

// Main pass over one tile.
template <class Op>
FASTOPT_ALWAYS_INLINE void tile_main(const Step<Op>& step, const TensorGrid& g, const Tile& tile,
                                     const typename Op::Math* halo, Scratch<typename Op::Math>& s) {
  using M = typename Op::Math;
  const TensorRows<Op> rows{step, step.tensors[tile.tensor]};
  switch (g.smooth) {
    case Smooth::kNone: rows.template elementwise<Smooth::kNone>(tile.col0, tile.ncols); return;
    case Smooth::kClamp: rows.template elementwise<Smooth::kClamp>(tile.col0, tile.ncols); return;
    case Smooth::kLine: {  // one row, padded by its wrap or the halo
      const int64_t W = tile.ncols;
      M* acc = s.ring(0);
      M* aux = s.aux(0);
      rows.template advance<true>(tile.col0, W, acc + 1, aux);
      acc[0] = halo ? halo[halo_layout(g, tile).left] : acc[W];
      acc[W + 1] = halo ? halo[halo_layout(g, tile).right] : acc[1];
      rows.template update<Smooth::kLine>(tile.col0, W, acc, acc, acc, aux);
      return;
    }
    case Smooth::kFive: tile_rows<Smooth::kFive>(rows, g, tile, halo, s); return;
    case Smooth::kNine: tile_rows<Smooth::kNine>(rows, g, tile, halo, s); return;
  }
}

template <class Op>
void tile_main_baseline(const Step<Op>& step, const TensorGrid& g, const Tile& tile, const typename Op::Math* halo,
                        Scratch<typename Op::Math>& s) {
  tile_main(step, g, tile, halo, s);
}
#if FASTOPT_HAVE_AVX2_VARIANT
template <class Op>
FASTOPT_TARGET_AVX2 void tile_main_avx2(const Step<Op>& step, const TensorGrid& g, const Tile& tile,
                                        const typename Op::Math* halo, Scratch<typename Op::Math>& s) {
  tile_main(step, g, tile, halo, s);
}
#endif

// Calls f(i) for i in [0, n), the indices handed out one by one, in order, to the threads of one
// at::parallel_for (dynamic: a thread slowed by other work on the machine takes fewer).
template <class F>
void for_each_item(int64_t n, bool serial, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (n == 1 || threads == 1 || serial || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      f(i);
    }
  });
}

// One step of an op over all its tensors: the halo pre-pass of the tiles that need one, then the
// main pass of every tile, as one list of work items in one parallel loop.
template <class Op>
void run_tiles(const Step<Op>& step, const std::vector<TensorGrid>& grids) {
  using M = typename Op::Math;
  const Tiling config = tiling();
  const TilePlan plan = plan_tiles(grids, config.policy);
  if (plan.tiles.empty()) return;
  auto main_fn = &tile_main_baseline<Op>;
#if FASTOPT_HAVE_AVX2_VARIANT
  if (use_avx2()) main_fn = &tile_main_avx2<Op>;
#endif
  std::vector<M> halo(static_cast<size_t>(plan.halo_elems));
  std::vector<int64_t> with_halo;
  for (int64_t i = 0; i < static_cast<int64_t>(plan.tiles.size()); ++i) {
    if (plan.tiles[i].halo >= 0) with_halo.push_back(i);
  }
  const int64_t n_halo = static_cast<int64_t>(with_halo.size());
  // Items are handed out in order, so every pre-pass item is taken before any main item; a main
  // item waits until all are done. So every halo is read from the old state before any tile
  // writes, and no thread reads a value that another one has already overwritten. (One parallel
  // loop, not one per pass: on a busy machine each loop's end waits for its slowest thread.)
  std::atomic<int64_t> halos_done{0};
  for_each_item(n_halo + static_cast<int64_t>(plan.tiles.size()), plan.elems < config.serial_below, [&](int64_t i) {
    if (i < n_halo) {
      const Tile& tile = plan.tiles[with_halo[i]];
      tile_halo(step, grids[tile.tensor], tile, halo.data() + tile.halo);
      halos_done.fetch_add(1, std::memory_order_release);
      return;
    }
    while (halos_done.load(std::memory_order_acquire) < n_halo) std::this_thread::yield();
    thread_local Scratch<M> scratch;
    scratch.reserve(plan.max_cols);
    const Tile& tile = plan.tiles[i - n_halo];
    main_fn(step, grids[tile.tensor], tile, tile.halo >= 0 ? halo.data() + tile.halo : nullptr, scratch);
  });
}

// The host side of a step: the tensor table (the op's state lists in the order of its signature:
// advance states, then update states), then the tiles. ``grad_factor`` unscales the gradients
// (AMP: see GradUnscale in step_functors.h).
// ``values``: each tensor's value for the functor's scalars (wave_variance's E0^2); none: 0.
template <class Op>
void run_step(Op op, double c2, const StepTensors& st, std::initializer_list<at::TensorList> states,
              at::TensorList steps, float grad_factor, const std::vector<double>* values = nullptr) {
  op.grad_factor = typename Op::Math(grad_factor);
  using R = Raw<typename Op::Storage>;
  static_assert(Op::kAdvanceStates <= 3 && Op::kUpdateFirst + Op::kUpdateStates <= 3,
                "TensorPtrs holds three state tensors");
  static_assert(Op::kUpdateFirst >= Op::kAdvanceWrites, "a state is written by one half only");
  const std::vector<double> counts = step_counts(steps);
  std::vector<TensorPtrs<Op>> tensors(st.size());
  for (size_t i = 0; i < st.size(); ++i) {
    TensorPtrs<Op>& t = tensors[i];
    t.p = data_of<R>(st.params[i]);
    t.g = data_of<const R>(st.grads[i]);
    t.state[0] = t.state[1] = t.state[2] = nullptr;
    int k = 0;
    for (at::TensorList list : states) t.state[k++] = data_of<R>(list[i]);
    t.k = op.scalars(counts[i], values ? (*values)[i] : 0.0);
  }
  run_tiles(Step<Op>{op, Coupling<typename Op::Math>(c2), tensors.data()}, st.grids);
}

}  // namespace cpu
}  // namespace fastopt
