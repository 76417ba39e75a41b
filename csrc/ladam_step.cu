// LAdam step (mode variance_lap), CUDA: moments, Laplacian-smoothed variance and parameter
// update fused, every tensor in one launch (plus the halo pre-pass where a tensor spans several
// tiles; multi_tensor_cuda.cuh). Math: fastopt/reference/ladam.py::ladam_step_reference, per
// element in LAdamStepFunctor (step_functors.h), shared with the CPU kernel.
#include "cuda_launch.h"
#include "multi_tensor_cuda.cuh"
#include "step_functors.h"

namespace fastopt {
namespace cuda {

cudaError_t launch_ladam_step(const LaunchArgs& a, double lr, double beta1, double beta2, double eps,
                              double weight_decay, double c2) {
  return dispatch_dtype(a.dtype, [&](auto t, auto m) {
    return launch(LAdamStepFunctor<decltype(t), decltype(m)>(lr, beta1, beta2, eps, weight_decay), c2, a);
  });
}

}  // namespace cuda
}  // namespace fastopt
