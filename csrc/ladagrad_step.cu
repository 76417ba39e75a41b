// LAdaGrad step, CUDA: accumulator, Laplacian-smoothed denominator and parameter update fused,
// every tensor in one launch (multi_tensor_cuda.cuh). Math:
// fastopt/reference/siblings.py::ladagrad_step_reference, per element in LAdaGradStepFunctor
// (step_functors.h), shared with the CPU kernel.
#include "cuda_launch.h"
#include "multi_tensor_cuda.cuh"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

cudaError_t launch_ladagrad_step(const LaunchArgs& a, double lr, double lr_decay, double eps, double weight_decay,
                                 double c2) {
  return dispatch_dtype(a.dtype, [&](auto t, auto m) {
    return launch(LAdaGradStepFunctor<decltype(t), decltype(m)>(lr, lr_decay, eps, weight_decay), c2, a);
  });
}

}  // namespace cuda
}  // namespace fastopt
