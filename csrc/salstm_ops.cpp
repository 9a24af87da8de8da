// The C++ CPU provider of the salstm_kernels fused-op contract (see
// salstm_kernels/ops/providers.py and ops/reference_kernels.py for the formulas).
//
// Layout: A (B, 4C, N) with gate rows i, f, o, g; c, h', c', out (B, C, N); N = H * W.
// A may also be channels_last per image (what a channels_last conv writes: the 4C gate values of a
// pixel contiguous, any batch stride); it is then read tile by tile through an in-cache transpose
// instead of being copied to NCHW first, and dA is written in the same channels_last layout.
// Work is split into fixed pixel tiles (kTile) per image, so every reduction (S = Q K^T,
// dP = dO V^T, projection gradients) is a sum of per-tile partials added in tile order:
// the bits do not depend on the thread count.  The small C x C products go through ATen's BLAS
// (at::native::cpublas::gemm), called on one tile at a time from inside at::parallel_for.
// float32 and float64 run natively; other floating dtypes (bfloat16, float16) are computed in
// float32 and the results cast back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "row_kernels.h"

namespace salstm_cpu {
namespace {

using at::Tensor;

constexpr int64_t kTile = 256;  // pixels per work item (fixed: part of the reduction order)

// ------------------------------------------------------------------------------------------------
// Validation and dtype handling
// ------------------------------------------------------------------------------------------------
struct Dims {
  int64_t B, C, H, W, N;
};

void check_float_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

Dims check_A_c(const Tensor& A, const Tensor& c, const char* op) {
  check_float_cpu(A, op, "A");
  check_float_cpu(c, op, "c");
  TORCH_CHECK(A.dim() == 4, op, ": A must be 4-D (B, 4C, H, W), got shape ", A.sizes());
  TORCH_CHECK(A.size(1) % 4 == 0 && A.size(1) > 0, op,
              ": A must be (B, 4C, H, W) with 4C a positive multiple of 4 channels, got shape ", A.sizes());
  Dims d{A.size(0), A.size(1) / 4, A.size(2), A.size(3), A.size(2) * A.size(3)};
  TORCH_CHECK(c.dim() == 4 && c.size(0) == d.B && c.size(1) == d.C && c.size(2) == d.H && c.size(3) == d.W, op,
              ": c must be (B, C, H, W) = (", d.B, ", ", d.C, ", ", d.H, ", ", d.W, ") to match A of shape ",
              A.sizes(), ", got ", c.sizes());
  return d;
}

void check_like_c(const Tensor& t, const Dims& d, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == d.B && t.size(1) == d.C && t.size(2) == d.H && t.size(3) == d.W, op,
              ": ", name, " must be (B, C, H, W) = (", d.B, ", ", d.C, ", ", d.H, ", ", d.W, "), got ", t.sizes());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Contiguous, in the accumulation dtype (no copy when it already is).
Tensor acc(const Tensor& t, at::ScalarType a) { return t.to(a).contiguous(); }

// Where the gate rows of A live: NCHW-contiguous, or channels_last per image (NHWC).
struct ALayout {
  bool nhwc = false;
  int64_t sB = 0;  // batch stride in elements
};

bool nhwc_images(const Tensor& A) {
  const int64_t C4 = A.size(1), H = A.size(2), W = A.size(3);
  return A.stride(1) == 1 && (W == 1 || A.stride(3) == C4) && (H == 1 || A.stride(2) == W * C4);
}

// A in the accumulation dtype, NCHW-contiguous or NHWC per image, copied only when neither.
Tensor acc_A(const Tensor& A_in, at::ScalarType a, ALayout& lay) {
  Tensor A = A_in.to(a);
  if (!A.is_contiguous() && nhwc_images(A)) {
    lay = {true, A.size(0) > 1 ? A.stride(0) : 0};
    return A;
  }
  A = A.contiguous();
  lay = {false, A.size(1) * A.size(2) * A.size(3)};
  return A;
}

// dA (B, 4C, H, W) in the layout the kernels write for A's layout.
Tensor empty_dA(const Tensor& A, const ALayout& lay) {
  return at::empty(A.sizes(), A.options().memory_format(lay.nhwc ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
}

int parse_combination(const std::string& s, bool has_proj, const char* op) {
  int comb;
  if (s == "linear") comb = kLinear;
  else if (s == "nonlinear") comb = kNonlinear;
  else if (s == "none") comb = kNone;
  else TORCH_CHECK(false, op, ": combination must be one of 'linear', 'nonlinear', 'none', got '", s, "'");
  TORCH_CHECK(comb != kNone || has_proj, op, ": combination='none' needs the learned projections (wq, bq, wk, bk, wv, bv)");
  return comb;
}

using OptT = c10::optional<Tensor>;

// Projections: all six given (returns true) or none (false); shapes (C, C) / (C,).
bool check_projections(const OptT& wq, const OptT& bq, const OptT& wk, const OptT& bk, const OptT& wv,
                       const OptT& bv, int64_t C, const char* op) {
  const OptT* p[6] = {&wq, &bq, &wk, &bk, &wv, &bv};
  const char* names[6] = {"wq", "bq", "wk", "bk", "wv", "bv"};
  int given = 0;
  for (int k = 0; k < 6; ++k) given += p[k]->has_value() ? 1 : 0;
  TORCH_CHECK(given == 0 || given == 6, op, ": projections must be all given or all None; got ", given, " of 6");
  if (given == 0) return false;
  for (int k = 0; k < 6; ++k) {
    const Tensor& t = **p[k];
    check_float_cpu(t, op, names[k]);
    if (k % 2 == 0) {
      TORCH_CHECK(t.dim() == 2 && t.size(0) == C && t.size(1) == C, op, ": ", names[k], " must be (C, C) = (", C,
                  ", ", C, "), got ", t.sizes());
    } else {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", names[k], " must be (C,) = (", C, ",), got ", t.sizes());
    }
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// Row-major GEMM on raw pointers: C (M x Nn) = alpha * op(A) op(B) + beta * C.
//
// Goes to the BLAS that libtorch_cpu links (MKL / OpenBLAS export the Fortran sgemm_ / dgemm_)
// when those symbols are present, else to at::mm_out / at::addmm_out on views of the buffers (the
// same BLAS behind the dispatcher, ~µs slower per call).  Either way one call is single-threaded
// inside at::parallel_for, so results do not depend on the thread count.
// ------------------------------------------------------------------------------------------------
}  // namespace
}  // namespace salstm_cpu

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace salstm_cpu {
namespace {

inline bool fortran_blas(float*) { return sgemm_ != nullptr; }
inline bool fortran_blas(double*) { return dgemm_ != nullptr; }
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* al,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* be, float* c,
                         const int* ldc) {
  sgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* al,
                         const double* a, const int* lda, const double* b, const int* ldb, const double* be, double* c,
                         const int* ldc) {
  dgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t Nn, int64_t K, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (M == 0 || Nn == 0) return;
  if (fortran_blas(static_cast<T*>(nullptr))) {
    // Column-major view: C^T (Nn x M) = op(B)^T op(A)^T.
    const char cta = tb ? 'T' : 'N', ctb = ta ? 'T' : 'N';
    const int m = static_cast<int>(Nn), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1)),
              lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    fortran_gemm(&cta, &ctb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    Tensor v = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? v.t() : v;
  };
  Tensor Cv = at::from_blob(c, {M, Nn}, {ldc, 1}, opts);
  Tensor Av = view(a, M, K, lda, ta), Bv = view(b, K, Nn, ldb, tb);
  if (beta == T(0)) {
    at::mm_out(Cv, Av, Bv);
    if (alpha != T(1)) Cv.mul_(alpha);
  } else {
    at::addmm_out(Cv, Cv, Av, Bv, beta, alpha);
  }
}

template <typename T>
inline void mul_rows(T* x, const T* y, int64_t C, int64_t L, int64_t ldx, int64_t ldy) {  // x *= y
  for (int64_t r = 0; r < C; ++r) {
    T* xr = x + r * ldx;
    const T* yr = y + r * ldy;
    for (int64_t j = 0; j < L; ++j) xr[j] *= yr[j];
  }
}

template <typename T>
inline void fill_rows(T* x, const T* bias, int64_t C, int64_t L, int64_t ldx) {
  for (int64_t r = 0; r < C; ++r) std::fill(x + r * ldx, x + r * ldx + L, bias[r]);
}

// y = W x + b on a tile: W (C x C), x (C x L, ld ldx), y (C x L, ld ldy).
template <typename T>
inline void project(const T* w, const T* b, const T* x, int64_t ldx, T* y, int64_t ldy, int64_t C, int64_t L) {
  fill_rows(y, b, C, L, ldy);
  gemm_rm<T>(false, false, C, L, C, T(1), w, C, x, ldx, T(1), y, ldy);
}

struct Tiles {
  int64_t per_image, count;
  Tiles(const Dims& d) : per_image((d.N + kTile - 1) / kTile), count(d.B * ((d.N + kTile - 1) / kTile)) {}
};

// The 4C gate rows of A for pixels [n0, n0 + L) of image b: row r at base + r * ld.  NCHW: a view
// into A (ld N); NHWC: transposed into `scratch` (4C x kTile, ld kTile).
template <typename T>
const T* a_tile(const RowKernels<T>& rk, const T* pA, const ALayout& lay, const Dims& d, int64_t b, int64_t n0,
                int64_t L, T* scratch, int64_t& ld) {
  if (!lay.nhwc) {
    ld = d.N;
    return pA + b * lay.sB + n0;
  }
  rk.transpose(pA + b * lay.sB + n0 * 4 * d.C, 4 * d.C, scratch, kTile, L, 4 * d.C);
  ld = kTile;
  return scratch;
}

// Where the rows of dA for that tile are written (same ld as a_tile); flush_dA moves a scratch
// tile to an NHWC dA (batch stride N * 4C).
template <typename T>
T* dA_tile(T* pdA, const ALayout& lay, const Dims& d, int64_t b, int64_t n0, T* scratch) {
  return lay.nhwc ? scratch : pdA + b * 4 * d.C * d.N + n0;
}

template <typename T>
void flush_dA(const RowKernels<T>& rk, const T* scratch, T* pdA, const ALayout& lay, const Dims& d, int64_t b,
              int64_t n0, int64_t L) {
  if (lay.nhwc) rk.transpose(scratch, kTile, pdA + (b * d.N + n0) * 4 * d.C, 4 * d.C, 4 * d.C, L);
}

// Sum `parts` (items, n) over consecutive groups of `group` items, in item order: out (items/group, n).
template <typename T>
void ordered_sum(const T* parts, int64_t groups, int64_t group, int64_t n, T* out) {
  at::parallel_for(0, groups * n, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t e = b0; e < b1; ++e) {
      const int64_t g = e / n, k = e % n;
      T s = T(0);
      for (int64_t t = 0; t < group; ++t) s += parts[(g * group + t) * n + k];
      out[e] = s;
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Cell ops
// ------------------------------------------------------------------------------------------------
template <typename T>
void cell_forward_impl(const Tensor& A, const ALayout& lay, const Tensor& c, Tensor& h, Tensor& cn, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T* pA = A.const_data_ptr<T>();
  const T* pc = c.const_data_ptr<T>();
  T* ph = h.mutable_data_ptr<T>();
  T* pcn = cn.mutable_data_ptr<T>();
  const int64_t N = d.N, C = d.C, gs = C * N;
  if (lay.nhwc) {  // per pixel tile: A tile transposed in cache, then the same row kernel
    const Tiles tiles(d);
    at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> scratch(4 * C * kTile);
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile, L = std::min(kTile, N - n0);
        int64_t ld;
        const T* a = a_tile(rk, pA, lay, d, b, n0, L, scratch.data(), ld);
        for (int64_t ch = 0; ch < C; ++ch) {
          const int64_t r = (b * C + ch) * N + n0;
          rk.cell_forward(a + ch * ld, C * ld, pc + r, ph + r, pcn + r, L);
        }
      }
    });
    return;
  }
  at::parallel_for(0, d.B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / C, ch = r % C;
      rk.cell_forward(pA + b * 4 * gs + ch * N, gs, pc + r * N, ph + r * N, pcn + r * N, N);
    }
  });
}

std::tuple<Tensor, Tensor> cell_forward(const Tensor& A_in, const Tensor& c_in) {
  const char* op = "salstm_kernels_cpp::cell_forward";
  Dims d = check_A_c(A_in, c_in, op);
  const auto at_ = acc_type(A_in.scalar_type());
  ALayout lay;
  Tensor A = acc_A(A_in, at_, lay), c = acc(c_in, at_);
  Tensor h = at::empty(c_in.sizes(), A.options().memory_format(at::MemoryFormat::Contiguous)),
         cn = at::empty(c_in.sizes(), A.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_forward", [&] { cell_forward_impl<scalar_t>(A, lay, c, h, cn, d); });
  return {h.to(A_in.scalar_type()), cn.to(A_in.scalar_type())};
}

template <typename T>
void cell_backward_impl(const Tensor& A, const ALayout& lay, const Tensor& c, const Tensor& dh, const Tensor& dcn,
                        Tensor& dA, Tensor& dc, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>();
  const T *pdh = dh.const_data_ptr<T>(), *pdcn = dcn.const_data_ptr<T>();
  T *pdA = dA.mutable_data_ptr<T>(), *pdc = dc.mutable_data_ptr<T>();
  const int64_t N = d.N, C = d.C, gs = C * N;
  if (lay.nhwc) {
    const Tiles tiles(d);
    at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> scratch(8 * C * kTile);
      T* da_s = scratch.data() + 4 * C * kTile;
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile, L = std::min(kTile, N - n0);
        int64_t ld;
        const T* a = a_tile(rk, pA, lay, d, b, n0, L, scratch.data(), ld);
        for (int64_t ch = 0; ch < C; ++ch) {
          const int64_t r = (b * C + ch) * N + n0;
          rk.backward(a + ch * ld, C * ld, pc + r, pdh + r, pdcn + r, nullptr, nullptr, nullptr, nullptr, kNone,
                      da_s + ch * ld, pdc + r, L);
        }
        flush_dA(rk, da_s, pdA, lay, d, b, n0, L);
      }
    });
    return;
  }
  at::parallel_for(0, d.B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / C, ch = r % C;
      const int64_t ao = b * 4 * gs + ch * N;
      rk.backward(pA + ao, gs, pc + r * N, pdh + r * N, pdcn + r * N, nullptr, nullptr, nullptr, nullptr, kNone,
                  pdA + ao, pdc + r * N, N);
    }
  });
}

