// One native forward step of a Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2 q/k/v
// bias, Qwen3 q/k RMSNorm, optional sliding window) over a paged KV cache.
//
// The model handle (NativeModel) holds only pointers: Python keeps the weights alive. A step
// takes T tokens from S sequences (sequence s appends q_lens[s] tokens after its starts[s]
// cached positions; tokens are back to back), writes their K/V into the cache
// [num_blocks, Hkv, block_size, D] per layer (fp32, or IEEE half) through each sequence's
// block table, and returns the logits of the requested rows. Everything per token is computed
// independently of the other tokens in the step (the linear kernels' per-row results do not
// depend on M, and attention runs per (token, head) with an order of operations fixed by the
// token's own positions only), so a sequence's logits are bitwise the same alone or in any
// batch, and the same for any block size.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "driver.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JISU_FWD_X86 1
#define JISU_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define JISU_AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define JISU_FWD_X86 0
#endif

namespace py = pybind11;

namespace jisu {
namespace {

// ---------------------------------------------------------------- small helpers
struct FBuf {  // grow-only, 64-byte aligned float buffer
  float* p = nullptr;
  size_t n = 0;
  FBuf() = default;
  FBuf(const FBuf&) = delete;
  FBuf& operator=(const FBuf&) = delete;
  FBuf(FBuf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr, o.n = 0; }
  ~FBuf() { std::free(p); }
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((want * 4) + 4095) & ~(size_t)4095;
      p = (float*)std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      n = bytes / 4;
    }
    return p;
  }
};

