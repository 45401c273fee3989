// AVX-512 (F/BW/VL + VNNI) kernels: the AVX2 code of kernels_x86.inc with its integer dot
// products done by vpdpbusd (256-bit, AVX512-VL), which removes the int16 step. Chosen at
// import when the CPU has AVX512-VNNI; jisu.kernels.ops checks it against the scalar path
// once and falls back to AVX2 on any mismatch.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(JISU_NO_AVX512)
#include <immintrin.h>

#include "common.h"
#include "x86_math.h"
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define JISU_X86_NAME "avx512"
#define JISU_X86_TABLE avx512_table
#define JISU_VNNI 1
#include "kernels_x86.inc"

#else
#include "common.h"
namespace jisu {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace jisu
#endif
