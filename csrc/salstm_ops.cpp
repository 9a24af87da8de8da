// The C++ CPU provider of the salstm_kernels fused-op contract (see
// salstm_kernels/ops/providers.py and ops/reference_kernels.py for the formulas).
//
// Layout: A (B, 4C, N) with gate rows i, f, o, g; c, h', c', out (B, C, N); N = H * W.  The
// zero-state cell ops (h = c = 0: the first step) take A (B, 3C, N) with gate rows i, o, g.
// A may also be channels_last per image (what a channels_last conv writes: the 4C gate values of a
// pixel contiguous, any batch stride); then every tensor of the call is channels_last and the
// kernels walk pixel-major runs (see Geo), so nothing is copied or transposed.
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
using OptT = c10::optional<Tensor>;

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

// A of the zero-state cell ops: (B, 3C, H, W), gate rows i, o, g (no forget gate).
Dims check_A_zero_state(const Tensor& A, const char* op) {
  check_float_cpu(A, op, "A");
  TORCH_CHECK(A.dim() == 4, op, ": A must be 4-D (B, 3C, H, W) with gate rows i, o, g, got shape ", A.sizes());
  TORCH_CHECK(A.size(1) % 3 == 0 && A.size(1) > 0, op,
              ": A must be (B, 3C, H, W) with 3C a positive multiple of 3 channels (gate rows i, o, g), got shape ",
              A.sizes());
  return Dims{A.size(0), A.size(1) / 3, A.size(2), A.size(3), A.size(2) * A.size(3)};
}

void check_like_c(const Tensor& t, const Dims& d, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == d.B && t.size(1) == d.C && t.size(2) == d.H && t.size(3) == d.W, op,
              ": ", name, " must be (B, C, H, W) = (", d.B, ", ", d.C, ", ", d.H, ", ", d.W, "), got ", t.sizes());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }


// Contiguous, in the accumulation dtype (no copy when it already is).
Tensor acc(const Tensor& t, at::ScalarType a) { return t.to(a).contiguous(); }

// The working layout of one op call, chosen by A (rows: its number of gate rows, 4, or 3 for the
// zero-state cell ops; written 4 below):
//   NCHW: A contiguous (B, 4C, N); every (B, C, H, W) tensor contiguous NCHW; a run of the row
//         kernels is one channel's pixels.
//   NHWC: A channels_last per image (the 4C gate values of a pixel contiguous, any batch stride:
//         what a channels_last conv writes, or a step's slice of a time-major one); every
//         (B, C, H, W) tensor channels_last (B, N, C); a run is one pixel's C channels.
// The (B, C, H, W) outputs and dA are written in that layout, so a channels_last recurrence makes
// no layout copy in either direction; inputs in the other layout are converted at the boundary.
struct Geo {
  bool nhwc;
  int64_t C, N, sA;   // sA: A's batch stride in elements (dA's is always rows C N)
  int64_t rows = 4;   // gate rows in A and dA: 4 (i, f, o, g), or 3 (i, o, g: the zero-state cell)

