// LAdam step, mode wave_variance, CPU: m's EMA, the damped leapfrog wave equation of v (its
// Laplacian that of the old v) and the parameter update fused, one pass over memory per tensor
// (multi_tensor_cpu.h). Math: fastopt/reference/ladam.py::ladam_wave_step_reference, per element in
// LAdamWaveStepFunctor (step_functors.h).
//
// The background level E0^2 (wave_E0 == 0): the mean of a tensor's g^2 at its first step, recorded
// in wave_e0_sqs. It is a reduction over the whole tensor, so it is computed here, before the fused
// pass, by mean_square; later steps read it back.
#include <ATen/Parallel.h>

#include <vector>

#include "multi_tensor_cpu.h"
#include "ops.h"
#include "step_functors.h"
#include "tensor_lists.h"

namespace fastopt {
namespace {

// mean((g * factor)^2) of n elements, g^2 rounded in the math type as the reference rounds it.
// Summed in double, in chunks of a fixed size added in a fixed order: the same bits on any number
// of threads (torch's mean, which the reference calls, splits its sum by the thread count, so its
// last bit does; the two agree to within an ulp of the math type).
template <typename T, typename M>
M mean_square(const Raw<T>* g, int64_t n, M factor, bool scaled) {
  constexpr int64_t kChunk = int64_t{1} << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0;
      const int64_t stop = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < stop; ++i) {
        M x = load<T, M>(g[i]);
        if (scaled) x = x * factor;
        const M sq = x * x;
        sum += static_cast<double>(sq);
      }
      partial[static_cast<size_t>(c)] = sum;
    }
  });
  double total = 0;
  for (double s : partial) total += s;
  return static_cast<M>(total / static_cast<double>(n));
}

}  // namespace

void ladam_wave_step_cpu(FASTOPT_LADAM_WAVE_STEP_ARGS) {
  const char* op = "ladam_wave_step";
  const StepTensors st = prepare_step(
      op, c10::DeviceType::CPU, params, grads,
      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"prev_exp_avg_sqs", prev_exp_avg_sqs}}, steps, use_laps,
      stencil, /*steps_on_device=*/false);
  check_scalar_states(op, "wave_e0_sqs", wave_e0_sqs, params);
  const HostInputs in = read_inputs(op, st, grad_scale, found_inf, lr_tensor, lr);
  if (in.skip) return;  // a non-finite gradient under AMP: the step is a no-op
  const std::vector<double> counts = step_counts(steps);
  std::vector<double> stored(st.size());
  FASTOPT_DISPATCH_FLOATING(st.dtype, op, {
    using R = Raw<scalar_t>;
    for (size_t i = 0; i < st.size(); ++i) {
      R* e0 = data_of<R>(wave_e0_sqs[i]);
      if (wave_E0 == 0 && counts[i] == 1) {  // the first step records the background level
        *e0 = store<scalar_t>(mean_square<scalar_t, math_t>(data_of<const R>(st.grads[i]), st.grads[i].numel(),
                                                             math_t(in.grad_factor), grad_scale.has_value()));
      }
      stored[i] = load<scalar_t, double>(*e0);
    }
    cpu::run_step(LAdamWaveStepFunctor<scalar_t, math_t>(in.lr, beta1, eps, weight_decay, wave_dt, wave_kappa, wave_E0,
                                                         wave_damping),
                  c2, st, {exp_avgs, exp_avg_sqs, prev_exp_avg_sqs}, steps, in.grad_factor, &stored);
  });
  st.write_back();
}

}  // namespace fastopt
