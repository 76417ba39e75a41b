// LRMSProp step (with or without momentum), CUDA: running average, Laplacian-smoothed
// denominator, momentum buffer and parameter update fused, every tensor in one launch
// (multi_tensor_cuda.cuh). Math: fastopt/reference/siblings.py::lrmsprop_step_reference, per
// element in LRMSPropStepFunctor (step_functors.h), shared with the CPU kernel.
#include "cuda_launch.h"
#include "multi_tensor_cuda.cuh"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

cudaError_t launch_lrmsprop_step(const LaunchArgs& a, double lr, double alpha, double eps, double weight_decay,
                                 double momentum, double c2) {
  return dispatch_dtype(a.dtype, [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    if (momentum > 0) return launch(LRMSPropStepFunctor<T, M, true>(lr, alpha, eps, weight_decay, momentum), c2, a);
    return launch(LRMSPropStepFunctor<T, M, false>(lr, alpha, eps, weight_decay, momentum), c2, a);
  });
}

}  // namespace cuda
}  // namespace fastopt