  at::MemoryFormat format() const { return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
  int64_t gs() const { return nhwc ? C : C * N; }  // distance between the gate rows of A / dA
  int64_t ld_t() const { return nhwc ? C : N; }    // run stride in (B, C, N) tensors
  int64_t ld_buf() const { return nhwc ? C : kTile; }  // run stride in the tile buffers
  int64_t ld_a() const { return nhwc ? rows * C : N; }  // run stride in A and dA
  // Runs of the tile of L pixels at n0: channels (NCHW) or pixels (NHWC), and their length.
  Runs runs(int64_t L) const { return {nhwc ? L : C, ld_a(), ld_t(), ld_t(), ld_buf()}; }
  int64_t run_len(int64_t L) const { return nhwc ? C : L; }
  // First element of the tile (image b, pixels [n0, n0 + L)) in a (B, C, N) tensor, A, dA.
  int64_t t0(int64_t b, int64_t n0) const { return nhwc ? (b * N + n0) * C : b * C * N + n0; }
  int64_t a0(int64_t b, int64_t n0) const { return b * sA + (nhwc ? n0 * rows * C : n0); }
  int64_t dA0(int64_t b, int64_t n0) const { return b * rows * C * N + (nhwc ? n0 * rows * C : n0); }
};

bool nhwc_images(const Tensor& A) {
  const int64_t C4 = A.size(1), H = A.size(2), W = A.size(3);
  return !A.is_contiguous() && A.stride(1) == 1 && (W == 1 || A.stride(3) == C4) && (H == 1 || A.stride(2) == W * C4);
}

// A (rows * C gate channels) in the accumulation dtype, NCHW-contiguous or NHWC per image (copied
// only when neither), and the layout it sets.
Tensor acc_A(const Tensor& A_in, at::ScalarType a, const Dims& d, Geo& geo, int64_t rows = 4) {
  Tensor A = A_in.to(a);
  if (nhwc_images(A)) {
    geo = {true, d.C, d.N, A.size(0) > 1 ? A.stride(0) : 0, rows};
    return A;
  }
  A = A.contiguous();
  geo = {false, d.C, d.N, rows * d.C * d.N, rows};
  return A;
}

// A (B, C, H, W) tensor in the accumulation dtype and the working layout.
Tensor acc_t(const Tensor& t, at::ScalarType a, const Geo& geo) { return t.to(a).contiguous(geo.format()); }

// An optional (B, C, H, W) gradient in the accumulation dtype and working layout; undefined (read as
// zero by the kernels, with no zero tensor allocated or read) when absent.
Tensor acc_opt(const OptT& t, at::ScalarType a, const Geo& geo, const Dims& d, const char* op, const char* name) {
  if (!t.has_value()) return Tensor();
  check_like_c(*t, d, op, name);
  return acc_t(*t, a, geo);
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

Tensor empty_t(const Tensor& like, const Geo& geo) { return at::empty(like.sizes(), like.options().memory_format(geo.format())); }

int parse_combination(const std::string& s, bool has_proj, const char* op) {
  int comb;
  if (s == "linear") comb = kLinear;
  else if (s == "nonlinear") comb = kNonlinear;
  else if (s == "none") comb = kNone;
  else TORCH_CHECK(false, op, ": combination must be one of 'linear', 'nonlinear', 'none', got '", s, "'");
  TORCH_CHECK(comb != kNone || has_proj, op, ": combination='none' needs the learned projections (wq, bq, wk, bk, wv, bv)");
  return comb;
}


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

// ------------------------------------------------------------------------------------------------
// Tile algebra in either layout.  A tile is a C x L matrix (channels x pixels) stored channel-major
// (NCHW: row ch at p + ch * ld) or pixel-major (NHWC: pixel n at p + n * ld, i.e. its transpose).
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Mat {
  const T* p;
  int64_t ld;
};

// S (m x n, row-major, ld n) = beta * S + X Y^T, the sum over the tile's pixels; X a tile of m
// rows, Y of n rows.
template <typename T>
inline void tile_xyT(const Geo& g, int64_t L, int64_t m, int64_t n, Mat<T> X, Mat<T> Y, T beta, T* S) {
  if (g.nhwc) gemm_rm<T>(true, false, m, n, L, T(1), X.p, X.ld, Y.p, Y.ld, beta, S, n);
  else gemm_rm<T>(false, true, m, n, L, T(1), X.p, X.ld, Y.p, Y.ld, beta, S, n);
}

// Z (tile of m rows) = beta * Z + op(M) X, X a tile of k rows; M row-major, (m x k), or (k x m)
// transposed when `tm`.
template <typename T>
inline void mat_tile(const Geo& g, int64_t L, int64_t m, int64_t k, const T* M, bool tm, Mat<T> X, T beta, T* Z,
                     int64_t ldz) {
  const int64_t ldm = tm ? m : k;
  if (g.nhwc) gemm_rm<T>(false, !tm, L, m, k, T(1), X.p, X.ld, M, ldm, beta, Z, ldz);  // Z^T = X^T op(M)^T
  else gemm_rm<T>(tm, false, m, L, k, T(1), M, ldm, X.p, X.ld, beta, Z, ldz);
}

// y (tile of m rows) = W x + b on a tile, W (m x C).
template <typename T>
inline void project(const Geo& g, int64_t L, int64_t m, const T* w, const T* b, Mat<T> x, T* y, int64_t ldy) {
  if (g.nhwc) {
    for (int64_t n = 0; n < L; ++n) std::copy(b, b + m, y + n * ldy);
  } else {
    for (int64_t ch = 0; ch < m; ++ch) std::fill(y + ch * ldy, y + ch * ldy + L, b[ch]);
  }
  mat_tile(g, L, m, g.C, w, false, x, T(1), y, ldy);
}

// out = a * b elementwise on tiles (same layout; out may be a).
template <typename T>
inline void mul_tile(const RowKernels<T>& rk, const Geo& g, int64_t L, T* out, int64_t ldo, Mat<T> a, Mat<T> b) {
  rk.mul(out, ldo, a.p, a.ld, b.p, b.ld, g.runs(L).count, g.run_len(L));
}

// db[ch] = sum over the tile's pixels of dy, a tile of m rows (run stride ld).
template <typename T>
inline void pixel_sum(const RowKernels<T>& rk, const Geo& g, int64_t L, int64_t m, const T* dy, int64_t ld, T* db) {
  if (g.nhwc) rk.col_sums(dy, ld, L, m, db);
  else rk.row_sums(dy, ld, m, L, db);
}

// Per-thread scratch kept across calls: the tile buffers and per-tile partials.  A fresh at::empty
// of these sizes (128 KB to ~1 MB) is served by mmap and page-faulted on every call; reusing them
// removes that.  Slots: 0 tile buffers (worker threads), 1 and 2 partials (calling thread).
// Sizes above kKeepBytes are allocated per call instead of being held.
constexpr size_t kKeepBytes = size_t(8) << 20;

template <typename T>
T* scratch(int slot, int64_t n, Tensor& hold) {
  static thread_local std::vector<T> keep[3];
  if (static_cast<size_t>(n) * sizeof(T) > kKeepBytes) {
    hold = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    return hold.mutable_data_ptr<T>();
  }
  std::vector<T>& v = keep[slot];
  if (v.size() < static_cast<size_t>(n)) v.resize(n);
  return v.data();
}

struct Tiles {
  int64_t per_image, count;
  Tiles(const Dims& d) : per_image((d.N + kTile - 1) / kTile), count(d.B * ((d.N + kTile - 1) / kTile)) {}
};

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

// An attention op is per-tile pass 1 (partials), a per-image step on the partials (reduce in tile
// order, softmax / dS), then per-tile pass 2.  When the images split evenly over the threads, each
// thread runs whole images through all three (no barrier between the phases, and pass 2 finds the
// image's h' / V still in its cache); otherwise phase by phase over all tiles.  The per-tile work
// and the reduction order are the same either way, so the bits are too.
template <typename F1, typename FI, typename F2>
void tiles_then_image_then_tiles(const Tiles& tiles, int64_t B, const F1& pass1, const FI& per_image, const F2& pass2) {
  const int64_t pi = tiles.per_image;
  if (B % std::max(1, at::get_num_threads()) == 0) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        pass1(b * pi, (b + 1) * pi);
        per_image(b);
        pass2(b * pi, (b + 1) * pi);
      }
    });
    return;
  }
  at::parallel_for(0, tiles.count, 1, pass1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) per_image(b);
  });
  at::parallel_for(0, tiles.count, 1, pass2);
}

