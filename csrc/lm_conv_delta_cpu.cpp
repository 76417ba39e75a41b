// The delta of a 2-D convolution's input from its output's, times the derivative of the activation
// that produced that input (from the activation's output y), for the chain rule of the layer-by-layer
// Levenberg-Marquardt Jacobian:
//
//   pre[n, c, h, w] = sum_{o, i, j : h = y*sh - ph + i*dh, w = x*sw - pw + j*dw} weight[o, c, i, j] * delta[n, o, y, x]
//   out[n, c, h, w] = pre[n, c, h, w] * act'(y[n, c, h, w])
//
// (the input half of aten's convolution_backward, then elu_backward(is_result=True) / tanh_backward /
// sigmoid_backward / threshold_backward(0), or nothing). Math: fastopt/reference/conv_grads.py::
// conv2d_input_delta_reference. Each sample's input delta is summed in a small channels-last buffer
// (H*W*C values, in L1), each delta value scattering W[o, :, i, j] (contiguous over c) into its
// window, and the activation's factor is applied as the buffer is written out: one pass over the
// delta and y, no full-size intermediate. The result goes to `out` where given, which may be y
// itself (the chain rule's case: fresh memory page-faults on first touch, which for the MNIST
// example's 27 MB input delta cost as much as the arithmetic), else to a new channels-last tensor.
// Samples run in parallel on ATen's intra-op threads; any strides in; float32 and float64,
// accumulated in that dtype (results differ from aten's by summation order only).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lm_conv_geometry.h"
#include "ops.h"

namespace fastopt {
namespace {

// Samples per task of at::parallel_for: a sample is ~OH*OW*C_out*kh*kw*C multiply-adds (12.8k for
// the MNIST example's second layer).
constexpr int64_t kGrain = 16;

enum class Act { kIdentity, kElu, kTanh, kSigmoid, kRelu };

Act parse_activation(const std::string& name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "elu") return Act::kElu;
  if (name == "tanh") return Act::kTanh;
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK_VALUE(false, "conv2d_input_delta: activation must be one of identity, elu, tanh, sigmoid, relu, got '",
                    name, "'");
}

// d act / d pre-activation, from the activation's output y (as aten's backward ops compute it).
template <Act kAct, typename T>
inline T derivative(T y, T alpha) {
  if constexpr (kAct == Act::kElu) return y > T(0) ? T(1) : y + alpha;
  if constexpr (kAct == Act::kTanh) return T(1) - y * y;
  if constexpr (kAct == Act::kSigmoid) return (T(1) - y) * y;
  if constexpr (kAct == Act::kRelu) return y > T(0) ? T(1) : T(0);
  return T(1);
}

using conv::Geometry;

// Samples [begin, end) into out (channels-last, (n, h, w, c) contiguous): each output position's
// C_out deltas scatter wt[i, j] (C_out x C, the channels contiguous) into every tap's input pixel,
// summed in place in the sample's rows of out, which the activation's factor then scales.
// kC > 0: the channel count as a constant (the loops over c unrolled into vector registers).
template <Act kAct, int64_t kC, typename T>
void input_delta_samples(const Geometry& g, const T* dl, const int64_t* ds, const T* wt, const T* yv, const int64_t* ys,
                         T alpha, T* ov, const int64_t* os, int64_t begin, int64_t end) {
  const int64_t C = kC > 0 ? kC : g.channels, O = g.out_channels, plane = g.height * g.width * C;
  std::vector<T> dv(O), acc(plane);
  for (int64_t n = begin; n < end; ++n) {
    T* o_n = acc.data();
    std::fill(o_n, o_n + plane, T(0));
    for (int64_t oy = 0; oy < g.out_height; ++oy) {
      for (int64_t ox = 0; ox < g.out_width; ++ox) {
        const T* d = dl + n * ds[0] + oy * ds[2] + ox * ds[3];
        for (int64_t o = 0; o < O; ++o) dv[o] = d[o * ds[1]];
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t h = oy * g.sh - g.ph + i * g.dh;
          if (h < 0 || h >= g.height) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t w = ox * g.sw - g.pw + j * g.dw;
            if (w < 0 || w >= g.width) continue;
            T* dst = o_n + (h * g.width + w) * C;
            const T* src = wt + (i * g.kw + j) * O * C;
            for (int64_t o = 0; o < O; ++o) {
              const T v = dv[o];
              const T* s = src + o * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dst[c] += v * s[c];
            }
          }
        }
      }
    }
    // Written out scaled by the activation's factor, y read before out is written at each
    // element: out may be y itself.
    for (int64_t h = 0; h < g.height; ++h) {
      for (int64_t w = 0; w < g.width; ++w) {
        const T* a = o_n + (h * g.width + w) * C;
        T* dst = ov + n * os[0] + h * os[2] + w * os[3];
        if constexpr (kAct == Act::kIdentity) {
          for (int64_t c = 0; c < C; ++c) dst[c * os[1]] = a[c];
        } else {
          const T* yp = yv + n * ys[0] + h * ys[2] + w * ys[3];
          for (int64_t c = 0; c < C; ++c) dst[c * os[1]] = a[c] * derivative<kAct>(yp[c * ys[1]], alpha);
        }
      }
    }
  }
}