// Splits [0, n) across the pool when there is enough work (threading costs ~1-5 us), in up
// to chunks_per_thread * threads pieces claimed dynamically. f must not throw.
template <class F>
void parallel_for(int64_t n, int64_t work_bytes, F&& f, int chunks_per_thread = 4) {
  int nth = pool_max_threads();
  if (work_bytes < 65536 || n < 2) nth = 1;
  if (nth <= 1) {
    f((int64_t)0, n, 0);
    return;
  }
  struct Ctx {
    F* f;
    int64_t n;
  } ctx{&f, n};
  int64_t nc = std::min<int64_t>(n, chunks_per_thread * (int64_t)nth);
  pool_run(
      [](void* c, int64_t ch, int64_t nch, int tid) {
        Ctx& x = *(Ctx*)c;
        const int64_t a = x.n * ch / nch, b = x.n * (ch + 1) / nch;
        if (a < b) (*x.f)(a, b, tid);
      },
      &ctx, nc, nth);
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool use_simd() {
#if JISU_FWD_X86
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok && std::strcmp(active_kernels()->name, "scalar") != 0;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- dequantize one row
void dequant_row(const PackedDesc& W, int64_t n, float* out) {
  if (n < 0 || n >= W.N) throw std::out_of_range("dequant_row: row out of range");
  const int64_t K = W.K;
  if (W.kind == KIND_F32) {
    std::memcpy(out, W.f32 + n * K, K * 4);
    return;
  }
  const int64_t t = n / NR, r = n % NR, ng = K / W.group, bpg = W.group / QK;
  const uint8_t* tile = W.data + t * W.tile_bytes;
  if (W.kind == KIND_CODEBOOK) {
    float tab[16];
    for (int e = 0; e < 16; e++) {
      const int16_t v = (int16_t)((uint16_t)tile[r * 32 + e] | ((uint16_t)tile[r * 32 + 16 + e] << 8));
      tab[e] = (float)v;
    }
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* gp = tile + 256 + g * W.group_bytes;
      float s;
      std::memcpy(&s, gp + 4 * r, 4);
      for (int64_t i = 0; i < bpg; i++) {
        const uint8_t* b = gp + 32 + i * 128 + r * 16;
        float* o = out + (g * bpg + i) * QK;
        for (int k = 0; k < 16; k++) {
          o[k] = tab[b[k] & 15] * s;
          o[k + 16] = tab[b[k] >> 4] * s;
        }
      }
    }
    return;
  }
  // INT: codes of row r live in bytes 4r..4r+3 of each 32-byte vector (see common.h)
  const int bits = W.bits;
  const int64_t bb = int_block_bytes(bits), sbytes = W.per_channel ? 0 : 16 * (1 + W.asym);
  const float off = (bits == 8 || W.asym) ? 0.f : (float)(1 << (bits - 1));
  for (int64_t g = 0; g < ng; g++) {
    const uint8_t* gp = tile + g * W.group_bytes;
    float s = 0.f, mn = 0.f;
    if (W.per_channel) {
      s = W.chan_scale[n];
    } else {
      uint16_t h;
      std::memcpy(&h, gp + 2 * r, 2);
      s = f16_to_f32(h);
      if (W.asym) {
        std::memcpy(&h, gp + 16 + 2 * r, 2);
        mn = f16_to_f32(h);
      }
    }
    for (int64_t i = 0; i < bpg; i++) {
      const uint8_t* b = gp + sbytes + i * bb;
      float* o = out + (g * bpg + i) * QK;
      for (int k = 0; k < QK; k++) {
        const float q = (float)int_code(b, bits, (int)r, k);
        if (W.asym)
          o[k] = q * s + mn;
        else if (bits == 8)
          o[k] = q * s;
        else
          o[k] = (q - off) * s;
      }
    }
  }
}

// ---------------------------------------------------------------- SIMD pieces
#if JISU_FWD_X86
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
JISU_AVX2_FN static inline __m256 vexp(__m256 x) {
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

// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u
JISU_AVX2_FN void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = vexp(_mm256_xor_ps(gv, sign));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}
#endif

void silu_mul(const float* g, const float* u, float* out, int64_t n, bool simd) {
#if JISU_FWD_X86
  if (simd) return silu_mul_avx2(g, u, out, n);
#endif
  (void)simd;
  for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// ---------------------------------------------------------------- attention
// One token, the query heads [h0, h1) of one KV head: scores over the positions [lo, hi] of
// its sequence (found through the block table), softmax, weighted sum of V.
// The cache holds fp32 or IEEE half (KV = float / uint16_t); a half is widened exactly on load.
struct AttnArgs {
  const void* kc;        // this layer's K cache [num_blocks, Hkv, bs, D]
  const void* vc;
  const int32_t* table;  // the sequence's block table
  int64_t bs, Hkv, D, hk, lo, hi;
  float scale;
  // Software prefetch of the rows: for a decode step, whose sequences' cached rows come from DRAM
  // in runs of one block. A prefill's queries read rows that the step just wrote and that the
  // previous query read (in cache): there the prefetch loops only cost time (~20 % of attention).
  bool prefetch = true;
};

inline float kv_value(float x) { return x; }
inline float kv_value(uint16_t x) { return f16_to_f32(x); }

template <class KV>
void attn_scalar(const AttnArgs& a, const float* q, float* out, int64_t nh, float* sc) {
  const int64_t D = a.D, n = a.hi - a.lo + 1;
  const KV* kc = (const KV*)a.kc;
  const KV* vc = (const KV*)a.vc;
  for (int64_t j = 0; j < nh; j++) {
    const float* qh = q + j * D;
    float* s = sc + j * n;
    for (int64_t p = a.lo; p <= a.hi; p++) {
      const KV* kp = kc + ((a.table[p / a.bs] * a.Hkv + a.hk) * a.bs + p % a.bs) * D;
      float acc = 0.f;
      for (int64_t d = 0; d < D; d++) acc += qh[d] * kv_value(kp[d]);
      s[p - a.lo] = acc * a.scale;
    }
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    float sum = 0.f;
    for (int64_t i = 0; i < n; i++) {
      s[i] = std::exp(s[i] - mx);
      sum += s[i];
    }
    float* o = out + j * D;
    for (int64_t d = 0; d < D; d++) o[d] = 0.f;
    for (int64_t p = a.lo; p <= a.hi; p++) {
      const KV* vp = vc + ((a.table[p / a.bs] * a.Hkv + a.hk) * a.bs + p % a.bs) * D;
      const float e = s[p - a.lo];
      for (int64_t d = 0; d < D; d++) o[d] += e * kv_value(vp[d]);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
  }
}

#if JISU_FWD_X86
// The positions [lo, hi] are walked block by block in increasing order (no lambdas: they
// would not inherit the target attribute).
#define JISU_WALK(CACHE, PTR, ...)                                                          \
  for (int64_t b_ = a.lo / a.bs, be_ = a.hi / a.bs; b_ <= be_; b_++) {                      \
    const int64_t p0_ = std::max(a.lo, b_ * a.bs), p1_ = std::min(a.hi, b_ * a.bs + a.bs - 1); \
    const KV* base_ = (const KV*)(CACHE) + ((int64_t)a.table[b_] * a.Hkv + a.hk) * a.bs * D;   \
    for (int64_t p = p0_; p <= p1_; p++) {                                                  \
      const KV* PTR = base_ + (p - b_ * a.bs) * D;                                          \
      __VA_ARGS__                                                                           \
    }                                                                                       \
  }

JISU_AVX2_FN static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
JISU_AVX2_FN static inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// A cursor over the positions [lo, hi] that prefetches each one's K row (block by block through
// the table, without a division per position). Batched decode steps read each sequence's cached
// rows once, in runs of one block; without it the loads of K and V took ~70 % of attention's
// samples, and 16 streams of 128-256 tokens ran 7-20 % slower (Zen 5 core).
template <class KV>
struct RowPrefetch {
  const AttnArgs& a;
  const char* base;
  int64_t p, blk, off;
  RowPrefetch(const AttnArgs& a_, const void* cache) : a(a_), base((const char*)cache), p(a_.lo), blk(a_.lo / a_.bs), off(a_.lo % a_.bs) {}
  inline void next() {
    if (p > a.hi) return;
    const char* r = base + (((int64_t)a.table[blk] * a.Hkv + a.hk) * a.bs + off) * a.D * (int64_t)sizeof(KV);
    for (int64_t o = 0; o < a.D * (int64_t)sizeof(KV); o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
    p++;
    if (++off == a.bs) off = 0, blk++;
  }
};
constexpr int KV_PF_ROWS = 8;  // K rows ahead of the one being scored (2-32 measured the same)

// Softmax of one head's scores s[0..n) in place (exp(s - max)); returns 1 / sum. Shared by the
// AVX2 and AVX-512 kernels, so both give the same bits.
JISU_AVX2_FN static float softmax_row(float* s, int64_t n) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + i));
  float mx = hmax8(mx8);
  for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = vexp(_mm256_sub_ps(_mm256_loadu_ps(s + i), mxv));
    _mm256_storeu_ps(s + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum8(sum8);
  if (i < n) {
    alignas(32) float tmp[8];
    for (int k = 0; k < 8; k++) tmp[k] = i + k < n ? s[i + k] - mx : -87.f;
    alignas(32) float e[8];
    _mm256_store_ps(e, vexp(_mm256_load_ps(tmp)));
    for (int64_t k = i; k < n; k++) {
      s[k] = e[k - i];
      sum = sum + e[k - i];
    }
  }
  return 1.f / sum;
}

// Up to 3 heads at once (they share every K/V row load). Each head's arithmetic does not
// depend on which heads run with it.
template <int NH, class KV>
JISU_AVX2_FN static void attn_heads_avx2(const AttnArgs& a, const float* q, float* out, float* sc) {
  const int64_t D = a.D, n = a.hi - a.lo + 1, lo = a.lo;
  RowPrefetch<KV> kpf(a, a.kc), vpf(a, a.vc);  // V rows are fetched while K is scored
  const bool pf = a.prefetch;
  if (pf)
    for (int i = 0; i < KV_PF_ROWS; i++) kpf.next();
  JISU_WALK(a.kc, kp, {
    if (pf) {
      kpf.next();
      vpf.next();
    }
    __m256 acc0[NH], acc1[NH];
    for (int j = 0; j < NH; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m256 k0 = load8(kp + d), k1 = load8(kp + d + 8);
      for (int j = 0; j < NH; j++) {
        acc0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), k0, acc0[j]);
        acc1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d + 8), k1, acc1[j]);
      }
    }
    if (d < D) {
      const __m256 k0 = load8(kp + d);
      for (int j = 0; j < NH; j++) acc0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), k0, acc0[j]);
    }
    for (int j = 0; j < NH; j++) sc[j * n + (p - lo)] = hsum8(_mm256_add_ps(acc0[j], acc1[j])) * a.scale;
  })
  float inv[NH];
  for (int j = 0; j < NH; j++) inv[j] = softmax_row(sc + j * n, n);
  // P V in chunks of 32 output dims: NH x 4 accumulators stay in registers
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int nv = (int)std::min<int64_t>(4, (D - d0) / 8);
    __m256 acc[NH][4];
    for (int j = 0; j < NH; j++)
      for (int c = 0; c < 4; c++) acc[j][c] = _mm256_setzero_ps();
    if (nv == 4) {
      JISU_WALK(a.vc, vp, {
        const __m256 v0 = load8(vp + d0), v1 = load8(vp + d0 + 8);
        const __m256 v2 = load8(vp + d0 + 16), v3 = load8(vp + d0 + 24);
        for (int j = 0; j < NH; j++) {
          const __m256 e = _mm256_broadcast_ss(sc + j * n + (p - lo));
          acc[j][0] = _mm256_fmadd_ps(e, v0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(e, v1, acc[j][1]);
          acc[j][2] = _mm256_fmadd_ps(e, v2, acc[j][2]);
          acc[j][3] = _mm256_fmadd_ps(e, v3, acc[j][3]);
        }
      })
    } else {
      JISU_WALK(a.vc, vp, {
        for (int j = 0; j < NH; j++) {
          const __m256 e = _mm256_broadcast_ss(sc + j * n + (p - lo));
          for (int c = 0; c < nv; c++) acc[j][c] = _mm256_fmadd_ps(e, load8(vp + d0 + 8 * c), acc[j][c]);
        }
      })
    }
    for (int j = 0; j < NH; j++) {
      const __m256 iv = _mm256_set1_ps(inv[j]);
      for (int c = 0; c < nv; c++) _mm256_storeu_ps(out + j * D + d0 + 8 * c, _mm256_mul_ps(acc[j][c], iv));
    }
  }
}
#undef JISU_WALK