// Sum the tile partials of image b (C x C each, in tile order) into out.
template <typename T>
void image_sum(const T* parts, int64_t b, int64_t per_image, int64_t n, T* out) {
  if (per_image == 0) {  // an empty image (H or W = 0): no partials, the sum is zero
    std::fill(out, out + n, T(0));
    return;
  }
  const T* p = parts + b * per_image * n;
  std::copy(p, p + n, out);
  for (int64_t t = 1; t < per_image; ++t)
    for (int64_t k = 0; k < n; ++k) out[k] += p[t * n + k];
}

// ------------------------------------------------------------------------------------------------
// Cell ops: pointwise, so plain chunks of whole runs (NCHW: channel rows, NHWC: pixels).
// ------------------------------------------------------------------------------------------------
// The cell ops are pointwise: chunks of whole runs (NCHW: channel rows, NHWC: pixels) that never
// cross an image; f(a, da, t, count) gets a chunk's first offsets in A, dA and the (B, C, N)
// tensors and its number of runs.
template <typename F>
void for_run_chunks(const Geo& g, const Dims& d, const F& f) {
  const int64_t per_image = g.runs(d.N).count, len = g.run_len(d.N);
  at::parallel_for(0, d.B * per_image, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {
      const int64_t b = r / per_image, k = r % per_image, e = std::min(r1, (b + 1) * per_image);
      f(g.a0(b, 0) + k * g.ld_a(), g.dA0(b, 0) + k * g.ld_a(), g.t0(b, 0) + k * g.ld_t(), e - r);
      r = e;
    }
  });
}

template <typename T>
void cell_forward_impl(const Tensor& A, const Geo& g, const Tensor& c, Tensor& h, Tensor& cn, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T* pA = A.const_data_ptr<T>();
  const T* pc = c.const_data_ptr<T>();
  T* ph = h.mutable_data_ptr<T>();
  T* pcn = cn.mutable_data_ptr<T>();
  for_run_chunks(g, d, [&](int64_t a, int64_t, int64_t t, int64_t count) {
    rk.cell_forward(pA + a, g.gs(), pc + t, ph + t, pcn + t, g.run_len(d.N), Runs{count, g.ld_a(), g.ld_t(), g.ld_t(), 0});
  });
}

std::tuple<Tensor, Tensor> cell_forward(const Tensor& A_in, const Tensor& c_in) {
  const char* op = "salstm_kernels_cpp::cell_forward";
  Dims d = check_A_c(A_in, c_in, op);
  const auto at_ = acc_type(A_in.scalar_type());
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g), c = acc_t(c_in, at_, g);
  Tensor h = empty_t(c, g), cn = empty_t(c, g);
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_forward", [&] { cell_forward_impl<scalar_t>(A, g, c, h, cn, d); });
  return {h.to(A_in.scalar_type()), cn.to(A_in.scalar_type())};
}

template <typename T>
void cell_backward_impl(const Tensor& A, const Geo& g, const Tensor& c, const Tensor& dh, const Tensor& dcn,
                        Tensor& dA, Tensor& dc, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>();
  const T *pdh = ptr_or_null<T>(dh), *pdcn = ptr_or_null<T>(dcn);
  T *pdA = dA.mutable_data_ptr<T>(), *pdc = dc.mutable_data_ptr<T>();
  // A and dA share run strides (rows * C per pixel / N per channel); only their batch strides differ.
  for_run_chunks(g, d, [&](int64_t a, int64_t da, int64_t t, int64_t count) {
    rk.backward(pA + a, g.gs(), pc + t, pdh ? pdh + t : nullptr, pdcn ? pdcn + t : nullptr, nullptr, nullptr,
                nullptr, nullptr, kNone, pdA + da, pdc + t, g.run_len(d.N),
                Runs{count, g.ld_a(), g.ld_t(), g.ld_t(), 0});
  });
}

