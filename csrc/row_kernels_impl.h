// Implementation of row_kernels.h; included by one .cpp per CPU capability, which defines
// SALSTM_CAP (the namespace) and CPU_CAPABILITY(_*) before including this file.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "row_kernels.h"

namespace salstm_cpu {
namespace SALSTM_CAP {

using at::vec::Vectorized;

namespace {

// tanh.  float: one clamped odd rational, no exp (the five exp_u20 + division activations per
// element made the row kernels compute-bound):
//   tanh(x) ~= x P(x^2) / Q(x^2),  P degree 6 (x^13), Q degree 3 (x^6), |x| clamped at 9
//   (tanh(9) rounds to 1 in float); coefficients fitted here (linearized minimax of the relative
//   error on [1e-4, 9], then rounded to float); Horner with FMAs and one division.
//   Max abs error vs float64 over [-20, 20] (4M points, measured through cell_forward): 3.5e-7; odd by construction (the sign
//   stays on x); NaN propagates through the clamp; |x| >= 9 (and +-inf) give exactly +-1.
// double keeps ATen's tanh (float64 is the gradcheck / accuracy path).
template <typename T>
inline Vectorized<T> tanh_(const Vectorized<T>& x) {
  return x.tanh();
}

// Coefficients of P (x^12 ... x^0 in s = x^2) and Q (s^3 ... s^0).
constexpr float kTanhP[7] = {-6.233286321e-14f, 4.281489746e-11f, -1.788570891e-08f, 1.051409981e-05f,
                             3.038408468e-03f,  1.302379072e-01f, 9.999998212e-01f};
constexpr float kTanhQ[4] = {2.453407797e-04f, 2.422946878e-02f, 4.635702968e-01f, 1.f};

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: the same rational with the saturation as mask operations.  No clamp of x is needed:
// every |x| >= 9 lane (where x^13 may overflow to inf / NaN) is replaced by sign(x) * 1 through the
// compare mask, and NaN compares false, so it propagates.  17 instructions instead of 21 through
// at::vec (whose compare / blendv go mask -> vector -> mask).
template <>
C10_ALWAYS_INLINE Vectorized<float> tanh_(const Vectorized<float>& xv) {
  const __m512 x = xv;
  const __m512 s = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kTanhP[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kTanhP[k]));
  __m512 q = _mm512_set1_ps(kTanhQ[0]);
  for (int k = 1; k < 4; ++k) q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kTanhQ[k]));
  const __m512 r = _mm512_div_ps(_mm512_mul_ps(x, p), q);
  const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(9.f), _CMP_GE_OQ);
  // (x & sign) | 1.0f: +-1 with x's sign, in one ternary-logic instruction.
  const __m512i one_signed = _mm512_ternarylogic_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN),
                                                       _mm512_castps_si512(_mm512_set1_ps(1.f)), 0xEA);
  return Vectorized<float>(_mm512_mask_blend_ps(big, r, _mm512_castsi512_ps(one_signed)));
}
#else
template <>
C10_ALWAYS_INLINE Vectorized<float> tanh_(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V xc = at::vec::clamp(x, V(-9.f), V(9.f));
  const V s = xc * xc;
  V p(kTanhP[0]);
  for (int k = 1; k < 7; ++k) p = at::vec::fmadd(p, s, V(kTanhP[k]));
  V q(kTanhQ[0]);
  for (int k = 1; k < 4; ++k) q = at::vec::fmadd(q, s, V(kTanhQ[k]));
  // |x| >= 9: exactly +-1 (the rational gives 1 - 1.8e-7 there), so sigmoid saturates to 0 / 1.
  return V::blendv((xc * p) / q, at::vec::clamp(x, V(-1.f), V(1.f)), x.abs() >= V(9.f));
}
#endif

// exp(-x) for sigmoid.  float without AVX-512: ATen's polynomial exp_u20 (relative error ~1e-6),
// which clamps its argument and so turns NaN into a number: NaN is put back.  double: ATen's exp.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> exp_neg(const Vectorized<T>& x) {
  return x.neg().exp();
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: exp(-x) = e^-u 2^-n with n = round(x log2 e), u = x - n ln 2 (one FMA; |u| <= ln2 / 2),
// e^-u by its Taylor series to u^6 (truncation <= 1.2e-7 relative; ln 2 rounded to float adds
// <= n 1.9e-9), 2^-n by vscalefps, which also gives inf / 0 past the float range and keeps NaN.
// 12 instructions, against about 20 for ATen's exp_u20 plus a NaN fix-up.
constexpr float kExpNegTaylor[7] = {1.f / 720, -1.f / 120, 1.f / 24, -1.f / 6, 0.5f, -1.f, 1.f};

