// The Gram-matrix ops on CUDA (the fallback behind Triton): tiled products of a matrix's columns,
// lower-triangle tiles only, fp32 accumulation (fp64 for fp64) with explicit fused multiply-adds
// on CUDA cores: no tensor cores, so no TF32. Raw pointers, no torch header (cuda_launch.h).
//
// jacobian_products: one block per tile (ti, tj), tj <= ti, of the (M, M) output; it reads the
// output tile once, adds scale * a[:, ti]^T a[:, tj] (and the shift on the diagonal) and writes
// only entries on or below the diagonal. Math: fastopt/reference/lm.py::jacobian_products_reference.
//
// batched_gram: one block per problem and lower tile of the (P+1) x (P+1) Gram matrix of
// [J | r] (the residual is column P, read in the same pass): entries (i, j), j <= i < P go to
// J^T J and its mirror, row P to J^T r. Math: fastopt/reference/batched_lsq.py.
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "multi_tensor.h"
#include "multi_tensor_cuda.cuh"  // dispatch_dtype

namespace fastopt {
namespace cuda {
namespace {

constexpr int kGramThreads = 256;  // 16 x 16 threads, each owning (TILE/16)^2 outputs
constexpr int kGramSide = 16;

// (ti, tj) of the t-th tile of the lower triangle, in row order: t = ti (ti + 1) / 2 + tj. The
// floating-point square root can be one off for large t; the two loops correct it.
__device__ void lower_tile(int64_t t, int64_t& ti, int64_t& tj) {
  int64_t i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while ((i + 1) * (i + 2) / 2 <= t) ++i;
  while (i * (i + 1) / 2 > t) --i;
  ti = i;
  tj = t - i * (i + 1) / 2;
}

// acc[r][c] += sum_k col(k, row0 + ty + 16 r) * col(k, col0 + tx + 16 c) over k < K, where
// col(k, m) is the loader's value (0 outside the matrix). Both column panels go through shared
// memory BK rows at a time; consecutive threads load consecutive columns.
template <typename M, int TILE, int BK, typename Load>
__device__ void gram_tile(const Load& col, int64_t K, int64_t row0, int64_t col0, M (&acc)[TILE / 16][TILE / 16]) {
  constexpr int R = TILE / kGramSide;
  __shared__ M rows_s[BK][TILE];
  __shared__ M cols_s[BK][TILE];
  const int tx = threadIdx.x % kGramSide, ty = threadIdx.x / kGramSide;
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int e = threadIdx.x; e < BK * TILE; e += kGramThreads) {
      const int kk = e / TILE, m = e % TILE;
      rows_s[kk][m] = col(k0 + kk, row0 + m);
      cols_s[kk][m] = col(k0 + kk, col0 + m);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      M x[R], y[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        x[r] = rows_s[kk][ty + kGramSide * r];
        y[r] = cols_s[kk][tx + kGramSide * r];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int c = 0; c < R; ++c) acc[r][c] = fma(x[r], y[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
}

// f(i, j, acc[r][c]) for each output entry (i, j) this thread accumulated in gram_tile.
template <typename M, int TILE, typename F>
__device__ void for_each_entry(int64_t row0, int64_t col0, const M (&acc)[TILE / 16][TILE / 16], const F& f) {
  constexpr int R = TILE / kGramSide;
  const int tx = threadIdx.x % kGramSide, ty = threadIdx.x / kGramSide;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int c = 0; c < R; ++c) f(row0 + ty + kGramSide * r, col0 + tx + kGramSide * c, acc[r][c]);
  }
}

// Column m of a (K, M) strided matrix, 0 outside it.
template <typename T, typename M>
struct StridedColumns {
  const Raw<T>* a;
  int64_t K, M_, sk, sm;
  __device__ M operator()(int64_t k, int64_t m) const {
    return (k < K && m < M_) ? load<T, M>(a[k * sk + m * sm]) : M(0);
  }
};

// Column m of problem b's [J | r]: J's columns, then r; 0 outside.
template <typename T, typename M>
struct AugmentedColumns {
  const Raw<T>* jac;
  const Raw<T>* res;
  int64_t N, P, sjn, sjp, srn;
  __device__ M operator()(int64_t n, int64_t m) const {
    if (n >= N || m > P) return M(0);
    return load<T, M>(m < P ? jac[n * sjn + m * sjp] : res[n * srn]);
  }
};

template <typename T, typename M, int TILE, int BK>
__global__ void __launch_bounds__(kGramThreads)
    jacobian_products_kernel(JacobianProductsArgs g, M scale) {
  constexpr int R = TILE / kGramSide;
  int64_t ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  const int64_t row0 = ti * TILE, col0 = tj * TILE;
  M acc[R][R] = {};
  const StridedColumns<T, M> col{static_cast<const Raw<T>*>(g.a), g.k, g.m, g.stride_ak, g.stride_am};
  gram_tile<M, TILE, BK>(col, g.k, row0, col0, acc);
  M* out = static_cast<M*>(g.out);
  const M* shift = static_cast<const M*>(g.shift);
  for_each_entry<M, TILE>(row0, col0, acc, [&](int64_t i, int64_t j, M sum) {
    if (i >= g.m || j > i) return;
    M* o = out + i * g.stride_oi + j * g.stride_oj;
    M v = *o + scale * sum;
    if (shift != nullptr && i == j) v += shift[i];
    *o = v;
  });
}

template <typename T, typename M, int TILE, int BK>
__global__ void __launch_bounds__(kGramThreads) batched_gram_kernel(BatchedGramArgs g) {
  constexpr int R = TILE / kGramSide;
  const int64_t b = blockIdx.x;
  int64_t ti, tj;
  lower_tile(blockIdx.y, ti, tj);
  const int64_t row0 = ti * TILE, col0 = tj * TILE;
  M acc[R][R] = {};
  const AugmentedColumns<T, M> col{static_cast<const Raw<T>*>(g.jac) + b * g.stride_jb,
                                   static_cast<const Raw<T>*>(g.res) + b * g.stride_rb,
                                   g.n, g.p, g.stride_jn, g.stride_jp, g.stride_rn};
  gram_tile<M, TILE, BK>(col, g.n, row0, col0, acc);
  Raw<T>* jtj = static_cast<Raw<T>*>(g.jtj) + b * g.p * g.p;
  Raw<T>* jtr = static_cast<Raw<T>*>(g.jtr) + b * g.p;
  for_each_entry<M, TILE>(row0, col0, acc, [&](int64_t i, int64_t j, M sum) {
    if (i > g.p || j > i || j >= g.p) return;
    const Raw<T> v = store<T, M>(sum);
    if (i == g.p) {
      jtr[j] = v;
    } else {
      jtj[i * g.p + j] = v;
      jtj[j * g.p + i] = v;
    }
  });
}

int64_t lower_tiles(int64_t side, int64_t tile) {
  const int64_t n = (side + tile - 1) / tile;
  return n * (n + 1) / 2;
}

}  // namespace

// fp32 outputs: 64 x 64 tiles (4 x 4 per thread), 16-deep k steps; fp64: 32 x 32 (2 x 2), so
// that the accumulators and the 8 KB of shared memory per block stay the same size. Untuned:
// no GPU was at hand to measure.
cudaError_t launch_jacobian_products(const JacobianProductsArgs& g, double scale) {
  if (g.m == 0) return cudaSuccess;
  return dispatch_dtype(g.dtype, [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    constexpr int kTile = sizeof(M) == 8 ? 32 : 64;
    const int64_t tiles = lower_tiles(g.m, kTile);
    jacobian_products_kernel<T, M, kTile, 16>
        <<<static_cast<unsigned>(tiles), kGramThreads, 0, g.stream>>>(g, static_cast<M>(scale));
    return cudaGetLastError();
  });
}

// 32 x 32 tiles: the problems this op is for have a few to a few dozen parameters.
cudaError_t launch_batched_gram(const BatchedGramArgs& g) {
  if (g.batch == 0 || g.p == 0) return cudaSuccess;
  return dispatch_dtype(g.dtype, [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    const dim3 grid(static_cast<unsigned>(g.batch), static_cast<unsigned>(lower_tiles(g.p + 1, 32)));
    batched_gram_kernel<T, M, 32, 16><<<grid, kGramThreads, 0, g.stream>>>(g);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastopt
