// The multi-tensor helper shared by every op of fastopt._C, on the CPU and on CUDA.
//
// A step of the LAdam family updates a list of tensors. Each tensor is cut into tiles (a range
// of rows times a range of columns of its stencil grid) and the tiles of all tensors are
// processed in one parallel loop (CPU) or one kernel launch (CUDA), apex multi_tensor_apply
// style. Plain C++ without torch headers, so that nvcc compiles the .cu files against it on a
// machine whose torch has no CUDA.
//
// The in-place stencil race: a tile updates its state in place, but its Laplacian needs the
// *new* second moment of the rows and columns just outside it (its halo), which other tiles,
// maybe on other threads, overwrite. So the halo's new values are computed from the old state
// (and the never-written gradient) *before* any tile writes: a pre-pass stores them in a small
// scratch buffer (2 rows + 2 columns per tile), and the main pass reads them from there. A
// tensor that is a single tile needs no pre-pass: its owner reads the old last row before it
// writes anything, and keeps a copy of its new first row for the wrap-around.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline
#endif

namespace fastopt {

// How the stencil's input is smoothed into the denominator of a tensor.
enum class Smooth : int32_t {
  kNone = 0,   // use_lap is false: the accumulator as it is
  kClamp = 1,  // use_lap, but the tensor's layout gets no Laplacian: max(x, floor) only
  kLine = 2,   // 1-D circular [1, -2, 1]
  kFive = 3,   // 2-D circular 5-point
  kNine = 4,   // 2-D circular 9-point [[1, 4, 1], [4, -20, 4], [1, 4, 1]] / 6
};

FASTOPT_HD bool is_vertical(Smooth s) { return s == Smooth::kFive || s == Smooth::kNine; }
FASTOPT_HD bool has_stencil(Smooth s) { return s == Smooth::kLine || is_vertical(s); }

// The grid a tensor is walked on: rows x cols in logical (row-major) order. Tensors without a
// stencil are one row of numel elements.
struct TensorGrid {
  int64_t rows;
  int64_t cols;
  Smooth smooth;
  int32_t pad = 0;  // explicit: CUDA tile tables are compared byte for byte (cuda_host.cpp), padding included
};

// ladam 0.4.1's layout rules (fastopt/reference/laplacian.py::stencil_layout) and use_lap:
// 1-D with n >= 4 -> (1, n) with the 1-D stencil; 2-D and up -> (shape[0], numel / shape[0]) if
// both sides are >= 3; else no Laplacian. ``nine_point`` picks the 2-D stencil.
inline TensorGrid stencil_grid(const int64_t* sizes, int64_t dim, bool use_lap, bool nine_point) {
  int64_t numel = 1;
  for (int64_t d = 0; d < dim; ++d) numel *= sizes[d];
  TensorGrid flat{1, numel, use_lap ? Smooth::kClamp : Smooth::kNone};
  if (!use_lap || dim == 0) return flat;
  if (dim == 1) return sizes[0] >= 4 ? TensorGrid{1, sizes[0], Smooth::kLine} : flat;
  const int64_t rows = sizes[0];
  const int64_t cols = rows ? numel / rows : 0;
  if (rows < 3 || cols < 3) return flat;
  return TensorGrid{rows, cols, nine_point ? Smooth::kNine : Smooth::kFive};
}

// A rectangle of one tensor's grid processed by one thread (CPU) or one thread block (CUDA).
struct Tile {
  int32_t tensor;
  int32_t pad_;
  int64_t row0, nrows;
  int64_t col0, ncols;
  int64_t halo;  // offset of the tile's halo in the scratch buffer; -1: the tile is the whole tensor
};

// Where a tile's halo lives in the scratch buffer (offsets from Tile::halo, in elements):
// the new values of the row above and the row below, each ncols + 2 wide (corners included),
// then, when the tile is narrower than its grid, the columns left and right of it, nrows each.
struct HaloLayout {
  int64_t top, bottom, left, right, size;
};

FASTOPT_HD HaloLayout halo_layout(const TensorGrid& g, const Tile& t) {
  HaloLayout h{0, 0, 0, 0, 0};
  if (is_vertical(g.smooth)) {
    h.top = 0;
    h.bottom = t.ncols + 2;
    h.size = 2 * (t.ncols + 2);
  }
  if (t.ncols < g.cols) {
    h.left = h.size;
    h.right = h.size + t.nrows;
    h.size += 2 * t.nrows;
  }
  return h;
}

// How big tiles are: tiles with a 2-D stencil at most ``max_cols`` wide and ``max_rows`` tall
// (their rows live in cache or shared memory), 1-D stencil tiles at most ``max_line_cols`` wide,
// and about ``target_elems`` elements per tile (enough work to amortise a tile's halo).
// Column cuts fall on multiples of ``align`` (CUDA: 8, so that a tile's rows start on 16-byte
// boundaries wherever the tensor's do, for 128-bit accesses; the widths above must be multiples).
struct TilingPolicy {
  int64_t max_cols;
  int64_t max_line_cols;
  int64_t target_elems;
  int64_t max_rows;  // 0: no limit
  int64_t align = 1;
};

struct TilePlan {
  std::vector<Tile> tiles;
  int64_t halo_elems = 0;  // size of the scratch buffer
  int64_t max_cols = 0;    // widest tile with a stencil (row buffer sizes)
  int64_t elems = 0;       // total elements
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cuts every tensor into tiles. Depends only on the shapes and the policy (never on the number
// of threads), so results are the same bit for bit whatever the thread count.
inline TilePlan plan_tiles(const std::vector<TensorGrid>& grids, const TilingPolicy& policy) {
  TilePlan plan;
  for (int32_t t = 0; t < static_cast<int32_t>(grids.size()); ++t) {
    const TensorGrid& g = grids[t];
    const int64_t numel = g.rows * g.cols;
    if (numel == 0) continue;
    plan.elems += numel;
    // Balanced cuts: sizes differ by at most one row or column; column cuts on multiples of
    // align when it is above 1 (widths rounded up to one, so there may be fewer tiles).
    int64_t col_width = 0;
    auto align_cols = [&](int64_t tiles) {
      if (policy.align <= 1) return tiles;
      col_width = ceil_div(ceil_div(g.cols, tiles), policy.align) * policy.align;
      return ceil_div(g.cols, col_width);
    };
    int64_t col_tiles, row_tiles;
    if (!has_stencil(g.smooth)) {
      // Elementwise: no halo, any width (the CPU walks a tile in cache-sized pieces).
      col_tiles = align_cols(ceil_div(numel, policy.target_elems));
      row_tiles = 1;
    } else {
      col_tiles = align_cols(ceil_div(g.cols, is_vertical(g.smooth) ? policy.max_cols : policy.max_line_cols));
      const int64_t width = col_width ? col_width : ceil_div(g.cols, col_tiles);
      int64_t rows_per_tile = is_vertical(g.smooth) ? policy.target_elems / width : 1;
      if (rows_per_tile < 1) rows_per_tile = 1;
      if (policy.max_rows > 0 && rows_per_tile > policy.max_rows) rows_per_tile = policy.max_rows;
      row_tiles = ceil_div(g.rows, rows_per_tile);
    }
    auto col_cut = [&](int64_t c) {
      if (col_width) return c * col_width < g.cols ? c * col_width : g.cols;
      return g.cols * c / col_tiles;
    };
    const bool split = col_tiles * row_tiles > 1 && has_stencil(g.smooth);
    for (int64_t r = 0; r < row_tiles; ++r) {
      const int64_t r0 = g.rows * r / row_tiles, r1 = g.rows * (r + 1) / row_tiles;
      for (int64_t c = 0; c < col_tiles; ++c) {
        const int64_t c0 = col_cut(c), c1 = col_cut(c + 1);
        Tile tile{t, 0, r0, r1 - r0, c0, c1 - c0, -1};
        if (split) {
          tile.halo = plan.halo_elems;
          plan.halo_elems += halo_layout(g, tile).size;
        }
        if (has_stencil(g.smooth) && tile.ncols > plan.max_cols) plan.max_cols = tile.ncols;
        plan.tiles.push_back(tile);
      }
    }
  }
  return plan;
}

// Storage types. bf16 and fp16 are tags: their tensors are handled as raw 16-bit words
// (Raw<T>), converted with the rounding torch uses (round to nearest even), in plain bit
// arithmetic so that the same code runs on the CPU and on CUDA and vectorises.
struct bf16 {};
struct fp16 {};

template <typename T>
struct RawOf {
  using type = T;
};
template <>
struct RawOf<bf16> {
  using type = uint16_t;
};
template <>
struct RawOf<fp16> {
  using type = uint16_t;
};
template <typename T>
using Raw = typename RawOf<T>::type;

FASTOPT_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } x;
  x.f = f;
  return x.u;
}
FASTOPT_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } x;
  x.u = u;
  return x.f;
}

