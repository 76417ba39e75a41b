// The per-element math of each op, shared by the CPU loops (multi_tensor_cpu.h) and the CUDA
// kernels (multi_tensor_cuda.cuh): T is the storage dtype, MATH_T the arithmetic one (float;
// double for double).
//
// A step has two halves, because the Laplacian of an element needs its neighbours' new
// stencil input before the element's parameter can be updated:
//   advance: g, p and the old state -> the new state, the stencil's input (the new accumulator,
//            bias corrected where the op corrects it; LAdam update_lap: the Adam update;
//            weight_lap: the Adam-stepped parameter; wave_variance: the old v) and ``aux``, what
//            the update needs besides;
//   update:  the stencil term (kSmoothed: x + c2 lap(x), floored, fastopt::smoothed; kLaplacian:
//            c2 lap(x) alone), aux, p, g and the update states -> the new p (and the new update
//            states: LRMSProp's momentum buffer, wave_variance's v and v_prev).
// A functor declares the state tensors each half touches (the op's state lists in the order of
// its signature: advance reads states [0, kAdvanceStates) and writes [0, kAdvanceWrites), update
// reads and writes [kUpdateFirst, kUpdateFirst + kUpdateStates)), what its stencil term is
// (kStencilUse), its floor, and the per-tensor values it derives from the step count and the
// tensor's value (TensorScalars; the value is wave_variance's E0^2, 0 for the others).
// ``set_lr`` sets what the learning rate enters (its constructor calls it; capturable CUDA steps
// call it again in-kernel). Operation order follows fastopt/reference, one rounding per torch op,
// so fp32 agrees with the reference to round-off; bias corrections are multiplied by their
// reciprocal.
#pragma once

#include <math.h>

#include "multi_tensor.h"

namespace fastopt {

// What a functor's update takes from the stencil (see the top of this file).
enum class StencilUse { kSmoothed, kLaplacian };

// Where ``aux`` (what advance hands to update) can be read again from memory: the gradient (the
// siblings), or the first advance state once written (LAdam's m, exactly so only when the state
// is stored in the math dtype: a bf16 m is rounded, the reference uses the fp32 one).
enum class AuxSource { kGradient, kState0 };

// AMP (fastopt/reference/_amp.py): under torch.amp.GradScaler the gradients arrive multiplied by
// the loss scale. Every functor reads g through unscaled(): g * grad_factor, grad_factor being
// GradScaler.unscale_'s float32(1 / scale), set by the driver (1 without a scaler: exact). Where a
// functor hands g on as aux, it hands on the gradient as stored and unscales it again in update, so
// that aux means the same whether the driver passes it in a register or re-reads it from memory.
//
// It also holds two defaults of every functor: whether advance reads p (LAdam weight_lap: its
// stencil input is the AdamW-stepped p) and whether update reads g (wave_variance: its source
// term); the CUDA kernels load a stream only where it is read.
template <typename MATH_T>
struct GradUnscale {
  static constexpr bool kAdvanceReadsParam = false;
  static constexpr bool kUpdateReadsGrad = false;
  MATH_T grad_factor = MATH_T(1);
  FASTOPT_HD MATH_T unscaled(MATH_T g) const { return g * grad_factor; }
};

FASTOPT_HD float math_sqrt(float x) { return sqrtf(x); }
FASTOPT_HD double math_sqrt(double x) { return sqrt(x); }

// The functor's stencil term at one element of a stencil tile (rows as fastopt::smoothed takes them).
template <Smooth S, class Op, typename M>
FASTOPT_HD M stencil_term(const Op& op, const M* up, const M* mid, const M* down, const Coupling<M>& c) {
  if (Op::kStencilUse == StencilUse::kLaplacian) return coupled_laplacian<S, M, /*Divide=*/true>(up, mid, down, c);
  return smoothed<S>(up, mid, down, c, op.floor());
}

// The same for a tensor without a stencil (S is kNone or kClamp), from the stencil input x.
template <Smooth S, class Op, typename M>
FASTOPT_HD M pointwise_term(const Op& op, M x) {
  if (Op::kStencilUse == StencilUse::kLaplacian) return M(0);
  if (S == Smooth::kClamp) return x < op.floor() ? op.floor() : x;
  return x;
}

// a where mask is all ones, b where it is 0, bit for bit (NaN and inf included), without a branch.
template <typename M>
struct BitsOf {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};
FASTOPT_HD float pick(uint32_t mask, float a, float b) {
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}
FASTOPT_HD double pick(uint64_t mask, double a, double b) {
  union {
    double d;
    uint64_t u;
  } x, y;
  x.d = a;
  y.d = b;
  x.u = (x.u & mask) | (y.u & ~mask);
  return x.d;
}

// A floor that never clamps: the smoothed value of update_lap and weight_lap is not floored.
template <typename M>
FASTOPT_HD M no_floor() {
  return -static_cast<M>(INFINITY);
}

// Adam's moments and bias corrections, shared by the LAdam modes with an EMA of g^2 (variance_lap,
// update_lap, weight_lap), and what the three have in common as functors: their state tensors
// (m and v, read and written by advance; no update states) and a smoothed stencil term. aux: the
// gradient by default, unused (update_lap's and weight_lap's updates need their stencil input only).
template <typename T, typename MATH_T>
struct AdamMoments : GradUnscale<MATH_T> {
  using Storage = T;
  using Math = MATH_T;
  static constexpr int kAdvanceStates = 2;  // exp_avg, exp_avg_sq
  static constexpr int kAdvanceWrites = 2;
  static constexpr int kUpdateFirst = 2;
  static constexpr int kUpdateStates = 0;
  static constexpr AuxSource kAux = AuxSource::kGradient;
  static constexpr StencilUse kStencilUse = StencilUse::kSmoothed;

