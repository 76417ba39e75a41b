// The Gram-matrix ops on the CPU.
//
// jacobian_products: out[lower] += scale * a^T a (then diag(out) += shift), the lower triangle
// only, as blocks of gemms (at::addmm_: MKL / OpenBLAS underneath). Math:
// fastopt/reference/lm.py::jacobian_products_reference.
//
// batched_gram: J_b^T J_b and J_b^T r_b of many small problems, one pass over each problem's
// [J | r]: the lower triangle of its (P+1) x (P+1) Gram matrix as dot products of columns, then
// mirrored. Math: fastopt/reference/batched_lsq.py::batched_gram_reference.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tril.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "gram.h"
#include "multi_tensor.h"
#include "multi_tensor_cpu.h"
#include "ops.h"
#include "tensor_lists.h"

namespace fastopt {
namespace {

// -- jacobian_products ----------------------------------------------------------------------------
// out[r0:r1, c0:c1] += scale * a[:, r0:r1]^T a[:, c0:c1]
struct Block {
  int64_t r0, r1, c0, c1;
};

// Blocks of the lower triangle of an m x m product: the block below the diagonal of the two
// halves (one large gemm), then each half the same way, down to diagonal squares of at most kLeaf
// columns (computed whole: their upper part lands above out's diagonal, which is unspecified).
// Flops: 1/2 + 1/2^(d+1) of the full product for d halvings. The gemms run on ATen's intra-op
// threads (MKL's), which split each block better than a loop over unequal blocks would.
// Measured on this project's loaded 2-core AMD EPYC for [J | r] of 8000 x 4354 fp32 (torch 2.13,
// 2 threads, bench/bench_lm.py --problems products, one run): 0.46x the wall time of J.T @ J
// (0.41x its CPU time), the reference's 512-wide column panels 0.48x (0.42x): the same within
// the machine's load noise; 1100-wide leaves were slower (0.56x in another run). Split points on
// multiples of 16 columns (64-byte rows in fp32).
constexpr int64_t kLeaf = 512;

std::vector<Block> gram_blocks(int64_t m) {
  std::vector<Block> blocks;
  std::vector<std::pair<int64_t, int64_t>> todo{{0, m}};
  while (!todo.empty()) {
    const auto [s, e] = todo.back();
    todo.pop_back();
    if (e - s <= kLeaf) {
      blocks.push_back({s, e, s, e});
      continue;
    }
    const int64_t mid = s + ((e - s) / 2 + 15) / 16 * 16;
    blocks.push_back({mid, e, s, mid});
    todo.push_back({s, mid});
    todo.push_back({mid, e});
  }
  return blocks;
}

void add_blocks(const at::Tensor& x, const at::Tensor& out, double scale) {
  for (const Block& b : gram_blocks(x.size(1))) {
    out.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1).addmm_(x.slice(1, b.r0, b.r1).t(), x.slice(1, b.c0, b.c1),
                                                          /*beta=*/1.0, /*alpha=*/scale);
  }
}

// -- batched_gram ---------------------------------------------------------------------------------
// Rows of [J | r] per pass: a problem is packed kChunk rows at a time into a column-major buffer
// (column c of the chunk contiguous), whose q (q + 1) / 2 column pairs are dot products over the
// chunk: vectorised over rows, and the chunk (q x 256 values) stays in L1/L2.
constexpr int64_t kChunk = 256;

struct GramArgs {
  const void* jac;
  const void* res;
  int64_t batch, n, p;
  int64_t sjb, sjn, sjp, srb, srn;
  void* jtj;  // (B, P, P) contiguous
  void* jtr;  // (B, P) contiguous
};

// acc[i * q + j] += cols[i, :rows] . cols[j, :rows] for j <= i < q. cols holds q_pad >= q + 3
// columns of kChunk (those past q zero), so that blocks of 2 x 4 column pairs need no edge cases:
// each loaded value feeds 4 or 2 multiply-adds instead of 1. Entries above the diagonal that a
// block covers are computed and dropped.
template <typename M>
inline void add_column_dots(M* acc, const M* cols, int64_t rows, int64_t q) {
  for (int64_t i = 0; i < q; i += 2) {
    const M* a0 = cols + i * kChunk;
    const M* a1 = a0 + kChunk;
    for (int64_t j = 0; j <= i + 1 && j < q; j += 4) {
      const M* b0 = cols + j * kChunk;
      const M* b1 = b0 + kChunk;
      const M* b2 = b1 + kChunk;
      const M* b3 = b2 + kChunk;
      M s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t k = 0; k < rows; ++k) {
        const M x0 = a0[k], x1 = a1[k];
        s00 += x0 * b0[k];
        s01 += x0 * b1[k];
        s02 += x0 * b2[k];
        s03 += x0 * b3[k];
        s10 += x1 * b0[k];
        s11 += x1 * b1[k];
        s12 += x1 * b2[k];
        s13 += x1 * b3[k];
      }
      const M block[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
      for (int64_t r = 0; r < 2 && i + r < q; ++r) {
        for (int64_t c = 0; c < 4 && j + c <= i + r; ++c) acc[(i + r) * q + j + c] += block[r][c];
      }
    }
  }
}

template <typename M>
FASTOPT_TARGET_AVX2 void add_column_dots_avx2(M* acc, const M* cols, int64_t rows, int64_t q) {
  add_column_dots(acc, cols, rows, q);
}

template <typename T, typename M>
void batched_gram_kernel(const GramArgs& g) {
  using R = Raw<T>;
  const R* jac = static_cast<const R*>(g.jac);
  const R* res = static_cast<const R*>(g.res);
  R* jtj = static_cast<R*>(g.jtj);
  R* jtr = static_cast<R*>(g.jtr);
  const int64_t p = g.p, q = p + 1;
  void (*dots)(M*, const M*, int64_t, int64_t) = cpu::use_avx2() ? &add_column_dots_avx2<M> : &add_column_dots<M>;
  // About 64K multiply-adds per task: a problem's work is ~N q^2 / 2.
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(1, g.n * q * q));
  at::parallel_for(0, g.batch, grain, [&](int64_t b0, int64_t b1) {
    std::vector<M> acc(q * q), cols((q + 4) * kChunk, M(0));
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), M(0));
      const R* jb = jac + b * g.sjb;
      const R* rb = res + b * g.srb;
      for (int64_t n0 = 0; n0 < g.n; n0 += kChunk) {
        const int64_t rows = std::min(kChunk, g.n - n0);
        for (int64_t c = 0; c < p; ++c) {
          const R* src = jb + n0 * g.sjn + c * g.sjp;
          M* dst = cols.data() + c * kChunk;
          for (int64_t k = 0; k < rows; ++k) dst[k] = load<T, M>(src[k * g.sjn]);
        }
        M* dst = cols.data() + p * kChunk;
        for (int64_t k = 0; k < rows; ++k) dst[k] = load<T, M>(rb[(n0 + k) * g.srn]);
        dots(acc.data(), cols.data(), rows, q);
      }
      R* out = jtj + b * p * p;
      for (int64_t i = 0; i < p; ++i) {
        for (int64_t j = 0; j <= i; ++j) out[i * p + j] = out[j * p + i] = store<T, M>(acc[i * q + j]);
      }
      for (int64_t j = 0; j < p; ++j) jtr[b * p + j] = store<T, M>(acc[p * q + j]);
    }
  });
}

}  // namespace

