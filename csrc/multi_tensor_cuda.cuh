// The CUDA side of the multi-tensor helper: one launch covers the tiles of every tensor of a
// step (apex multi_tensor_apply style, with the tile table in device memory instead of kernel
// arguments, so there is no limit on the number of tensors per launch). The per-element math is
// the op's functor (step_functors.h), the same as on the CPU.
//
// A thread block takes a tile: each thread advances up to kElemsPerThread elements (new state
// written, the stencil input into shared memory, aux kept in registers), the block fills the
// tile's halo into shared memory, then each thread updates its elements' parameters.
//
// The in-place stencil race (see multi_tensor.h): blocks run in any order, so a tile's halo is
// computed from the old state by a first kernel (halo_kernel) before the second (step_kernel)
// writes anything; a tile that is a whole tensor finds all its neighbours in its own shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda_launch.h"
#include "multi_tensor.h"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

// -- global accesses ----------------------------------------------------------------------------
// A thread moves its elements in chunks of V consecutive elements: V = kVec (16 bytes of storage:
// 4 fp32, 8 bf16/fp16, 2 fp64; one 128-bit load or store per stream and chunk) where a tile's rows
// start on 16-byte boundaries and its width is a multiple of kVec, else V = 1 (the scalar path).
// Every load of a thread's chunks is issued before any of its stores: p, g and the state may alias
// as far as the compiler knows, so interleaved, each store would wait for the loads before it and
// each load for the stores before it (a DRAM round trip per chunk). The accesses are PTX
// ld.global / st.global: the pointers come from the tile table, so the compiler cannot tell they
// are global and would emit generic LD/ST (which test the address space first); volatile, so that
// they stay in the order written (loads, then stores) and none is dropped. tests/test_cuda_build.py
// checks the sm_90 build for LDG.E.128 / STG.E.128 and no generic LD/ST.
template <class Op>
constexpr int kVec = 16 / static_cast<int>(sizeof(Raw<typename Op::Storage>));

__device__ __forceinline__ void ld_global(const void* p, uint16_t& x) {
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(x) : "l"(p));
}
__device__ __forceinline__ void ld_global(const void* p, uint32_t& x) {
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(x) : "l"(p));
}
__device__ __forceinline__ void ld_global(const void* p, unsigned long long& x) {
  asm volatile("ld.global.u64 %0, [%1];" : "=l"(x) : "l"(p));
}
__device__ __forceinline__ void ld_global(const void* p, uint4& x) {
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w) : "l"(p));
}
__device__ __forceinline__ void st_global(void* p, uint16_t x) {
  asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"(x) : "memory");
}
__device__ __forceinline__ void st_global(void* p, uint32_t x) {
  asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}
__device__ __forceinline__ void st_global(void* p, unsigned long long x) {
  asm volatile("st.global.u64 [%0], %1;" ::"l"(p), "l"(x) : "memory");
}
__device__ __forceinline__ void st_global(void* p, uint4 x) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w) : "memory");
}

// The unsigned word of a chunk's bytes.
template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<8> {
  using type = unsigned long long;
};
template <>
struct Word<16> {
  using type = uint4;
};

template <int V, typename R>
__device__ __forceinline__ void load_chunk(const R* from, R (&to)[V]) {
  typename Word<V * sizeof(R)>::type w;
  ld_global(from, w);
  memcpy(to, &w, sizeof(w));
}
template <int V, typename R>
__device__ __forceinline__ void store_chunk(R* to, const R (&from)[V]) {
  typename Word<V * sizeof(R)>::type w;
  memcpy(&w, from, sizeof(w));
  st_global(to, w);
}
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
__device__ __forceinline__ float global_float(const float* p) {
  uint32_t x;
  ld_global(p, x);
  return __uint_as_float(x);
}

// One tensor as a block sees it: typed pointers and the values the op derives from its step count.
template <class Op>
struct DeviceTensor {
  using T = typename Op::Storage;
  using M = typename Op::Math;
  using R = Raw<T>;
  R* p;
  const R* g;
  R* state[3];
  typename Op::TensorScalars k;

  __device__ DeviceTensor(const Op& op, const TensorArgs& t)
      : p(static_cast<R*>(t.p)), g(static_cast<const R*>(t.g)),
        state{static_cast<R*>(t.state[0]), static_cast<R*>(t.state[1]), static_cast<R*>(t.state[2])},
        k(op.scalars(static_cast<double>(global_float(t.step)), stored_value(t))) {}