  struct TensorScalars {
    MATH_T inv_bc1, inv_bc2;
  };

  double beta1_, beta2_;  // for the bias corrections, in double as the reference computes them
  double weight_decay_;
  MATH_T beta1, one_minus_beta1, beta2, one_minus_beta2, decay, neg_lr, eps;

  AdamMoments(double lr, double b1, double b2, double eps_, double weight_decay)
      : beta1_(b1), beta2_(b2), weight_decay_(weight_decay), beta1(MATH_T(b1)), one_minus_beta1(MATH_T(1.0 - b1)),
        beta2(MATH_T(b2)), one_minus_beta2(MATH_T(1.0 - b2)), eps(MATH_T(eps_)) {
    set_lr(lr);
  }

  // Also called in-kernel with an lr read from device memory (capturable steps).
  FASTOPT_HD void set_lr(double lr) {
    decay = MATH_T(1.0 - lr * weight_decay_);
    neg_lr = MATH_T(-lr);
  }

  // The reference's 1 - beta ** t, from the tensor's step count t.
  FASTOPT_HD TensorScalars scalars(double step, double = 0) const {
    return TensorScalars{MATH_T(1.0 / (1.0 - pow(beta1_, step))), MATH_T(1.0 / (1.0 - pow(beta2_, step)))};
  }

  // s = {m, v}: old in, new out (the reference's EMAs, one rounding per torch op).
  FASTOPT_HD void moments(MATH_T g, MATH_T* s) const {
    MATH_T m = s[0] * beta1;
    m = m + one_minus_beta1 * g;
    MATH_T v = s[1] * beta2;
    v = v + one_minus_beta2 * g * g;
    s[0] = m;
    s[1] = v;
  }

  // Adam's update m_hat / (sqrt(v_hat) + eps), as the reference's foreach_div / addcdiv round it.
  FASTOPT_HD MATH_T adam_update(const TensorScalars& k, MATH_T m, MATH_T v) const {
    return (m * k.inv_bc1) / (math_sqrt(v * k.inv_bc2) + eps);
  }
};

// LAdam, mode variance_lap (fastopt/reference/ladam.py::ladam_step_reference):
//   p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr (m / bc1) / (sqrt(max(v/bc2 + c2 lap(v/bc2), eps)) + eps),  bc_i = 1 - b_i^t.
template <typename T, typename MATH_T>
struct LAdamStepFunctor : AdamMoments<T, MATH_T> {
  using Base = AdamMoments<T, MATH_T>;
  using typename Base::TensorScalars;
  static constexpr AuxSource kAux = AuxSource::kState0;  // the new m

  using Base::Base;

  FASTOPT_HD MATH_T floor() const { return this->eps; }