std::tuple<Tensor, Tensor> cell_backward(const Tensor& A_in, const Tensor& c_in, const Tensor& dh_in,
                                         const Tensor& dcn_in) {
  const char* op = "salstm_kernels_cpp::cell_backward";
  Dims d = check_A_c(A_in, c_in, op);
  check_like_c(dh_in, d, op, "dh");
  check_like_c(dcn_in, d, op, "dc_new");
  const auto at_ = acc_type(A_in.scalar_type());
  ALayout lay;
  Tensor A = acc_A(A_in, at_, lay), c = acc(c_in, at_), dh = acc(dh_in, at_), dcn = acc(dcn_in, at_);
  Tensor dA = empty_dA(A, lay), dc = at::empty(c_in.sizes(), A.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_backward",
                             [&] { cell_backward_impl<scalar_t>(A, lay, c, dh, dcn, dA, dc, d); });
  return {dA.to(A_in.scalar_type()), dc.to(c_in.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// Attention ops
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Proj {
  const T *wq = nullptr, *bq = nullptr, *wk = nullptr, *bk = nullptr, *wv = nullptr, *bv = nullptr;
};

// For one tile: h', c' (written to the outputs) and Q, K, V of the tile.  Returns pointers (with
// leading dimensions) to Q, K, V; they live in `buf` (C x kTile slots) or, for V = h', in h'.
template <typename T>
struct TileQKV {
  const T *Q, *K, *V;
  int64_t ldq, ldk, ldv;
};

template <typename T>
TileQKV<T> tile_state(const RowKernels<T>& rk, const T* a, int64_t lda, const T* pc, T* ph, T* pcn, int64_t b,
                      int64_t n0, int64_t L, const Dims& d, int comb, const Proj<T>* proj, T* fq, T* fk, T* q, T* k,
                      T* v, T* v_out, int64_t ld_vout) {
  const int64_t C = d.C, N = d.N;
  for (int64_t ch = 0; ch < C; ++ch) {
    const int64_t r = (b * C + ch) * N + n0;
    rk.attention_state(a + ch * lda, C * lda, pc + r, ph + r, pcn + r, fq + ch * kTile, fk + ch * kTile, comb, L);
  }
  const T* H = ph + b * C * N + n0;  // (C x L), ld N
  if (proj == nullptr) return {fq, fk, H, kTile, kTile, N};
  project(proj->wq, proj->bq, H, N, q, kTile, C, L);
  project(proj->wk, proj->bk, H, N, k, kTile, C, L);
  project(proj->wv, proj->bv, H, N, v_out, ld_vout, C, L);
  if (comb != kNone) {
    mul_rows(q, fq, C, L, kTile, kTile);
    mul_rows(k, fk, C, L, kTile, kTile);
    mul_rows(v_out, H, C, L, ld_vout, N);
  }
  return {q, k, v_out, kTile, kTile, ld_vout};
}

template <typename T>
void softmax_rows(const T* S, T* P, int64_t C, T scale) {
  for (int64_t r = 0; r < C; ++r) {
    const T* s = S + r * C;
    T* p = P + r * C;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < C; ++j) {
      p[j] = s[j] * scale;
      m = std::max(m, p[j]);
    }
    T sum = T(0);
    for (int64_t j = 0; j < C; ++j) {
      p[j] = std::exp(p[j] - m);
      sum += p[j];
    }
    for (int64_t j = 0; j < C; ++j) p[j] /= sum;
  }
}

template <typename T>
void attention_forward_impl(const Tensor& A, const ALayout& lay, const Tensor& c, const Proj<T>* proj, T scale, int comb,
                            Tensor& out, Tensor& h, Tensor& cn, Tensor& P, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const int64_t C = d.C, N = d.N;
  const Tiles tiles(d);
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>();
  T *ph = h.mutable_data_ptr<T>(), *pcn = cn.mutable_data_ptr<T>(), *pout = out.mutable_data_ptr<T>();
  T* pP = P.mutable_data_ptr<T>();
  Tensor Spart = at::empty({tiles.count, C, C}, A.options());
  Tensor Vfull = proj ? at::empty({d.B, C, N}, A.options()) : Tensor();
  T* pS = Spart.mutable_data_ptr<T>();
  T* pV = proj ? Vfull.mutable_data_ptr<T>() : nullptr;
  const int64_t slot = C * kTile;

  // Pass 1: cell + QKV per tile, S partial = Q K^T.
  at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
    Tensor buf = at::empty({((proj ? 4 : 2) + (lay.nhwc ? 4 : 0)) * slot}, A.options());
    T* fq = buf.mutable_data_ptr<T>();
    T* fk = fq + slot;
    T* q = proj ? fk + slot : nullptr;
    T* k = proj ? q + slot : nullptr;
    T* a_s = fq + (proj ? 4 : 2) * slot;  // NHWC A tile (4C x kTile)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      int64_t lda;
      const T* a = a_tile(rk, pA, lay, d, b, n0, L, a_s, lda);
      TileQKV<T> t = tile_state(rk, a, lda, pc, ph, pcn, b, n0, L, d, comb, proj, fq, fk, q, k, static_cast<T*>(nullptr),
                                pV ? pV + b * C * N + n0 : nullptr, N);
      gemm_rm<T>(false, true, C, C, L, T(1), t.Q, t.ldq, t.K, t.ldk, T(0), pS + it * C * C, C);
    }
  });
  // Reduce partials in tile order; softmax.
  Tensor S = at::empty({d.B, C, C}, A.options());
  ordered_sum(pS, d.B, tiles.per_image, C * C, S.mutable_data_ptr<T>());
  const T* pSr = S.const_data_ptr<T>();
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) softmax_rows(pSr + b * C * C, pP + b * C * C, C, scale);
  });
  // Pass 2: O = P V per tile.
  const T* pVr = proj ? pV : ph;
  at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      gemm_rm<T>(false, false, C, L, C, T(1), pP + b * C * C, C, pVr + b * C * N + n0, N, T(0), pout + b * C * N + n0, N);
    }
  });
}

