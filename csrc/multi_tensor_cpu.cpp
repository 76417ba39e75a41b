// The CPU multi-tensor helper's run-time settings: the ISA of the loops and the tiling.
#include "multi_tensor_cpu.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastopt {
namespace cpu {

namespace {
std::atomic<int64_t> g_max_cols{kDefaultPolicy.max_cols}, g_target_elems{kDefaultPolicy.target_elems},
    g_serial_below{kDefaultSerialBelow};
}  // namespace

Tiling tiling() {
  const int64_t cols = g_max_cols.load(std::memory_order_relaxed);
  return Tiling{TilingPolicy{cols, cols, g_target_elems.load(std::memory_order_relaxed), 0},
                g_serial_below.load(std::memory_order_relaxed)};
}

Tiling set_tiling(const Tiling& t) {
  TORCH_CHECK(t.policy.max_cols >= 1 && t.policy.target_elems >= 1 && t.serial_below >= 0,
              "fastopt: tile sizes must be positive, got max_cols=", t.policy.max_cols,
              ", target_elems=", t.policy.target_elems, ", serial_below=", t.serial_below);
  const Tiling old = tiling();
  g_max_cols.store(t.policy.max_cols);
  g_target_elems.store(t.policy.target_elems);
  g_serial_below.store(t.serial_below);
  return old;
}

bool use_avx2() {
#if FASTOPT_HAVE_AVX2_VARIANT
  // Decided once. ATEN_CPU_CAPABILITY=default asks torch for its baseline kernels; fastopt
  // follows it (and the tests use it to check the baseline build too).
  static const bool avx2 = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap && std::strcmp(cap, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastopt
