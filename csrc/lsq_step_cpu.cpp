// The two ops of a batched Levenberg-Marquardt iteration on the CPU, one pass over each problem's
// state instead of the ~90 small ATen operations (each a pass over the whole batch) that the eager
// torch code takes per iteration:
//
// lsq_propose: the damped normal equations (J^T J + lam diag(scale)) s = -g of each problem, by an
//   in-register Cholesky factorisation (frozen parameters get an identity row), and the trial point
//   x + s clipped to the box.
// lsq_update: gain ratio, accept/reject, Nielsen's damping update, the ftol / xtol / gtol / max_nfev
//   tests and the free-gradient norm of each problem.
//
// Math: fastopt/reference/batched_lsq.py::lsq_propose_reference and lsq_update_reference (the
// algorithm is described in fastopt/lm/nonlinear_lsq.py). Float32 and float64 inputs; arithmetic
// in double for both, results rounded to the inputs' dtype. Where the reference reduces in the
// dtype (its step, predicted reduction and norms in float32), results differ by float32 rounding.
// Inputs may have any strides (the bounds are broadcast views); outputs are new contiguous tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"

namespace fastopt {
namespace {

// The status of a problem still iterating and MINPACK's acceptance threshold of the gain ratio:
// fastopt/reference/batched_lsq.py's LSQ_RUNNING and LSQ_ACCEPT_RATIO.
constexpr int64_t kRunning = -9;
constexpr double kAcceptRatio = 1e-4;
// Problems per task of at::parallel_for: one problem is ~P^3/3 + a few P^2 flops, far below the
// cost of a task for the P of curve fitting; a few hundred problems per task amortise it.
constexpr int64_t kGrain = 256;
// Parameters held on the stack; larger P take a heap buffer per task.
constexpr int64_t kStackParams = 16;

// A strided (B, P) or (B, P, P) view of an input tensor.
template <typename T>
struct View {
  const T* p;
  int64_t s0, s1, s2;
  explicit View(const at::Tensor& t)
      : p(t.const_data_ptr<T>()),
        s0(t.stride(0)),
        s1(t.dim() > 1 ? t.stride(1) : 0),
        s2(t.dim() > 2 ? t.stride(2) : 0) {}
  T operator()(int64_t b) const { return p[b * s0]; }
  T operator()(int64_t b, int64_t i) const { return p[b * s0 + i * s1]; }
  T operator()(int64_t b, int64_t i, int64_t j) const { return p[b * s0 + i * s1 + j * s2]; }
};

// Errors name the op and the argument: TypeError for a dtype or device, ValueError for a shape or value.
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", c10::toString(want), ", got ",
                   c10::toString(t.scalar_type()));
  TORCH_CHECK_TYPE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device().str());
}

// One argument of an op: its name, the tensor, its rank (1: (B,), 2: (B, P), 3: (B, P, P)) and
// dtype (kX: the dtype of x, float32 or float64).
constexpr auto kX = at::ScalarType::Undefined;
struct Arg {
  const char* name;
  const at::Tensor& t;
  int64_t rank;
  at::ScalarType dtype;
};

// Checks every argument's dtype, device and shape against x's (B, P); returns x's dtype.
at::ScalarType check_args(const char* op, std::initializer_list<Arg> args) {
  const at::Tensor& x = args.begin()->t;
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape (B, P), got ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, op, ": x must be float32 or float64, got ",
                   c10::toString(dt));
  for (const Arg& a : args) {
    check_dtype(op, a.name, a.t, a.dtype == kX ? dt : a.dtype);
    std::vector<int64_t> shape{x.size(0)};
    for (int64_t d = 1; d < a.rank; ++d) shape.push_back(x.size(1));
    TORCH_CHECK_VALUE(a.t.sizes().vec() == shape, op, ": ", a.name, " must have shape ", c10::IntArrayRef(shape),
                      ", got ", a.t.sizes());
  }
  return dt;
}

// A scratch buffer of n doubles: on the stack for small P, else on the heap.
class Scratch {
 public:
  explicit Scratch(int64_t n) : heap_(n > kStackParams * (kStackParams + 2) ? n : 0) {}
  double* data() { return heap_.empty() ? stack_ : heap_.data(); }

 private:
  double stack_[kStackParams * (kStackParams + 2)];
  std::vector<double> heap_;
};