// ---- The same attention in 512-bit registers, for D a multiple of 16 (chosen with the AVX-512
// kernels). Every lane does the AVX2 kernel's arithmetic: a zmm's lanes 0-7 / 8-15 are its two
// score accumulators, the 8-position score reduction pairs the same values as hsum8, the softmax
// is shared, and P V runs per lane in position order. So both give the same bits, while a K row
// is loaded once for all heads, 8 scores are reduced together, and P V takes all D dims per pass.
JISU_AVX512_FN static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
JISU_AVX512_FN static inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}

// z[i]: the 16-lane partial score sums of position i. Returns the 8 values hsum8(lo(z_i) + hi(z_i)).
JISU_AVX512_FN static inline __m256 reduce8_z(const __m512* z) {
  __m512 y[4];  // y[k] = [lo + hi of z[2k], of z[2k+1]]
  for (int k = 0; k < 4; k++)
    y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * k], z[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(z[2 * k], z[2 * k + 1], 0xEE));
  // 128-bit lane k of s0 / s1: positions k / k + 4, their lanes i + lanes i + 4 (hsum8's first add)
  const __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  // the second add (elements 0 + 2, 1 + 3), then the third (0 + 1)
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s0, s1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s0, s1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(t, t, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(t, t, _MM_SHUFFLE(3, 1, 3, 1)));
  // lane k holds positions k (element 4k) and k + 4 (element 4k + 1)
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, r));
}

// Prefetches one cache row (D values) into L1.
template <class KV>
JISU_AVX512_FN static inline void prefetch_row(const KV* r, int64_t D) {
  for (int64_t o = 0; o < D * (int64_t)sizeof(KV); o += 64) _mm_prefetch((const char*)r + o, _MM_HINT_T0);
}

