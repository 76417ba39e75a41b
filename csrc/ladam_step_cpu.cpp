// LAdam step (mode variance_lap), CPU: moments, Laplacian-smoothed variance and parameter update
// fused, one pass over memory per tensor (multi_tensor_cpu.h). Math:
// fastopt/reference/ladam.py::ladam_step_reference, per element in LAdamStepFunctor.
#include "multi_tensor_cpu.h"
#include "ops.h"
#include "step_functors.h"
#include "tensor_lists.h"

namespace fastopt {

void ladam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, const c10::List<bool>& use_laps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c2,
                    c10::string_view stencil,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor) {
  const StepTensors st = prepare_step("ladam_step", c10::DeviceType::CPU, params, grads,
                                      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps, use_laps,
                                      stencil, /*steps_on_device=*/false);
  const HostInputs in = read_inputs("ladam_step", st, grad_scale, found_inf, lr_tensor, lr);
  if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
  FASTOPT_DISPATCH_FLOATING(st.dtype, "ladam_step",
                            cpu::run_step(LAdamStepFunctor<scalar_t, math_t>(in.lr, beta1, beta2, eps, weight_decay), c2,
                                          st, {exp_avgs, exp_avg_sqs}, steps, in.grad_factor));
  st.write_back();
}

}  // namespace fastopt