template <typename T>
Proj<T> proj_ptrs(const std::vector<Tensor>& p) {
  Proj<T> r;
  r.wq = p[0].const_data_ptr<T>();
  r.bq = p[1].const_data_ptr<T>();
  r.wk = p[2].const_data_ptr<T>();
  r.bk = p[3].const_data_ptr<T>();
  r.wv = p[4].const_data_ptr<T>();
  r.bv = p[5].const_data_ptr<T>();
  return r;
}

std::vector<Tensor> acc_projections(const OptT& wq, const OptT& bq, const OptT& wk, const OptT& bk, const OptT& wv,
                                    const OptT& bv, at::ScalarType a) {
  return {acc(*wq, a), acc(*bq, a), acc(*wk, a), acc(*bk, a), acc(*wv, a), acc(*bv, a)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_forward(const Tensor& A_in, const Tensor& c_in, const OptT& wq,
                                                             const OptT& bq, const OptT& wk, const OptT& bk,
                                                             const OptT& wv, const OptT& bv, double scale,
                                                             c10::string_view combination) {
  const char* op = "salstm_kernels_cpp::attention_forward";
  Dims d = check_A_c(A_in, c_in, op);
  const bool has_proj = check_projections(wq, bq, wk, bk, wv, bv, d.C, op);
  const int comb = parse_combination(std::string(combination), has_proj, op);
  const auto at_ = acc_type(A_in.scalar_type());
  ALayout lay;
  Tensor A = acc_A(A_in, at_, lay), c = acc(c_in, at_);
  std::vector<Tensor> p = has_proj ? acc_projections(wq, bq, wk, bk, wv, bv, at_) : std::vector<Tensor>{};
  Tensor out = at::empty(c_in.sizes(), A.options()), h = at::empty(c_in.sizes(), A.options()),
         cn = at::empty(c_in.sizes(), A.options()), P = at::empty({d.B, d.C, d.C}, A.options());
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm attention_forward", [&] {
    Proj<scalar_t> pr;
    if (has_proj) pr = proj_ptrs<scalar_t>(p);
    attention_forward_impl<scalar_t>(A, lay, c, has_proj ? &pr : nullptr, static_cast<scalar_t>(scale), comb, out, h, cn,
                                     P, d);
  });
  const auto dt = A_in.scalar_type();
  return {out.to(dt), h.to(dt), cn.to(dt), P};
}