std::tuple<Tensor, Tensor> cell_backward(const Tensor& A_in, const Tensor& c_in, const OptT& dh_in,
                                         const OptT& dcn_in) {
  const char* op = "salstm_kernels_cpp::cell_backward";
  Dims d = check_A_c(A_in, c_in, op);
  const auto at_ = acc_type(A_in.scalar_type());
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g), c = acc_t(c_in, at_, g);
  Tensor dh = acc_opt(dh_in, at_, g, d, op, "dh"), dcn = acc_opt(dcn_in, at_, g, d, op, "dc_new");
  Tensor dA = at::empty(A.sizes(), A.options().memory_format(g.format())), dc = empty_t(c, g);
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_backward",
                             [&] { cell_backward_impl<scalar_t>(A, g, c, dh, dcn, dA, dc, d); });
  return {dA.to(A_in.scalar_type()), dc.to(c_in.scalar_type())};
}

// Zero-state cell ops: the first step of a recurrence (h = c = 0), where the forget gate does not
// matter, so A (B, 3C, H, W) has the gate rows i, o, g only; c' = i * g, h' = o * tanh(c').
template <typename T>
void cell_zero_state_forward_impl(const Tensor& A, const Geo& g, Tensor& h, Tensor& cn, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T* pA = A.const_data_ptr<T>();
  T* ph = h.mutable_data_ptr<T>();
  T* pcn = cn.mutable_data_ptr<T>();
  for_run_chunks(g, d, [&](int64_t a, int64_t, int64_t t, int64_t count) {
    rk.cell_forward_zero_state(pA + a, g.gs(), ph + t, pcn + t, g.run_len(d.N),
                               Runs{count, g.ld_a(), g.ld_t(), g.ld_t(), 0});
  });
}

// (B, C, H, W) outputs of the zero-state ops, in A's dtype options and the working layout.
Tensor empty_state(const Tensor& A, const Dims& d, const Geo& g) {
  return at::empty({d.B, d.C, d.H, d.W}, A.options().memory_format(g.format()));
}

std::tuple<Tensor, Tensor> cell_zero_state_forward(const Tensor& A_in) {
  const char* op = "salstm_kernels_cpp::cell_zero_state_forward";
  Dims d = check_A_zero_state(A_in, op);
  const auto at_ = acc_type(A_in.scalar_type());
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g, 3);
  Tensor h = empty_state(A, d, g), cn = empty_state(A, d, g);
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_zero_state_forward",
                             [&] { cell_zero_state_forward_impl<scalar_t>(A, g, h, cn, d); });
  return {h.to(A_in.scalar_type()), cn.to(A_in.scalar_type())};
}

template <typename T>
void cell_zero_state_backward_impl(const Tensor& A, const Geo& g, const Tensor& dh, const Tensor& dcn, Tensor& dA,
                                   const Dims& d) {
  const auto& rk = row_kernels<T>();
  const T* pA = A.const_data_ptr<T>();
  const T *pdh = ptr_or_null<T>(dh), *pdcn = ptr_or_null<T>(dcn);
  T* pdA = dA.mutable_data_ptr<T>();
  for_run_chunks(g, d, [&](int64_t a, int64_t da, int64_t t, int64_t count) {
    rk.backward_zero_state(pA + a, g.gs(), pdh ? pdh + t : nullptr, pdcn ? pdcn + t : nullptr, pdA + da,
                           g.run_len(d.N), Runs{count, g.ld_a(), g.ld_t(), g.ld_t(), 0});
  });
}