template <>
C10_ALWAYS_INLINE Vectorized<float> exp_neg(const Vectorized<float>& xv) {
  // |x| <= 104 keeps u exact enough (for |x| ~ 1e30, u = x - n ln2 was ~1e23 and e^-u inf); past
  // it the result is inf / 0 either way.  min / max return their second operand for NaN: x's.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(104.f), xv));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 u = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.6931471805599453f), x);
  __m512 p = _mm512_set1_ps(kExpNegTaylor[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(kExpNegTaylor[k]));
  return Vectorized<float>(_mm512_scalef_ps(p, _mm512_sub_ps(_mm512_setzero_ps(), n)));
}
#else
template <>
C10_ALWAYS_INLINE Vectorized<float> exp_neg(const Vectorized<float>& x) {
  return Vectorized<float>::blendv(x.neg().exp_u20(), x, x.isnan());
}
#endif

// sigmoid(x) = 1 / (1 + exp(-x)): a small relative error over the whole range.  (The form
// 0.5 tanh(x / 2) + 0.5 with the rational tanh has a fixed absolute error, ~1.5e-7, so where a
// gate saturates low its relative error grew: 1e-3 of sigmoid(-11), and sigmoid(x <= -18) was
// exactly 0, a dead gradient.)  x -> -inf: exp overflows to inf (or ATen's clamp gives ~2^128),
// and the result goes to 0.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + exp_neg(x));
}

template <typename T>
struct State {
  Vectorized<T> i, f, o, g, c, cn, tc, h;
};

// kZeroState: the previous state is zero (h = c = 0), A holds the gate rows i, o, g only (o at gs,
// g at 2 * gs), c is not read (may be null) and f, c stay unset: c' = i * g.
template <typename T, bool kZeroState = false>
C10_ALWAYS_INLINE State<T> load_state(const T* A, int64_t gs, const T* c, int64_t j, int64_t n) {
  using V = Vectorized<T>;
  State<T> s;
  s.i = sigmoid(V::loadu(A + j, n));
  if constexpr (kZeroState) {
    s.o = sigmoid(V::loadu(A + gs + j, n));
    s.g = tanh_(V::loadu(A + 2 * gs + j, n));
    s.cn = s.i * s.g;
  } else {
    s.f = sigmoid(V::loadu(A + gs + j, n));
    s.o = sigmoid(V::loadu(A + 2 * gs + j, n));
    s.g = tanh_(V::loadu(A + 3 * gs + j, n));
    s.c = V::loadu(c + j, n);
    s.cn = s.f * s.c + s.i * s.g;
  }
  s.tc = tanh_(s.cn);
  s.h = s.o * s.tc;
  return s;
}

template <typename T, bool kZeroState = false>
void cell_forward(const T* A, int64_t gs, const T* c, T* h, T* cn, int64_t L, Runs runs) {
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t r = 0; r < runs.count; ++r) {
    const T* a = A + r * runs.a;
    const T* cr = kZeroState ? nullptr : c + r * runs.t;
    T *hr = h + r * runs.o, *cnr = cn + r * runs.o;
    for (int64_t j = 0; j < L; j += W) {
      const int64_t n = std::min<int64_t>(W, L - j);
      State<T> s = load_state<T, kZeroState>(a, gs, cr, j, n);
      s.h.store(hr + j, n);
      s.cn.store(cnr + j, n);
    }
  }
}

template <typename T>
void cell_forward_zero_state(const T* A, int64_t gs, T* h, T* cn, int64_t L, Runs runs) {
  cell_forward<T, true>(A, gs, nullptr, h, cn, L, runs);
}

template <typename T>
void attention_state(const T* A, int64_t gs, const T* c, T* h, T* cn, T* fq, T* fk, int comb, int64_t L,
                     Runs runs) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V half(T(0.5)), zero(T(0));
  for (int64_t r = 0; r < runs.count; ++r, A += runs.a, c += runs.t, h += runs.o, cn += runs.o) {
    T* q = comb == kNone ? nullptr : fq + r * runs.buf;
    T* k = comb == kNone ? nullptr : fk + r * runs.buf;
    for (int64_t j = 0; j < L; j += W) {
      const int64_t n = std::min<int64_t>(W, L - j);
      State<T> s = load_state(A, gs, c, j, n);
      s.h.store(h + j, n);
      s.cn.store(cn + j, n);
      if (comb == kLinear) {
        ((s.f + s.cn) * half).store(q + j, n);
        ((s.g + s.h) * half).store(k + j, n);
      } else if (comb == kNonlinear) {
        at::vec::maximum(s.f * s.cn, zero).store(q + j, n);
        at::vec::maximum(s.g * s.h, zero).store(k + j, n);
      }
    }
  }
}