template <typename T>
void attention_backward_impl(const Tensor& A, const ALayout& lay, const Tensor& c, const Proj<T>* proj, const Tensor& P,
                             const Tensor& dout,
                             const Tensor& dh, const Tensor& dcn, T scale, int comb, Tensor& dA, Tensor& dc,
                             Tensor& dproj_flat, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const int64_t C = d.C, N = d.N;
  const Tiles tiles(d);
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>(), *pP = P.const_data_ptr<T>();
  const T *pdO = dout.const_data_ptr<T>(), *pdh = dh.const_data_ptr<T>(), *pdcn = dcn.const_data_ptr<T>();
  T *pdA = dA.mutable_data_ptr<T>(), *pdc = dc.mutable_data_ptr<T>();
  const int64_t slot = C * kTile;
  const int64_t pstride = 3 * (C * C + C);  // per-tile projection-gradient partials

  // Pass 1: dP partial = dO V^T per tile (V recomputed).
  Tensor dPpart = at::empty({tiles.count, C, C}, A.options());
  T* pdPp = dPpart.mutable_data_ptr<T>();
  at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
    Tensor buf = at::empty({((proj ? 3 : 2) + (lay.nhwc ? 4 : 0)) * slot}, A.options());
    T* hb = buf.mutable_data_ptr<T>();
    T* cnb = hb + slot;
    T* vb = proj ? cnb + slot : nullptr;
    T* a_s = hb + (proj ? 3 : 2) * slot;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      int64_t lda;
      const T* a = a_tile(rk, pA, lay, d, b, n0, L, a_s, lda);
      for (int64_t ch = 0; ch < C; ++ch)
        rk.attention_state(a + ch * lda, C * lda, pc + (b * C + ch) * N + n0, hb + ch * kTile, cnb + ch * kTile, nullptr,
                           nullptr, kNone, L);
      const T* V = hb;
      if (proj) {
        project(proj->wv, proj->bv, hb, kTile, vb, kTile, C, L);
        if (comb != kNone) mul_rows(vb, hb, C, L, kTile, kTile);
        V = vb;
      }
      gemm_rm<T>(false, true, C, C, L, T(1), pdO + b * C * N + n0, N, V, kTile, T(0), pdPp + it * C * C, C);
    }
  });
  // dS = P * (dP - rowsum(dP * P)) * scale.
  Tensor dS = at::empty({d.B, C, C}, A.options());
  T* pdS = dS.mutable_data_ptr<T>();
  ordered_sum(pdPp, d.B, tiles.per_image, C * C, pdS);
  for (int64_t r = 0; r < d.B * C; ++r) {
    T* ds = pdS + r * C;
    const T* p = pP + r * C;
    T s = T(0);
    for (int64_t j = 0; j < C; ++j) s += ds[j] * p[j];
    for (int64_t j = 0; j < C; ++j) ds[j] = p[j] * (ds[j] - s) * scale;
  }

  // Pass 2: per tile recompute state and Q, K, V; dQ = dS K, dK = dS^T Q, dV = P^T dO; then dA, dc.
  Tensor dpp = proj ? at::empty({tiles.count, pstride}, A.options()) : Tensor();
  T* pdpp = proj ? dpp.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, tiles.count, 1, [&](int64_t i0, int64_t i1) {
    const int nslots = (proj ? 14 : 7) + (lay.nhwc ? 8 : 0);
    Tensor buf = at::empty({nslots * slot}, A.options());
    T* s0 = buf.mutable_data_ptr<T>();
    auto S = [&](int k) { return s0 + k * slot; };
    T *hb = S(0), *cnb = S(1), *fq = S(2), *fk = S(3), *dQ = S(4), *dK = S(5), *dV = S(6);
    T *q = nullptr, *k = nullptr, *v = nullptr, *dfq = nullptr, *dfk = nullptr, *dfv = nullptr, *dhx = nullptr;
    if (proj) {
      q = S(7); k = S(8); v = S(9); dfq = S(10); dfk = S(11); dfv = S(12); dhx = S(13);
    }
    T* a_s = S(proj ? 14 : 7);  // NHWC: A tile and dA tile (4C x kTile each)
    T* da_s = a_s + 4 * slot;
    // Raw projections kept beside Q, K, V (q, k, v are overwritten by Q, K, V for "none").
    Tensor raw = proj && comb != kNone ? at::empty({3 * slot}, A.options()) : Tensor();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      int64_t lda;
      const T* a = a_tile(rk, pA, lay, d, b, n0, L, a_s, lda);
      for (int64_t ch = 0; ch < C; ++ch)
        rk.attention_state(a + ch * lda, C * lda, pc + (b * C + ch) * N + n0, hb + ch * kTile, cnb + ch * kTile,
                           fq + ch * kTile, fk + ch * kTile, comb, L);
      const T *Q = fq, *K = fk;
      T *rq = nullptr, *rk_ = nullptr, *rv = nullptr;
      if (proj) {
        project(proj->wq, proj->bq, hb, kTile, q, kTile, C, L);
        project(proj->wk, proj->bk, hb, kTile, k, kTile, C, L);
        project(proj->wv, proj->bv, hb, kTile, v, kTile, C, L);
        if (comb != kNone) {
          rq = raw.mutable_data_ptr<T>();
          rk_ = rq + slot;
          rv = rk_ + slot;
          std::copy(q, q + C * kTile, rq);
          std::copy(k, k + C * kTile, rk_);
          std::copy(v, v + C * kTile, rv);
          mul_rows(q, fq, C, L, kTile, kTile);
          mul_rows(k, fk, C, L, kTile, kTile);
          mul_rows(v, hb, C, L, kTile, kTile);
        }
        Q = q; K = k;
      }
      const T* dS_b = pdS + b * C * C;
      const T* P_b = pP + b * C * C;
      const T* dO = pdO + b * C * N + n0;
      gemm_rm<T>(false, false, C, L, C, T(1), dS_b, C, K, kTile, T(0), dQ, kTile);
      gemm_rm<T>(true, false, C, L, C, T(1), dS_b, C, Q, kTile, T(0), dK, kTile);
      gemm_rm<T>(true, false, C, L, C, T(1), P_b, C, dO, N, T(0), dV, kTile);
      const T *gq = dQ, *gk = dK, *gv = dV, *dh_extra = nullptr;
      if (proj) {
        // dfq = dQ * q_raw, dq = dQ * fq (and k, v with fv = h'); for "none" dq = dQ.
        if (comb != kNone) {
          for (int64_t ch = 0; ch < C; ++ch) {
            const int64_t o = ch * kTile;
            for (int64_t j = 0; j < L; ++j) {
              dfq[o + j] = dQ[o + j] * rq[o + j];
              dQ[o + j] *= fq[o + j];
              dfk[o + j] = dK[o + j] * rk_[o + j];
              dK[o + j] *= fk[o + j];
              dfv[o + j] = dV[o + j] * rv[o + j];
              dV[o + j] *= hb[o + j];
            }
          }
          gq = dfq; gk = dfk; gv = dfv;
        } else {
          gq = gk = gv = nullptr;
        }
        T* part = pdpp + it * pstride;
        const T* dys[3] = {dQ, dK, dV};
        const T* ws[3] = {proj->wq, proj->wk, proj->wv};
        for (int m = 0; m < 3; ++m) {
          T* dW = part + m * (C * C + C);
          T* db = dW + C * C;
          gemm_rm<T>(false, true, C, C, L, T(1), dys[m], kTile, hb, kTile, T(0), dW, C);
          for (int64_t ch = 0; ch < C; ++ch) {
            T s = T(0);
            const T* y = dys[m] + ch * kTile;
            for (int64_t j = 0; j < L; ++j) s += y[j];
            db[ch] = s;
          }
          gemm_rm<T>(true, false, C, L, C, T(1), ws[m], C, dys[m], kTile, m == 0 ? T(0) : T(1), dhx, kTile);
        }
        dh_extra = dhx;
      }
      // Final pointwise pass, row by row (buffers have ld kTile, the tensors ld N).
      T* da = dA_tile(pdA, lay, d, b, n0, da_s);
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t r = (b * C + ch) * N + n0, o = ch * kTile;
        rk.backward(a + ch * lda, C * lda, pc + r, pdh + r, pdcn + r, dh_extra ? dh_extra + o : nullptr,
                    gq ? gq + o : nullptr, gk ? gk + o : nullptr, gv ? gv + o : nullptr, gq ? comb : kNone,
                    da + ch * lda, pdc + r, L);
      }
      flush_dA(rk, da_s, pdA, lay, d, b, n0, L);
    }
  });
  if (proj) ordered_sum(pdpp, 1, tiles.count, pstride, dproj_flat.mutable_data_ptr<T>());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_backward(
    const Tensor& A_in, const Tensor& c_in, const OptT& wq, const OptT& bq, const OptT& wk, const OptT& bk,
    const OptT& wv, const OptT& bv, const Tensor& P_in, const Tensor& dout_in, const Tensor& dh_in,
    const Tensor& dcn_in, double scale, c10::string_view combination) {
  const char* op = "salstm_kernels_cpp::attention_backward";
  Dims d = check_A_c(A_in, c_in, op);
  const bool has_proj = check_projections(wq, bq, wk, bk, wv, bv, d.C, op);
  const int comb = parse_combination(std::string(combination), has_proj, op);
  check_like_c(dout_in, d, op, "dout");
  check_like_c(dh_in, d, op, "dh");
  check_like_c(dcn_in, d, op, "dc_new");
  check_float_cpu(P_in, op, "P");
  TORCH_CHECK(P_in.dim() == 3 && P_in.size(0) == d.B && P_in.size(1) == d.C && P_in.size(2) == d.C, op,
              ": P must be (B, C, C) = (", d.B, ", ", d.C, ", ", d.C, "), got ", P_in.sizes());
  const auto at_ = acc_type(A_in.scalar_type());
  ALayout lay;
  Tensor A = acc_A(A_in, at_, lay), c = acc(c_in, at_), P = acc(P_in, at_), dout = acc(dout_in, at_),
         dh = acc(dh_in, at_), dcn = acc(dcn_in, at_);
  std::vector<Tensor> p = has_proj ? acc_projections(wq, bq, wk, bk, wv, bv, at_) : std::vector<Tensor>{};
  Tensor dA = empty_dA(A, lay), dc = at::empty(c_in.sizes(), A.options());
  Tensor dproj = at::empty({has_proj ? 3 * (d.C * d.C + d.C) : 0}, A.options());
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm attention_backward", [&] {
    Proj<scalar_t> pr;
    if (has_proj) pr = proj_ptrs<scalar_t>(p);
    attention_backward_impl<scalar_t>(A, lay, c, has_proj ? &pr : nullptr, P, dout, dh, dcn, static_cast<scalar_t>(scale),
                                      comb, dA, dc, dproj, d);
  });
  Tensor g[6];
  if (has_proj) {
    const OptT* src[6] = {&wq, &bq, &wk, &bk, &wv, &bv};
    const int64_t C = d.C, blk = C * C + C;
    for (int m = 0; m < 3; ++m) {
      g[2 * m] = dproj.narrow(0, m * blk, C * C).view({C, C}).to((*src[2 * m])->scalar_type()).clone();
      g[2 * m + 1] = dproj.narrow(0, m * blk + C * C, C).to((*src[2 * m + 1])->scalar_type()).clone();
    }
  } else {
    for (auto& t : g) t = at::empty({0}, A_in.options());
  }
  return {dA.to(A_in.scalar_type()), dc.to(c_in.scalar_type()), g[0], g[1], g[2], g[3], g[4], g[5]};
}