  // The tensor's stored scalar (TensorArgs::value), 0 where it has none.
  static __device__ __forceinline__ double stored_value(const TensorArgs& t) {
    if (t.value == nullptr) return 0.0;
    R x[1];
    load_chunk<1>(static_cast<const R*>(t.value), x);
    return load<T, double>(x[0]);
  }

  // The stencil input of element i from the old state (the halo pass: nothing is written).
  __device__ __forceinline__ M peek(const Op& op, int64_t i) const {
    R x[1];
    M s[2] = {M(0), M(0)};
    load_chunk<1>(state[0] + i, x);
    s[0] = load<T, M>(x[0]);
    if (Op::kAdvanceStates > 1) {
      load_chunk<1>(state[1] + i, x);
      s[1] = load<T, M>(x[0]);
    }
    M pv = M(0);
    if (Op::kAdvanceReadsParam) {
      load_chunk<1>(p + i, x);
      pv = load<T, M>(x[0]);
    }
    load_chunk<1>(g + i, x);
    M aux;
    return op.advance(k, load<T, M>(x[0]), pv, s, aux);
  }

  // Whether this tensor's streams (p, g and the op's states) are 16-byte aligned.
  __device__ __forceinline__ bool aligned() const {
    bool ok = aligned16(p) && aligned16(g);
    for (int i = 0; i < 3; ++i) ok = ok && (state[i] == nullptr || aligned16(state[i]));
    return ok;
  }
};

// The device scalars, at the start of every kernel: false when the step is skipped (found_inf
// nonzero), else sets the functor's gradient factor to GradScaler.unscale_'s float32(1 / scale)
// and, for capturable steps, its learning rate to the one in device memory.
template <class Op>
__device__ __forceinline__ bool take_device_scalars(Op& op, const DeviceScalars& d) {
  if (d.found_inf != nullptr && *d.found_inf != 0.0f) return false;
  if (d.grad_scale != nullptr) {
    op.grad_factor = typename Op::Math(static_cast<float>(1.0 / static_cast<double>(*d.grad_scale)));
  }
  if (d.lr != nullptr) op.set_lr(static_cast<double>(*d.lr));
  return true;
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
    halo_kernel(Op op, const TensorArgs* tensors, const Tile* tiles, typename Op::Math* halo, DeviceScalars scalars) {
  using M = typename Op::Math;
  if (!take_device_scalars(op, scalars)) return;
  const Tile tile = tiles[blockIdx.x];
  if (tile.halo < 0) return;
  const TensorGrid g = tensors[tile.tensor].grid;
  const DeviceTensor<Op> t(op, tensors[tile.tensor]);
  const HaloLayout h = halo_layout(g, tile);
  const int64_t W = tile.ncols, H = tile.nrows, C = g.cols, R = g.rows;
  const int64_t row_part = is_vertical(g.smooth) ? 2 * (W + 2) : 0;  // rows above and below, corners included
  for (int64_t i = threadIdx.x; i < h.size; i += kThreads) {
    int64_t row, col;
    if (i < row_part) {
      row = i < W + 2 ? (tile.row0 - 1 + R) % R : (tile.row0 + H) % R;
      col = (tile.col0 + i % (W + 2) - 1 + C) % C;
    } else {
      const int64_t j = i - row_part;
      row = tile.row0 + j % H;
      col = j < H ? (tile.col0 - 1 + C) % C : (tile.col0 + W) % C;
    }
    halo[tile.halo + i] = t.peek(op, row * C + col);
  }
}

// The two halves of a tile, in chunks of V elements (see "global accesses" above). ``for_chunk``
// calls f(element offset in the tensor, row in the tile, column in the tile) for the thread's
// chunk c if it lies in the tile; chunks of V > 1 need the tile width to be a multiple of V.
template <int V, class F>
__device__ __forceinline__ void for_chunk(const Tile& tile, int64_t C, int c, const F& f) {
  const int W = static_cast<int>(tile.ncols), n = static_cast<int>(tile.nrows * tile.ncols);
  const int e = (threadIdx.x + c * kThreads) * V;
  if (e < n) {
    const int r = e / W, col = e - r * W;
    f((tile.row0 + r) * C + tile.col0 + col, r, col);
  }
}

// Advance: the new advance states written, the stencil input into shared memory (acc, padded
// rows of pitch elements, the tile's first row at row ``top``), aux kept in registers.
template <int V, class Op>
__device__ __forceinline__ void advance_tile(const Op& op, const DeviceTensor<Op>& t, const Tile& tile, int64_t C,
                                             typename Op::Math* acc, int64_t pitch, int top,
                                             typename Op::Math (&aux)[kElemsPerThread]) {
  using M = typename Op::Math;
  using T = typename Op::Storage;
  using R = Raw<T>;
  constexpr int kChunks = kElemsPerThread / V;
  R g[kChunks][V], p[kChunks][V], s0[kChunks][V], s1[kChunks][V];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // every load first
    for_chunk<V>(tile, C, c, [&](int64_t off, int, int) {
      load_chunk<V>(t.g + off, g[c]);
      if (Op::kAdvanceReadsParam) load_chunk<V>(t.p + off, p[c]);
      load_chunk<V>(t.state[0] + off, s0[c]);
      if (Op::kAdvanceStates > 1) load_chunk<V>(t.state[1] + off, s1[c]);
    });
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    for_chunk<V>(tile, C, c, [&](int64_t, int r, int col) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        M s[2] = {load<T, M>(s0[c][v]), Op::kAdvanceStates > 1 ? load<T, M>(s1[c][v]) : M(0)};
        const M pv = Op::kAdvanceReadsParam ? load<T, M>(p[c][v]) : M(0);
        acc[(r + top) * pitch + col + 1 + v] = op.advance(t.k, load<T, M>(g[c][v]), pv, s, aux[c * V + v]);
        s0[c][v] = store<T>(s[0]);
        if (Op::kAdvanceStates > 1) s1[c][v] = store<T>(s[1]);
      }
    });
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // then the stores
    for_chunk<V>(tile, C, c, [&](int64_t off, int, int) {
      if (Op::kAdvanceWrites > 0) store_chunk<V>(t.state[0] + off, s0[c]);
      if (Op::kAdvanceWrites > 1) store_chunk<V>(t.state[1] + off, s1[c]);
    });
  }
}

