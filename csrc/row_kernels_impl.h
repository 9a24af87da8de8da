// Implementation of row_kernels.h; included by one .cpp per CPU capability, which defines
// SALSTM_CAP (the namespace) and CPU_CAPABILITY(_*) before including this file.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "row_kernels.h"

namespace salstm_cpu {
namespace SALSTM_CAP {

using at::vec::Vectorized;

namespace {

template <typename T>
C10_ALWAYS_INLINE Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  // exp_u20: ATen's inline polynomial exp (<= 2 ulp; no SLEEF call); double falls back to exp.
  return one / (one + x.neg().exp_u20());
}

// tanh.  float: no SLEEF call (Sleef_tanhf16_u10 was ~60% of the cell kernel's time, perf):
//   |x| <  0.4: odd Taylor series to x^13 (truncation < 5e-9 relative);
//   |x| >= 0.4: (1 - e) / (1 + e), e = exp_u20(-2|x|) (1 - e >= 0.55: no cancellation),
//   |x| clamped at 9 (tanh(9) rounds to 1 in float), the sign restored last; NaN propagates.
// double keeps ATen's tanh (float64 is the gradcheck / accuracy path).
template <typename T>
inline Vectorized<T> tanh_(const Vectorized<T>& x) {
  return x.tanh();
}

template <>
C10_ALWAYS_INLINE Vectorized<float> tanh_(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V one(1.f);
  const V ax = at::vec::minimum(x.abs(), V(9.f));
  const V e = (ax * V(-2.f)).exp_u20();
  const V large = (one - e) / (one + e);
  const V x2 = ax * ax;
  V p(3.5921280e-3f);                            // 21844 / 6081075
  p = at::vec::fmadd(p, x2, V(-8.8632355e-3f));  // -1382 / 155925
  p = at::vec::fmadd(p, x2, V(2.1869488e-2f));   // 62 / 2835
  p = at::vec::fmadd(p, x2, V(-5.3968254e-2f));  // -17 / 315
  p = at::vec::fmadd(p, x2, V(1.3333333e-1f));   // 2 / 15
  p = at::vec::fmadd(p, x2, V(-3.3333333e-1f));  // -1 / 3
  p = at::vec::fmadd(p, x2, one);
  const V r = V::blendv(large, ax * p, ax < V(0.4f));
  return V::blendv(r, r.neg(), x < V(0.f));
}

template <typename T>
struct State {
  Vectorized<T> i, f, o, g, c, cn, tc, h;
};

template <typename T>
C10_ALWAYS_INLINE State<T> load_state(const T* A, int64_t gs, const T* c, int64_t j, int64_t n) {
  using V = Vectorized<T>;
  State<T> s;
  s.i = sigmoid(V::loadu(A + j, n));
  s.f = sigmoid(V::loadu(A + gs + j, n));
  s.o = sigmoid(V::loadu(A + 2 * gs + j, n));
  s.g = tanh_(V::loadu(A + 3 * gs + j, n));
  s.c = V::loadu(c + j, n);
  s.cn = s.f * s.c + s.i * s.g;
  s.tc = tanh_(s.cn);
  s.h = s.o * s.tc;
  return s;
}

template <typename T>
void cell_forward(const T* A, int64_t gs, const T* c, T* h, T* cn, int64_t L) {
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t j = 0; j < L; j += W) {
    const int64_t n = std::min<int64_t>(W, L - j);
    State<T> s = load_state(A, gs, c, j, n);
    s.h.store(h + j, n);
    s.cn.store(cn + j, n);
  }
}

template <typename T>
void attention_state(const T* A, int64_t gs, const T* c, T* h, T* cn, T* fq, T* fk, int comb, int64_t L) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V half(T(0.5)), zero(T(0));
  for (int64_t j = 0; j < L; j += W) {
    const int64_t n = std::min<int64_t>(W, L - j);
    State<T> s = load_state(A, gs, c, j, n);
    s.h.store(h + j, n);
    s.cn.store(cn + j, n);
    if (comb == kLinear) {
      ((s.f + s.cn) * half).store(fq + j, n);
      ((s.g + s.h) * half).store(fk + j, n);
    } else if (comb == kNonlinear) {
      at::vec::maximum(s.f * s.cn, zero).store(fq + j, n);
      at::vec::maximum(s.g * s.h, zero).store(fk + j, n);
    }
  }
}

template <typename T>
void backward(const T* A, int64_t gs, const T* c, const T* dh, const T* dcn, const T* dh_extra,
              const T* dfq, const T* dfk, const T* dfv, int comb, T* dA, T* dc, int64_t L) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V one(T(1)), half(T(0.5)), zero(T(0));
  const bool factors = dfq != nullptr && comb != kNone;
  for (int64_t j = 0; j < L; j += W) {
    const int64_t n = std::min<int64_t>(W, L - j);
    State<T> s = load_state(A, gs, c, j, n);
    V dh_t = V::loadu(dh + j, n);
    V dc_t = V::loadu(dcn + j, n);
    V df = zero, dg = zero;
    if (dh_extra != nullptr) dh_t = dh_t + V::loadu(dh_extra + j, n);
    if (factors) {
      const V gq = V::loadu(dfq + j, n);
      const V gk = V::loadu(dfk + j, n);
      if (comb == kLinear) {
        df = gq * half;
        dc_t = dc_t + gq * half;
        dg = gk * half;
        dh_t = dh_t + gk * half;
      } else {
        const V mq = V::blendv(zero, gq, (s.f * s.cn) > zero);
        const V mk = V::blendv(zero, gk, (s.g * s.h) > zero);
        df = mq * s.cn;
        dc_t = dc_t + mq * s.f;
        dg = mk * s.h;
        dh_t = dh_t + mk * s.g;
      }
      dh_t = dh_t + V::loadu(dfv + j, n);
    }
    const V dct = dc_t + dh_t * s.o * (one - s.tc * s.tc);
    (dct * s.g * s.i * (one - s.i)).store(dA + j, n);
    ((dct * s.c + df) * s.f * (one - s.f)).store(dA + gs + j, n);
    (dh_t * s.tc * s.o * (one - s.o)).store(dA + 2 * gs + j, n);
    ((dct * s.i + dg) * (one - s.g * s.g)).store(dA + 3 * gs + j, n);
    (dct * s.f).store(dc + j, n);
  }
}

template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
  // ATen's transpose_mxn: 16 x 16 register blocks for float on AVX-512, a plain loop otherwise;
  // blocked here so the generic loop stays within cache lines of both buffers.
  constexpr int64_t kB = 16;
  for (int64_t i = 0; i < M; i += kB) {
    for (int64_t j = 0; j < N; j += kB) {
      at::vec::transpose_mxn<T>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                static_cast<int>(std::min(kB, M - i)), static_cast<int>(std::min(kB, N - j)));
    }
  }
}

}  // namespace

template <typename T>
RowKernels<T> row_kernels() {
  return RowKernels<T>{&cell_forward<T>, &attention_state<T>, &backward<T>, &transpose<T>};
}
template RowKernels<float> row_kernels<float>();
template RowKernels<double> row_kernels<double>();

}  // namespace SALSTM_CAP
}  // namespace salstm_cpu