  // s = {m, v}: old in, new out; aux = the new m; returns v_hat, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars& k, MATH_T g, MATH_T, MATH_T* s, MATH_T& aux) const {
    this->moments(this->unscaled(g), s);
    aux = s[0];
    return s[1] * k.inv_bc2;
  }

  FASTOPT_HD MATH_T update(const TensorScalars& k, MATH_T p, MATH_T m, MATH_T v_smooth, MATH_T*, MATH_T) const {
    p = p * this->decay;
    return p + this->neg_lr * (m * k.inv_bc1) / (math_sqrt(v_smooth) + this->eps);
  }
};

// LAdam, mode update_lap (fastopt/reference/ladam.py::ladam_update_lap_step_reference): the
// moments as variance_lap; u = m_hat / (sqrt(v_hat) + eps); p = p (1 - lr wd) - lr (u + c2 lap(u)).
template <typename T, typename MATH_T>
struct LAdamUpdateLapStepFunctor : AdamMoments<T, MATH_T> {
  using Base = AdamMoments<T, MATH_T>;
  using typename Base::TensorScalars;

  using Base::Base;

  FASTOPT_HD MATH_T floor() const { return no_floor<MATH_T>(); }

  // s = {m, v}: old in, new out; returns u, Adam's update, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars& k, MATH_T g, MATH_T, MATH_T* s, MATH_T& aux) const {
    aux = g;
    this->moments(this->unscaled(g), s);
    return this->adam_update(k, s[0], s[1]);
  }

  FASTOPT_HD MATH_T update(const TensorScalars&, MATH_T p, MATH_T, MATH_T u_smooth, MATH_T*, MATH_T) const {
    p = p * this->decay;
    return p + this->neg_lr * u_smooth;
  }
};

// LAdam, mode weight_lap (fastopt/reference/ladam.py::ladam_weight_lap_step_reference): a plain
// AdamW step q = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), then p = q + c2 lap(q). The
// stencil's input is q, which needs the old p: advance reads p (and leaves it), update writes it.
template <typename T, typename MATH_T>
struct LAdamWeightLapStepFunctor : AdamMoments<T, MATH_T> {
  using Base = AdamMoments<T, MATH_T>;
  using typename Base::TensorScalars;
  static constexpr bool kAdvanceReadsParam = true;

  using Base::Base;

  FASTOPT_HD MATH_T floor() const { return no_floor<MATH_T>(); }

  // s = {m, v}: old in, new out; returns q, the AdamW-stepped parameter, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars& k, MATH_T g, MATH_T p, MATH_T* s, MATH_T& aux) const {
    aux = g;
    this->moments(this->unscaled(g), s);
    p = p * this->decay;
    return p + this->neg_lr * this->adam_update(k, s[0], s[1]);
  }

  FASTOPT_HD MATH_T update(const TensorScalars&, MATH_T, MATH_T, MATH_T q_smooth, MATH_T*, MATH_T) const {
    return q_smooth;
  }
};

// LAdam, mode wave_variance (fastopt/reference/ladam.py::ladam_wave_step_reference): m as Adam's;
// v follows a damped leapfrog wave equation whose Laplacian is that of the *old* v:
//   step 1:  v = v_prev = max(g^2, eps);
//   later:   v_next = max((2 - d) v - (1 - d) v_prev + dt^2 (c2 lap(v) - kappa (g^2 - E0^2)), eps),
//            v_prev = v, v = v_next;
//   p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v) + eps).
// States {m, v, v_prev}: advance writes m and hands on the old v as the stencil's input; update
// reads and writes {v, v_prev}. E0^2 is wave_E0^2, or where wave_E0 is 0 the tensor's value: the
// mean of its first step's g^2 (wave_e0_sqs), which the host entry computes and stores.
template <typename T, typename MATH_T>
struct LAdamWaveStepFunctor : GradUnscale<MATH_T> {
  using Storage = T;
  using Math = MATH_T;
  static constexpr int kAdvanceStates = 2;  // exp_avg, exp_avg_sq (read only: the old v)
  static constexpr int kAdvanceWrites = 1;  // exp_avg
  static constexpr int kUpdateFirst = 1;
  static constexpr int kUpdateStates = 2;  // exp_avg_sq, prev_exp_avg_sq
  static constexpr AuxSource kAux = AuxSource::kState0;
  static constexpr StencilUse kStencilUse = StencilUse::kLaplacian;
  static constexpr bool kUpdateReadsGrad = true;
  using Mask = typename BitsOf<MATH_T>::type;
  struct TensorScalars {
    MATH_T inv_bc1, e0_sq;
    Mask first;  // all ones at the tensor's first step, else 0: see pick()
  };

