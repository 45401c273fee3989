// The fused low-rank term of a linear (see lowrank.h): u = B x per token, then A u added to the
// linear's output, 8 rows at a time. Work per token O(r (N + K)); the pool splits the B rows and the
// A tiles once either holds at least 64 KB of codes. AVX2 on x86 CPUs whose kernel table is AVX2 or
// AVX-512, plain loops otherwise.
#include "lowrank.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "driver.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jisu {

void LowRank::init() {
  if (N <= 0 || K <= 0 || r <= 0 || !a || !b || !sa || !sb || seg_rows.empty())
    throw std::invalid_argument("set_lowrank: bad factors");
  int64_t n = 0;
  tile_row.clear(), tile_end.clear(), tile_seg.clear();
  for (size_t s = 0; s < seg_rows.size(); s++) {
    if (seg_rows[s] <= 0) throw std::invalid_argument("set_lowrank: empty segment");
    for (int64_t t = 0; t < seg_rows[s]; t += 8) {
      tile_row.push_back(n + t);
      tile_end.push_back(n + std::min<int64_t>(t + 8, seg_rows[s]));
      tile_seg.push_back((int64_t)s);
    }
    n += seg_rows[s];
  }
  if (n != N) throw std::invalid_argument("set_lowrank: segments hold " + std::to_string(n) + " rows, not " +
                                          std::to_string(N));
}

namespace {

using BFn = float (*)(const int8_t*, const float*, int64_t);
using AFn = void (*)(const int8_t*, const float*, int64_t, float*);

// sum_k b[k] x[k]
float dot_ref(const int8_t* b, const float* x, int64_t K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int i = 0; i < 8; i++) acc[i] = acc[i] + (float)b[k + i] * x[k + i];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; k < K; k++) s = s + (float)b[k] * x[k];
  return s;
}

// out[i] = sum_j tile[j][i] u[j], i < 8
void tile_ref(const int8_t* tile, const float* u, int64_t r, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < r; j++)
    for (int i = 0; i < 8; i++) acc[i] = acc[i] + (float)tile[j * 8 + i] * u[j];
  std::memcpy(out, acc, sizeof acc);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float dot_avx2(const int8_t* b, const float* x, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m128i c = _mm_loadu_si128((const __m128i*)(b + k));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  for (; k < K; k++) s = s + (float)b[k] * x[k];
  return s;
}

__attribute__((target("avx2,fma"))) void tile_avx2(const int8_t* tile, const float* u, int64_t r, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < r; j++) {
    const __m128i c = _mm_loadl_epi64((const __m128i*)(tile + j * 8));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_set1_ps(u[j]), acc);
  }
  _mm256_storeu_ps(out, acc);
}
#endif

void pick(BFn& dot, AFn& tile) {
  dot = dot_ref, tile = tile_ref;
#if defined(__x86_64__)
  const std::string isa = active_kernels()->name;
  if (isa == "avx2" || isa == "avx512") dot = dot_avx2, tile = tile_avx2;
#endif
}

int threads_for(int64_t bytes) { return bytes < 65536 ? 1 : pool_max_threads(); }

}  // namespace

void lowrank_add(const LowRank& L, const float* x, int64_t T, float* y, int64_t ldy, float* u) {
  BFn dot;
  AFn tile;
  pick(dot, tile);
  const int64_t R = L.u_size(), K = L.K, r = L.r;
  parallel_for(T * R, threads_for(T * R * K), [&](int64_t a, int64_t b, int) {
    for (int64_t i = a; i < b; i++) {
      const int64_t t = i / R, j = i % R;
      u[i] = L.sb[j] * dot(L.b + j * K, x + t * K, K);
    }
  });
  const int64_t ntiles = (int64_t)L.tile_row.size();
  parallel_for(ntiles, threads_for(T * L.N * r), [&](int64_t a, int64_t b, int) {
    float acc[8];
    for (int64_t ti = a; ti < b; ti++) {
      const int64_t n0 = L.tile_row[ti], n1 = L.tile_end[ti], s = L.tile_seg[ti];
      const int8_t* codes = L.a + ti * r * 8;
      for (int64_t t = 0; t < T; t++) {
        tile(codes, u + t * R + s * r, r, acc);
        float* yt = y + t * ldy;
        for (int64_t n = n0; n < n1; n++) yt[n] = yt[n] + L.sa[n] * acc[n - n0];
      }
    }
  });
}

}  // namespace jisu
