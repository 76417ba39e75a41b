#include "tensor_lists.h"

#include <c10/util/Exception.h>



namespace fastopt {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_matches(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
              "] has shape ", p.sizes());
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", p.device());
}

}  // namespace

StepTensors prepare_step(const char* op, c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                         std::initializer_list<NamedList> states, at::TensorList steps,
                         const c10::List<bool>& use_laps, c10::string_view stencil, bool steps_on_device) {
  const size_t n = params.size();
  TORCH_CHECK(stencil == "9point" || stencil == "5point", op, ": invalid stencil '", std::string(stencil),
              "'. Choose from: 9point, 5point");
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(steps.size() == n, op, ": got ", n, " params but ", steps.size(), " steps");
  TORCH_CHECK(use_laps.size() == n, op, ": got ", n, " params but ", use_laps.size(), " use_laps");
  for (const NamedList& s : states) {
    TORCH_CHECK(s.tensors.size() == n, op, ": got ", n, " params but ", s.tensors.size(), " ", s.name);
  }
  StepTensors out;
  if (n == 0) return out;
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.defined(), op, ": params[0] is undefined");
  TORCH_CHECK(first.device().type() == device_type, op, ": runs on ", c10::DeviceTypeName(device_type, true),
              " tensors; params[0] is on ", first.device());
  TORCH_CHECK(supported_dtype(first.scalar_type()), op, ": params[0] has dtype ", first.scalar_type(),
              "; supported: float32, float64, bfloat16, float16");
  const bool nine_point = stencil == "9point";
  out.dtype = first.scalar_type();
  out.params.reserve(n);
  out.grads.reserve(n);
  out.grids.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(), op, ": params[", i,
                "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ", first.scalar_type(), " on ",
                first.device(), "; group tensors by device and dtype");
    check_matches(op, "grads", i, grads[i], p);
    for (const NamedList& s : states) {
      check_matches(op, s.name, i, s.tensors[i], p);
      TORCH_CHECK(s.tensors[i].is_contiguous(), op, ": ", s.name, "[", i,
                  "] is not contiguous; state tensors must be contiguous in logical order");
    }
    const at::Tensor& step = steps[i];
    TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat, op, ": steps[", i,
                "] must be a float32 tensor of one element");
    if (steps_on_device) {
      TORCH_CHECK(step.device() == p.device(), op, ": steps[", i, "] is on ", step.device(), " but params[", i,
                  "] is on ", p.device(), "; this backend reads step counts on the device");
    } else {
      TORCH_CHECK(step.device().is_cpu(), op, ": steps[", i, "] must be on the CPU, got ", step.device());
    }
    out.grids.push_back(stencil_grid(p.sizes().data(), p.dim(), use_laps.get(i), nine_point));
  }
  // Only now, with every check passed, make the copies the kernels need.
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.is_contiguous()) {
      out.params.push_back(p);
    } else {
      at::Tensor copy = p.contiguous();
      out.copies.emplace_back(p, copy);
      out.params.push_back(copy);
    }
    out.grads.push_back(grads[i].contiguous());
  }
  return out;
}

void check_scalar_states(const char* op, const char* name, at::TensorList states, at::TensorList params) {
  TORCH_CHECK(states.size() == params.size(), op, ": got ", params.size(), " params but ", states.size(), " ", name);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& s = states[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(s.defined() && s.numel() == 1, op, ": ", name, "[", i, "] must be a tensor of one element");
    TORCH_CHECK(s.scalar_type() == p.scalar_type() && s.device() == p.device(), op, ": ", name, "[", i, "] is ",
                s.scalar_type(), " on ", s.device(), " but params[", i, "] is ", p.scalar_type(), " on ", p.device());
  }
}

void check_device_scalars(const char* op, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                          const at::Device& device) {
  for (const auto& [name, t] : {std::make_pair("grad_scale", &grad_scale), std::make_pair("found_inf", &found_inf),
                                std::make_pair("lr_tensor", &lr_tensor)}) {
    if (!t->has_value()) continue;
    const at::Tensor& x = **t;
    TORCH_CHECK(x.defined() && x.numel() == 1 && x.scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 tensor of one element");
    TORCH_CHECK(x.device() == device, op, ": ", name, " is on ", x.device(), " but the params are on ", device);
  }
}

HostInputs read_inputs(const char* op, const StepTensors& st, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                       double lr) {
  HostInputs in;
  in.lr = lr;
  if (st.size() == 0) return in;
  check_device_scalars(op, grad_scale, found_inf, lr_tensor, st.params[0].device());
  if (lr_tensor.has_value()) in.lr = *reinterpret_cast<const float*>(lr_tensor->const_data_ptr());
  // One element each (check_device_scalars): read in place, strides do not matter.
  if (found_inf.has_value()) in.skip = *reinterpret_cast<const float*>(found_inf->const_data_ptr()) != 0.0f;
  if (grad_scale.has_value()) {
    const double scale = *reinterpret_cast<const float*>(grad_scale->const_data_ptr());
    in.grad_factor = static_cast<float>(1.0 / scale);
  }
  return in;
}

void StepTensors::write_back() const {
  for (auto& pc : copies) pc.first.copy_(pc.second);
}

std::vector<double> step_counts(at::TensorList steps) {
  std::vector<double> out(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    // Read in place: Tensor::item() costs a dispatch per tensor. Strides don't matter: one element.
    out[i] = static_cast<double>(*reinterpret_cast<const float*>(s.const_data_ptr()));
  }
  return out;
}

}  // namespace fastopt