// sc: NH * n scores, then (64-byte aligned) n row offsets (elements) of the positions [lo, hi].
template <int NH, class KV>
JISU_AVX512_FN static void attn_heads_avx512(const AttnArgs& a, const float* q, float* out, float* sc) {
  const int64_t D = a.D, n = a.hi - a.lo + 1;
  int64_t* rows = (int64_t*)(sc + ((NH * n + 15) & ~(int64_t)15));
  {  // through the block table, a block's rows at a time
    const int64_t bs = a.bs, Hkv = a.Hkv, hk = a.hk, lo = a.lo, hi = a.hi;
    int64_t i = 0;
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
      const int64_t p0 = std::max(lo, b * bs), p1 = std::min(hi, b * bs + bs - 1);
      int64_t r = (((int64_t)a.table[b] * Hkv + hk) * bs + (p0 - b * bs)) * D;
      for (int64_t p = p0; p <= p1; p++, r += D) rows[i++] = r;
    }
  }
  const KV* kb = (const KV*)a.kc;
  const KV* vb = (const KV*)a.vc;
  const bool pf = a.prefetch;
  if (pf)
    for (int64_t i = 0; i < std::min<int64_t>(8, n); i++) prefetch_row(kb + rows[i], D);
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t c0 = 0; c0 < n; c0 += 8) {
    const int cnt = (int)std::min<int64_t>(8, n - c0);
    // the next group's K rows and this group's V rows (read by P V below)
    if (pf) {
      for (int64_t i = c0 + 8; i < std::min<int64_t>(c0 + 16, n); i++) prefetch_row(kb + rows[i], D);
      for (int64_t i = c0; i < c0 + cnt; i++) prefetch_row(vb + rows[i], D);
    }
    const KV* r[8];
    for (int i = 0; i < 8; i++) r[i] = kb + rows[c0 + (i < cnt ? i : cnt - 1)];
    __m512 z[NH][8];
    for (int j = 0; j < NH; j++)
      for (int i = 0; i < 8; i++) z[j][i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      for (int i = 0; i < 8; i++) {
        const __m512 k = load16(r[i] + d);
        for (int j = 0; j < NH; j++) z[j][i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * D + d), k, z[j][i]);
      }
    }
    const __mmask8 m = (__mmask8)((1u << cnt) - 1);
    for (int j = 0; j < NH; j++) _mm256_mask_storeu_ps(sc + j * n + c0, m, _mm256_mul_ps(reduce8_z(z[j]), scale));
  }
  float inv[NH];
  for (int j = 0; j < NH; j++) inv[j] = softmax_row(sc + j * n, n);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nv = (int)std::min<int64_t>(4, (D - d0) / 16);
    __m512 acc[NH][4];
    for (int j = 0; j < NH; j++)
      for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
    if (nv == 4) {
      for (int64_t i = 0; i < n; i++) {
        if (pf && i + 8 < n) prefetch_row(vb + rows[i + 8] + d0, 64);
        const KV* vp = vb + rows[i] + d0;
        const __m512 v0 = load16(vp), v1 = load16(vp + 16), v2 = load16(vp + 32), v3 = load16(vp + 48);
        for (int j = 0; j < NH; j++) {
          const __m512 e = _mm512_set1_ps(sc[j * n + i]);
          acc[j][0] = _mm512_fmadd_ps(e, v0, acc[j][0]);
          acc[j][1] = _mm512_fmadd_ps(e, v1, acc[j][1]);
          acc[j][2] = _mm512_fmadd_ps(e, v2, acc[j][2]);
          acc[j][3] = _mm512_fmadd_ps(e, v3, acc[j][3]);
        }
      }
    } else {
      for (int64_t i = 0; i < n; i++) {
        const KV* vp = vb + rows[i] + d0;
        for (int j = 0; j < NH; j++) {
          const __m512 e = _mm512_set1_ps(sc[j * n + i]);
          for (int c = 0; c < nv; c++) acc[j][c] = _mm512_fmadd_ps(e, load16(vp + 16 * c), acc[j][c]);
        }
      }
    }
    for (int j = 0; j < NH; j++) {
      const __m512 iv = _mm512_set1_ps(inv[j]);
      for (int c = 0; c < nv; c++) _mm512_storeu_ps(out + j * D + d0 + 16 * c, _mm512_mul_ps(acc[j][c], iv));
    }
  }
}
#endif

// q: the first head's query row ([nh][D]), out likewise; sc: nh * (hi - lo + 1) floats.
template <class KV>
void attend_kv(const AttnArgs& a, const float* q, float* out, int64_t nh, float* sc, bool simd, bool wide) {
#if JISU_FWD_X86
  if (simd && wide && a.D % 16 == 0) {
    for (int64_t j = 0; j < nh; j += 3) {
      const int64_t m = std::min<int64_t>(3, nh - j);
      if (m == 3) attn_heads_avx512<3, KV>(a, q + j * a.D, out + j * a.D, sc);
      else if (m == 2) attn_heads_avx512<2, KV>(a, q + j * a.D, out + j * a.D, sc);
      else attn_heads_avx512<1, KV>(a, q + j * a.D, out + j * a.D, sc);
    }
    return;
  }
  if (simd && a.D % 8 == 0) {
    for (int64_t j = 0; j < nh; j += 3) {
      const int64_t m = std::min<int64_t>(3, nh - j);
      if (m == 3) attn_heads_avx2<3, KV>(a, q + j * a.D, out + j * a.D, sc);
      else if (m == 2) attn_heads_avx2<2, KV>(a, q + j * a.D, out + j * a.D, sc);
      else attn_heads_avx2<1, KV>(a, q + j * a.D, out + j * a.D, sc);
    }
    return;
  }
#endif
  (void)simd;
  (void)wide;
  attn_scalar<KV>(a, q, out, nh, sc);
}

// wide: the AVX-512 kernels are active (the same bits as AVX2, see attn_heads_avx512).
void attend(const AttnArgs& a, bool half, const float* q, float* out, int64_t nh, float* sc, bool simd, bool wide) {
  if (half) attend_kv<uint16_t>(a, q, out, nh, sc, simd, wide);
  else attend_kv<float>(a, q, out, nh, sc, simd, wide);
}