void jacobian_products_cpu(const at::Tensor& a, const at::Tensor& out, double scale,
                           const std::optional<at::Tensor>& shift) {
  check_jacobian_products(a, out, shift, c10::DeviceType::CPU);
  const at::Tensor x = a.scalar_type() == out.scalar_type() ? a : a.to(out.scalar_type());
  add_blocks(x, out, scale);
  if (shift.has_value()) out.diagonal().add_(shift->to(out.scalar_type()));
}

// From this many parameters per problem on, MKL's batched gemm beats the column dots (measured on
// this project's 2-core AVX2 CPU, time of the column dots / torch.bmm, fp32: P = 20: 0.73,
// 64: 0.98, 96: 0.86, 128: 1.35, 200: 1.58; fp64 within 0.86-1.23 from P = 48 on).
constexpr int64_t kGemmFromParams = 112;

// Large P: J^T J and J^T r by at::bmm in the math dtype (fp32 for the half types), as the
// reference computes them (one gemm of J^T [J | r] instead measured 1.3-1.6x slower in fp64: its
// P + 1 columns), J^T J's lower triangle mirrored so that it is exactly symmetric, as the
// column-dot path makes it.
std::tuple<at::Tensor, at::Tensor> batched_gram_by_bmm(const at::Tensor& jac, const at::Tensor& res) {
  const auto math = jac.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor j = jac.to(math);
  const at::Tensor jt = j.transpose(1, 2);
  const at::Tensor lower = at::bmm(jt, j).tril_();
  const at::Tensor jtj = lower.add(lower.tril(-1).transpose(1, 2));
  const at::Tensor jtr = at::bmm(jt, res.to(math).unsqueeze(-1)).squeeze(-1);
  return {jtj.to(jac.scalar_type()).contiguous(), jtr.to(jac.scalar_type()).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> batched_gram_cpu(const at::Tensor& jac, const at::Tensor& res) {
  check_batched_gram(jac, res, c10::DeviceType::CPU);
  const int64_t batch = jac.size(0), n = jac.size(1), p = jac.size(2);
  if (p >= kGemmFromParams && batch > 0 && n > 0) return batched_gram_by_bmm(jac, res);
  at::Tensor jtj = at::empty({batch, p, p}, jac.options());
  at::Tensor jtr = at::empty({batch, p}, jac.options());
  if (batch == 0 || p == 0) return {jtj, jtr};
  const GramArgs args{jac.const_data_ptr(), res.const_data_ptr(), batch, n, p, jac.stride(0), jac.stride(1),
                      jac.stride(2), res.stride(0), res.stride(1), jtj.data_ptr(), jtr.data_ptr()};
  FASTOPT_DISPATCH_FLOATING(jac.scalar_type(), "batched_gram", (batched_gram_kernel<scalar_t, math_t>(args)));
  return {jtj, jtr};
}

}  // namespace fastopt
