// Portable build of the row kernels (any CPU).
#define CPU_CAPABILITY DEFAULT
#define SALSTM_CAP DEFAULT
#include "row_kernels_impl.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SALSTM_HAVE_AVX2_BUILD 1
#else
namespace salstm_cpu {
namespace AVX2 {
template <typename T>
RowKernels<T> row_kernels() { return DEFAULT::row_kernels<T>(); }
template RowKernels<float> row_kernels<float>();
template RowKernels<double> row_kernels<double>();
bool compiled() { return false; }
}  // namespace AVX2
}  // namespace salstm_cpu
#endif

namespace salstm_cpu {

static bool cpu_has_avx2() {
#if defined(SALSTM_HAVE_AVX2_BUILD)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename T>
const RowKernels<T>& row_kernels() {
  static const RowKernels<T> k = (AVX2::compiled() && cpu_has_avx2()) ? AVX2::row_kernels<T>() : DEFAULT::row_kernels<T>();
  return k;
}
template const RowKernels<float>& row_kernels<float>();
template const RowKernels<double>& row_kernels<double>();

}  // namespace salstm_cpu
