// AVX2 + FMA + F16C kernels (the code is in kernels_x86.inc), compiled for that target by
// pragma so the module still runs on any x86-64 CPU; chosen at import by CPU detection.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "common.h"
#include "x86_math.h"
// Headers first: only the code below is compiled for AVX2.
#pragma GCC target("avx2,fma,f16c")
#define JISU_X86_NAME "avx2"
#define JISU_X86_TABLE avx2_table
#define JISU_VNNI 0
#include "kernels_x86.inc"

#else  // not x86
#include "common.h"
namespace jisu {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace jisu
#endif