// Cholesky factor L (lower, row-major P x P in a) of the symmetric matrix in a's lower triangle,
// then the solution of L L^T s = rhs in rhs. False where a pivot is not positive and finite
// (LAPACK potrf's failure, which torch.linalg.cholesky_ex reports as info > 0).
bool cholesky_solve(double* a, double* rhs, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double d = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= a[j * n + k] * a[j * n + k];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    a[j * n + j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) v -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = v / ljj;
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // L y = rhs
    double v = rhs[i];
    for (int64_t k = 0; k < i; ++k) v -= a[i * n + k] * rhs[k];
    rhs[i] = v / a[i * n + i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T s = y
    double v = rhs[i];
    for (int64_t k = i + 1; k < n; ++k) v -= a[k * n + i] * rhs[k];
    rhs[i] = v / a[i * n + i];
  }
  return true;
}

template <typename T>
void propose_kernel(const at::Tensor& x_t, const at::Tensor& jtj_t, const at::Tensor& g_t, const at::Tensor& lam_t,
                    const at::Tensor& scale_t, const at::Tensor& frozen_t, const at::Tensor& lb_t,
                    const at::Tensor& ub_t, bool bounded, T* x_new, T* step, bool* solved) {
  const int64_t batch = x_t.size(0), n = x_t.size(1);
  const View<T> x(x_t), jtj(jtj_t), g(g_t), lam(lam_t), scale(scale_t), lb(lb_t), ub(ub_t);
  const View<bool> frozen(frozen_t);
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    Scratch scratch(n * (n + 1));
    double* a = scratch.data();
    double* s = a + n * n;
    for (int64_t b = begin; b < end; ++b) {
      const double damping = static_cast<double>(lam(b));
      for (int64_t i = 0; i < n; ++i) {
        const bool free_i = !(bounded && frozen(b, i));
        for (int64_t j = 0; j <= i; ++j) {
          const bool free_j = !(bounded && frozen(b, j));
          a[i * n + j] = free_i && free_j ? static_cast<double>(jtj(b, i, j)) : 0.0;
        }
        a[i * n + i] += free_i ? damping * static_cast<double>(scale(b, i)) : 1.0;
        s[i] = free_i ? -static_cast<double>(g(b, i)) : 0.0;
      }
      bool ok = cholesky_solve(a, s, n);
      for (int64_t i = 0; ok && i < n; ++i) ok = std::isfinite(static_cast<T>(s[i]));
      solved[b] = ok;
      for (int64_t i = 0; i < n; ++i) {
        const T xi = x(b, i);
        T xn = xi + (ok ? static_cast<T>(s[i]) : T(0));
        if (bounded) xn = std::min(std::max(xn, lb(b, i)), ub(b, i));
        x_new[b * n + i] = xn;
        step[b * n + i] = bounded ? xn - xi : (ok ? static_cast<T>(s[i]) : T(0));
      }
    }
  });
}

struct UpdateRules {
  bool bounded;
  double ftol, xtol, gtol, cost_noise;
  int64_t max_nfev;
  double lam_min, lam_max;
};

template <typename T>
struct UpdateOut {
  T *x, *cost, *jtj, *g;
  bool* frozen;
  T* optimality;
  int64_t *status, *nfev;
  T *scale, *lam, *nu;
};

