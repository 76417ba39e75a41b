// The one bindings file of fastopt._C: op schemas (TORCH_LIBRARY, namespace fastopt) and their
// implementations per dispatch key (TORCH_LIBRARY_IMPL: CPU, and CUDA where built with it).
// Registered as torch.ops.fastopt.<op>, the ops are visible to torch.compile (their fake
// implementations are registered from Python, in fastopt/extension.py). The schemas mirror the
// signatures of fastopt.reference: mutated lists are annotated (a!), hyperparameters keyword-only,
// then the optional device scalars: the AMP inputs grad_scale and found_inf
// (fastopt/reference/_amp.py) and lr_tensor, an lr read on the device (capturable steps).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "multi_tensor_cpu.h"
#include "ops.h"

namespace fastopt {
namespace {

// What was compiled in and what the CPU loops run on, e.g. "cpu+openmp isa=avx2 cuda".
std::string build_info() {
  std::string info = "cpu";
#ifdef _OPENMP
  info += "+openmp";
#endif
  info += cpu::use_avx2() ? " isa=avx2" : " isa=baseline";
#ifdef FASTOPT_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

// Test hook: the CPU tiling (tile columns, tile elements, and the step size below which one
// thread does all); returns the previous values. Tiny tiles and no serial threshold put tile and
// thread boundaries, and so halos, everywhere in small tensors.
std::vector<int64_t> set_cpu_tiling(int64_t max_cols, int64_t target_elems, int64_t serial_below) {
  const cpu::Tiling old = cpu::set_tiling(cpu::Tiling{TilingPolicy{max_cols, max_cols, target_elems, 0}, serial_below});
  return {old.policy.max_cols, old.policy.target_elems, old.serial_below};
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "ladam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, bool[] use_laps, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float c2, str stencil, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  // The other LAdam modes: update_lap and weight_lap take variance_lap's arguments.
  m.def(
      "ladam_update_lap_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, bool[] use_laps, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float c2, str stencil, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  m.def(
      "ladam_weight_lap_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, bool[] use_laps, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float c2, str stencil, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  m.def(
      "ladam_wave_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] prev_exp_avg_sqs, Tensor(e!)[] wave_e0_sqs, Tensor[] steps, bool[] use_laps, *, float lr, "
      "float beta1, float eps, float weight_decay, float c2, str stencil, float wave_dt, float wave_kappa, "
      "float wave_E0, float wave_damping, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None) -> ()");
  m.def(
      "ladagrad_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor[] steps, "
      "bool[] use_laps, *, float lr, float lr_decay, float eps, float weight_decay, float c2, str stencil, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  m.def(
      "lrmsprop_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] momentum_buffers, Tensor[] steps, bool[] use_laps, *, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, float c2, str stencil, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  // out[lower] += scale * a^T a (+ diag shift); only out is written.
  m.def("jacobian_products(Tensor a, Tensor(a!) out, *, float scale, Tensor? shift=None) -> ()");
  m.def("batched_gram(Tensor jac, Tensor res) -> (Tensor, Tensor)");
  // least_squares' iteration: new tensors out, inputs unchanged.
  m.def(
      "lsq_propose(Tensor x, Tensor jtj, Tensor g, Tensor lam, Tensor scale, Tensor frozen, Tensor lb, Tensor ub, "
      "*, bool bounded) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lsq_update(Tensor x, Tensor cost, Tensor jtj, Tensor g, Tensor frozen, Tensor status, Tensor nfev, "
      "Tensor scale, Tensor lam, Tensor nu, Tensor lb, Tensor ub, Tensor x_new, Tensor step, Tensor solved, "
      "Tensor cost_new, Tensor jtj_new, Tensor g_new, Tensor colsq_new, *, bool bounded, float ftol, float xtol, "
      "float gtol, float cost_noise, int max_nfev, float lam_min, float lam_max) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Levenberg-Marquardt, layer by layer: a convolution's per-sample weight / bias gradients into rows of [J | r].
  m.def(
      "conv2d_per_sample_grads(Tensor input, Tensor delta, Tensor(a!)? weight_out, Tensor(b!)? bias_out, *, "
      "int[] kernel_size, int[] stride, int[] padding, int[] dilation) -> ()");
  // Levenberg-Marquardt, layer by layer: a convolution's input delta times the activation's derivative before it.
  m.def(
      "conv2d_input_delta(Tensor delta, Tensor weight, Tensor? activation_output, *, int[] input_size, int[] stride, "
      "int[] padding, int[] dilation, str activation, float alpha, Tensor(a!)? out=None) -> Tensor");
  // Levenberg-Marquardt, small P: (lower(matrix) mirrored, diagonal + shift) x = rhs by Householder QR; x new.
  m.def("lm_small_solve(Tensor matrix, Tensor diagonal, Tensor rhs, *, float shift) -> Tensor");
  m.def("build_info() -> str", &fastopt::build_info);
  m.def("_set_cpu_tiling(int max_cols, int target_elems, int serial_below) -> int[]", &fastopt::set_cpu_tiling);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("ladam_step", &fastopt::ladam_step_cpu);
  m.impl("ladam_update_lap_step", &fastopt::ladam_update_lap_step_cpu);
  m.impl("ladam_weight_lap_step", &fastopt::ladam_weight_lap_step_cpu);
  m.impl("ladam_wave_step", &fastopt::ladam_wave_step_cpu);
  m.impl("ladagrad_step", &fastopt::ladagrad_step_cpu);
  m.impl("lrmsprop_step", &fastopt::lrmsprop_step_cpu);
  m.impl("jacobian_products", &fastopt::jacobian_products_cpu);
  m.impl("batched_gram", &fastopt::batched_gram_cpu);
  m.impl("lsq_propose", &fastopt::lsq_propose_cpu);
  m.impl("lsq_update", &fastopt::lsq_update_cpu);
  m.impl("conv2d_per_sample_grads", &fastopt::conv2d_per_sample_grads_cpu);
  m.impl("conv2d_input_delta", &fastopt::conv2d_input_delta_cpu);
  m.impl("lm_small_solve", &fastopt::lm_small_solve_cpu);
}

#ifdef FASTOPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("ladam_step", &fastopt::ladam_step_cuda);
  m.impl("ladam_update_lap_step", &fastopt::ladam_update_lap_step_cuda);
  m.impl("ladam_weight_lap_step", &fastopt::ladam_weight_lap_step_cuda);
  m.impl("ladam_wave_step", &fastopt::ladam_wave_step_cuda);
  m.impl("ladagrad_step", &fastopt::ladagrad_step_cuda);
  m.impl("lrmsprop_step", &fastopt::lrmsprop_step_cuda);
  m.impl("jacobian_products", &fastopt::jacobian_products_cuda);
  m.impl("batched_gram", &fastopt::batched_gram_cuda);
}
#endif

// ``import fastopt._C`` loads the library (and so registers the ops); the module itself is empty.
// When fastopt builds the extension at run time it loads it with torch.ops.load_library instead.
#define FASTOPT_STR_(x) #x
#define FASTOPT_STR(x) FASTOPT_STR_(x)
#define FASTOPT_CAT_(a, b) a##b
#define FASTOPT_CAT(a, b) FASTOPT_CAT_(a, b)

PyMODINIT_FUNC FASTOPT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTOPT_STR(TORCH_EXTENSION_NAME),
                               "fastopt's C++/CUDA kernels, registered as torch.ops.fastopt.*", -1, nullptr};
  return PyModule_Create(&module);
}
