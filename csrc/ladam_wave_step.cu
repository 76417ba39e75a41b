// LAdam step, mode wave_variance, CUDA: m's EMA, the damped leapfrog wave equation of v (its
// Laplacian that of the old v) and the parameter update fused, every tensor in one launch (plus the
// halo pre-pass where a tensor spans several tiles; multi_tensor_cuda.cuh). Math:
// fastopt/reference/ladam.py::ladam_wave_step_reference, per element in LAdamWaveStepFunctor
// (step_functors.h), shared with the CPU kernel (ladam_wave_step_cpu.cpp).
//
// Where wave_E0 is 0, the first step's E0^2 (the mean of g^2) is reduced first: ladam_wave_e0.cuh.
#include "cuda_launch.h"
#include "ladam_wave_e0.cuh"
#include "multi_tensor_cuda.cuh"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

cudaError_t launch_ladam_wave_step(const LaunchArgs& a, const WaveArgs& w) {
  return dispatch_dtype(a.dtype, [&](auto t, auto m) {
    using Op = LAdamWaveStepFunctor<decltype(t), decltype(m)>;
    const Op op(w.lr, w.beta1, w.eps, w.weight_decay, w.dt, w.kappa, w.e0, w.damping);
    if (w.partials != nullptr && a.n_tiles > 0) {
      e0_partial_kernel<Op><<<static_cast<unsigned>(a.n_tiles), kThreads, 0, a.stream>>>(op, a.tensors, a.tiles,
                                                                                      w.partials, a.scalars);
      e0_finish_kernel<Op><<<static_cast<unsigned>(w.n_tensors), kThreads, 0, a.stream>>>(
          op, a.tensors, a.tiles, a.n_tiles, w.partials, a.scalars);
    }
    return launch(op, w.c2, a);
  });
}

}  // namespace cuda
}  // namespace fastopt
