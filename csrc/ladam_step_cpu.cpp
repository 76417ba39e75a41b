// LAdam steps with an EMA second moment, CPU: modes variance_lap (ladam_step), update_lap and
// weight_lap. Moments, the stencil and the parameter update fused, one pass over memory per tensor
// (multi_tensor_cpu.h). Math: fastopt/reference/ladam.py (ladam_step_reference,
// ladam_update_lap_step_reference, ladam_weight_lap_step_reference), per element in the functors
// LAdamStepFunctor, LAdamUpdateLapStepFunctor and LAdamWeightLapStepFunctor (step_functors.h).
#include "multi_tensor_cpu.h"
#include "ops.h"
#include "step_functors.h"
#include "tensor_lists.h"

namespace fastopt {
namespace {

// The three modes take the same tensors and hyperparameters; only the functor differs.
template <template <typename, typename> class Functor>
void run_ladam_mode(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, const c10::List<bool>& use_laps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c2, c10::string_view stencil,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor) {
  const StepTensors st = prepare_step(op, c10::DeviceType::CPU, params, grads,
                                      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps, use_laps, stencil,
                                      /*steps_on_device=*/false);
  const HostInputs in = read_inputs(op, st, grad_scale, found_inf, lr_tensor, lr);
  if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
  FASTOPT_DISPATCH_FLOATING(st.dtype, op,
                            cpu::run_step(Functor<scalar_t, math_t>(in.lr, beta1, beta2, eps, weight_decay), c2, st,
                                          {exp_avgs, exp_avg_sqs}, steps, in.grad_factor));
  st.write_back();
}

}  // namespace

void ladam_step_cpu(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode<LAdamStepFunctor>("ladam_step", params, grads, exp_avgs, exp_avg_sqs, steps, use_laps, lr, beta1,
                                   beta2, eps, weight_decay, c2, stencil, grad_scale, found_inf, lr_tensor);
}

void ladam_update_lap_step_cpu(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode<LAdamUpdateLapStepFunctor>("ladam_update_lap_step", params, grads, exp_avgs, exp_avg_sqs, steps,
                                            use_laps, lr, beta1, beta2, eps, weight_decay, c2, stencil, grad_scale,
                                            found_inf, lr_tensor);
}

void ladam_weight_lap_step_cpu(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode<LAdamWeightLapStepFunctor>("ladam_weight_lap_step", params, grads, exp_avgs, exp_avg_sqs, steps,
                                            use_laps, lr, beta1, beta2, eps, weight_decay, c2, stencil, grad_scale,
                                            found_inf, lr_tensor);
}

}  // namespace fastopt
