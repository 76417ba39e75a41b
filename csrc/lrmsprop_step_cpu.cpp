// LRMSProp step (with or without momentum), CPU: running average, Laplacian-smoothed
// denominator, momentum buffer and parameter update fused, one pass over memory per tensor
// (multi_tensor_cpu.h). Math: fastopt/reference/siblings.py::lrmsprop_step_reference, per element
// in LRMSPropStepFunctor.
#include "multi_tensor_cpu.h"
#include "ops.h"
#include "step_functors.h"
#include "tensor_lists.h"

namespace fastopt {

void lrmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList momentum_buffers, at::TensorList steps, const c10::List<bool>& use_laps,
                       double lr, double alpha, double eps, double weight_decay, double momentum, double c2,
                       c10::string_view stencil,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor) {
  // The reference passes momentum_buffers=None without momentum; here that is an empty list.
  if (momentum > 0) {
    const StepTensors st = prepare_step("lrmsprop_step", c10::DeviceType::CPU, params, grads,
                                        {{"square_avgs", square_avgs}, {"momentum_buffers", momentum_buffers}},
                                        steps, use_laps, stencil, /*steps_on_device=*/false);
    const HostInputs in = read_inputs("lrmsprop_step", st, grad_scale, found_inf, lr_tensor, lr);
    if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
    FASTOPT_DISPATCH_FLOATING(
        st.dtype, "lrmsprop_step",
        cpu::run_step(LRMSPropStepFunctor<scalar_t, math_t, true>(in.lr, alpha, eps, weight_decay, momentum), c2, st,
                      {square_avgs, momentum_buffers}, steps, in.grad_factor));
    st.write_back();
  } else {
    const StepTensors st = prepare_step("lrmsprop_step", c10::DeviceType::CPU, params, grads,
                                        {{"square_avgs", square_avgs}}, steps, use_laps, stencil,
                                        /*steps_on_device=*/false);
    const HostInputs in = read_inputs("lrmsprop_step", st, grad_scale, found_inf, lr_tensor, lr);
    if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
    FASTOPT_DISPATCH_FLOATING(
        st.dtype, "lrmsprop_step",
        cpu::run_step(LRMSPropStepFunctor<scalar_t, math_t, false>(in.lr, alpha, eps, weight_decay, momentum), c2, st,
                      {square_avgs}, steps, in.grad_factor));
    st.write_back();
  }
}

}  // namespace fastopt
