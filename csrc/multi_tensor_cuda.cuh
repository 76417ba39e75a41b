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

#include "cuda_launch.h"
#include "multi_tensor.h"

namespace fastopt {
namespace cuda {

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
        k(op.scalars(static_cast<double>(*t.step))) {}

  // The stencil input of element i from the old state; the new state is written when Write.
  template <bool Write>
  __device__ __forceinline__ M advance(const Op& op, int64_t i, M& aux) const {
    M s[2] = {load<T, M>(state[0][i]), Op::kAdvanceStates > 1 ? load<T, M>(state[1][i]) : M(0)};
    const M acc = op.advance(k, load<T, M>(g[i]), s, aux);
    if (Write) {
      state[0][i] = store<T>(s[0]);
      if (Op::kAdvanceStates > 1) state[1][i] = store<T>(s[1]);
    }
    return acc;
  }

  template <Smooth S>
  __device__ __forceinline__ void update(const Op& op, const Coupling<M>& c, int64_t i, M aux, const M* up,
                                         const M* mid, const M* down) const {
    const M smooth = smoothed<S>(up, mid, down, c, op.floor());
    R* u0 = Op::kUpdateStates ? state[Op::kAdvanceStates] : nullptr;
    M u[1] = {Op::kUpdateStates ? load<T, M>(u0[i]) : M(0)};
    p[i] = store<T>(op.update(k, load<T, M>(p[i]), aux, smooth, u));
    if (Op::kUpdateStates) u0[i] = store<T>(u[0]);
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
    M unused;
    halo[tile.halo + i] = t.template advance<false>(op, row * C + col, unused);
  }
}

template <Smooth S, class Op, typename M>
__device__ __forceinline__ void update_tile(const Op& op, const Coupling<M>& c, const DeviceTensor<Op>& t,
                                            const Tile& tile, int64_t C, const M* acc, int64_t pitch, int top,
                                            const M (&aux)[kElemsPerThread]) {
  const int n = static_cast<int>(tile.nrows * tile.ncols), W = static_cast<int>(tile.ncols);
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    if (idx < n) {
      const int r = idx / W, col = idx - r * W;
      const M* mid = acc + (r + top) * pitch + col;
      const M* up = is_vertical(S) ? mid - pitch : mid;
      const M* down = is_vertical(S) ? mid + pitch : mid;
      t.template update<S>(op, c, (tile.row0 + r) * C + tile.col0 + col, aux[k], up, mid, down);
    }
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
  const int n = static_cast<int>(H * W);

  M aux[kElemsPerThread];
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    if (idx < n) {
      const int r = idx / static_cast<int>(W), col = idx - r * static_cast<int>(W);
      acc[(r + top) * pitch + col + 1] = t.template advance<true>(op, (tile.row0 + r) * C + tile.col0 + col, aux[k]);
    }
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
    case Smooth::kNone: update_tile<Smooth::kNone>(op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kClamp: update_tile<Smooth::kClamp>(op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kLine: update_tile<Smooth::kLine>(op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kFive: update_tile<Smooth::kFive>(op, coupling, t, tile, C, acc, pitch, top, aux); break;
    case Smooth::kNine: update_tile<Smooth::kNine>(op, coupling, t, tile, C, acc, pitch, top, aux); break;
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
