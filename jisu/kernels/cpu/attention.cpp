// Paged attention of the native step: one token's query heads over its sequence's cached
// positions, read through the block table, on an fp32 or IEEE-half cache, with optional tanh
// soft-capping of the scaled scores before the softmax (Gemma 2). The scalar kernel is
// the reference; the AVX2 kernel (D a multiple of 8) and the AVX-512 kernel (D a multiple of 16)
// give each other's bits (tests/kernels/test_attention_isa.py). Each ISA's KernelTable points at
// its attn_paged_* entry; the x86 kernels are compiled for their targets by attribute.
//
// A head's order of operations depends only on its own positions [lo, hi] (not on the batch, the
// heads run with it or the block size), which keeps a sequence's logits bitwise the same alone or
// in any batch.
#include <algorithm>
#include <cmath>

#include "common.h"
#include "x86_math.h"

#if defined(__x86_64__) || defined(__i386__)
#define JISU_ATTN_X86 1
#define JISU_AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define JISU_ATTN_X86 0
#endif

namespace jisu {
namespace {

// ---------------------------------------------------------------- scalar reference
inline float kv_value(float x) { return x; }
inline float kv_value(uint16_t x) { return f16_to_f32(x); }

template <class KV>
void attn_scalar(const PagedAttn& a, const float* q, float* out, int64_t nh, float* sc) {
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
    if (a.softcap > 0.f)
      for (int64_t i = 0; i < n; i++) s[i] = std::tanh(s[i] / a.softcap) * a.softcap;
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

#if JISU_ATTN_X86
// ---------------------------------------------------------------- soft-capping (x86)
// s[i] = tanh(s[i] / cap) * cap for a row of n scores, shared by the AVX2 and AVX-512 kernels (the
// same bits). tanh |y| = (1 - e) / (1 + e) with e = exp(-2 |y|): absolute error ~1e-7, so a
// score moves by ~1e-7 cap (about one ulp of a score near the cap).
JISU_AVX2_FN static inline __m256 capped8(__m256 s, __m256 inv_cap, __m256 cap) {
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 y = _mm256_mul_ps(s, inv_cap);
  const __m256 ay = _mm256_andnot_ps(sign, y);
  const __m256 e = exp8(_mm256_mul_ps(ay, _mm256_set1_ps(-2.f)));
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  return _mm256_mul_ps(_mm256_or_ps(t, _mm256_and_ps(sign, y)), cap);
}

JISU_AVX2_FN static void softcap_row(float* s, int64_t n, float cap) {
  const __m256 capv = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.f / cap);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, capped8(_mm256_loadu_ps(s + i), inv, capv));
  if (i < n) {
    alignas(32) float tmp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t k = i; k < n; k++) tmp[k - i] = s[k];
    _mm256_store_ps(tmp, capped8(_mm256_load_ps(tmp), inv, capv));
    for (int64_t k = i; k < n; k++) s[k] = tmp[k - i];
  }
}

// ---------------------------------------------------------------- AVX2
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
  const PagedAttn& a;
  const char* base;
  int64_t p, blk, off;
  RowPrefetch(const PagedAttn& a_, const void* cache) : a(a_), base((const char*)cache), p(a_.lo), blk(a_.lo / a_.bs), off(a_.lo % a_.bs) {}
  inline void next() {
    if (p > a.hi) return;
    const char* r = base + (((int64_t)a.table[blk] * a.Hkv + a.hk) * a.bs + off) * a.D * (int64_t)sizeof(KV);
    for (int64_t o = 0; o < a.D * (int64_t)sizeof(KV); o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
    p++;
    if (++off == a.bs) off = 0, blk++;
  }
};
constexpr int KV_PF_ROWS = 8;  // K rows ahead of the one being scored (2-32 measured the same)

// Up to 3 heads at once (they share every K/V row load). Each head's arithmetic does not
// depend on which heads run with it.
template <int NH, class KV>
JISU_AVX2_FN static void attn_heads_avx2(const PagedAttn& a, const float* q, float* out, float* sc) {
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
  if (a.softcap > 0.f)
    for (int j = 0; j < NH; j++) softcap_row(sc + j * n, n, a.softcap);
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

// ---------------------------------------------------------------- AVX-512
// The same attention in 512-bit registers, for D a multiple of 16 (chosen with the AVX-512
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
JISU_AVX512_FN static void attn_heads_avx512(const PagedAttn& a, const float* q, float* out, float* sc) {
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
  if (a.softcap > 0.f)
    for (int j = 0; j < NH; j++) softcap_row(sc + j * n, n, a.softcap);
  for (int j = 0; j < NH; j++) inv[j] = softmax_row(sc + j * n, n);
  // P V as in the AVX2 kernel above, 64 output dims a pass (the same shape, zmm for ymm: same sums)
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

// Heads [0, nh) in passes of up to 3, which share each K/V row load: run[m - 1] takes m heads.
using HeadsFn = void (*)(const PagedAttn& a, const float* q, float* out, float* sc);
void by_threes(const HeadsFn run[3], const PagedAttn& a, const float* q, float* out, int64_t nh, float* sc) {
  for (int64_t j = 0; j < nh; j += 3) run[std::min<int64_t>(3, nh - j) - 1](a, q + j * a.D, out + j * a.D, sc);
}
#endif

}  // namespace

void attn_paged_scalar(const PagedAttn& a, const float* q, float* out, int64_t nh, float* sc) {
  if (a.half) attn_scalar<uint16_t>(a, q, out, nh, sc);
  else attn_scalar<float>(a, q, out, nh, sc);
}

#if JISU_ATTN_X86
void attn_paged_avx2(const PagedAttn& a, const float* q, float* out, int64_t nh, float* sc) {
  if (a.D % 8) return attn_paged_scalar(a, q, out, nh, sc);
  static constexpr HeadsFn f32[3] = {attn_heads_avx2<1, float>, attn_heads_avx2<2, float>, attn_heads_avx2<3, float>};
  static constexpr HeadsFn f16[3] = {attn_heads_avx2<1, uint16_t>, attn_heads_avx2<2, uint16_t>,
                                     attn_heads_avx2<3, uint16_t>};
  by_threes(a.half ? f16 : f32, a, q, out, nh, sc);
}

void attn_paged_avx512(const PagedAttn& a, const float* q, float* out, int64_t nh, float* sc) {
  if (a.D % 16) return attn_paged_avx2(a, q, out, nh, sc);
  static constexpr HeadsFn f32[3] = {attn_heads_avx512<1, float>, attn_heads_avx512<2, float>,
                                     attn_heads_avx512<3, float>};
  static constexpr HeadsFn f16[3] = {attn_heads_avx512<1, uint16_t>, attn_heads_avx512<2, uint16_t>,
                                     attn_heads_avx512<3, uint16_t>};
  by_threes(a.half ? f16 : f32, a, q, out, nh, sc);
}
#endif

}  // namespace jisu