// Update: the stencil term from shared memory, aux, p (and g, and the update states) -> the new p.
template <Smooth S, int V, class Op>
__device__ __forceinline__ void update_tile(const Op& op, const Coupling<typename Op::Math>& cp,
                                            const DeviceTensor<Op>& t, const Tile& tile, int64_t C,
                                            const typename Op::Math* acc, int64_t pitch, int top,
                                            const typename Op::Math (&aux)[kElemsPerThread]) {
  using M = typename Op::Math;
  using T = typename Op::Storage;
  using R = Raw<T>;
  constexpr int kChunks = kElemsPerThread / V;
  R* u0 = Op::kUpdateStates > 0 ? t.state[Op::kUpdateFirst] : nullptr;
  R* u1 = Op::kUpdateStates > 1 ? t.state[Op::kUpdateFirst + 1] : nullptr;
  R p[kChunks][V], g[kChunks][V], w0[kChunks][V], w1[kChunks][V];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // every load first
    for_chunk<V>(tile, C, c, [&](int64_t off, int, int) {
      load_chunk<V>(t.p + off, p[c]);
      if (Op::kUpdateReadsGrad) load_chunk<V>(t.g + off, g[c]);
      if (Op::kUpdateStates > 0) load_chunk<V>(u0 + off, w0[c]);
      if (Op::kUpdateStates > 1) load_chunk<V>(u1 + off, w1[c]);
    });
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    for_chunk<V>(tile, C, c, [&](int64_t, int r, int col) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const M* mid = acc + (r + top) * pitch + col + v;
        const M* up = is_vertical(S) ? mid - pitch : mid;
        const M* down = is_vertical(S) ? mid + pitch : mid;
        const M term = stencil_term<S>(op, up, mid, down, cp);
        M u[2] = {Op::kUpdateStates > 0 ? load<T, M>(w0[c][v]) : M(0),
                  Op::kUpdateStates > 1 ? load<T, M>(w1[c][v]) : M(0)};
        const M gv = Op::kUpdateReadsGrad ? load<T, M>(g[c][v]) : M(0);
        p[c][v] = store<T>(op.update(t.k, load<T, M>(p[c][v]), aux[c * V + v], term, u, gv));
        if (Op::kUpdateStates > 0) w0[c][v] = store<T>(u[0]);
        if (Op::kUpdateStates > 1) w1[c][v] = store<T>(u[1]);
      }
    });
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // then the stores
    for_chunk<V>(tile, C, c, [&](int64_t off, int, int) {
      store_chunk<V>(t.p + off, p[c]);
      if (Op::kUpdateStates > 0) store_chunk<V>(u0 + off, w0[c]);
      if (Op::kUpdateStates > 1) store_chunk<V>(u1 + off, w1[c]);
    });
  }
}

