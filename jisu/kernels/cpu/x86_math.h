// The x86 float helpers shared by the SIMD kernels (kernels_x86.inc) and the paged attention
// (attention.cpp): horizontal sum and max of 8 lanes, a vector exp, and the softmax of one row
// of scores built on them. Each is compiled for AVX2 + FMA + F16C by attribute, so a file may
// include this header before any target pragma; a caller compiled for a superset (the AVX-512
// kernels) inlines them. Internal linkage (static): every file keeps its own copy.
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define JISU_AVX2_FN __attribute__((target("avx2,fma,f16c")))

namespace jisu {

JISU_AVX2_FN static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

JISU_AVX2_FN static inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x), x clamped to [-87, 88]: Cody-Waite reduction by ln 2 and a degree-6 polynomial.
JISU_AVX2_FN static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n in two halves so n = 128 (x near 88) does not overflow the exponent field
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// Softmax of one head's scores s[0..n) in place (exp(s - max)); returns 1 / sum. Shared by every
// x86 attention kernel, so AVX2 and AVX-512 give the same bits.
JISU_AVX2_FN static float softmax_row(float* s, int64_t n) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + i));
  float mx = hmax8(mx8);
  for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mxv));
    _mm256_storeu_ps(s + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum8(sum8);
  if (i < n) {
    alignas(32) float tmp[8];
    for (int k = 0; k < 8; k++) tmp[k] = i + k < n ? s[i + k] - mx : -87.f;
    alignas(32) float e[8];
    _mm256_store_ps(e, exp8(_mm256_load_ps(tmp)));
    for (int64_t k = i; k < n; k++) {
      s[k] = e[k - i];
      sum = sum + e[k - i];
    }
  }
  return 1.f / sum;
}

}  // namespace jisu
#endif