template <typename T>
void update_kernel(const std::vector<at::Tensor>& in, const UpdateRules& r, const UpdateOut<T>& out) {
  const int64_t batch = in[0].size(0), n = in[0].size(1);
  const View<T> x(in[0]), cost(in[1]), jtj(in[2]), g(in[3]);
  const View<int64_t> status(in[5]), nfev(in[6]);
  const View<T> scale(in[7]), lam(in[8]), nu(in[9]), lb(in[10]), ub(in[11]), x_new(in[12]), step(in[13]);
  const View<bool> solved(in[14]);
  const View<T> cost_new(in[15]), jtj_new(in[16]), g_new(in[17]), colsq_new(in[18]);
  constexpr double inf = std::numeric_limits<double>::infinity();
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const bool running = status(b) == kRunning;
      // predicted reduction -(g.s + s.A.s / 2), actual reduction, gain ratio
      double predicted = 0.0, step_sq = 0.0, x_sq = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        double as = 0.0;
        for (int64_t j = 0; j < n; ++j) as += static_cast<double>(jtj(b, i, j)) * static_cast<double>(step(b, j));
        const double si = static_cast<double>(step(b, i)), xi = static_cast<double>(x(b, i));
        predicted -= si * (static_cast<double>(g(b, i)) + 0.5 * as);
        step_sq += si * si;
        x_sq += xi * xi;
      }
      const double c_old = static_cast<double>(cost(b)), c_new = static_cast<double>(cost_new(b));
      const double actual = c_old - c_new;
      double ratio = predicted > 0.0 ? actual / predicted : -inf;
      if (std::isnan(ratio)) ratio = -inf;
      bool finite = std::isfinite(c_new);
      for (int64_t i = 0; finite && i < n; ++i) {
        finite = std::isfinite(static_cast<double>(g_new(b, i)));
        for (int64_t j = 0; finite && j < n; ++j) finite = std::isfinite(static_cast<double>(jtj_new(b, i, j)));
      }
      const bool usable = solved(b) && finite;
      const bool accept = usable && ratio > kAcceptRatio && running;

      // MINPACK's ftol test, or an actual reduction lost in the costs' rounding (the reference's docstring)
      const bool small_prediction = predicted <= r.ftol * c_old;
      bool ftol_met = usable && small_prediction && std::abs(actual) <= r.ftol * c_old && ratio <= 2.0;
      if (r.ftol > 0.0 && r.cost_noise > 0.0)
        ftol_met = ftol_met || (usable && small_prediction && std::abs(actual) <= r.cost_noise * c_old);
      const bool xtol_met = solved(b) && std::sqrt(step_sq) < r.xtol * (r.xtol + std::sqrt(x_sq));
      int64_t code = ftol_met && xtol_met ? 4 : ftol_met ? 2 : xtol_met ? 3 : 0;

      double gnorm = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const T xi = accept ? x_new(b, i) : x(b, i);
        const T gi = accept ? g_new(b, i) : g(b, i);
        const T ci = colsq_new(b, i), sc = scale(b, i);
        out.x[b * n + i] = xi;
        out.g[b * n + i] = gi;
        out.scale[b * n + i] = accept && std::isfinite(ci) ? std::max(sc, ci) : sc;
        const bool fz = r.bounded && ((xi <= lb(b, i) && gi > 0) || (xi >= ub(b, i) && gi < 0));
        out.frozen[b * n + i] = fz;
        const double ag = fz ? 0.0 : std::abs(static_cast<double>(gi));
        gnorm = std::isnan(ag) || std::isnan(gnorm) ? std::numeric_limits<double>::quiet_NaN() : std::max(gnorm, ag);
        for (int64_t j = 0; j < n; ++j) out.jtj[(b * n + i) * n + j] = accept ? jtj_new(b, i, j) : jtj(b, i, j);
      }
      out.cost[b] = accept ? cost_new(b) : cost(b);
      out.optimality[b] = static_cast<T>(gnorm);
      const double shrink = std::max(1.0 - std::pow(2.0 * ratio - 1.0, 3), 1.0 / 3.0);
      const double l = static_cast<double>(lam(b)) * (accept ? shrink : static_cast<double>(nu(b)));
      out.lam[b] = static_cast<T>(std::min(std::max(l, r.lam_min), r.lam_max));
      out.nu[b] = accept ? T(2) : nu(b) * T(2);
      if (accept && gnorm < r.gtol) code = 1;  // gtol wins, as in scipy's loop

      const int64_t evaluations = nfev(b) + (running ? 1 : 0);
      int64_t st = running && code > 0 ? code : status(b);
      if (st == kRunning && evaluations >= r.max_nfev) st = 0;
      out.nfev[b] = evaluations;
      out.status[b] = st;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_propose_cpu(FASTOPT_LSQ_PROPOSE_ARGS) {
  const at::ScalarType dt = check_args("lsq_propose", {{"x", x, 2, kX},
                                                       {"jtj", jtj, 3, kX},
                                                       {"g", g, 2, kX},
                                                       {"lam", lam, 1, kX},
                                                       {"scale", scale, 2, kX},
                                                       {"frozen", frozen, 2, at::kBool},
                                                       {"lb", lb, 2, kX},
                                                       {"ub", ub, 2, kX}});
  const int64_t batch = x.size(0), n = x.size(1);
  at::Tensor x_new = at::empty({batch, n}, x.options());
  at::Tensor step = at::empty({batch, n}, x.options());
  at::Tensor solved = at::empty({batch}, x.options().dtype(at::kBool));
  if (batch == 0) return {x_new, step, solved};
  if (dt == at::kFloat) {
    propose_kernel<float>(x, jtj, g, lam, scale, frozen, lb, ub, bounded, x_new.data_ptr<float>(),
                          step.data_ptr<float>(), solved.data_ptr<bool>());
  } else {
    propose_kernel<double>(x, jtj, g, lam, scale, frozen, lb, ub, bounded, x_new.data_ptr<double>(),
                           step.data_ptr<double>(), solved.data_ptr<bool>());
  }
  return {x_new, step, solved};
}

