// Pointwise row kernels of the SA-LSTM / LSTM-SA ops (gates, state update, QKV factors and their
// gradients) over one contiguous run of L pixels of every gate row.  Compiled once per CPU
// capability (row_kernels_default.cpp, row_kernels_avx2.cpp) and picked at run time.
#pragma once

#include <cstdint>

namespace salstm_cpu {

// QKV formation of paper eq. 4; kNone: projections only (separated baseline).
enum Combination : int { kLinear = 0, kNonlinear = 1, kNone = 2 };

// Each kernel walks `runs.count` runs of L contiguous elements.  Run r starts r * runs.a elements
// after the first in A / dA, r * runs.t in c, dh, dc' and dc, r * runs.o in the outputs h', c', and
// r * runs.buf in the tile buffers (fq, fk, dh_extra, dfq, dfk, dfv).
// NCHW: a run is one channel's pixels; NHWC (channels_last): a run is one pixel's C channels.
// Within a run the gate rows of A (i, f, o, g) are `gs` elements apart, as are those of dA.  The
// zero-state kernels (previous h = c = 0, so no forget gate) take A / dA with three gate rows,
// i at 0, o at gs, g at 2 * gs.
struct Runs {
  int64_t count, a, t, o, buf;
};

template <typename T>
struct RowKernels {
  // h' = o * tanh(c'),  c' = f * c + i * g.
  void (*cell_forward)(const T* A, int64_t gs, const T* c, T* h, T* cn, int64_t L, Runs runs);
  // As cell_forward, plus the LSTM-state QKV factors fq, fk (unused for kNone; may be null then).
  void (*attention_state)(const T* A, int64_t gs, const T* c, T* h, T* cn, T* fq, T* fk, int comb, int64_t L,
                          Runs runs);
  // dA, dc from the gradients on h' and c' (dh, dcn), plus optional extra ones:
  //   dh_extra (added to dh),  dfq / dfk / dfv: gradients on the QKV factors of `comb`
  //   (null when absent).  dh and dcn may be null too (no gradient: zero).
  void (*backward)(const T* A, int64_t gs, const T* c, const T* dh, const T* dcn, const T* dh_extra,
                   const T* dfq, const T* dfk, const T* dfv, int comb, T* dA, T* dc, int64_t L, Runs runs);
  // The cell from a zero state (h = c = 0: the first step): A has the gate rows i, o, g (no f);
  // c' = i * g, h' = o * tanh(c').
  void (*cell_forward_zero_state)(const T* A, int64_t gs, T* h, T* cn, int64_t L, Runs runs);
  // Its backward: dA (rows i, o, g) from dh, dcn (either may be null: zero); no dc.
  void (*backward_zero_state)(const T* A, int64_t gs, const T* dh, const T* dcn, T* dA, int64_t L, Runs runs);
  // Tile helpers of the projected (LSTM-SA) path, vectorized here rather than left to the
  // portable salstm_ops.cpp build.  out = a * b on `rows` rows of L (out may be a).
  void (*mul)(T* out, int64_t ldo, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows, int64_t L);
  // out[r] = sum_j x[r * ld + j] (r < rows, j < L)
  void (*row_sums)(const T* x, int64_t ld, int64_t rows, int64_t L, T* out);
  // out[j] = sum_r x[r * ld + j] (r < rows, j < L)
  void (*col_sums)(const T* x, int64_t ld, int64_t rows, int64_t L, T* out);
};

namespace DEFAULT {
template <typename T>
RowKernels<T> row_kernels();
}
namespace AVX2 {
template <typename T>
RowKernels<T> row_kernels();
bool compiled();
}
namespace AVX512 {
template <typename T>
RowKernels<T> row_kernels();
bool compiled();
}

// "avx512", "avx2" or "default": which build row_kernels() returns.
const char* row_kernels_capability();

// The fastest kernels this CPU supports.
template <typename T>
const RowKernels<T>& row_kernels();

}  // namespace salstm_cpu