// n values into the cache: copied, or rounded to half (bitwise what torch's .half() gives)
#if JISU_FWD_X86
JISU_AVX2_FN static void store_half_avx2(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; i++) dst[i] = f32_to_f16(src[i]);
}
#endif

void store_kv(void* cache, int64_t off, const float* src, int64_t n, bool half, bool simd) {
  if (!half) {
    std::memcpy((float*)cache + off, src, n * 4);
    return;
  }
  uint16_t* dst = (uint16_t*)cache + off;
#if JISU_FWD_X86
  if (simd) return store_half_avx2(dst, src, n);
#endif
  (void)simd;
  for (int64_t i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

// ---------------------------------------------------------------- the model
struct Layer {
  const PackedDesc* qkv[3] = {nullptr, nullptr, nullptr};  // one fused [q|k|v] or three
  const float* qkv_bias[3] = {nullptr, nullptr, nullptr};
  int nqkv = 0;
  const PackedDesc* o = nullptr;
  const PackedDesc* gu[2] = {nullptr, nullptr};  // one fused [gate|up] or two
  int ngu = 0;
  const PackedDesc* down = nullptr;
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  int64_t window = 0;  // 0: full causal attention
};

struct Stats {
  double linear = 0, attn = 0, other = 0, total = 0;
  int64_t steps = 0, tokens = 0;
};

class NativeModel {
 public:
  NativeModel(int64_t hidden, int64_t inter, int64_t n_layers, int64_t H, int64_t Hkv, int64_t D,
              int64_t vocab, double eps, double scale, uintptr_t inv_freq)
      : hidden_(hidden), inter_(inter), H_(H), Hkv_(Hkv), D_(D), vocab_(vocab), eps_((float)eps),
        scale_((float)scale), layers_(n_layers) {
    if (hidden <= 0 || inter <= 0 || n_layers <= 0 || H <= 0 || Hkv <= 0 || D <= 0 || D % 2 || H % Hkv || vocab <= 0)
      throw std::invalid_argument("NativeModel: bad config");
    const float* f = (const float*)inv_freq;
    inv_freq_.assign(f, f + D / 2);
  }

  void set_layer(int64_t i, std::vector<uintptr_t> qkv, std::vector<uintptr_t> qkv_bias, uintptr_t o,
                 std::vector<uintptr_t> gu, uintptr_t down, uintptr_t attn_norm, uintptr_t ffn_norm,
                 uintptr_t q_norm, uintptr_t k_norm, int64_t window) {
    if (i < 0 || i >= (int64_t)layers_.size()) throw std::out_of_range("set_layer: layer index");
    Layer& L = layers_[i];
    const int64_t nq = H_ * D_, nkv = Hkv_ * D_;
    if (qkv.size() == 1) {
      check(qkv[0], nq + 2 * nkv, hidden_, "qkv");
    } else if (qkv.size() == 3) {
      check(qkv[0], nq, hidden_, "q");
      check(qkv[1], nkv, hidden_, "k");
      check(qkv[2], nkv, hidden_, "v");
    } else {
      throw std::invalid_argument("set_layer: qkv needs 1 or 3 weights");
    }
    if (qkv_bias.size() != qkv.size()) throw std::invalid_argument("set_layer: one bias (or 0) per qkv weight");
    L.nqkv = (int)qkv.size();
    for (int j = 0; j < L.nqkv; j++) {
      L.qkv[j] = (const PackedDesc*)qkv[j];
      L.qkv_bias[j] = (const float*)qkv_bias[j];
    }
    check(o, hidden_, nq, "o");
    L.o = (const PackedDesc*)o;
    if (gu.size() == 1) {
      check(gu[0], 2 * inter_, hidden_, "gate_up");
    } else if (gu.size() == 2) {
      check(gu[0], inter_, hidden_, "gate");
      check(gu[1], inter_, hidden_, "up");
    } else {
      throw std::invalid_argument("set_layer: gate/up needs 1 or 2 weights");
    }
    L.ngu = (int)gu.size();
    for (int j = 0; j < L.ngu; j++) L.gu[j] = (const PackedDesc*)gu[j];
    check(down, hidden_, inter_, "down");
    L.down = (const PackedDesc*)down;
    if (!attn_norm || !ffn_norm) throw std::invalid_argument("set_layer: norms are required");
    L.attn_norm = (const float*)attn_norm;
    L.ffn_norm = (const float*)ffn_norm;
    L.q_norm = (const float*)q_norm;
    L.k_norm = (const float*)k_norm;
    if ((q_norm == 0) != (k_norm == 0)) throw std::invalid_argument("set_layer: q_norm and k_norm go together");
    L.window = window > 0 ? window : 0;
  }

  // embed_f32: [vocab, hidden] table, or embed_desc: a packed [vocab, hidden] weight.
  void set_globals(uintptr_t embed_f32, uintptr_t embed_desc, uintptr_t head_desc, uintptr_t final_norm) {
    if ((embed_f32 == 0) == (embed_desc == 0)) throw std::invalid_argument("set_globals: give one embedding");
    if (embed_desc) check(embed_desc, vocab_, hidden_, "embedding");
    check(head_desc, vocab_, hidden_, "lm_head");
    if (!final_norm) throw std::invalid_argument("set_globals: final norm is required");
    emb_f32_ = (const float*)embed_f32;
    emb_ = (const PackedDesc*)embed_desc;
    head_ = (const PackedDesc*)head_desc;
    final_norm_ = (const float*)final_norm;
  }

  void forward(uintptr_t tokens_p, int64_t T, int64_t S, uintptr_t qlens_p, uintptr_t starts_p,
               uintptr_t tables_p, int64_t max_blocks, uintptr_t kptrs_p, uintptr_t vptrs_p,
               int64_t block_size, int64_t num_blocks, uintptr_t rows_p, int64_t R, uintptr_t logits_p,
               bool kv_half);

  py::dict stats() const {
    py::dict d;
    d["linear_s"] = st_.linear;
    d["attention_s"] = st_.attn;
    d["other_s"] = st_.other;
    d["total_s"] = st_.total;
    d["steps"] = st_.steps;
    d["tokens"] = st_.tokens;
    return d;
  }
  void reset_stats() { st_ = Stats(); }
  bool profile = false;

 private:
  void check(uintptr_t p, int64_t N, int64_t K, const char* what) const {
    if (!p) throw std::invalid_argument(std::string("NativeModel: missing weight ") + what);
    const PackedDesc& d = *(const PackedDesc*)p;
    if (d.N != N || d.K != K)
      throw std::invalid_argument(std::string("NativeModel: weight ") + what + " has shape [" + std::to_string(d.N) +
                                  ", " + std::to_string(d.K) + "], expected [" + std::to_string(N) + ", " +
                                  std::to_string(K) + "]");
  }

  void ensure_rope(int64_t npos) {
    if (npos <= rope_len_) return;
    const int64_t h2 = D_ / 2;
    int64_t n = std::max<int64_t>({npos, 2 * rope_len_, 256});
    cos_.resize(n * h2);
    sin_.resize(n * h2);
    for (int64_t p = rope_len_; p < n; p++)
      for (int64_t i = 0; i < h2; i++) {
        // the angle rounded to float first, as the reference's float32 table
        const float ang = (float)p * inv_freq_[i];
        cos_[p * h2 + i] = (float)std::cos((double)ang);
        sin_[p * h2 + i] = (float)std::sin((double)ang);
      }
    rope_len_ = n;
  }

  // rotate-half RoPE of nh heads of x at position pos, in place
  void rope(float* x, int64_t nh, int64_t pos) const {
    const int64_t h2 = D_ / 2;
    const float* c = cos_.data() + pos * h2;
    const float* s = sin_.data() + pos * h2;
    for (int64_t h = 0; h < nh; h++) {
      float* xh = x + h * D_;
      for (int64_t i = 0; i < h2; i++) {
        const float x1 = xh[i], x2 = xh[i + h2];
        const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
        xh[i] = a - b;
        xh[i + h2] = e + f;
      }
    }
  }

  void embed_row(int64_t tok, float* out) const {
    if (emb_f32_)
      std::memcpy(out, emb_f32_ + tok * hidden_, hidden_ * 4);
    else
      dequant_row(*emb_, tok, out);
  }

  int64_t hidden_, inter_, H_, Hkv_, D_, vocab_;
  float eps_, scale_;
  std::vector<Layer> layers_;
  const float* emb_f32_ = nullptr;
  const PackedDesc* emb_ = nullptr;
  const PackedDesc* head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<float> inv_freq_, cos_, sin_;
  int64_t rope_len_ = 0;
  FBuf x_, h_, qkv_, q_, k_, v_, att_, tmp_, gu_, g_, u_, act_, xr_;
  std::vector<FBuf> thr_;
  std::vector<int64_t> pos_, seq_;
  Stats st_;
};

void NativeModel::forward(uintptr_t tokens_p, int64_t T, int64_t S, uintptr_t qlens_p, uintptr_t starts_p,
                          uintptr_t tables_p, int64_t max_blocks, uintptr_t kptrs_p, uintptr_t vptrs_p,
                          int64_t bs, int64_t num_blocks, uintptr_t rows_p, int64_t R, uintptr_t logits_p,
                          bool kv_half) {
  if (!head_) throw std::runtime_error("NativeModel: set_globals was not called");
  for (const Layer& L : layers_)
    if (!L.o) throw std::runtime_error("NativeModel: a layer was not set");
  const int64_t* tokens = (const int64_t*)tokens_p;
  const int32_t* qlens = (const int32_t*)qlens_p;
  const int32_t* starts = (const int32_t*)starts_p;
  const int32_t* tables = (const int32_t*)tables_p;
  const int64_t* kptrs = (const int64_t*)kptrs_p;
  const int64_t* vptrs = (const int64_t*)vptrs_p;
  const int32_t* rows = (const int32_t*)rows_p;
  float* logits = (float*)logits_p;
  if (T <= 0 || S <= 0 || bs <= 0 || max_blocks <= 0 || R < 0) throw std::invalid_argument("forward: bad sizes");

  // ---- validate the step and lay out per-token position / sequence
  pos_.resize(T);
  seq_.resize(T);
  int64_t t = 0, max_pos = 0;
  for (int64_t s = 0; s < S; s++) {
    const int64_t a = starts[s], n = qlens[s];
    if (a < 0 || n < 0 || t + n > T) throw std::invalid_argument("forward: q_lens / starts do not match the tokens");
    const int64_t nblk = (a + n + bs - 1) / bs;
    if (nblk > max_blocks) throw std::invalid_argument("forward: a sequence runs past its block table (KV cache full?)");
    for (int64_t b = 0; b < nblk; b++) {
      const int32_t id = tables[s * max_blocks + b];
      if (id < 0 || id >= num_blocks) throw std::invalid_argument("forward: block id out of range");
    }
    for (int64_t i = 0; i < n; i++, t++) {
      pos_[t] = a + i;
      seq_[t] = s;
    }
    if (n) max_pos = std::max(max_pos, a + n - 1);
  }
  if (t != T) throw std::invalid_argument("forward: sum(q_lens) != number of tokens");
  for (int64_t i = 0; i < T; i++)
    if (tokens[i] < 0 || tokens[i] >= vocab_) throw std::invalid_argument("forward: token id out of range");
  for (int64_t r = 0; r < R; r++)
    if (rows[r] < 0 || rows[r] >= T) throw std::invalid_argument("forward: logits row out of range");
  ensure_rope(max_pos + 1);

  const bool simd = use_simd();
  const bool prof = profile;
  const KernelTable* kt = active_kernels();
  const bool wide = simd && std::strcmp(kt->name, "avx512") == 0;
  const double t_start = now_s();
  double t_lin = 0, t_att = 0;
  auto lin = [&](const PackedDesc* W, const float* in, float* out, const float* bias) {
    const double t0 = prof ? now_s() : 0;
    linear((uintptr_t)W, (uintptr_t)in, (uintptr_t)out, T, (uintptr_t)bias);
    if (prof) t_lin += now_s() - t0;
  };

  const int64_t E = hidden_, F = inter_, D = D_, H = H_, Hkv = Hkv_, G = H / Hkv;
  const int64_t nq = H * D, nkv = Hkv * D;
  float* x = x_.get(T * E);
  float* h = h_.get(T * E);
  float* att = att_.get(T * nq);
  float* tmp = tmp_.get(T * E);
  float* act = act_.get(T * F);
  for (int64_t i = 0; i < T; i++) embed_row(tokens[i], x + i * E);
  const int nth = pool_max_threads();
  if ((int64_t)thr_.size() < nth) thr_.resize(nth);

  for (size_t li = 0; li < layers_.size(); li++) {
    const Layer& L = layers_[li];
    void* kcache = (void*)kptrs[li];
    void* vcache = (void*)vptrs[li];
    // ---- attention block
    parallel_for(T, T * E * 8, [&](int64_t a, int64_t b, int) { kt->rms_norm(x, L.attn_norm, h, a, b, E, eps_); });
    float *q, *k, *v;
    int64_t qs, ks, vs;  // row strides
    if (L.nqkv == 1) {
      float* qkv = qkv_.get(T * (nq + 2 * nkv));
      lin(L.qkv[0], h, qkv, L.qkv_bias[0]);
      q = qkv, k = qkv + nq, v = qkv + nq + nkv;
      qs = ks = vs = nq + 2 * nkv;
    } else {
      q = q_.get(T * nq), k = k_.get(T * nkv), v = v_.get(T * nkv);
      lin(L.qkv[0], h, q, L.qkv_bias[0]);
      lin(L.qkv[1], h, k, L.qkv_bias[1]);
      lin(L.qkv[2], h, v, L.qkv_bias[2]);
      qs = nq, ks = vs = nkv;
    }
    const double ta = prof ? now_s() : 0;
    // q/k norm, RoPE, and the new K/V into the cache (before any token attends)
    parallel_for(T, T * (nq + 2 * nkv) * 16, [&](int64_t a, int64_t b, int) {
      for (int64_t i = a; i < b; i++) {
        float* qi = q + i * qs;
        float* ki = k + i * ks;
        const float* vi = v + i * vs;
        if (L.q_norm) {
          kt->rms_norm(qi, L.q_norm, qi, 0, H, D, eps_);
          kt->rms_norm(ki, L.k_norm, ki, 0, Hkv, D, eps_);
        }
        rope(qi, H, pos_[i]);
        rope(ki, Hkv, pos_[i]);
        const int64_t p = pos_[i];
        const int64_t blk = tables[seq_[i] * max_blocks + p / bs];
        for (int64_t hk = 0; hk < Hkv; hk++) {
          const int64_t off = ((blk * Hkv + hk) * bs + p % bs) * D;
          store_kv(kcache, off, ki + hk * D, D, kv_half, simd);
          store_kv(vcache, off, vi + hk * D, D, kv_half, simd);
        }
      }
    });
    // attention: one task per (token, KV head), or per (token, head) when that is too few
    const bool split_heads = G > 1 && T * Hkv < 2 * nth;
    const int64_t per_tok = split_heads ? H : Hkv;
    int64_t work = 0, max_n = 1;
    for (int64_t i = 0; i < T; i++) {
      const int64_t n = std::min<int64_t>(pos_[i] + 1, L.window ? L.window : pos_[i] + 1);
      work += n * nkv * (kv_half ? 4 : 8);
      max_n = std::max(max_n, n);
    }
    // scores of up to G heads, and the AVX-512 kernel's row offsets (64-bit, aligned)
    for (int th = 0; th < nth; th++) thr_[th].get(G * max_n + 2 * max_n + 32);  // here: tasks must not throw
    parallel_for(T * per_tok, work, [&](int64_t a, int64_t b, int tid) {
      for (int64_t task = a; task < b; task++) {
        const int64_t i = task / per_tok, u = task % per_tok;
        const int64_t hk = split_heads ? u / G : u;
        const int64_t h0 = split_heads ? u : hk * G, nh = split_heads ? 1 : G;
        AttnArgs A;
        A.kc = kcache;
        A.vc = vcache;
        A.table = tables + seq_[i] * max_blocks;
        A.bs = bs;
        A.Hkv = Hkv;
        A.D = D;
        A.hk = hk;
        A.hi = pos_[i];
        A.lo = L.window ? std::max<int64_t>(0, pos_[i] - L.window + 1) : 0;
        A.scale = scale_;
        A.prefetch = qlens[seq_[i]] <= 1;
        attend(A, kv_half, q + i * qs + h0 * D, att + i * nq + h0 * D, nh, thr_[tid].p, simd, wide);
      }
    }, 16);
    if (prof) t_att += now_s() - ta;
    lin(L.o, att, tmp, nullptr);
    // residual, then the MLP's norm
    parallel_for(T, T * E * 12, [&](int64_t a, int64_t b, int) {
      for (int64_t i = a * E; i < b * E; i++) x[i] = x[i] + tmp[i];
      kt->rms_norm(x, L.ffn_norm, h, a, b, E, eps_);
    });
    // ---- MLP
    const float *g, *up;
    int64_t gs;
    if (L.ngu == 1) {
      float* gu = gu_.get(T * 2 * F);
      lin(L.gu[0], h, gu, nullptr);
      g = gu, up = gu + F, gs = 2 * F;
    } else {
      float* gb = g_.get(T * F);
      float* ub = u_.get(T * F);
      lin(L.gu[0], h, gb, nullptr);
      lin(L.gu[1], h, ub, nullptr);
      g = gb, up = ub, gs = F;
    }
    parallel_for(T, T * F * 12, [&](int64_t a, int64_t b, int) {
      for (int64_t i = a; i < b; i++) silu_mul(g + i * gs, up + i * gs, act + i * F, F, simd);
    });
    lin(L.down, act, tmp, nullptr);
    parallel_for(T, T * E * 8, [&](int64_t a, int64_t b, int) {
      for (int64_t i = a * E; i < b * E; i++) x[i] = x[i] + tmp[i];
    });
  }
  // ---- final norm and the LM head for the requested rows
  if (R > 0) {
    float* xr = xr_.get(R * E);
    for (int64_t r = 0; r < R; r++) kt->rms_norm(x + (int64_t)rows[r] * E, final_norm_, xr + r * E, 0, 1, E, eps_);
    const double t0 = prof ? now_s() : 0;
    linear((uintptr_t)head_, (uintptr_t)xr, (uintptr_t)logits, R, 0);
    if (prof) t_lin += now_s() - t0;
  }
  if (prof) {
    const double total = now_s() - t_start;
    st_.linear += t_lin;
    st_.attn += t_att;
    st_.other += total - t_lin - t_att;
    st_.total += total;
  }
  st_.steps++;
  st_.tokens += T;
}

void dequant_rows(uintptr_t desc, uintptr_t ids_p, int64_t n, uintptr_t out_p) {
  const PackedDesc& W = *(const PackedDesc*)desc;
  const int64_t* ids = (const int64_t*)ids_p;
  float* out = (float*)out_p;
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= W.N) throw std::out_of_range("dequant_rows: row id out of range");
  for (int64_t i = 0; i < n; i++) dequant_row(W, ids[i], out + i * W.K);
}

}  // namespace

