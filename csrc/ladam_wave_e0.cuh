// LAdam wave_variance's background level E0^2 on CUDA (wave_E0 == 0): the mean of a tensor's g^2
// at its first step, recorded in its wave_e0_sq (TensorArgs::value) and read back by every later
// step. A reduction over the whole tensor, so two kernels run before the step (ladam_wave_step.cu):
// e0_partial_kernel sums each tile's g^2 (one block per tile), and e0_finish_kernel adds a tensor's
// tile sums and stores the mean (one block per tensor). Both test the step count in-kernel (a
// tensor records at its first step only, the others return at once), so the host reads nothing
// from the device and the step stays capturable.
//
// Deterministic: each thread sums a fixed set of elements in double, in order, and the block adds
// the threads' sums in a fixed tree, so the result does not depend on how blocks are scheduled. It
// may differ from the CPU's (ladam_wave_step_cpu.cpp sums chunks of 2^14 elements) in the last bits
// of the double sum; both are rounded to the math type once, so they agree to an ulp of it.
#pragma once

#include "cuda_launch.h"
#include "multi_tensor_cuda.cuh"

namespace fastopt {
namespace cuda {

// Whether a tensor records its E0^2 in this step: at its first step (the kernels below are launched
// only where wave_E0 is 0).
__device__ __forceinline__ bool records_e0(const TensorArgs& t) { return global_float(t.step) == 1.0f; }

// The sum of the block's ``x``, added in a fixed tree (pairs at distance kThreads / 2, then half
// that, ...): the same bits on every run. Every thread of the block must call it.
__device__ __forceinline__ double block_sum(double x) {
  static_assert((kThreads & (kThreads - 1)) == 0, "the tree needs a power-of-two block");
  __shared__ double sums[kThreads];
  sums[threadIdx.x] = x;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  return sums[0];
}

// partials[tile] = sum over the tile's elements of (g * grad_factor)^2, the square rounded in the
// math type (as the reference's g * g), the sum in double.
template <class Op>
__global__ void __launch_bounds__(kThreads)
    e0_partial_kernel(Op op, const TensorArgs* tensors, const Tile* tiles, double* partials, DeviceScalars scalars) {
  using T = typename Op::Storage;
  using M = typename Op::Math;
  using R = Raw<T>;
  if (!take_device_scalars(op, scalars)) return;  // a skipped step (AMP) records nothing
  const Tile tile = tiles[blockIdx.x];
  const TensorArgs& t = tensors[tile.tensor];
  if (!records_e0(t)) return;  // uniform over the block
  const R* g = static_cast<const R*>(t.g);
  const int64_t C = t.grid.cols, W = tile.ncols, n = tile.nrows * tile.ncols;
  double sum = 0.0;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t r = e / W;
    R x[1];
    load_chunk<1>(g + (tile.row0 + r) * C + tile.col0 + (e - r * W), x);
    const M u = op.unscaled(load<T, M>(x[0]));
    const M sq = u * u;
    sum += static_cast<double>(sq);
  }
  const double total = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// The first tile of ``tensor`` in the table (tiles are listed tensor by tensor), or n_tiles.
__device__ __forceinline__ int64_t first_tile(const Tile* tiles, int64_t n_tiles, int64_t tensor) {
  int64_t lo = 0, hi = n_tiles;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (tiles[mid].tensor < tensor) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A tensor's E0^2: the sum of its tiles' partials over its numel, rounded to the math type, then
// stored in the tensor's dtype (as the CPU kernel stores it).
template <class Op>
__global__ void __launch_bounds__(kThreads)
    e0_finish_kernel(Op op, const TensorArgs* tensors, const Tile* tiles, int64_t n_tiles, const double* partials,
                     DeviceScalars scalars) {
  using T = typename Op::Storage;
  using M = typename Op::Math;
  using R = Raw<T>;
  if (!take_device_scalars(op, scalars)) return;
  const int64_t tensor = blockIdx.x;
  const TensorArgs& t = tensors[tensor];
  if (!records_e0(t)) return;
  const int64_t first = first_tile(tiles, n_tiles, tensor), last = first_tile(tiles, n_tiles, tensor + 1);
  double sum = 0.0;
  for (int64_t i = first + threadIdx.x; i < last; i += kThreads) sum += partials[i];
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    const double numel = static_cast<double>(t.grid.rows) * static_cast<double>(t.grid.cols);
    const R out[1] = {store<T>(static_cast<M>(total / numel))};
    store_chunk<1>(static_cast<R*>(t.value), out);
  }
}

}  // namespace cuda
}  // namespace fastopt