  double beta1_, weight_decay_, e0_sq_;  // e0_sq_: wave_E0^2
  bool fixed_e0_;                         // wave_E0 != 0: else each tensor's stored value
  MATH_T beta1, one_minus_beta1, decay, neg_lr, eps, kappa, two_minus_d, one_minus_d, dt_sq;

  LAdamWaveStepFunctor(double lr, double b1, double eps_, double weight_decay, double dt, double kappa_, double e0,
                       double damping)
      : beta1_(b1), weight_decay_(weight_decay), e0_sq_(e0 * e0), fixed_e0_(e0 != 0), beta1(MATH_T(b1)),
        one_minus_beta1(MATH_T(1.0 - b1)), eps(MATH_T(eps_)), kappa(MATH_T(kappa_)),
        two_minus_d(MATH_T(2.0 - damping)), one_minus_d(MATH_T(1.0 - damping)), dt_sq(MATH_T(dt * dt)) {
    set_lr(lr);
  }

  FASTOPT_HD void set_lr(double lr) {
    decay = MATH_T(1.0 - lr * weight_decay_);
    neg_lr = MATH_T(-lr);
  }

  FASTOPT_HD MATH_T floor() const { return eps; }

  // ``stored_e0_sq``: the tensor's wave_e0_sq (used where wave_E0 is 0).
  FASTOPT_HD TensorScalars scalars(double step, double stored_e0_sq = 0) const {
    return TensorScalars{MATH_T(1.0 / (1.0 - pow(beta1_, step))), MATH_T(fixed_e0_ ? e0_sq_ : stored_e0_sq),
                         step == 1.0 ? ~Mask(0) : Mask(0)};
  }

  // s = {m, v}: m old in, new out; aux = the new m; returns the old v, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars&, MATH_T g, MATH_T, MATH_T* s, MATH_T& aux) const {
    g = this->unscaled(g);
    MATH_T m = s[0] * beta1;
    m = m + one_minus_beta1 * g;
    s[0] = m;
    aux = m;
    return s[1];
  }

  // u = {v, v_prev}: old in, new out; lap = c2 lap(old v).
  FASTOPT_HD MATH_T update(const TensorScalars& k, MATH_T p, MATH_T m, MATH_T lap, MATH_T* u, MATH_T g) const {
    g = this->unscaled(g);
    const MATH_T g_sq = g * g;
    // Both branches computed, one picked by bits: a branch (or a select on a bool) here kept GCC
    // from vectorising the CPU loops (the step measured 3.5x variance_lap's time).
    const MATH_T source = kappa * (g_sq - k.e0_sq);
    const MATH_T accel = lap - source;
    MATH_T wave = two_minus_d * u[0] - one_minus_d * u[1];
    wave = wave + dt_sq * accel;
    MATH_T v = pick(k.first, g_sq, wave);
    v = v < eps ? eps : v;  // NaN stays NaN, as torch.clamp
    u[1] = pick(k.first, v, u[0]);
    u[0] = v;
    p = p * decay;
    return p + neg_lr * ((m * k.inv_bc1) / (math_sqrt(v) + eps));
  }
};

// LAdaGrad (fastopt/reference/siblings.py::ladagrad_step_reference):
//   p *= 1 - lr wd;  s += g^2;  p -= clr g / (sqrt(max(s + c2 lap(s), 0)) + eps),
//   clr = lr / (1 + (t - 1) lr_decay).
template <typename T, typename MATH_T>
struct LAdaGradStepFunctor : GradUnscale<MATH_T> {
  using Storage = T;
  using Math = MATH_T;
  static constexpr int kAdvanceStates = 1;  // sum
  static constexpr int kAdvanceWrites = 1;
  static constexpr int kUpdateFirst = 1;
  static constexpr int kUpdateStates = 0;
  static constexpr AuxSource kAux = AuxSource::kGradient;
  static constexpr StencilUse kStencilUse = StencilUse::kSmoothed;
  struct TensorScalars {
    MATH_T neg_clr;
  };

  double lr_, lr_decay_, weight_decay_;
  MATH_T decay, eps;