template <typename T>
struct Codec {  // float, double: no conversion beyond the math type's
  template <typename M>
  static FASTOPT_HD M load(T x) { return static_cast<M>(x); }
  template <typename M>
  static FASTOPT_HD T store(M x) { return static_cast<T>(x); }
};

template <>
struct Codec<bf16> {
  template <typename M>
  static FASTOPT_HD M load(uint16_t x) { return static_cast<M>(bits_float(static_cast<uint32_t>(x) << 16)); }
  static FASTOPT_HD uint16_t store(float x) {
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
  }
};

template <>
struct Codec<fp16> {
  template <typename M>
  static FASTOPT_HD M load(uint16_t h) {
    // Normal numbers: shift the exponent and mantissa into place and rescale by 2^-112 (the bias
    // difference); subnormals: build 0.5 + m * 2^-24 as a float and subtract 0.5.
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normal = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? float_bits(subnormal) : float_bits(normal);
    return static_cast<M>(bits_float(sign | magnitude));
  }
  static FASTOPT_HD uint16_t store(float x) {
    // Scale into the half range so that the float adder rounds the mantissa to 10 bits (to
    // nearest even), then read the exponent and mantissa off the sum.
    float base = (x < 0 ? -x : x) * 0x1.0p+112f * 0x1.0p-110f;
    const uint32_t w = float_bits(x);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t bias_bits = shl1_w & 0xFF000000u;
    const uint32_t bias = bias_bits < 0x71000000u ? 0x71000000u : bias_bits;
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// load<T, M>(raw): a stored value in the math type; store<T>(math): back, rounded once.
template <typename T, typename M>
FASTOPT_HD M load(Raw<T> x) { return Codec<T>::template load<M>(x); }
template <typename T, typename M>
FASTOPT_HD Raw<T> store(M x) { return Codec<T>::store(x); }

// The stencil's weights: c2 for the 1-D and 5-point stencils, c2 / 6 for the 9-point one.
template <typename M>
struct Coupling {
  M c2, c2_sixth;
  Coupling(double c2_) : c2(M(c2_)), c2_sixth(M(c2_ / 6.0)) {}
};

// c2 * lap(x) at one element, from the new values of the element's row (mid) and the rows above
// and below (up, down); 0 where the tensor gets no stencil. Each row pointer is at the element's
// left neighbour, so [0], [1], [2] are left, centre, right. The 9-point stencil's 1/6 is folded
// into c2 (a multiplication), or with Divide taken as the reference rounds it, c2 * (sum / 6): the
// wave equation's v cancels down to near eps, where an ulp of its terms is a large part of v.
template <Smooth S, typename M, bool Divide = false>
FASTOPT_HD M coupled_laplacian(const M* up, const M* mid, const M* down, const Coupling<M>& k) {
  const M x = mid[1];
  if (S == Smooth::kLine) return k.c2 * (mid[0] + mid[2] - M(2) * x);
  if (S == Smooth::kFive) return k.c2 * (up[1] + down[1] + mid[0] + mid[2] - M(4) * x);
  if (S == Smooth::kNine) {
    const M faces = up[1] + down[1] + mid[0] + mid[2];
    const M corners = up[0] + up[2] + down[0] + down[2];
    const M sum = M(4) * faces + corners - M(20) * x;
    return Divide ? k.c2 * (sum / M(6)) : k.c2_sixth * sum;
  }
  return M(0);
}

// The stencil's input after smoothing, at one element: x + c2 * lap(x), floored (kNone: x as it
// is). A floor of -inf smooths without clamping (LAdam's update_lap and weight_lap).
template <Smooth S, typename M>
FASTOPT_HD M smoothed(const M* up, const M* mid, const M* down, const Coupling<M>& k, M floor) {
  const M x = mid[1];
  if (S == Smooth::kNone) return x;
  const M s = S == Smooth::kClamp ? x : x + coupled_laplacian<S>(up, mid, down, k);
  return s < floor ? floor : s;  // NaN stays NaN, as torch.clamp
}

}  // namespace fastopt
