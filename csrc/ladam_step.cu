// LAdam steps with an EMA second moment, CUDA: modes variance_lap (ladam_step), update_lap and
// weight_lap. Moments, the stencil and the parameter update fused, every tensor in one launch (plus
// the halo pre-pass where a tensor spans several tiles; multi_tensor_cuda.cuh). Math:
// fastopt/reference/ladam.py, per element in the functors of step_functors.h, shared with the CPU
// kernels.
#include "cuda_launch.h"
#include "multi_tensor_cuda.cuh"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

namespace {

// The LAdam modes with an EMA of g^2 take the same arguments; only the functor differs.
template <template <typename, typename> class Functor>
cudaError_t launch_ladam_mode(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                              double weight_decay, double c2) {
  return dispatch_dtype(a.dtype, [&](auto t, auto m) {
    return launch(Functor<decltype(t), decltype(m)>(lr, beta1, beta2, eps, weight_decay), c2, a);
  });
}

}  // namespace

cudaError_t launch_ladam_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                              double weight_decay, double c2) {
  return launch_ladam_mode<LAdamStepFunctor>(a, lr, beta1, beta2, eps, weight_decay, c2);
}

cudaError_t launch_ladam_update_lap_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                                         double weight_decay, double c2) {
  return launch_ladam_mode<LAdamUpdateLapStepFunctor>(a, lr, beta1, beta2, eps, weight_decay, c2);
}

cudaError_t launch_ladam_weight_lap_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                                         double weight_decay, double c2) {
  return launch_ladam_mode<LAdamWeightLapStepFunctor>(a, lr, beta1, beta2, eps, weight_decay, c2);
}

}  // namespace cuda
}  // namespace fastopt