  LAdaGradStepFunctor(double lr, double lr_decay, double eps_, double weight_decay)
      : lr_decay_(lr_decay), weight_decay_(weight_decay), eps(MATH_T(eps_)) {
    set_lr(lr);
  }

  // Also called in-kernel with an lr read from device memory (capturable steps), before scalars().
  FASTOPT_HD void set_lr(double lr) {
    lr_ = lr;
    decay = MATH_T(1.0 - lr * weight_decay_);
  }

  FASTOPT_HD MATH_T floor() const { return MATH_T(0); }

  // The reference's -lr / (1 + (t - 1) * lr_decay).
  FASTOPT_HD TensorScalars scalars(double step, double = 0) const {
    return TensorScalars{MATH_T(-lr_ / (1 + (step - 1) * lr_decay_))};
  }

  // s = {sum}; aux = g as stored; returns the new sum, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars&, MATH_T g, MATH_T, MATH_T* s, MATH_T& aux) const {
    aux = g;
    g = this->unscaled(g);
    s[0] = s[0] + g * g;
    return s[0];
  }

  FASTOPT_HD MATH_T update(const TensorScalars& k, MATH_T p, MATH_T g, MATH_T s_smooth, MATH_T*, MATH_T) const {
    g = this->unscaled(g);
    p = p * decay;
    return p + k.neg_clr * g / (math_sqrt(s_smooth) + eps);
  }
};

// LRMSProp (fastopt/reference/siblings.py::lrmsprop_step_reference):
//   p *= 1 - lr wd;  a = alpha a + (1 - alpha) g^2;  d = sqrt(max(a + c2 lap(a), 0)) + eps;
//   momentum mu > 0: buf = mu buf + g / d, p -= lr buf;  else p -= lr g / d.
template <typename T, typename MATH_T, bool Momentum>
struct LRMSPropStepFunctor : GradUnscale<MATH_T> {
  using Storage = T;
  using Math = MATH_T;
  static constexpr int kAdvanceStates = 1;              // square_avg
  static constexpr int kAdvanceWrites = 1;
  static constexpr int kUpdateFirst = 1;
  static constexpr int kUpdateStates = Momentum ? 1 : 0;  // momentum_buffer
  static constexpr AuxSource kAux = AuxSource::kGradient;
  static constexpr StencilUse kStencilUse = StencilUse::kSmoothed;
  struct TensorScalars {};

  double weight_decay_;
  MATH_T alpha, one_minus_alpha, decay, neg_lr, eps, momentum;

  LRMSPropStepFunctor(double lr, double alpha_, double eps_, double weight_decay, double momentum_)
      : weight_decay_(weight_decay), alpha(MATH_T(alpha_)), one_minus_alpha(MATH_T(1.0 - alpha_)), eps(MATH_T(eps_)),
        momentum(MATH_T(momentum_)) {
    set_lr(lr);
  }

  // Also called in-kernel with an lr read from device memory (capturable steps).
  FASTOPT_HD void set_lr(double lr) {
    decay = MATH_T(1.0 - lr * weight_decay_);
    neg_lr = MATH_T(-lr);
  }

  FASTOPT_HD MATH_T floor() const { return MATH_T(0); }
  FASTOPT_HD TensorScalars scalars(double, double = 0) const { return TensorScalars{}; }

  // s = {square_avg}; aux = g as stored; returns the new square average, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars&, MATH_T g, MATH_T, MATH_T* s, MATH_T& aux) const {
    aux = g;
    g = this->unscaled(g);
    MATH_T a = s[0] * alpha;
    s[0] = a + one_minus_alpha * g * g;
    return s[0];
  }

  // u = {momentum buffer}: old in, new out (with momentum).
  FASTOPT_HD MATH_T update(const TensorScalars&, MATH_T p, MATH_T g, MATH_T a_smooth, MATH_T* u, MATH_T) const {
    g = this->unscaled(g);
    if (Momentum) {
      MATH_T buf = u[0] * momentum;
      buf = buf + g / (math_sqrt(a_smooth) + eps);
      u[0] = buf;
      p = p * decay;
      return p + neg_lr * buf;
    }
    p = p * decay;
    return p + neg_lr * g / (math_sqrt(a_smooth) + eps);
  }
};

}  // namespace fastopt
