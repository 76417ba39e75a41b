// The per-element math of each op, shared by the CPU loops (multi_tensor_cpu.h) and the CUDA
// kernels (multi_tensor_cuda.cuh): T is the storage dtype, MATH_T the arithmetic one (float;
// double for double).
//
// A step has two halves, because the Laplacian of an element needs its neighbours' new
// accumulator before the element's parameter can be updated:
//   advance: g and the old state -> the new state, the stencil's input (the new accumulator, bias
//            corrected where the op corrects it) and ``aux``, what the update needs besides;
//   update:  the smoothed accumulator (fastopt::smoothed), aux and p -> the new p (and the new
//            momentum buffer, for LRMSProp with momentum).
// A functor declares how many state tensors each half reads and writes (kAdvanceStates,
// kUpdateStates: the op's state lists in the order of its signature), its Laplacian floor, and
// the per-tensor values it derives from the step count (TensorScalars). ``set_lr`` sets what the
// learning rate enters (its constructor calls it; capturable CUDA steps call it again in-kernel).
// Operation order follows fastopt/reference, one rounding per torch op, so fp32 agrees with the
// reference to round-off; bias corrections are multiplied by their reciprocal.
#pragma once

#include <math.h>

#include "multi_tensor.h"

namespace fastopt {

// Where ``aux`` (what advance hands to update) can be read again from memory: the gradient (the
// siblings), or the first advance state once written (LAdam's m, exactly so only when the state
// is stored in the math dtype: a bf16 m is rounded, the reference uses the fp32 one).
enum class AuxSource { kGradient, kState0 };

// AMP (fastopt/reference/_amp.py): under torch.amp.GradScaler the gradients arrive multiplied by
// the loss scale. Every functor reads g through unscaled(): g * grad_factor, grad_factor being
// GradScaler.unscale_'s float32(1 / scale), set by the driver (1 without a scaler: exact). Where a
// functor hands g on as aux, it hands on the gradient as stored and unscales it again in update, so
// that aux means the same whether the driver passes it in a register or re-reads it from memory.
template <typename MATH_T>
struct GradUnscale {
  MATH_T grad_factor = MATH_T(1);
  FASTOPT_HD MATH_T unscaled(MATH_T g) const { return g * grad_factor; }
};

FASTOPT_HD float math_sqrt(float x) { return sqrtf(x); }
FASTOPT_HD double math_sqrt(double x) { return sqrt(x); }

// LAdam, mode variance_lap (fastopt/reference/ladam.py::ladam_step_reference):
//   p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr (m / bc1) / (sqrt(max(v/bc2 + c2 lap(v/bc2), eps)) + eps),  bc_i = 1 - b_i^t.
template <typename T, typename MATH_T>
struct LAdamStepFunctor : GradUnscale<MATH_T> {
  using Storage = T;
  using Math = MATH_T;
  static constexpr int kAdvanceStates = 2;  // exp_avg, exp_avg_sq
  static constexpr int kUpdateStates = 0;
  static constexpr AuxSource kAux = AuxSource::kState0;
  struct TensorScalars {
    MATH_T inv_bc1, inv_bc2;
  };

  double beta1_, beta2_;  // for the bias corrections, in double as the reference computes them
  double weight_decay_;
  MATH_T beta1, one_minus_beta1, beta2, one_minus_beta2, decay, neg_lr, eps;

  LAdamStepFunctor(double lr, double b1, double b2, double eps_, double weight_decay)
      : beta1_(b1), beta2_(b2), weight_decay_(weight_decay), beta1(MATH_T(b1)), one_minus_beta1(MATH_T(1.0 - b1)),
        beta2(MATH_T(b2)), one_minus_beta2(MATH_T(1.0 - b2)), eps(MATH_T(eps_)) {
    set_lr(lr);
  }

  // Also called in-kernel with an lr read from device memory (capturable steps).
  FASTOPT_HD void set_lr(double lr) {
    decay = MATH_T(1.0 - lr * weight_decay_);
    neg_lr = MATH_T(-lr);
  }

  FASTOPT_HD MATH_T floor() const { return eps; }

  // The reference's 1 - beta ** t, from the tensor's step count t.
  FASTOPT_HD TensorScalars scalars(double step) const {
    return TensorScalars{MATH_T(1.0 / (1.0 - pow(beta1_, step))), MATH_T(1.0 / (1.0 - pow(beta2_, step)))};
  }

  // s = {m, v}: old in, new out; aux = the new m; returns v_hat, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars& k, MATH_T g, MATH_T* s, MATH_T& aux) const {
    g = this->unscaled(g);
    MATH_T m = s[0] * beta1;
    m = m + one_minus_beta1 * g;
    MATH_T v = s[1] * beta2;
    v = v + one_minus_beta2 * g * g;
    s[0] = m;
    s[1] = v;
    aux = m;
    return v * k.inv_bc2;
  }

  FASTOPT_HD MATH_T update(const TensorScalars& k, MATH_T p, MATH_T m, MATH_T v_smooth, MATH_T*) const {
    p = p * decay;
    return p + neg_lr * (m * k.inv_bc1) / (math_sqrt(v_smooth) + eps);
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
  static constexpr int kUpdateStates = 0;
  static constexpr AuxSource kAux = AuxSource::kGradient;
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
  FASTOPT_HD TensorScalars scalars(double step) const {
    return TensorScalars{MATH_T(-lr_ / (1 + (step - 1) * lr_decay_))};
  }

  // s = {sum}; aux = g as stored; returns the new sum, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars&, MATH_T g, MATH_T* s, MATH_T& aux) const {
    aux = g;
    g = this->unscaled(g);
    s[0] = s[0] + g * g;
    return s[0];
  }

  FASTOPT_HD MATH_T update(const TensorScalars& k, MATH_T p, MATH_T g, MATH_T s_smooth, MATH_T*) const {
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
  static constexpr int kUpdateStates = Momentum ? 1 : 0;  // momentum_buffer
  static constexpr AuxSource kAux = AuxSource::kGradient;
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
  FASTOPT_HD TensorScalars scalars(double) const { return TensorScalars{}; }

  // s = {square_avg}; aux = g as stored; returns the new square average, the stencil's input.
  FASTOPT_HD MATH_T advance(const TensorScalars&, MATH_T g, MATH_T* s, MATH_T& aux) const {
    aux = g;
    g = this->unscaled(g);
    MATH_T a = s[0] * alpha;
    s[0] = a + one_minus_alpha * g * g;
    return s[0];
  }

  // u = {momentum buffer}: old in, new out (with momentum).
  FASTOPT_HD MATH_T update(const TensorScalars&, MATH_T p, MATH_T g, MATH_T a_smooth, MATH_T* u) const {
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
