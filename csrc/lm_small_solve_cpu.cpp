// lm_small_solve: one attempt's damped system of a small Levenberg-Marquardt step, solved by
// Householder QR in one call (the 'qr' solve of fastopt.lm for P up to a hundred or so).
//
// Math: fastopt/reference/lm_small_solve.py::lm_small_solve_reference. The matrix is the
// symmetric matrix whose strict lower triangle is that of `matrix` and whose diagonal is
// `diagonal + shift`; x solves matrix x = rhs through A = QR (Householder reflectors, LAPACK
// geqr2's conventions: beta = -sign(alpha) ||x||, tau = (beta - alpha) / beta, v(0) = 1), Q^T rhs
// applied reflector by reflector and R x = Q^T rhs by back substitution.
//
// Why not LAPACK: for the 61 x 61 system of tlm's sinc example, torch's geqrf + ormqr +
// solve_triangular took ~40-50 us per attempt on this project's CPU (MKL, 2 threads), against
// ~19 us for this loop, which keeps the matrix in one column-major scratch buffer and applies each
// reflector to four columns at a time (the dot products' reductions overlap). From ~128 columns on
// LAPACK's blocked code wins; fastopt/lm/_engine/solve.py calls this only below its threshold.
//
// Float32 and float64, arithmetic in the dtype as LAPACK's (each column's norm accumulated in
// double, so float32 squares cannot overflow). A singular matrix gives inf or NaN entries in x
// (a zero pivot of R), as geqrf + solve_triangular do: the caller rejects a non-finite update.
// Inputs may have any strides; they are read, never written; x is a new contiguous tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace fastopt {
namespace {

constexpr const char* kOp = "lm_small_solve";

// Overwrites the column-major n x n matrix a with its QR factors and b (length n) with x.
template <typename T>
void qr_solve_in_place(T* a, T* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    T* v = a + k * n;  // column k; below the diagonal it becomes the reflector's v (v(k) = 1 implied)
    double sigma = 0;
#pragma omp simd reduction(+ : sigma)
    for (int64_t i = k + 1; i < n; ++i) sigma += static_cast<double>(v[i]) * static_cast<double>(v[i]);
    if (sigma == 0) continue;  // nothing below the diagonal: H = I (tau = 0), as LAPACK's larfg
    const T alpha = v[k];
    const T norm = static_cast<T>(std::sqrt(static_cast<double>(alpha) * static_cast<double>(alpha) + sigma));
    const T beta = alpha >= 0 ? -norm : norm;
    const T tau = (beta - alpha) / beta;
    const T scal = T(1) / (alpha - beta);
#pragma omp simd
    for (int64_t i = k + 1; i < n; ++i) v[i] *= scal;
    v[k] = beta;
    // H = I - tau v v^T on the columns right of k, four at a time, then on the rest and on b.
    int64_t j = k + 1;
    for (; j + 4 <= n; j += 4) {
      T* c0 = a + j * n;
      T* c1 = c0 + n;
      T* c2 = c1 + n;
      T* c3 = c2 + n;
      T w0 = 0, w1 = 0, w2 = 0, w3 = 0;
#pragma omp simd reduction(+ : w0, w1, w2, w3)
      for (int64_t i = k + 1; i < n; ++i) {
        w0 += v[i] * c0[i];
        w1 += v[i] * c1[i];
        w2 += v[i] * c2[i];
        w3 += v[i] * c3[i];
      }
      w0 = (w0 + c0[k]) * tau;
      w1 = (w1 + c1[k]) * tau;
      w2 = (w2 + c2[k]) * tau;
      w3 = (w3 + c3[k]) * tau;
      c0[k] -= w0;
      c1[k] -= w1;
      c2[k] -= w2;
      c3[k] -= w3;
#pragma omp simd
      for (int64_t i = k + 1; i < n; ++i) {
        c0[i] -= w0 * v[i];
        c1[i] -= w1 * v[i];
        c2[i] -= w2 * v[i];
        c3[i] -= w3 * v[i];
      }
    }
    for (; j <= n; ++j) {
      T* c = j < n ? a + j * n : b;
      T w = 0;
#pragma omp simd reduction(+ : w)
      for (int64_t i = k + 1; i < n; ++i) w += v[i] * c[i];
      w = (w + c[k]) * tau;
      c[k] -= w;
#pragma omp simd
      for (int64_t i = k + 1; i < n; ++i) c[i] -= w * v[i];
    }
  }
  // R x = Q^T b, column by column (R's columns are contiguous in a).
  for (int64_t j = n - 1; j >= 0; --j) {
    const T* r = a + j * n;
    const T x = b[j] / r[j];
    b[j] = x;
#pragma omp simd
    for (int64_t i = 0; i < j; ++i) b[i] -= r[i] * x;
  }
}

template <typename T>
void solve_kernel(const at::Tensor& matrix, const at::Tensor& diagonal, const at::Tensor& rhs, double shift,
                  T* x) {
  const int64_t n = matrix.size(0);
  // One scratch matrix per thread, kept: no allocation per attempt.
  thread_local std::vector<T> scratch;
  scratch.resize(static_cast<size_t>(n * n));
  T* a = scratch.data();
  const T* m = matrix.const_data_ptr<T>();
  const int64_t s0 = matrix.stride(0), s1 = matrix.stride(1);
  const T* d = diagonal.const_data_ptr<T>();
  const int64_t sd = diagonal.stride(0);
  const T* r = rhs.const_data_ptr<T>();
  const int64_t sr = rhs.stride(0);
  const T add = static_cast<T>(shift);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = j + 1; i < n; ++i) {
      const T value = m[i * s0 + j * s1];  // below the diagonal: (i, j) and, mirrored, (j, i)
      a[j * n + i] = value;
      a[i * n + j] = value;
    }
    a[j * n + j] = d[j * sd] + add;  // as torch.add(diagonal, shift) rounds it, in the dtype
    x[j] = r[j * sr];
  }
  qr_solve_in_place(a, x, n);
}

void check_arg(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim, int64_t n) {
  TORCH_CHECK_TYPE(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got one on ", t.device().str());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " must have the dtype of matrix (",
                   c10::toString(dtype), "), got ", c10::toString(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == dim && t.size(0) == n && (dim == 1 || t.size(1) == n), kOp, ": ", name,
                    " must have shape ", dim == 1 ? "(n,)" : "(n, n)", " with n = ", n, ", got ", t.sizes());
}

}  // namespace

at::Tensor lm_small_solve_cpu(const at::Tensor& matrix, const at::Tensor& diagonal, const at::Tensor& rhs,
                              double shift) {
  TORCH_CHECK_VALUE(matrix.dim() == 2 && matrix.size(0) == matrix.size(1), kOp,
                    ": matrix must be square (n, n), got shape ", matrix.sizes());
  const at::ScalarType dtype = matrix.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, kOp, ": matrix must be float32 or float64, got ",
                   c10::toString(dtype));
  const int64_t n = matrix.size(0);
  check_arg("matrix", matrix, dtype, 2, n);
  check_arg("diagonal", diagonal, dtype, 1, n);
  check_arg("rhs", rhs, dtype, 1, n);
  at::Tensor x = at::empty({n}, matrix.options());
  if (n == 0) return x;
  if (dtype == at::kFloat) {
    solve_kernel<float>(matrix, diagonal, rhs, shift, x.mutable_data_ptr<float>());
  } else {
    solve_kernel<double>(matrix, diagonal, rhs, shift, x.mutable_data_ptr<double>());
  }
  return x;
}

}  // namespace fastopt
