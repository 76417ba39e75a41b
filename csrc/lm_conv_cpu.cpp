// Per-sample weight (and bias) gradients of a 2-D convolution, written straight into the rows of a
// Levenberg-Marquardt [J | r] buffer: for each sample n,
//
//   weight_out[n, (o, c, i, j)] = sum_{y, x} delta[n, o, y, x] * input[n, c, y*sh - ph + i*dh, x*sw - pw + j*dw]
//   bias_out[n, o]              = sum_{y, x} delta[n, o, y, x]
//
// (zero where the input index falls into the padding). Math: fastopt/reference/conv_grads.py::
// conv2d_per_sample_grads_reference, which unfolds the whole batch (a B x C*kh*kw x OH*OW tensor
// written to and read back from memory, ~50 MB for the MNIST example's first layer) and multiplies
// it batch-wise. Here each sample is reduced at once from its input read in place (the run kernels
// below) or unfolded into a small per-thread buffer (a few KB, in L1/L2): one pass over the input
// and the delta, no B-sized temporary. Samples run in parallel on ATen's intra-op threads; inputs
// may have any strides (channels-last activations, the columns of a [J | r] row); float32 and
// float64, accumulated in the inputs' dtype (as the reference's bmm does), so results differ from
// it by summation order only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "lm_conv_geometry.h"
#include "ops.h"