Tensor cell_zero_state_backward(const Tensor& A_in, const OptT& dh_in, const OptT& dcn_in) {
  const char* op = "salstm_kernels_cpp::cell_zero_state_backward";
  Dims d = check_A_zero_state(A_in, op);
  const auto at_ = acc_type(A_in.scalar_type());
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g, 3);
  Tensor dh = acc_opt(dh_in, at_, g, d, op, "dh"), dcn = acc_opt(dcn_in, at_, g, d, op, "dc_new");
  Tensor dA = at::empty(A.sizes(), A.options().memory_format(g.format()));
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm cell_zero_state_backward",
                             [&] { cell_zero_state_backward_impl<scalar_t>(A, g, dh, dcn, dA, d); });
  return dA.to(A_in.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// Attention ops
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Proj {
  // [Wq; Wk; Wv] (3C x C) and [bq; bk; bv] (3C), so the three projections of a tile, their weight
  // gradients and their input gradients are one GEMM each; wv / bv point into them.
  const T *wqkv = nullptr, *bqkv = nullptr, *wv = nullptr, *bv = nullptr;
};

// A tile of Q, K, V stacked (3C rows): member m starts m * step after p, runs ld apart.  NCHW:
// three C x kTile slots in a row; NHWC: one kTile x 3C block (a pixel's q, k, v side by side).
template <typename T>
struct Stack3 {
  T* p;
  int64_t ld, step;
  // stacked = false: three separate tile buffers (run stride g.ld_buf()), as the row kernels take.
  Stack3(T* base, const Geo& g, bool stacked = true)
      : p(base), ld(stacked && g.nhwc ? 3 * g.C : g.ld_buf()), step(stacked && g.nhwc ? g.C : g.C * kTile) {}
  T* operator[](int m) const { return p + m * step; }
  Mat<T> mat(int m) const { return {p + m * step, ld}; }
};

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

// Tile (b, n0, L) of a tensor / of a tile buffer as a matrix.
template <typename T>
Mat<T> tile_of(const T* base, const Geo& g, int64_t b, int64_t n0) { return {base + g.t0(b, n0), g.ld_t()}; }
template <typename T>
Mat<T> buf_of(const T* buf, const Geo& g) { return {buf, g.ld_buf()}; }

template <typename T>
void attention_forward_impl(const Tensor& A, const Geo& g, const Tensor& c, const Proj<T>* proj, T scale, int comb,
                            Tensor& out, Tensor& h, Tensor& cn, Tensor& P, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const int64_t C = d.C, N = d.N, bld = g.ld_buf();
  const Tiles tiles(d);
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>();
  T *ph = h.mutable_data_ptr<T>(), *pcn = cn.mutable_data_ptr<T>(), *pout = out.mutable_data_ptr<T>();
  T* pP = P.mutable_data_ptr<T>();
  Tensor hold_S;
  T* pS = scratch<T>(1, tiles.count * C * C, hold_S);
  Tensor Vfull = proj ? empty_t(c, g) : Tensor();  // LSTM-SA's V (B, C, N), in the working layout
  T* pV = proj ? Vfull.mutable_data_ptr<T>() : nullptr;
  const int64_t slot = C * kTile;

  // Pass 1: cell + QKV per tile, S partial = Q K^T.
  auto pass1 = [&](int64_t i0, int64_t i1) {
    Tensor hold;
    T* fq = scratch<T>(0, (proj ? 5 : 2) * slot, hold);
    T* fk = fq + slot;
    const Stack3<T> qkv(proj ? fk + slot : nullptr, g);  // raw projections (LSTM-SA only)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      const int64_t t = g.t0(b, n0);
      rk.attention_state(pA + g.a0(b, n0), g.gs(), pc + t, ph + t, pcn + t, fq, fk, comb, g.run_len(L), g.runs(L));
      const Mat<T> H = tile_of<T>(ph, g, b, n0);
      Mat<T> Q = buf_of<T>(fq, g), K = buf_of<T>(fk, g);
      if (proj) {
        project(g, L, 3 * C, proj->wqkv, proj->bqkv, H, qkv.p, qkv.ld);
        if (comb != kNone) {  // gate in place; V = v * h' goes to the (B, C, N) buffer pass 2 reads
          mul_tile(rk, g, L, qkv[0], qkv.ld, qkv.mat(0), Q);
          mul_tile(rk, g, L, qkv[1], qkv.ld, qkv.mat(1), K);
          mul_tile(rk, g, L, pV + t, g.ld_t(), qkv.mat(2), H);
        } else {
          const int64_t runs = g.runs(L).count, len = g.run_len(L);
          for (int64_t r = 0; r < runs; ++r) std::copy(qkv[2] + r * qkv.ld, qkv[2] + r * qkv.ld + len, pV + t + r * g.ld_t());
        }
        Q = qkv.mat(0);
        K = qkv.mat(1);
      }
      tile_xyT(g, L, C, C, Q, K, T(0), pS + it * C * C);
    }
  };
  // Per image: reduce the partials in tile order (into P's storage), softmax in place.
  auto softmax = [&](int64_t b) {
    image_sum(pS, b, tiles.per_image, C * C, pP + b * C * C);
    softmax_rows(pP + b * C * C, pP + b * C * C, C, scale);
  };
  // Pass 2: O = P V per tile.
  const T* pVr = proj ? pV : ph;
  auto pass2 = [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      mat_tile(g, L, C, C, pP + b * C * C, false, tile_of<T>(pVr, g, b, n0), T(0), pout + g.t0(b, n0), g.ld_t());
    }
  };
  tiles_then_image_then_tiles(tiles, d.B, pass1, softmax, pass2);
}

template <typename T>
Proj<T> proj_ptrs(const std::vector<Tensor>& p) {
  Proj<T> r;
  const int64_t C = p[1].size(0) / 3;
  r.wqkv = p[0].const_data_ptr<T>();
  r.bqkv = p[1].const_data_ptr<T>();
  r.wv = r.wqkv + 2 * C * C;
  r.bv = r.bqkv + 2 * C;
  return r;
}