void register_forward(py::module_& m) {
  py::class_<NativeModel>(m, "NativeModel",
                          "A Llama-family model step over a paged KV cache (see jisu.kernels.native_model).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, uintptr_t>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("num_layers"), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("vocab"), py::arg("eps"), py::arg("scale"),
           py::arg("inv_freq"))
      .def("set_layer", &NativeModel::set_layer, py::arg("i"), py::arg("qkv"), py::arg("qkv_bias"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("window"))
      .def("set_globals", &NativeModel::set_globals, py::arg("embed_f32"), py::arg("embed_desc"),
           py::arg("head_desc"), py::arg("final_norm"))
      .def("forward",
           [](NativeModel& self, uintptr_t tokens, int64_t T, int64_t S, uintptr_t qlens, uintptr_t starts,
              uintptr_t tables, int64_t max_blocks, uintptr_t kptrs, uintptr_t vptrs, int64_t bs, int64_t nb,
              uintptr_t rows, int64_t R, uintptr_t logits, bool kv_half) {
             py::gil_scoped_release nogil;  // other Python threads run while the step computes
             std::lock_guard<std::mutex> lock(native_mutex());
             self.forward(tokens, T, S, qlens, starts, tables, max_blocks, kptrs, vptrs, bs, nb, rows, R, logits,
                          kv_half);
           },
           "forward(tokens_i64, T, S, q_lens_i32, starts_i32, tables_i32, max_blocks, k_ptrs_i64, v_ptrs_i64, "
           "block_size, num_blocks, rows_i32, R, logits_f32, kv_half): addresses of contiguous buffers; the "
           "cache is fp32, or IEEE half when kv_half",
           py::arg("tokens"), py::arg("T"), py::arg("S"), py::arg("q_lens"), py::arg("starts"), py::arg("tables"),
           py::arg("max_blocks"), py::arg("k_ptrs"), py::arg("v_ptrs"), py::arg("block_size"), py::arg("num_blocks"),
           py::arg("rows"), py::arg("R"), py::arg("logits"), py::arg("kv_half") = false)
      .def("stats", &NativeModel::stats)
      .def("reset_stats", &NativeModel::reset_stats)
      .def_readwrite("profile", &NativeModel::profile);
  m.def(
      "to_half",
      [](uintptr_t src, uintptr_t dst, int64_t n) {
        if (n < 0) throw std::invalid_argument("to_half: n < 0");
        store_kv((void*)dst, 0, (const float*)src, n, true, use_simd());
      },
      "to_half(src_f32_addr, dst_u16_addr, n): fp32 -> IEEE half as the native step writes the KV cache "
      "(F16C on x86 with the SIMD kernels, else portable code)");
  m.def("dequant_rows", unlocked(&dequant_rows), "dequant_rows(desc_addr, ids_i64_addr, n, out_f32_addr): rows of a packed weight");
}

}  // namespace jisu
