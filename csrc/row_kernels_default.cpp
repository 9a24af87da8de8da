// Portable build of the row kernels (any CPU).
#define CPU_CAPABILITY DEFAULT
#define SALSTM_CAP DEFAULT
#include "row_kernels_impl.h"

#include <cstdlib>
#include <string>

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
namespace AVX512 {
template <typename T>
RowKernels<T> row_kernels() { return DEFAULT::row_kernels<T>(); }
template RowKernels<float> row_kernels<float>();
template RowKernels<double> row_kernels<double>();
bool compiled() { return false; }
}  // namespace AVX512
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

static bool cpu_has_avx512() {
#if defined(SALSTM_HAVE_AVX2_BUILD)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The best build this CPU runs; SALSTM_KERNELS_CPU_CAPABILITY=default|avx2 caps it (for tests and
// comparisons).
static const char* capability() {
  static const char* cap = [] {
    const char* env = std::getenv("SALSTM_KERNELS_CPU_CAPABILITY");
    const std::string want = env ? env : "";
    if (want == "default") return "default";
    if (want != "avx2" && AVX512::compiled() && cpu_has_avx512()) return "avx512";
    if (AVX2::compiled() && cpu_has_avx2()) return "avx2";
    return "default";
  }();
  return cap;
}

const char* row_kernels_capability() { return capability(); }

template <typename T>
const RowKernels<T>& row_kernels() {
  static const RowKernels<T> k = std::string(capability()) == "avx512" ? AVX512::row_kernels<T>()
                                 : std::string(capability()) == "avx2" ? AVX2::row_kernels<T>()
                                                                       : DEFAULT::row_kernels<T>();
  return k;
}
template const RowKernels<float>& row_kernels<float>();
template const RowKernels<double>& row_kernels<double>();

}  // namespace salstm_cpu
