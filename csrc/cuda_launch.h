// What the thin host code (cuda_host.cpp, with torch) hands to the CUDA kernels (*.cu, without
// torch): raw pointers, the tile plan of multi_tensor.h, launch settings. Keeping torch out of the
// .cu files lets nvcc compile them wherever the CUDA toolkit is, even beside a CPU-only torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "multi_tensor.h"

namespace fastopt {
namespace cuda {

// One thread block per tile; each thread keeps kElemsPerThread elements in registers between
// the two halves of the step (advance, then the stencil and the update).
constexpr int kThreads = 256;
constexpr int kElemsPerThread = 16;
constexpr int64_t kTileElems = int64_t(kThreads) * kElemsPerThread;
// 2-D tiles of up to 32 x 128 (with halo, 34 x 130 values in shared memory: 35 KB in double),
// 1-D and elementwise tiles of up to 4096 elements; column cuts on multiples of 8 elements, so
// that tiles of aligned tensors start on 16-byte boundaries (the 128-bit path, multi_tensor_cuda.cuh).
constexpr TilingPolicy kPolicy{128, kTileElems, kTileElems, 32, 8};
static_assert(kPolicy.max_cols % kPolicy.align == 0 && kTileElems % kPolicy.align == 0,
              "tile widths must be multiples of the column alignment");
static_assert(kElemsPerThread % 8 == 0, "a thread's elements must split into 128-bit chunks of every dtype");
static_assert(kPolicy.max_cols * kPolicy.max_rows <= kTileElems, "2-D tiles must fit the block");
static_assert(kPolicy.max_line_cols <= kTileElems && kPolicy.target_elems <= kTileElems,
              "1-D and elementwise tiles must fit the block");

enum class DType : int32_t { kFloat, kDouble, kBFloat16, kHalf };

// One tensor of the step: its storage, its step count (on the device) and its grid.
struct TensorArgs {
  void* p;
  const void* g;
  void* state[3];     // the op's state tensors in the order of its signature: advance states, then update states
  void* value;        // one element of the storage type, handed to the functor's scalars(): wave_variance's E0^2;
                      // nullptr for the other ops (scalars() then gets 0)
  const float* step;  // incremented step count
  TensorGrid grid;
};

// The step's scalars in device memory, read in-kernel; nullptr when the step has none. AMP
// (fastopt/reference/_amp.py): the loss scale, and whether some gradient was inf/NaN (nonzero:
// every kernel returns at once). lr: the learning rate of a capturable step, replacing the one the
// launch was given.
struct DeviceScalars {
  const float* grad_scale;
  const float* found_inf;
  const float* lr;
};

// One launch: device pointers to the tensor table, the tiles and the halo scratch.
struct LaunchArgs {
  const TensorArgs* tensors;
  const Tile* tiles;
  int64_t n_tiles;
  void* halo;           // MATH_T values; nullptr when no tile needs a halo pre-pass
  int64_t smem_bytes;   // shared memory per block
  DType dtype;
  cudaStream_t stream;
  DeviceScalars scalars;
};

// Each returns cudaGetLastError() after its launches.
cudaError_t launch_ladam_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                              double weight_decay, double c2);
cudaError_t launch_ladam_update_lap_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                                         double weight_decay, double c2);
cudaError_t launch_ladam_weight_lap_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                                         double weight_decay, double c2);
// LAdam wave_variance: the wave equation's constants. Where wave_E0 is 0, each tensor's E0^2 (TensorArgs::value)
// is recorded at its first step, the mean of its g^2 (a reduction before the step kernel, with ``partials``: one
// double per tile); ``partials`` is nullptr where wave_E0 is not 0.
struct WaveArgs {
  double lr, beta1, eps, weight_decay, c2, dt, kappa, e0, damping;
  int64_t n_tensors;
  double* partials;
};
cudaError_t launch_ladam_wave_step(const LaunchArgs& a, const WaveArgs& w);
cudaError_t launch_ladagrad_step(const LaunchArgs& a, double lr, double lr_decay, double eps, double weight_decay,
                                 double c2);
cudaError_t launch_lrmsprop_step(const LaunchArgs& a, double lr, double alpha, double eps, double weight_decay,
                                 double momentum, double c2);

// jacobian_products: out[lower] += scale * a^T a (+ diag shift). a is (k, m) of dtype's storage
// type, out (m, m) and shift (m, contiguous) of its math type (fp32, fp64 for fp64).
struct JacobianProductsArgs {
  const void* a;
  int64_t k, m, stride_ak, stride_am;
  void* out;
  int64_t stride_oi, stride_oj;
  const void* shift;  // nullptr: no shift
  DType dtype;        // a's
  cudaStream_t stream;
};

// batched_gram: jtj (batch, p, p) and jtr (batch, p), contiguous, of jac's dtype.
struct BatchedGramArgs {
  const void* jac;
  const void* res;
  int64_t batch, n, p, stride_jb, stride_jn, stride_jp, stride_rb, stride_rn;
  void* jtj;
  void* jtr;
  DType dtype;
  cudaStream_t stream;
};

cudaError_t launch_jacobian_products(const JacobianProductsArgs& args, double scale);
cudaError_t launch_batched_gram(const BatchedGramArgs& args);

}  // namespace cuda
}  // namespace fastopt
