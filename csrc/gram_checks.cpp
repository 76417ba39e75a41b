#include "gram.h"

#include <c10/util/Exception.h>

namespace fastopt {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void check_jacobian_products(const at::Tensor& a, const at::Tensor& out, const std::optional<at::Tensor>& shift,
                             c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(a.dim() == 2, "jacobian_products: a must be a 2-D tensor (rows x columns); got shape ", a.sizes());
  TORCH_CHECK_TYPE(supported_dtype(a.scalar_type()), "jacobian_products: a has dtype ", a.scalar_type(),
                   "; supported: float32, float64, bfloat16, float16");
  TORCH_CHECK_VALUE(a.device().type() == device_type, "jacobian_products: runs on ",
                    c10::DeviceTypeName(device_type, true), " tensors; a is on ", a.device());
  const int64_t m = a.size(1);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == m && out.size(1) == m, "jacobian_products: out must be a (", m,
                    ", ", m, ") tensor for a of shape ", a.sizes(), "; got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == accumulation_dtype(a.scalar_type()), "jacobian_products: out must be ",
                   accumulation_dtype(a.scalar_type()), " (the accumulation dtype of ", a.scalar_type(),
                   " inputs); got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == a.device(), "jacobian_products: a is on ", a.device(), " but out on ",
                    out.device());
  if (shift.has_value()) {
    TORCH_CHECK_VALUE(shift->dim() == 1 && shift->size(0) == m, "jacobian_products: shift must be a (", m,
                      ",) tensor; got ", shift->sizes());
    TORCH_CHECK_VALUE(shift->device() == a.device(), "jacobian_products: shift is on ", shift->device(), " but a on ",
                      a.device());
    TORCH_CHECK_TYPE(shift->is_floating_point(), "jacobian_products: shift must be floating point; got ",
                     shift->scalar_type());
  }
}

void check_batched_gram(const at::Tensor& jac, const at::Tensor& res, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(jac.dim() == 3, "batched_gram: jac must have shape (B, N, P), got ", jac.sizes());
  TORCH_CHECK_VALUE(res.dim() == 2 && res.size(0) == jac.size(0) && res.size(1) == jac.size(1),
                    "batched_gram: res must have shape (B, N) = (", jac.size(0), ", ", jac.size(1), "), got ",
                    res.sizes());
  TORCH_CHECK_VALUE(res.scalar_type() == jac.scalar_type() && res.device() == jac.device(),
                    "batched_gram: jac and res must share dtype and device, got ", jac.scalar_type(), " on ",
                    jac.device(), " and ", res.scalar_type(), " on ", res.device());
  TORCH_CHECK_TYPE(supported_dtype(jac.scalar_type()), "batched_gram: jac has dtype ", jac.scalar_type(),
                   "; supported: float32, float64, bfloat16, float16");
  TORCH_CHECK_VALUE(jac.device().type() == device_type, "batched_gram: runs on ",
                    c10::DeviceTypeName(device_type, true), " tensors; jac is on ", jac.device());
}

}  // namespace fastopt