namespace fastopt {
namespace {

// Samples per task of at::parallel_for: one sample is ~Cout * C*kh*kw * OH*OW multiply-adds
// (43k for the MNIST example's first layer, 200 for its last): a few dozen samples amortise a task.
constexpr int64_t kGrain = 32;
// Output channels reduced together: each unfolded input row is loaded once for this many channels.
constexpr int64_t kChannelBlock = 4;

using conv::Geometry;

int64_t pair_value(c10::IntArrayRef v, const char* name, int64_t i) {
  TORCH_CHECK_VALUE(v.size() == 2, "conv2d_per_sample_grads: ", name, " must have 2 values, got ", v.size());
  return v[i];
}

Geometry check_args(const at::Tensor& input, const at::Tensor& delta, const std::optional<at::Tensor>& weight_out,
                    const std::optional<at::Tensor>& bias_out, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "conv2d_per_sample_grads";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must have shape (B, C, H, W), got ", input.sizes());
  TORCH_CHECK_VALUE(delta.dim() == 4, op, ": delta must have shape (B, C_out, OH, OW), got ", delta.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": input must be float32 or float64, got ",
                   c10::toString(dtype));
  Geometry g{input.size(0),
             input.size(1),
             input.size(2),
             input.size(3),
             delta.size(1),
             delta.size(2),
             delta.size(3),
             pair_value(kernel_size, "kernel_size", 0),
             pair_value(kernel_size, "kernel_size", 1),
             pair_value(stride, "stride", 0),
             pair_value(stride, "stride", 1),
             pair_value(padding, "padding", 0),
             pair_value(padding, "padding", 1),
             pair_value(dilation, "dilation", 0),
             pair_value(dilation, "dilation", 1)};
  TORCH_CHECK_VALUE(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
                    op, ": kernel_size, stride and dilation must be positive and padding >= 0, got kernel_size ",
                    kernel_size, ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  const int64_t oh = g.expected_out_height(), ow = g.expected_out_width();
  TORCH_CHECK_VALUE(delta.size(0) == g.batch && g.out_height == oh && g.out_width == ow, op,
                    ": delta must have shape (", g.batch, ", C_out, ", oh, ", ", ow, ") for input ", input.sizes(),
                    ", got ", delta.sizes());
  const struct {
    const char* name;
    const at::Tensor* t;
    int64_t columns;
  } tensors[] = {{"delta", &delta, -1},
                 {"weight_out", weight_out ? &*weight_out : nullptr, g.out_channels * g.channels * g.kh * g.kw},
                 {"bias_out", bias_out ? &*bias_out : nullptr, g.out_channels}};
  for (const auto& a : tensors) {
    if (a.t == nullptr) continue;
    TORCH_CHECK_TYPE(a.t->scalar_type() == dtype, op, ": ", a.name, " must have the input's dtype ",
                     c10::toString(dtype), ", got ", c10::toString(a.t->scalar_type()));
    TORCH_CHECK_TYPE(a.t->device().is_cpu() && input.device().is_cpu(), op, ": ", a.name,
                     " and input must be CPU tensors, got ", a.t->device().str(), " and ", input.device().str());
    if (a.columns >= 0) {
      TORCH_CHECK_VALUE(a.t->dim() == 2 && a.t->size(0) == g.batch && a.t->size(1) == a.columns, op, ": ", a.name,
                        " must have shape (", g.batch, ", ", a.columns, "), got ", a.t->sizes());
    }
  }
  return g;
}

// The pointers and strides of one call.
template <typename T>
struct Args {
  const T* in;
  const T* dl;
  T* w_out;
  T* b_out;
  int64_t is0, is1, is2, is3, ds0, ds1, ds2, ds3, w_s0, w_s1, b_s0, b_s1;
  Geometry g;
  int run;  // the weight gradients' loop: kGather, or a run kernel (see run_kind)
};

// The weight gradients' loops. kGather: each sample's input unfolded into a buffer, then one dot
// product of length OH*OW per weight (any strides, padding, dilation). The run kernels read the
// input in place, in runs of kRun contiguous values that are kRun weights of one output channel
// (kChannelRun: the channels of one pixel of a channels-last input; kWidthRun: kRun taps of a
// kernel row of an NCHW / single-channel input without width padding or dilation), with
// kBlock x kRun sums in registers: no unfolded copy, no horizontal sums. Measured on this project's
// CPU (2 threads, 5000 samples, NCHW inputs, best of 7, load 1-3 from other work): the MNIST
// example's first two layers took 8.1-8.5 and 9.0-9.8 ms by the gather loops, 5.1-5.3 and 4.5-5.8
// ms by the run kernels (the reference's unfold and bmm: 22-27 and 30-34 ms).
constexpr int kGather = 0, kChannelRun = 1, kWidthRun = 2;
constexpr int64_t kRun = 4;
// Output channels per pass of a run kernel: 8 (8 x kRun sums, 8 SSE registers in float32) where
// there are as many, else 4 (no multiply-adds on padding channels for the example's 4-channel
// layers; not measured against 4 in isolation: the first layer's op took 7.3-8.1 ms in step
// profiles with 4, 5.3-6.8 ms in isolation with 8, on a loaded machine).
constexpr int64_t kWideBlock = 8, kNarrowBlock = 4;

// Which loop serves this call.
int run_kind(const at::Tensor& input, const Geometry& g) {
  if (input.stride(1) == 1 && g.channels % kRun == 0) return kChannelRun;
  if (input.stride(3) == 1 && g.pw == 0 && g.dw == 1 && g.kw % kRun == 0) return kWidthRun;
  return kGather;
}

// weight_out[n] by a run kernel, kBlock output channels at a time (kWideBlock where C_out >= 8,
// else kNarrowBlock): deltas_t is the sample's delta as (OH*OW, padded_channels), the channels
// padded with zeros to a multiple of kWideBlock.
template <int64_t kBlock, typename T>
void run_weights(const Args<T>& a, int64_t n, const T* deltas_t, int64_t padded_channels) {
  const Geometry& g = a.g;
  const T* in = a.in + n * a.is0;
  T* w_row = a.w_out + n * a.w_s0;
  const int64_t kernel = g.kh * g.kw;
  const bool channel_run = a.run == kChannelRun;
  // Runs: (i, j, channel block) for channel runs, (c, i, j block) for width runs.
  const int64_t outer = channel_run ? kernel : g.channels * g.kh;
  const int64_t inner = channel_run ? g.channels / kRun : g.kw / kRun;
  for (int64_t o0 = 0; o0 < g.out_channels; o0 += kBlock) {
    const int64_t block = std::min(kBlock, g.out_channels - o0);
    for (int64_t u = 0; u < outer; ++u) {
      const int64_t c = channel_run ? 0 : u / g.kh;
      const int64_t i = channel_run ? u / g.kw : u % g.kh;
      const int64_t j = channel_run ? u % g.kw : 0;
      // Output rows y and columns x whose input pixel lies inside the image (padding adds zero).
      const int64_t y0 = std::max<int64_t>(0, (g.ph - i * g.dh + g.sh - 1) / g.sh);
      const int64_t y1 = std::min<int64_t>(g.out_height, (g.height + g.ph - i * g.dh + g.sh - 1) / g.sh);
      const int64_t x0 = channel_run ? std::max<int64_t>(0, (g.pw - j * g.dw + g.sw - 1) / g.sw) : 0;
      const int64_t x1 =
          channel_run ? std::min<int64_t>(g.out_width, (g.width + g.pw - j * g.dw + g.sw - 1) / g.sw) : g.out_width;
      for (int64_t v = 0; v < inner; ++v) {
        T acc[kBlock][kRun] = {};
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t h = y * g.sh - g.ph + i * g.dh;
          const T* row = in + h * a.is2 + c * a.is1;
          for (int64_t x = x0; x < x1; ++x) {
            const T* src = channel_run ? row + (x * g.sw - g.pw + j * g.dw) * a.is3 + v * kRun
                                       : row + x * g.sw + v * kRun;
            const T* d = deltas_t + (y * g.out_width + x) * padded_channels + o0;
            for (int64_t b = 0; b < kBlock; ++b) {
              for (int64_t q = 0; q < kRun; ++q) acc[b][q] += d[b] * src[q];
            }
          }
        }
        for (int64_t b = 0; b < block; ++b) {
          for (int64_t q = 0; q < kRun; ++q) {
            const int64_t tap = channel_run ? (v * kRun + q) * kernel + i * g.kw + j
                                            : c * kernel + i * g.kw + v * kRun + q;
            w_row[((o0 + b) * g.channels * kernel + tap) * a.w_s1] = acc[b][q];
          }
        }
      }
    }
  }
}

// Samples [begin, end): each sample's delta gathered into the task's buffer, then its weight
// gradients by a run kernel or from its unfolded input (K rows of L), and its bias gradients.
template <typename T>
void samples(const Args<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t positions = g.out_height * g.out_width;  // L: the reduction length
  const int64_t taps = g.channels * g.kh * g.kw;         // K: weights per output channel
  const bool gather = a.run == kGather;
  const int64_t padded_channels = (g.out_channels + kWideBlock - 1) / kWideBlock * kWideBlock;
  std::vector<T> cols(a.w_out && gather ? taps * positions : 0);
  std::vector<T> deltas(g.out_channels * positions);
  std::vector<T> deltas_t(a.w_out && !gather ? positions * padded_channels : 0, T(0));
  for (int64_t n = begin; n < end; ++n) {
    T* d = deltas.data();
    for (int64_t o = 0; o < g.out_channels; ++o) {
      for (int64_t y = 0; y < g.out_height; ++y) {
        const T* src = a.dl + n * a.ds0 + o * a.ds1 + y * a.ds2;
        for (int64_t x = 0; x < g.out_width; ++x) *d++ = src[x * a.ds3];
      }
    }
    if (a.b_out) {
      for (int64_t o = 0; o < g.out_channels; ++o) {
        const T* row = deltas.data() + o * positions;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < positions; ++l) sum += row[l];
        a.b_out[n * a.b_s0 + o * a.b_s1] = sum;
      }
    }
    if (!a.w_out) continue;
    if (!gather) {
      for (int64_t o = 0; o < g.out_channels; ++o) {
        const T* row = deltas.data() + o * positions;
        for (int64_t l = 0; l < positions; ++l) deltas_t[l * padded_channels + o] = row[l];
      }
      if (g.out_channels >= kWideBlock) {
        run_weights<kWideBlock>(a, n, deltas_t.data(), padded_channels);
      } else {
        run_weights<kNarrowBlock>(a, n, deltas_t.data(), padded_channels);
      }
      continue;
    }
    // The unfolded input, row (c, i, j), column (y, x): padding reads as zero.
    T* col = cols.data();
    for (int64_t c = 0; c < g.channels; ++c) {
      const T* plane = a.in + n * a.is0 + c * a.is1;
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          for (int64_t y = 0; y < g.out_height; ++y) {
            const int64_t h = y * g.sh - g.ph + i * g.dh;
            if (h < 0 || h >= g.height) {
              std::fill(col, col + g.out_width, T(0));
              col += g.out_width;
              continue;
            }
            const T* src = plane + h * a.is2;
            for (int64_t x = 0; x < g.out_width; ++x) {
              const int64_t w = x * g.sw - g.pw + j * g.dw;
              *col++ = (w >= 0 && w < g.width) ? src[w * a.is3] : T(0);
            }
          }
        }
      }
    }
    // weight_out[n, o, k] = <deltas[o], cols[k]>, kChannelBlock channels per pass over cols[k].
    T* w_row = a.w_out + n * a.w_s0;
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += kChannelBlock) {
      const int64_t block = std::min(kChannelBlock, g.out_channels - o0);
      const T* d0 = deltas.data() + o0 * positions;
      // Channels past the block's end read channel o0's row again; their sums are not stored.
      const T* d1 = block > 1 ? d0 + positions : d0;
      const T* d2 = block > 2 ? d0 + 2 * positions : d0;
      const T* d3 = block > 3 ? d0 + 3 * positions : d0;
      for (int64_t k = 0; k < taps; ++k) {
        const T* c = cols.data() + k * positions;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t l = 0; l < positions; ++l) {
          const T v = c[l];
          s0 += d0[l] * v;
          s1 += d1[l] * v;
          s2 += d2[l] * v;
          s3 += d3[l] * v;
        }
        const T sums[kChannelBlock] = {s0, s1, s2, s3};
        for (int64_t b = 0; b < block; ++b) w_row[((o0 + b) * taps + k) * a.w_s1] = sums[b];
      }
    }
  }
}