LsqUpdateResult lsq_update_cpu(FASTOPT_LSQ_UPDATE_ARGS) {
  const char* op = "lsq_update";
  const at::ScalarType dt = check_args(op, {{"x", x, 2, kX},
                                            {"cost", cost, 1, kX},
                                            {"jtj", jtj, 3, kX},
                                            {"g", g, 2, kX},
                                            {"frozen", frozen, 2, at::kBool},
                                            {"status", status, 1, at::kLong},
                                            {"nfev", nfev, 1, at::kLong},
                                            {"scale", scale, 2, kX},
                                            {"lam", lam, 1, kX},
                                            {"nu", nu, 1, kX},
                                            {"lb", lb, 2, kX},
                                            {"ub", ub, 2, kX},
                                            {"x_new", x_new, 2, kX},
                                            {"step", step, 2, kX},
                                            {"solved", solved, 1, at::kBool},
                                            {"cost_new", cost_new, 1, kX},
                                            {"jtj_new", jtj_new, 3, kX},
                                            {"g_new", g_new, 2, kX},
                                            {"colsq_new", colsq_new, 2, kX}});
  const int64_t batch = x.size(0), n = x.size(1);
  const std::vector<at::Tensor> in{x,  cost, jtj,   g,    frozen, status,   nfev,    scale, lam,      nu,
                                   lb, ub,   x_new, step, solved, cost_new, jtj_new, g_new, colsq_new};
  for (const auto& [name, value] : {std::pair<const char*, double>{"ftol", ftol}, {"xtol", xtol}, {"gtol", gtol},
                                    {"cost_noise", cost_noise}}) {
    TORCH_CHECK_VALUE(value >= 0.0, op, ": ", name, " must be >= 0, got ", value);
  }
  TORCH_CHECK_VALUE(max_nfev >= 1, op, ": max_nfev must be >= 1, got ", max_nfev);
  TORCH_CHECK_VALUE(0.0 < lam_min && lam_min <= lam_max, op,
                    ": lam_min and lam_max must satisfy 0 < lam_min <= lam_max, got ", lam_min, " and ", lam_max);
  const auto opts = x.options();
  LsqUpdateResult res{at::empty({batch, n}, opts),
                      at::empty({batch}, opts),
                      at::empty({batch, n, n}, opts),
                      at::empty({batch, n}, opts),
                      at::empty({batch, n}, opts.dtype(at::kBool)),
                      at::empty({batch}, opts),
                      at::empty({batch}, opts.dtype(at::kLong)),
                      at::empty({batch}, opts.dtype(at::kLong)),
                      at::empty({batch, n}, opts),
                      at::empty({batch}, opts),
                      at::empty({batch}, opts)};
  if (batch == 0) return res;
  const UpdateRules rules{bounded, ftol, xtol, gtol, cost_noise, max_nfev, lam_min, lam_max};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    auto& [ox, ocost, ojtj, og, ofrozen, oopt, ostatus, onfev, oscale, olam, onu] = res;
    update_kernel<T>(in, rules,
                     UpdateOut<T>{ox.data_ptr<T>(), ocost.data_ptr<T>(), ojtj.data_ptr<T>(), og.data_ptr<T>(),
                                  ofrozen.data_ptr<bool>(), oopt.data_ptr<T>(), ostatus.data_ptr<int64_t>(),
                                  onfev.data_ptr<int64_t>(), oscale.data_ptr<T>(), olam.data_ptr<T>(),
                                  onu.data_ptr<T>()});
  };
  if (dt == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return res;
}

}  // namespace fastopt
