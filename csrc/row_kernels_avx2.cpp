// AVX2 + FMA build of the row kernels (x86-64 with GCC/Clang), used only when the CPU has them.
// The target is set by pragma, not by a command-line flag, so the rest of the extension stays
// portable; vectorised exp/tanh come from the SLEEF build inside libtorch_cpu.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SALSTM_CAP AVX2
#include "row_kernels_impl.h"

namespace salstm_cpu {
namespace AVX2 {
bool compiled() { return true; }
}  // namespace AVX2
}  // namespace salstm_cpu
#endif
