// The host entries of fastopt._C, registered as torch.ops.fastopt.<op> by bindings.cpp.
// Each has the signature of fastopt.reference's <op>_reference (lists of tensors of one device
// and dtype, then the hyperparameters); <op>_cpu runs on CPU tensors, <op>_cuda on CUDA ones.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastopt {

// The optional device scalars of every step op: the AMP inputs grad_scale and found_inf
// (fastopt/reference/_amp.py) and lr_tensor, a learning rate that replaces ``lr`` (capturable
// steps); each a 1-element float32 tensor on the params' device (CPU kernels read them on the
// host, CUDA kernels in-kernel).
#define FASTOPT_DEVICE_SCALARS                                                              \
  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, \
      const std::optional<at::Tensor>& lr_tensor
#define FASTOPT_LADAM_STEP_ARGS                                                                            \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,       \
      at::TensorList steps, const c10::List<bool>& use_laps, double lr, double beta1, double beta2,       \
      double eps, double weight_decay, double c2, c10::string_view stencil, FASTOPT_DEVICE_SCALARS
// LAdam wave_variance: the EMA modes' lists plus prev_exp_avg_sqs and wave_e0_sqs (one-element
// tensors), no beta2, the wave equation's constants.
#define FASTOPT_LADAM_WAVE_STEP_ARGS                                                                       \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,       \
      at::TensorList prev_exp_avg_sqs, at::TensorList wave_e0_sqs, at::TensorList steps,                  \
      const c10::List<bool>& use_laps, double lr, double beta1, double eps, double weight_decay, double c2, \
      c10::string_view stencil, double wave_dt, double wave_kappa, double wave_E0, double wave_damping,     \
      FASTOPT_DEVICE_SCALARS
#define FASTOPT_LADAGRAD_STEP_ARGS                                                                         \
  at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,           \
      const c10::List<bool>& use_laps, double lr, double lr_decay, double eps, double weight_decay,       \
      double c2, c10::string_view stencil, FASTOPT_DEVICE_SCALARS
#define FASTOPT_LRMSPROP_STEP_ARGS                                                                         \
  at::TensorList params, at::TensorList grads, at::TensorList square_avgs,                                \
      at::TensorList momentum_buffers, at::TensorList steps, const c10::List<bool>& use_laps, double lr,  \
      double alpha, double eps, double weight_decay, double momentum, double c2, c10::string_view stencil,  \
      FASTOPT_DEVICE_SCALARS

// LAdam: modes variance_lap (ladam_step), update_lap, weight_lap and wave_variance.
void ladam_step_cpu(FASTOPT_LADAM_STEP_ARGS);
void ladam_update_lap_step_cpu(FASTOPT_LADAM_STEP_ARGS);
void ladam_weight_lap_step_cpu(FASTOPT_LADAM_STEP_ARGS);
void ladam_wave_step_cpu(FASTOPT_LADAM_WAVE_STEP_ARGS);
void ladagrad_step_cpu(FASTOPT_LADAGRAD_STEP_ARGS);
void lrmsprop_step_cpu(FASTOPT_LRMSPROP_STEP_ARGS);
// The Gram-matrix ops (signatures of jacobian_products_reference and batched_gram_reference).
void jacobian_products_cpu(const at::Tensor& a, const at::Tensor& out, double scale,
                           const std::optional<at::Tensor>& shift);
std::tuple<at::Tensor, at::Tensor> batched_gram_cpu(const at::Tensor& jac, const at::Tensor& res);
// The two ops of a batched Levenberg-Marquardt iteration (signatures of
// fastopt/reference/batched_lsq.py's lsq_propose_reference and lsq_update_reference).
#define FASTOPT_LSQ_PROPOSE_ARGS                                                                         \
  const at::Tensor &x, const at::Tensor &jtj, const at::Tensor &g, const at::Tensor &lam,              \
      const at::Tensor &scale, const at::Tensor &frozen, const at::Tensor &lb, const at::Tensor &ub, \
      bool bounded
#define FASTOPT_LSQ_UPDATE_ARGS                                                                            \
  const at::Tensor &x, const at::Tensor &cost, const at::Tensor &jtj, const at::Tensor &g,               \
      const at::Tensor &frozen, const at::Tensor &status, const at::Tensor &nfev, const at::Tensor &scale, \
      const at::Tensor &lam, const at::Tensor &nu, const at::Tensor &lb, const at::Tensor &ub,            \
      const at::Tensor &x_new, const at::Tensor &step, const at::Tensor &solved, const at::Tensor &cost_new, \
      const at::Tensor &jtj_new, const at::Tensor &g_new, const at::Tensor &colsq_new, bool bounded,       \
      double ftol, double xtol, double gtol, double cost_noise, int64_t max_nfev, double lam_min,          \
      double lam_max
// lsq_update's result: the new (x, cost, jtj, g, frozen, optimality, status, nfev, scale, lam, nu)
using LsqUpdateResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_propose_cpu(FASTOPT_LSQ_PROPOSE_ARGS);
LsqUpdateResult lsq_update_cpu(FASTOPT_LSQ_UPDATE_ARGS);
// One damped system of a small Levenberg-Marquardt step by Householder QR (signature of
// fastopt/reference/lm_small_solve.py's lm_small_solve_reference).
at::Tensor lm_small_solve_cpu(const at::Tensor& matrix, const at::Tensor& diagonal, const at::Tensor& rhs,
                              double shift);
// Per-sample weight and bias gradients of a 2-D convolution into rows of [J | r] (signature of
// fastopt/reference/conv_grads.py's conv2d_per_sample_grads_reference).
void conv2d_per_sample_grads_cpu(const at::Tensor& input, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                                 c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation);
// The input delta of a 2-D convolution times the derivative of the activation before it (signature of
// fastopt/reference/conv_grads.py's conv2d_input_delta_reference).
at::Tensor conv2d_input_delta_cpu(const at::Tensor& delta, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& activation_output, c10::IntArrayRef input_size,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                  c10::string_view activation, double alpha, const std::optional<at::Tensor>& out);

#ifdef FASTOPT_WITH_CUDA
void ladam_step_cuda(FASTOPT_LADAM_STEP_ARGS);
void ladam_update_lap_step_cuda(FASTOPT_LADAM_STEP_ARGS);
void ladam_weight_lap_step_cuda(FASTOPT_LADAM_STEP_ARGS);
void ladam_wave_step_cuda(FASTOPT_LADAM_WAVE_STEP_ARGS);
void ladagrad_step_cuda(FASTOPT_LADAGRAD_STEP_ARGS);
void lrmsprop_step_cuda(FASTOPT_LRMSPROP_STEP_ARGS);
void jacobian_products_cuda(const at::Tensor& a, const at::Tensor& out, double scale,
                            const std::optional<at::Tensor>& shift);
std::tuple<at::Tensor, at::Tensor> batched_gram_cuda(const at::Tensor& jac, const at::Tensor& res);
#endif

}  // namespace fastopt