// Compiled for the baseline ISA only: an AVX build of the same loops (target attribute, chosen at
// run time) measured no faster on an earlier CPU of this project's (AVX without AVX2), for the
// gather loops or the run kernels (5000 samples, 2 threads, 3 alternating runs each). On its
// current one (AVX2, FMA, AVX-512) an AVX2+FMA clone (cpu::use_avx2, std::fma in the sums) took
// 27.8-38.1 ms for the MNIST example's five calls against 12.6-23.0 for the baseline, and without
// FMA 13.4-16.0 against 12.6-25.4 (best of 7-11, 2-3 alternating processes, load 0.1-2): no gain
// beyond the machine's noise. The sums of the run kernels are kRun = 4 wide, one SSE register.
template <typename T>
void per_sample_grads(const Args<T>& a) {
  at::parallel_for(0, a.g.batch, kGrain, [&](int64_t begin, int64_t end) { samples(a, begin, end); });
}

}  // namespace

void conv2d_per_sample_grads_cpu(const at::Tensor& input, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                                 c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation) {
  const Geometry g = check_args(input, delta, weight_out, bias_out, kernel_size, stride, padding, dilation);
  if (g.batch == 0 || (!weight_out && !bias_out)) return;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_per_sample_grads", [&] {
    Args<scalar_t> a{input.const_data_ptr<scalar_t>(),
                     delta.const_data_ptr<scalar_t>(),
                     weight_out ? weight_out->data_ptr<scalar_t>() : nullptr,
                     bias_out ? bias_out->data_ptr<scalar_t>() : nullptr,
                     input.stride(0),
                     input.stride(1),
                     input.stride(2),
                     input.stride(3),
                     delta.stride(0),
                     delta.stride(1),
                     delta.stride(2),
                     delta.stride(3),
                     weight_out ? weight_out->stride(0) : 0,
                     weight_out ? weight_out->stride(1) : 0,
                     bias_out ? bias_out->stride(0) : 0,
                     bias_out ? bias_out->stride(1) : 0,
                     g,
                     run_kind(input, g)};
    per_sample_grads(a);
  });
}

}  // namespace fastopt
