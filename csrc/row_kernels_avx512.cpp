// AVX-512 build of the row kernels (x86-64 with GCC/Clang), used only when the CPU has
// AVX512F/BW/VL/DQ.  Same scheme as row_kernels_avx2.cpp.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC's target pragma does not define the ISA macros that sleef.h and ATen's vec headers test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SALSTM_CAP AVX512
#include "row_kernels_impl.h"

namespace salstm_cpu {
namespace AVX512 {
bool compiled() { return true; }
}  // namespace AVX512
}  // namespace salstm_cpu
#endif