template <Smooth S, class Op, typename M>
__device__ __forceinline__ void update_any(bool chunked, const Op& op, const Coupling<M>& c, const DeviceTensor<Op>& t,
                                           const Tile& tile, int64_t C, const M* acc, int64_t pitch, int top,
                                           const M (&aux)[kElemsPerThread]) {
  if (chunked) {
    update_tile<S, kVec<Op>>(op, c, t, tile, C, acc, pitch, top, aux);
  } else {
    update_tile<S, 1>(op, c, t, tile, C, acc, pitch, top, aux);
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads) step_kernel(Op op, Coupling<typename Op::Math> coupling,
                                                        const TensorArgs* tensors, const Tile* tiles,
                                                        const typename Op::Math* halo, DeviceScalars scalars) {
  using M = typename Op::Math;
  if (!take_device_scalars(op, scalars)) return;  // uniform over the block: before any barrier
  extern __shared__ __align__(16) unsigned char smem[];
  M* acc = reinterpret_cast<M*>(smem);  // the tile's stencil input, padded by its halo
  const Tile tile = tiles[blockIdx.x];
  const TensorGrid g = tensors[tile.tensor].grid;
  const DeviceTensor<Op> t(op, tensors[tile.tensor]);
  const int64_t C = g.cols, W = tile.ncols, H = tile.nrows, pitch = W + 2;
  const bool vertical = is_vertical(g.smooth), full_width = W == C;
  const int top = vertical ? 1 : 0;

  // Uniform over the block: the 128-bit path where the tile's rows are aligned chunks.
  constexpr int V = kVec<Op>;
  const bool chunked = W % V == 0 && C % V == 0 && tile.col0 % V == 0 && t.aligned();
  M aux[kElemsPerThread];
  if (chunked) {
    advance_tile<V>(op, t, tile, C, acc, pitch, top, aux);
  } else {
    advance_tile<1>(op, t, tile, C, acc, pitch, top, aux);
  }
  if (has_stencil(g.smooth)) {
    const HaloLayout h = halo_layout(g, tile);
    const M* own = tile.halo >= 0 ? halo + tile.halo : nullptr;
    if (own) {
      if (vertical) {
        for (int64_t i = threadIdx.x; i < pitch; i += kThreads) {
          acc[i] = own[h.top + i];
          acc[(H + 1) * pitch + i] = own[h.bottom + i];
        }
      }
      if (!full_width) {
        for (int64_t r = threadIdx.x; r < H; r += kThreads) {
          acc[(r + top) * pitch] = own[h.left + r];
          acc[(r + top) * pitch + W + 1] = own[h.right + r];
        }
      }
    }
    __syncthreads();
    if (full_width) {  // the left and right neighbours wrap around within the row
      for (int64_t r = threadIdx.x; r < H; r += kThreads) {
        acc[(r + top) * pitch] = acc[(r + top) * pitch + W];
        acc[(r + top) * pitch + W + 1] = acc[(r + top) * pitch + 1];
      }
    }
    __syncthreads();
    if (vertical && !own) {  // the tile is the whole tensor: row 0 is below the last row
      for (int64_t i = threadIdx.x; i < pitch; i += kThreads) {
        acc[i] = acc[H * pitch + i];
        acc[(H + 1) * pitch + i] = acc[pitch + i];
      }
    }
    __syncthreads();
  }
  switch (g.smooth) {
    case Smooth::kNone: update_any<Smooth::kNone>(chunked, op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kClamp: update_any<Smooth::kClamp>(chunked, op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kLine: update_any<Smooth::kLine>(chunked, op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kFive: update_any<Smooth::kFive>(chunked, op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kNine: update_any<Smooth::kNine>(chunked, op, coupling, t, tile, C, acc, pitch, top, aux); break;
  }
}

// The halo pass (when some tensor spans several tiles), then the step, on the caller's stream.
template <class Op>
cudaError_t launch(const Op& op, double c2, const LaunchArgs& a) {
  using M = typename Op::Math;
  if (a.n_tiles == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(a.n_tiles);
  if (a.halo) {
    halo_kernel<Op><<<blocks, kThreads, 0, a.stream>>>(op, a.tensors, a.tiles, static_cast<M*>(a.halo), a.scalars);
  }
  step_kernel<Op><<<blocks, kThreads, a.smem_bytes, a.stream>>>(op, Coupling<M>(c2), a.tensors, a.tiles,
                                                               static_cast<const M*>(a.halo), a.scalars);
  return cudaGetLastError();
}

// Calls f(T{}, M{}) with the storage and math types of the launch's dtype.
template <class F>
cudaError_t dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{}, float{});
    case DType::kDouble: return f(double{}, double{});
    case DType::kBFloat16: return f(bf16{}, float{});
    case DType::kHalf: return f(fp16{}, float{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastopt
