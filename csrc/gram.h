// The Gram-matrix ops (jacobian_products, batched_gram): argument checks shared by the CPU and
// CUDA host entries. They run before anything is written and name the argument; the Python
// wrappers (fastopt/extension.py) run the reference's checks first, so these guard direct callers
// of torch.ops.fastopt.* (the kernels take raw pointers: a wrong shape must never reach them).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastopt {

// The dtype jacobian_products accumulates in, and so out's dtype: fp64 for fp64, else fp32.
inline at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// a (K, M) floating point on device_type, out (M, M) of a's accumulation dtype on a's device (any
// strides), shift (M,) on a's device or absent.
void check_jacobian_products(const at::Tensor& a, const at::Tensor& out, const std::optional<at::Tensor>& shift,
                             c10::DeviceType device_type);

// jac (B, N, P) and res (B, N) of one floating dtype, both on device_type.
void check_batched_gram(const at::Tensor& jac, const at::Tensor& res, c10::DeviceType device_type);

}  // namespace fastopt
