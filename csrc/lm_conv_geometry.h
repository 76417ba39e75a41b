// The shape of one 2-D convolution as the LM conv ops (csrc/lm_conv_cpu.cpp,
// csrc/lm_conv_delta_cpu.cpp) see it: the input, the delta at its output, the kernel, stride,
// padding and dilation per spatial dimension, and the output extent they imply.
#pragma once

#include <cstdint>

namespace fastopt {
namespace conv {

struct Geometry {
  int64_t batch, channels, height, width;       // the input
  int64_t out_channels, out_height, out_width;  // the delta
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;

  // The output extents the input, kernel, stride, padding and dilation imply (as F.conv2d's).
  int64_t expected_out_height() const { return (height + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
  int64_t expected_out_width() const { return (width + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
};

}  // namespace conv
}  // namespace fastopt