// kZeroState: A and dA have the gate rows i, o, g (see load_state); c, dc, dh_extra and the factor
// gradients are not used (may be null).
template <typename T, bool kZeroState = false>
C10_ALWAYS_INLINE void backward_run(const T* A, int64_t gs, const T* c, const T* dh, const T* dcn, const T* dh_extra,
                                    const T* dfq, const T* dfk, const T* dfv, int comb, T* dA, T* dc, int64_t L) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V one(T(1)), half(T(0.5)), zero(T(0));
  const bool factors = !kZeroState && dfq != nullptr && comb != kNone;
  for (int64_t j = 0; j < L; j += W) {
    const int64_t n = std::min<int64_t>(W, L - j);
    State<T> s = load_state<T, kZeroState>(A, gs, c, j, n);
    V dh_t = dh != nullptr ? V::loadu(dh + j, n) : zero;  // absent gradients are zero
    V dc_t = dcn != nullptr ? V::loadu(dcn + j, n) : zero;
    V df = zero, dg = zero;
    if (!kZeroState && dh_extra != nullptr) dh_t = dh_t + V::loadu(dh_extra + j, n);
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
    if constexpr (kZeroState) {
      (dh_t * s.tc * s.o * (one - s.o)).store(dA + gs + j, n);
      (dct * s.i * (one - s.g * s.g)).store(dA + 2 * gs + j, n);
    } else {
      ((dct * s.c + df) * s.f * (one - s.f)).store(dA + gs + j, n);
      (dh_t * s.tc * s.o * (one - s.o)).store(dA + 2 * gs + j, n);
      ((dct * s.i + dg) * (one - s.g * s.g)).store(dA + 3 * gs + j, n);
      (dct * s.f).store(dc + j, n);
    }
  }
}

template <typename T>
void backward(const T* A, int64_t gs, const T* c, const T* dh, const T* dcn, const T* dh_extra,
              const T* dfq, const T* dfk, const T* dfv, int comb, T* dA, T* dc, int64_t L, Runs runs) {
  for (int64_t r = 0; r < runs.count; ++r) {
    const int64_t a = r * runs.a, t = r * runs.t, u = r * runs.buf;
    backward_run(A + a, gs, c + t, dh ? dh + t : nullptr, dcn ? dcn + t : nullptr, dh_extra ? dh_extra + u : nullptr,
                 dfq ? dfq + u : nullptr,
                 dfk ? dfk + u : nullptr, dfv ? dfv + u : nullptr, comb, dA + a, dc + t, L);
  }
}

// A and dA share the run stride runs.a; dh, dcn advance by runs.t.
template <typename T>
void backward_zero_state(const T* A, int64_t gs, const T* dh, const T* dcn, T* dA, int64_t L, Runs runs) {
  for (int64_t r = 0; r < runs.count; ++r) {
    const int64_t a = r * runs.a, t = r * runs.t;
    backward_run<T, true>(A + a, gs, nullptr, dh ? dh + t : nullptr, dcn ? dcn + t : nullptr, nullptr, nullptr,
                          nullptr, nullptr, kNone, dA + a, nullptr, L);
  }
}

template <typename T>
void mul(T* out, int64_t ldo, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows, int64_t L) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t r = 0; r < rows; ++r, out += ldo, a += lda, b += ldb) {
    for (int64_t j = 0; j < L; j += W) {
      const int64_t n = std::min<int64_t>(W, L - j);
      (V::loadu(a + j, n) * V::loadu(b + j, n)).store(out + j, n);
    }
  }
}

template <typename T>
void row_sums(const T* x, int64_t ld, int64_t rows, int64_t L, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  T lanes[W];
  for (int64_t r = 0; r < rows; ++r, x += ld) {
    V acc(T(0));
    for (int64_t j = 0; j < L; j += W) acc = acc + V::loadu(x + j, std::min<int64_t>(W, L - j));  // zero-filled tail
    acc.store(lanes);
    T s = T(0);
    for (int64_t k = 0; k < W; ++k) s += lanes[k];
    out[r] = s;
  }
}

template <typename T>
void col_sums(const T* x, int64_t ld, int64_t rows, int64_t L, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t j = 0; j < L; j += W) {
    const int64_t n = std::min<int64_t>(W, L - j);
    V acc(T(0));
    for (int64_t r = 0; r < rows; ++r) acc = acc + V::loadu(x + r * ld + j, n);
    acc.store(out + j, n);
  }
}

}  // namespace

template <typename T>
RowKernels<T> row_kernels() {
  RowKernels<T> k;
  k.cell_forward = &cell_forward<T>;
  k.attention_state = &attention_state<T>;
  k.backward = &backward<T>;
  k.cell_forward_zero_state = &cell_forward_zero_state<T>;
  k.backward_zero_state = &backward_zero_state<T>;
  k.mul = &mul<T>;
  k.row_sums = &row_sums<T>;
  k.col_sums = &col_sums<T>;
  return k;
}
template RowKernels<float> row_kernels<float>();
template RowKernels<double> row_kernels<double>();

}  // namespace SALSTM_CAP
}  // namespace salstm_cpu