// {[Wq; Wk; Wv], [bq; bk; bv]} in the accumulation dtype.
std::vector<Tensor> acc_projections(const OptT& wq, const OptT& bq, const OptT& wk, const OptT& bk, const OptT& wv,
                                    const OptT& bv, at::ScalarType a) {
  return {at::cat({acc(*wq, a), acc(*wk, a), acc(*wv, a)}), at::cat({acc(*bq, a), acc(*bk, a), acc(*bv, a)})};
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
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g), c = acc_t(c_in, at_, g);
  std::vector<Tensor> p = has_proj ? acc_projections(wq, bq, wk, bk, wv, bv, at_) : std::vector<Tensor>{};
  Tensor out = empty_t(c, g), h = empty_t(c, g), cn = empty_t(c, g), P = at::empty({d.B, d.C, d.C}, A.options());
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm attention_forward", [&] {
    Proj<scalar_t> pr;
    if (has_proj) pr = proj_ptrs<scalar_t>(p);
    attention_forward_impl<scalar_t>(A, g, c, has_proj ? &pr : nullptr, static_cast<scalar_t>(scale), comb, out, h, cn,
                                     P, d);
  });
  const auto dt = A_in.scalar_type();
  return {out.to(dt), h.to(dt), cn.to(dt), P};
}

