// LAdaGrad step, CPU: accumulator, Laplacian-smoothed denominator and parameter update fused,
// one pass over memory per tensor (multi_tensor_cpu.h). Math:
// fastopt/reference/siblings.py::ladagrad_step_reference, per element in LAdaGradStepFunctor.
#include "multi_tensor_cpu.h"
#include "ops.h"
#include "step_functors.h"
#include "tensor_lists.h"

namespace fastopt {

void ladagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                       const c10::List<bool>& use_laps, double lr, double lr_decay, double eps, double weight_decay,
                       double c2, c10::string_view stencil,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor) {
  const StepTensors st = prepare_step("ladagrad_step", c10::DeviceType::CPU, params, grads,
                                      {{"state_sums", state_sums}}, steps, use_laps, stencil,
                                      /*steps_on_device=*/false);
  const HostInputs in = read_inputs("ladagrad_step", st, grad_scale, found_inf, lr_tensor, lr);
  if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
  FASTOPT_DISPATCH_FLOATING(st.dtype, "ladagrad_step",
                            cpu::run_step(LAdaGradStepFunctor<scalar_t, math_t>(in.lr, lr_decay, eps, weight_decay), c2,
                                          st, {state_sums}, steps, in.grad_factor));
  st.write_back();
}

}  // namespace fastopt
