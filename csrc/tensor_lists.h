// Validation of a step's tensor lists and their preparation for the kernels, shared by the CPU
// and CUDA host entries. Everything is checked before anything is written, so a bad input leaves
// parameters and state as they were.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "multi_tensor.h"

namespace fastopt {

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// The inputs of one step, checked, with parameters and gradients made contiguous.
struct StepTensors {
  std::vector<at::Tensor> params;  // contiguous: the caller's tensors, or copies of them
  std::vector<at::Tensor> grads;   // contiguous
  std::vector<TensorGrid> grids;   // each tensor's stencil grid (fastopt::stencil_grid)
  at::ScalarType dtype = at::kFloat;
  // Results computed in contiguous copies of non-contiguous parameters go back by write_back().
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (caller's parameter, its copy)
  void write_back() const;
  size_t size() const { return params.size(); }
};

// Checks that the lists have one entry per parameter, that grads and states match their
// parameter (shape, dtype, device), that states are contiguous, that the parameters share one
// supported dtype and live on ``device_type``, that steps are float32 scalars (on the CPU, or
// on the parameters' device when ``steps_on_device``) and that ``stencil`` is known. Errors name
// the op, the argument and the index.
StepTensors prepare_step(const char* op, c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                         std::initializer_list<NamedList> states, at::TensorList steps,
                         const c10::List<bool>& use_laps, c10::string_view stencil, bool steps_on_device);

// A list of per-tensor scalar states (LAdam wave_variance's wave_e0_sqs): one per parameter, each a
// one-element tensor of the parameter's dtype on its device. Errors name the op, the list and the index.
void check_scalar_states(const char* op, const char* name, at::TensorList states, at::TensorList params);

// The device scalars of a step (ops.h: grad_scale, found_inf, lr_tensor), each absent or a
// float32 tensor of one element on ``device`` (checked before anything is written; read_inputs
// checks too).
void check_device_scalars(const char* op, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                          const at::Device& device);

// The device scalars of a CPU step, read on the host: whether to skip the step (found_inf
// nonzero), the factor gradients are multiplied by (GradScaler.unscale_'s float32(1 / scale); 1
// without one) and the learning rate (lr_tensor's value, else the op's ``lr``).
struct HostInputs {
  bool skip = false;
  float grad_factor = 1.0f;
  double lr = 0.0;
};
HostInputs read_inputs(const char* op, const StepTensors& st, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                       double lr);

// The step counts of CPU steps, as the reference reads them (float(step)).
std::vector<double> step_counts(at::TensorList steps);

// Pointer to a tensor's storage, typed for the kernels (fastopt::bf16, fastopt::fp16, ...).
template <typename T>
T* data_of(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace fastopt

// Runs __VA_ARGS__ with scalar_t (the storage type the kernels see) and math_t (their
// arithmetic type) bound to the dtype's.
#define FASTOPT_DISPATCH_FLOATING(dtype, op, ...)                                       \
  switch (dtype) {                                                                      \
    case at::kFloat: {                                                                  \
      using scalar_t = float;                                                           \
      using math_t = float;                                                             \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case at::kDouble: {                                                                 \
      using scalar_t = double;                                                          \
      using math_t = double;                                                            \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case at::kBFloat16: {                                                               \
      using scalar_t = ::fastopt::bf16;                                                 \
      using math_t = float;                                                             \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case at::kHalf: {                                                                   \
      using scalar_t = ::fastopt::fp16;                                                 \
      using math_t = float;                                                             \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    default:                                                                            \
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);                            \
  }