template <typename T>
void attention_backward_impl(const Tensor& A, const Geo& g, const Tensor& c, const Proj<T>* proj, const Tensor& P,
                             const Tensor& h_saved, const Tensor& dout, const Tensor& dh, const Tensor& dcn, T scale,
                             int comb, Tensor& dA, Tensor& dc, Tensor& dproj_flat, const Dims& d) {
  const auto& rk = row_kernels<T>();
  const int64_t C = d.C, N = d.N, bld = g.ld_buf();
  const Tiles tiles(d);
  const T *pA = A.const_data_ptr<T>(), *pc = c.const_data_ptr<T>(), *pP = P.const_data_ptr<T>();
  const T *pdO = dout.const_data_ptr<T>(), *pdh = ptr_or_null<T>(dh), *pdcn = ptr_or_null<T>(dcn);
  T *pdA = dA.mutable_data_ptr<T>(), *pdc = dc.mutable_data_ptr<T>();
  const int64_t slot = C * kTile;
  const int64_t pstride = 3 * (C * C + C);  // per-tile projection-gradient partials

  // Pass 1: dP partial = dO V^T per tile; V from the forward's h' when given (no pass over A),
  // else h' recomputed from A and c.
  const T* phs = h_saved.defined() ? h_saved.const_data_ptr<T>() : nullptr;
  Tensor hold_dP;
  T* pdPp = scratch<T>(1, tiles.count * C * C, hold_dP);
  auto pass1 = [&](int64_t i0, int64_t i1) {
    Tensor hold;
    T* hb = scratch<T>(0, (proj ? 3 : 2) * slot, hold);
    T* cnb = hb + slot;
    T* vb = proj ? cnb + slot : nullptr;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      Mat<T> V = phs ? tile_of<T>(phs, g, b, n0) : buf_of<T>(hb, g);
      if (!phs) {
        Runs runs = g.runs(L);
        runs.o = bld;  // h', c' go to the tile buffers
        rk.attention_state(pA + g.a0(b, n0), g.gs(), pc + g.t0(b, n0), hb, cnb, nullptr, nullptr, kNone, g.run_len(L),
                           runs);
      }
      if (proj) {
        project(g, L, C, proj->wv, proj->bv, V, vb, bld);
        if (comb != kNone) mul_tile(rk, g, L, vb, bld, buf_of<T>(vb, g), V);
        V = buf_of<T>(vb, g);
      }
      tile_xyT(g, L, C, C, tile_of<T>(pdO, g, b, n0), V, T(0), pdPp + it * C * C);
    }
  };
  // Per image: dP reduced in tile order, dS = P * (dP - rowsum(dP * P)) * scale.
  Tensor dS = at::empty({d.B, C, C}, A.options());
  T* pdS = dS.mutable_data_ptr<T>();
  auto scores_grad = [&](int64_t b) {
    image_sum(pdPp, b, tiles.per_image, C * C, pdS + b * C * C);
    for (int64_t r = b * C; r < (b + 1) * C; ++r) {
      T* ds = pdS + r * C;
      const T* p = pP + r * C;
      T s = T(0);
      for (int64_t j = 0; j < C; ++j) s += ds[j] * p[j];
      for (int64_t j = 0; j < C; ++j) ds[j] = p[j] * (ds[j] - s) * scale;
    }
  };

  // Pass 2: per tile recompute state and Q, K, V; dQ = dS K, dK = dS^T Q, dV = P^T dO; then dA, dc.
  Tensor hold_dpp;
  T* pdpp = proj ? scratch<T>(2, tiles.count * pstride, hold_dpp) : nullptr;
  auto pass2 = [&](int64_t i0, int64_t i1) {
    const int nslots = proj ? (comb != kNone ? 17 : 14) : 7;
    Tensor hold;
    T* s0 = scratch<T>(0, nslots * slot, hold);
    auto S = [&](int k) { return s0 + k * slot; };
    T *hb = S(0), *cnb = S(1), *fq = S(2), *fk = S(3);
    // dQ, dK, dV (then dq, dk, dv); stacked for the projections' gradient GEMMs when LSTM-SA.
    const Stack3<T> dY(S(4), g, proj != nullptr);
    // LSTM-SA only (the slots exist then): raw projections q, k, v, the factor gradients, W^T dy,
    // and the gated Q, K, V (combination != none).
    const Stack3<T> qkv(proj ? S(7) : nullptr, g, true);
    T *dfq = proj ? S(10) : nullptr, *dfk = proj ? S(11) : nullptr, *dfv = proj ? S(12) : nullptr;
    T* dhx = proj ? S(13) : nullptr;
    const Stack3<T> gated(proj && comb != kNone ? S(14) : nullptr, g, true);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / tiles.per_image, n0 = (it % tiles.per_image) * kTile;
      const int64_t L = std::min(kTile, N - n0);
      const int64_t t = g.t0(b, n0);
      Runs runs = g.runs(L);
      runs.o = bld;
      rk.attention_state(pA + g.a0(b, n0), g.gs(), pc + t, hb, cnb, fq, fk, comb, g.run_len(L), runs);
      const Mat<T> H = buf_of<T>(hb, g);
      Mat<T> Q = buf_of<T>(fq, g), K = buf_of<T>(fk, g);
      if (proj) {
        project(g, L, 3 * C, proj->wqkv, proj->bqkv, H, qkv.p, qkv.ld);
        const Stack3<T>& used = comb != kNone ? gated : qkv;
        if (comb != kNone) {
          mul_tile(rk, g, L, gated[0], gated.ld, qkv.mat(0), Q);
          mul_tile(rk, g, L, gated[1], gated.ld, qkv.mat(1), K);
          mul_tile(rk, g, L, gated[2], gated.ld, qkv.mat(2), H);
        }
        Q = used.mat(0);
        K = used.mat(1);
      }
      const T* dS_b = pdS + b * C * C;
      const T* P_b = pP + b * C * C;
      const Mat<T> dO = tile_of<T>(pdO, g, b, n0);
      mat_tile(g, L, C, C, dS_b, false, K, T(0), dY[0], dY.ld);
      mat_tile(g, L, C, C, dS_b, true, Q, T(0), dY[1], dY.ld);
      mat_tile(g, L, C, C, P_b, true, dO, T(0), dY[2], dY.ld);
      const T *gq = dY[0], *gk = dY[1], *gv = dY[2], *dh_extra = nullptr;
      if (proj) {
        // dfq = dQ * q_raw, dq = dQ * fq (and k, v with fv = h'); for "none" dq = dQ.
        if (comb != kNone) {
          const Mat<T> factor[3] = {buf_of<T>(fq, g), buf_of<T>(fk, g), H};
          T* dF[3] = {dfq, dfk, dfv};
          for (int m = 0; m < 3; ++m) {
            mul_tile(rk, g, L, dF[m], bld, dY.mat(m), qkv.mat(m));
            mul_tile(rk, g, L, dY[m], dY.ld, dY.mat(m), factor[m]);
          }
          gq = dfq; gk = dfk; gv = dfv;
        } else {
          gq = gk = gv = nullptr;
        }
        // [dWq; dWk; dWv] = [dq; dk; dv] h'^T, [dbq; dbk; dbv] = pixel sums, dh' += [Wq; Wk; Wv]^T [dq; dk; dv].
        T* part = pdpp + it * pstride;
        tile_xyT(g, L, 3 * C, C, dY.mat(0), H, T(0), part);
        pixel_sum(rk, g, L, 3 * C, dY.p, dY.ld, part + 3 * C * C);
        mat_tile(g, L, C, 3 * C, proj->wqkv, true, dY.mat(0), T(0), dhx, bld);
        dh_extra = dhx;
      }
      // Final pointwise pass: dA, dc.
      rk.backward(pA + g.a0(b, n0), g.gs(), pc + t, pdh ? pdh + t : nullptr, pdcn ? pdcn + t : nullptr, dh_extra, gq,
                  gk, gv, gq ? comb : kNone,
                  pdA + g.dA0(b, n0), pdc + t, g.run_len(L), g.runs(L));
    }
  };
  tiles_then_image_then_tiles(tiles, d.B, pass1, scores_grad, pass2);
  if (proj) ordered_sum(pdpp, 1, tiles.count, pstride, dproj_flat.mutable_data_ptr<T>());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_backward(
    const Tensor& A_in, const Tensor& c_in, const OptT& wq, const OptT& bq, const OptT& wk, const OptT& bk,
    const OptT& wv, const OptT& bv, const Tensor& P_in, const Tensor& dout_in, const OptT& dh_in,
    const OptT& dcn_in, double scale, c10::string_view combination, const OptT& h_in) {
  const char* op = "salstm_kernels_cpp::attention_backward";
  Dims d = check_A_c(A_in, c_in, op);
  const bool has_proj = check_projections(wq, bq, wk, bk, wv, bv, d.C, op);
  const int comb = parse_combination(std::string(combination), has_proj, op);
  check_like_c(dout_in, d, op, "dout");
  check_float_cpu(P_in, op, "P");
  TORCH_CHECK(P_in.dim() == 3 && P_in.size(0) == d.B && P_in.size(1) == d.C && P_in.size(2) == d.C, op,
              ": P must be (B, C, C) = (", d.B, ", ", d.C, ", ", d.C, "), got ", P_in.sizes());
  const auto at_ = acc_type(A_in.scalar_type());
  Geo g;
  Tensor A = acc_A(A_in, at_, d, g), c = acc_t(c_in, at_, g), P = acc(P_in, at_), dout = acc_t(dout_in, at_, g),
         dh = acc_opt(dh_in, at_, g, d, op, "dh"), dcn = acc_opt(dcn_in, at_, g, d, op, "dc_new");
  std::vector<Tensor> p = has_proj ? acc_projections(wq, bq, wk, bk, wv, bv, at_) : std::vector<Tensor>{};
  // The forward's h' is used only when it carries the accumulation precision (float32 / float64
  // inputs); a rounded bfloat16 / float16 h' would change the float32 math, so it is recomputed.
  Tensor h;
  if (h_in.has_value()) {
    check_like_c(*h_in, d, op, "h");
    if (h_in->scalar_type() == at_) h = acc_t(*h_in, at_, g);
  }
  Tensor dA = at::empty(A.sizes(), A.options().memory_format(g.format())), dc = empty_t(c, g);
  Tensor dproj = at::empty({has_proj ? 3 * (d.C * d.C + d.C) : 0}, A.options());
  AT_DISPATCH_FLOATING_TYPES(at_, "salstm attention_backward", [&] {
    Proj<scalar_t> pr;
    if (has_proj) pr = proj_ptrs<scalar_t>(p);
    attention_backward_impl<scalar_t>(A, g, c, has_proj ? &pr : nullptr, P, h, dout, dh, dcn,
                                      static_cast<scalar_t>(scale), comb, dA, dc, dproj, d);
  });
  Tensor gr[6];
  if (has_proj) {
    const OptT* src[6] = {&wq, &bq, &wk, &bk, &wv, &bv};
    const int64_t C = d.C;  // dproj = [dWq; dWk; dWv] (3C x C), then [dbq; dbk; dbv]
    for (int m = 0; m < 3; ++m) {
      gr[2 * m] = dproj.narrow(0, m * C * C, C * C).view({C, C}).to((*src[2 * m])->scalar_type()).clone();
      gr[2 * m + 1] = dproj.narrow(0, 3 * C * C + m * C, C).to((*src[2 * m + 1])->scalar_type()).clone();
    }
  } else {
    for (auto& t : gr) t = at::empty({0}, A_in.options());
  }
  return {dA.to(A_in.scalar_type()), dc.to(c_in.scalar_type()), gr[0], gr[1], gr[2], gr[3], gr[4], gr[5]};
}