template <Act kAct, typename T>
void input_delta(const Geometry& g, const at::Tensor& delta, const T* wt, const at::Tensor* y, T alpha,
                 at::Tensor& out) {
  const T* dl = delta.const_data_ptr<T>();
  const int64_t ds[4] = {delta.stride(0), delta.stride(1), delta.stride(2), delta.stride(3)};
  const T* yv = y ? y->const_data_ptr<T>() : nullptr;
  const int64_t ys[4] = {y ? y->stride(0) : 0, y ? y->stride(1) : 0, y ? y->stride(2) : 0, y ? y->stride(3) : 0};
  T* ov = out.data_ptr<T>();
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  auto run = &input_delta_samples<kAct, 0, T>;
  if (g.channels == 4) run = &input_delta_samples<kAct, 4, T>;
  if (g.channels == 8) run = &input_delta_samples<kAct, 8, T>;
  at::parallel_for(0, g.batch, kGrain,
                   [&](int64_t begin, int64_t end) { run(g, dl, ds, wt, yv, ys, alpha, ov, os, begin, end); });
}

}  // namespace

at::Tensor conv2d_input_delta_cpu(const at::Tensor& delta, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& activation_output, c10::IntArrayRef input_size,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                  c10::string_view activation, double alpha, const std::optional<at::Tensor>& out_arg) {
  const char* op = "conv2d_input_delta";
  const Act act = parse_activation(std::string(activation));
  TORCH_CHECK_VALUE(delta.dim() == 4, op, ": delta must have shape (B, C_out, OH, OW), got ", delta.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == delta.size(1), op,
                    ": weight must have shape (C_out, C, kh, kw) with C_out = delta.size(1) = ", delta.size(1),
                    ", got ", weight.sizes());
  const auto dtype = delta.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": delta must be float32 or float64, got ",
                   c10::toString(dtype));
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, op, ": weight must have delta's dtype ", c10::toString(dtype),
                   ", got ", c10::toString(weight.scalar_type()));
  for (const auto* v : {&input_size, &stride, &padding, &dilation}) {
    TORCH_CHECK_VALUE(v->size() == 2, op, ": input_size, stride, padding and dilation must have 2 values each, got ",
                      input_size, ", ", stride, ", ", padding, ", ", dilation);
  }
  const Geometry g{delta.size(0),  weight.size(1), input_size[0],  input_size[1],  delta.size(1),
                   delta.size(2),  delta.size(3),  weight.size(2), weight.size(3), stride[0],
                   stride[1],      padding[0],     padding[1],     dilation[0],    dilation[1]};
  TORCH_CHECK_VALUE(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0 && g.height > 0 &&
                        g.width > 0,
                    op, ": stride, dilation and input_size must be positive and padding >= 0, got stride ", stride,
                    ", padding ", padding, ", dilation ", dilation, ", input_size ", input_size);
  const int64_t oh = g.expected_out_height(), ow = g.expected_out_width();
  TORCH_CHECK_VALUE(g.out_height == oh && g.out_width == ow, op, ": delta's spatial size must be (", oh, ", ", ow,
                    ") for input_size ", input_size, ", got ", delta.sizes());
  const bool needs_y = act != Act::kIdentity;
  TORCH_CHECK_VALUE(!needs_y || activation_output.has_value(), op, ": activation '", std::string(activation),
                    "' needs activation_output");
  if (needs_y) {
    const at::Tensor& y = *activation_output;
    TORCH_CHECK_VALUE(y.dim() == 4 && y.size(0) == g.batch && y.size(1) == g.channels && y.size(2) == g.height &&
                          y.size(3) == g.width,
                      op, ": activation_output must have shape (", g.batch, ", ", g.channels, ", ", g.height, ", ",
                      g.width, "), got ", y.sizes());
    TORCH_CHECK_TYPE(y.scalar_type() == dtype, op, ": activation_output must have delta's dtype ",
                     c10::toString(dtype), ", got ", c10::toString(y.scalar_type()));
  }
  for (const auto* t : {&delta, &weight}) {
    TORCH_CHECK_TYPE(t->device().is_cpu(), op, ": delta and weight must be CPU tensors, got ", t->device().str());
  }
  TORCH_CHECK_TYPE(!needs_y || activation_output->device().is_cpu(), op,
                   ": activation_output must be a CPU tensor, got ", activation_output->device().str());
  at::Tensor out;
  if (out_arg) {
    out = *out_arg;
    TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == g.batch && out.size(1) == g.channels &&
                          out.size(2) == g.height && out.size(3) == g.width,
                      op, ": out must have shape (", g.batch, ", ", g.channels, ", ", g.height, ", ", g.width,
                      "), got ", out.sizes());
    TORCH_CHECK_TYPE(out.scalar_type() == dtype && out.device().is_cpu(), op,
                     ": out must be a CPU tensor of delta's dtype ", c10::toString(dtype), ", got ",
                     c10::toString(out.scalar_type()), " on ", out.device().str());
  } else {
    out = at::empty({g.batch, g.height, g.width, g.channels}, delta.options()).permute({0, 3, 1, 2});
  }
  if (g.batch == 0) return out;
  // weight as (kh, kw, C_out, C): each tap's block contiguous for the scatter.
  const at::Tensor wt = weight.permute({2, 3, 0, 1}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "conv2d_input_delta", [&] {
    const scalar_t* w = wt.const_data_ptr<scalar_t>();
    const at::Tensor* y = needs_y ? &*activation_output : nullptr;
    const auto a = static_cast<scalar_t>(alpha);
    switch (act) {
      case Act::kIdentity: input_delta<Act::kIdentity, scalar_t>(g, delta, w, y, a, out); break;
      case Act::kElu: input_delta<Act::kElu, scalar_t>(g, delta, w, y, a, out); break;
      case Act::kTanh: input_delta<Act::kTanh, scalar_t>(g, delta, w, y, a, out); break;
      case Act::kSigmoid: input_delta<Act::kSigmoid, scalar_t>(g, delta, w, y, a, out); break;
      case Act::kRelu: input_delta<Act::kRelu, scalar_t>(g, delta, w, y, a, out); break;
    }
  });
  return out;
}

}  // namespace fastopt