std::string cpu_capability() { return row_kernels_capability(); }

}  // namespace
}  // namespace salstm_cpu

TORCH_LIBRARY(salstm_kernels_cpp, m) {
  m.def("cpu_capability() -> str");
  m.def("cell_forward(Tensor A, Tensor c) -> (Tensor, Tensor)");
  m.def("cell_backward(Tensor A, Tensor c, Tensor dh, Tensor dc_new) -> (Tensor, Tensor)");
  m.def(
      "attention_forward(Tensor A, Tensor c, Tensor? wq, Tensor? bq, Tensor? wk, Tensor? bk, Tensor? wv, "
      "Tensor? bv, float scale, str combination) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor A, Tensor c, Tensor? wq, Tensor? bq, Tensor? wk, Tensor? bk, Tensor? wv, "
      "Tensor? bv, Tensor P, Tensor dout, Tensor dh, Tensor dc_new, float scale, str combination) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(salstm_kernels_cpp, m) {
  m.impl("cpu_capability", &salstm_cpu::cpu_capability);  // no tensor arguments: CompositeExplicit
}

TORCH_LIBRARY_IMPL(salstm_kernels_cpp, CPU, m) {
  m.impl("cell_forward", &salstm_cpu::cell_forward);
  m.impl("cell_backward", &salstm_cpu::cell_backward);
  m.impl("attention_forward", &salstm_cpu::attention_forward);
  m.impl("attention_backward", &salstm_cpu::attention_backward);
}