std::string cpu_capability() { return row_kernels_capability(); }

}  // namespace
}  // namespace salstm_cpu

TORCH_LIBRARY(salstm_kernels_cpp, m) {
  m.def("cpu_capability() -> str");
  m.def("cell_forward(Tensor A, Tensor c) -> (Tensor, Tensor)");
  m.def("cell_backward(Tensor A, Tensor c, Tensor? dh, Tensor? dc_new) -> (Tensor, Tensor)");
  m.def("cell_zero_state_forward(Tensor A) -> (Tensor, Tensor)");
  m.def("cell_zero_state_backward(Tensor A, Tensor? dh, Tensor? dc_new) -> Tensor");
  m.def(
      "attention_forward(Tensor A, Tensor c, Tensor? wq, Tensor? bq, Tensor? wk, Tensor? bk, Tensor? wv, "
      "Tensor? bv, float scale, str combination) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor A, Tensor c, Tensor? wq, Tensor? bq, Tensor? wk, Tensor? bk, Tensor? wv, "
      "Tensor? bv, Tensor P, Tensor dout, Tensor? dh, Tensor? dc_new, float scale, str combination, Tensor? h=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(salstm_kernels_cpp, m) {
  m.impl("cpu_capability", &salstm_cpu::cpu_capability);  // no tensor arguments: CompositeExplicit
}

TORCH_LIBRARY_IMPL(salstm_kernels_cpp, CPU, m) {
  m.impl("cell_forward", &salstm_cpu::cell_forward);
  m.impl("cell_backward", &salstm_cpu::cell_backward);
  m.impl("cell_zero_state_forward", &salstm_cpu::cell_zero_state_forward);
  m.impl("cell_zero_state_backward", &salstm_cpu::cell_zero_state_backward);
  m.impl("attention_forward", &salstm_cpu::attention_forward);
  m.impl("attention_backward", &salstm_cpu::attention_backward);
}
