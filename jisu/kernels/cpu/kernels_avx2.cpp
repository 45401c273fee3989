// AVX2 + FMA + F16C kernels, compiled for that target by pragma so one build holds every
// ISA (chosen at import by CPU detection). Nothing here may be an inline function shared
// with other files (the linker could pick this AVX2 copy for the scalar path), so every
// helper lives in an anonymous namespace and no std:: templates are instantiated.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "common.h"
// Headers first: only the code below is compiled for AVX2.
#pragma GCC target("avx2,fma,f16c")

namespace jisu {
namespace {

// ---------------------------------------------------------------- helpers
static inline __m256i bc4(const int8_t* p) {  // broadcast 4 int8 activations to all lanes
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Reduces 8 vectors of 8 int32 partial sums to one vector holding each vector's total.
static inline __m256i reduce8x8(const __m256i s[8]) {
  const __m256i h01 = _mm256_hadd_epi32(s[0], s[1]), h23 = _mm256_hadd_epi32(s[2], s[3]);
  const __m256i h45 = _mm256_hadd_epi32(s[4], s[5]), h67 = _mm256_hadd_epi32(s[6], s[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

// Stores 8 row results of tile t (bias added), only rows < N.
static inline void store_tile(float* o, int64_t t, int64_t N, __m256 acc, const float* bias) {
  const int64_t n0 = t * NR;
  if (n0 + NR <= N) {
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(o + n0, acc);
  } else {
    alignas(32) float tmp[NR];
    _mm256_store_ps(tmp, acc);
    for (int64_t r = 0; n0 + r < N; r++) o[n0 + r] = bias ? tmp[r] + bias[n0 + r] : tmp[r];
  }
}

// ---------------------------------------------------------------- activations
void quantize_act(const float* x, int64_t m0, int64_t m1, ActQ& A, bool need_q16) {
  const int64_t K = A.K, nb = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; m++) {
    for (int64_t b = 0; b < nb; b++) {
      const float* xb = x + m * K + b * QK;
      __m256 v[4];
      for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      const float amax = hmax8(mx);
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i iv[4];
      for (int i = 0; i < 4; i++)
        iv[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vid),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]), p23 = _mm256_packs_epi32(iv[2], iv[3]);
      const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
      _mm256_storeu_si256((__m256i*)(A.q + m * K + b * QK), q8);
      const int32_t s = hsum8i(_mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]),
                                                _mm256_add_epi32(iv[2], iv[3])));
      A.d[m * nb + b] = d;
      A.s[m * nb + b] = s;
      A.sd[m * nb + b] = d * (float)s;
      if (need_q16) {
        int16_t* o = A.q16 + m * K + b * QK;
        _mm256_storeu_si256((__m256i*)o, _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[0], iv[2]), 0xd8));
        _mm256_storeu_si256((__m256i*)(o + 16),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[1], iv[3]), 0xd8));
      }
    }
  }
}

// ---------------------------------------------------------------- INT formats
// Unpacks one 8-row block into 8 code vectors (vector j: quad j of all 8 rows).
template <int BITS>
static inline void unpack_block(const uint8_t* blk, __m256i w[8]) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 8; j++) w[j] = _mm256_loadu_si256((const __m256i*)(blk + 32 * j));
  } else if constexpr (BITS == 4) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int v = 0; v < 4; v++) {
      const __m256i L = _mm256_loadu_si256((const __m256i*)(blk + 32 * v));
      w[v] = _mm256_and_si256(L, m4);
      w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(L, 4), m4);
    }
  } else {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int v = 0; v < 2; v++) {
      const __m256i L = _mm256_loadu_si256((const __m256i*)(blk + 32 * v));
      w[v] = _mm256_and_si256(L, m3);
      w[v + 2] = _mm256_and_si256(_mm256_srli_epi16(L, 2), m3);
      w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(L, 4), m3);
      w[v + 6] = _mm256_and_si256(_mm256_srli_epi16(L, 6), m3);
    }
    if constexpr (BITS == 3) {
      // Bit j of each byte of H is bit 2 of quad j's code; 16-bit shifts keep every
      // byte's bits inside the byte for these shift amounts (see common.h).
      const __m256i H = _mm256_loadu_si256((const __m256i*)(blk + 64));
      const __m256i m4 = _mm256_set1_epi8(4);
      w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(H, 2), m4));
      w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(H, 1), m4));
      w[2] = _mm256_or_si256(w[2], _mm256_and_si256(H, m4));
      w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_srli_epi16(H, 1), m4));
      w[4] = _mm256_or_si256(w[4], _mm256_and_si256(_mm256_srli_epi16(H, 2), m4));
      w[5] = _mm256_or_si256(w[5], _mm256_and_si256(_mm256_srli_epi16(H, 3), m4));
      w[6] = _mm256_or_si256(w[6], _mm256_and_si256(_mm256_srli_epi16(H, 4), m4));
      w[7] = _mm256_or_si256(w[7], _mm256_and_si256(_mm256_srli_epi16(H, 5), m4));
    }
  }
}

// Per-row integer dot of a block with 32 activations: lane r = row r.
// Codes <= 7 bits: 8 maddubs summed in int16 (|sum| <= 16*15*127 < 32768, exact).
template <int BITS>
static inline __m256i block_isum(const __m256i w[8], const int8_t* xb) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    __m256i acc = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_abs_epi8(w[0]), _mm256_sign_epi8(bc4(xb), w[0])), ones);
    for (int j = 1; j < 8; j++)
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w[j]),
                                                                         _mm256_sign_epi8(bc4(xb + 4 * j), w[j])),
                                                    ones));
    return acc;
  } else {
    __m256i p = _mm256_maddubs_epi16(w[0], bc4(xb));
    for (int j = 1; j < 8; j++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[j], bc4(xb + 4 * j)));
    return _mm256_madd_epi16(p, ones);
  }
}

// Float accumulation of one block, in the same order as the scalar kernel.
template <bool ASYM, bool PC>
static inline __m256 block_acc(__m256 acc, __m256i isum, __m256 d8, __m256 m8, float dx, float sd) {
  if constexpr (PC) {
    return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(dx), _mm256_cvtepi32_ps(isum)));
  } else {
    const __m256 ds = _mm256_mul_ps(d8, _mm256_set1_ps(dx));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(ds, _mm256_cvtepi32_ps(isum)));
    if constexpr (ASYM) acc = _mm256_add_ps(acc, _mm256_mul_ps(m8, _mm256_set1_ps(sd)));
    return acc;
  }
}

template <int BITS, bool ASYM, bool PC>
static void int_gemv(const PackedDesc& W, const ActQ& A, int64_t t0, int64_t t1, float* out,
                     const float* bias) {
  const int64_t K = W.K, bpg = W.group / QK, ng = K / W.group, bb = int_block_bytes(BITS);
  const int32_t off = (BITS == 8 || ASYM) ? 0 : 1 << (BITS - 1);
  const int8_t* xq = A.q;
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    __m256 acc = _mm256_setzero_ps(), d8 = acc, m8 = acc;
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* gp = tile + g * W.group_bytes;
      if constexpr (!PC) {
        d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)gp));
        if constexpr (ASYM) m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gp + 16)));
        gp += ASYM ? 32 : 16;
      }
      for (int64_t i = 0; i < bpg; i++) {
        const int64_t b = g * bpg + i;
        const uint8_t* blk = gp + i * bb;
        _mm_prefetch((const char*)blk + 1024, _MM_HINT_T0);
        __m256i w[8];
        unpack_block<BITS>(blk, w);
        __m256i isum = block_isum<BITS>(w, xq + b * QK);
        if (off) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(off * A.s[b]));
        acc = block_acc<ASYM, PC>(acc, isum, d8, m8, A.d[b], A.sd[b]);
      }
    }
    if constexpr (PC) acc = _mm256_mul_ps(acc, _mm256_loadu_ps(W.chan_scale + t * NR));
    store_tile(out, t, W.N, acc, bias);
  }
}

// MR activation rows against one unpacked tile (codes in wb, f32 scales in sb / mb).
template <int BITS, bool ASYM, bool PC, int MR>
static inline void int_micro(const PackedDesc& W, const ActQ& A, int64_t m0, const __m256i* wb,
                             const float* sb, const float* mb, int64_t t, float* out, int64_t ldo,
                             const float* bias) {
  const int64_t K = W.K, nb = K / QK, bpg = W.group / QK;
  const int32_t off = (BITS == 8 || ASYM) ? 0 : 1 << (BITS - 1);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x[MR];
  for (int i = 0; i < MR; i++) x[i] = A.q + (m0 + i) * K;
  __m256 acc[MR];
  for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const int64_t g = b / bpg;
    __m256i p[MR];
    if constexpr (BITS == 8) {
      const __m256i* wa = wb + b * 16;  // abs codes, then signed codes
      for (int j = 0; j < 8; j++) {
        const __m256i a = _mm256_load_si256(wa + j), s = _mm256_load_si256(wa + 8 + j);
        for (int i = 0; i < MR; i++) {
          const __m256i v = _mm256_madd_epi16(
              _mm256_maddubs_epi16(a, _mm256_sign_epi8(bc4(x[i] + b * QK + 4 * j), s)), ones);
          p[i] = j == 0 ? v : _mm256_add_epi32(p[i], v);
        }
      }
    } else {
      const __m256i* wj = wb + b * 8;
      for (int j = 0; j < 8; j++) {
        const __m256i a = _mm256_load_si256(wj + j);
        for (int i = 0; i < MR; i++) {
          const __m256i v = _mm256_maddubs_epi16(a, bc4(x[i] + b * QK + 4 * j));
          p[i] = j == 0 ? v : _mm256_add_epi16(p[i], v);
        }
      }
      for (int i = 0; i < MR; i++) p[i] = _mm256_madd_epi16(p[i], ones);
    }
    __m256 d8 = _mm256_setzero_ps(), m8 = d8;
    if constexpr (!PC) {
      d8 = _mm256_load_ps(sb + g * NR);
      if constexpr (ASYM) m8 = _mm256_load_ps(mb + g * NR);
    }
    for (int i = 0; i < MR; i++) {
      const int64_t mi = (m0 + i) * nb + b;
      __m256i isum = p[i];
      if (off) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(off * A.s[mi]));
      acc[i] = block_acc<ASYM, PC>(acc[i], isum, d8, m8, A.d[mi], A.sd[mi]);
    }
  }
  for (int i = 0; i < MR; i++) {
    __m256 a = acc[i];
    if constexpr (PC) a = _mm256_mul_ps(a, _mm256_loadu_ps(W.chan_scale + t * NR));
    store_tile(out + (m0 + i) * ldo, t, W.N, a, bias);
  }
}

template <int BITS, bool ASYM, bool PC>
static void int_gemm_t(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
                       float* out, int64_t ldo, const float* bias, uint8_t* scratch) {
  if (M == 1) return int_gemv<BITS, ASYM, PC>(W, A, t0, t1, out, bias);
  const int64_t K = W.K, nb = K / QK, bpg = W.group / QK, ng = K / W.group, bb = int_block_bytes(BITS);
  __m256i* wb = (__m256i*)scratch;                      // nb * 8 (or 16) vectors
  float* sb = (float*)(scratch + nb * 512);             // ng * 8 scales
  float* mb = sb + ng * NR;                             // ng * 8 mins
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* gp = tile + g * W.group_bytes;
      if constexpr (!PC) {
        _mm256_store_ps(sb + g * NR, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)gp)));
        if constexpr (ASYM) _mm256_store_ps(mb + g * NR, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gp + 16))));
        gp += ASYM ? 32 : 16;
      }
      for (int64_t i = 0; i < bpg; i++) {
        const int64_t b = g * bpg + i;
        __m256i w[8];
        unpack_block<BITS>(gp + i * bb, w);
        if constexpr (BITS == 8) {
          for (int j = 0; j < 8; j++) {
            _mm256_store_si256(wb + b * 16 + j, _mm256_abs_epi8(w[j]));
            _mm256_store_si256(wb + b * 16 + 8 + j, w[j]);
          }
        } else {
          for (int j = 0; j < 8; j++) _mm256_store_si256(wb + b * 8 + j, w[j]);
        }
      }
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int_micro<BITS, ASYM, PC, 4>(W, A, m, wb, sb, mb, t, out, ldo, bias);
    switch (M - m) {
      case 3: int_micro<BITS, ASYM, PC, 3>(W, A, m, wb, sb, mb, t, out, ldo, bias); break;
      case 2: int_micro<BITS, ASYM, PC, 2>(W, A, m, wb, sb, mb, t, out, ldo, bias); break;
      case 1: int_micro<BITS, ASYM, PC, 1>(W, A, m, wb, sb, mb, t, out, ldo, bias); break;
      default: break;
    }
  }
}

void int_gemm(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1, float* out,
              int64_t ldo, const float* bias, uint8_t* scratch) {
#define JISU_CASE(B, AS, PC) \
  if (W.bits == B && W.asym == AS && W.per_channel == PC) return int_gemm_t<B, AS, PC>(W, A, M, t0, t1, out, ldo, bias, scratch);
  JISU_CASE(4, 0, 0) JISU_CASE(4, 1, 0) JISU_CASE(8, 0, 0) JISU_CASE(8, 0, 1) JISU_CASE(8, 1, 0)
  JISU_CASE(3, 0, 0) JISU_CASE(3, 1, 0) JISU_CASE(2, 0, 0) JISU_CASE(2, 1, 0)
#undef JISU_CASE
}

// ---------------------------------------------------------------- CODEBOOK
// Looks up one row-block's 32 indices in the row's int16 table; returns the int32
// partial sums (8 lanes) of table[idx] * activation (q16 order, see quantize_act).
static inline void cb_decode(const uint8_t* idx16, const uint8_t* tab, __m256i& c0, __m256i& c1) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m128i raw = _mm_loadu_si128((const __m128i*)idx16);
  const __m256i idx = _mm256_and_si256(
      _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), m4);
  const __m256i lo = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)tab)), idx);
  const __m256i hi = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(tab + 16))), idx);
  c0 = _mm256_unpacklo_epi8(lo, hi);
  c1 = _mm256_unpackhi_epi8(lo, hi);
}

void cb_gemm(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1, float* out,
             int64_t ldo, const float* bias, uint8_t* scratch) {
  const int64_t K = W.K, nb = K / QK, bpg = W.group / QK, ng = K / W.group;
  __m256i* db = (__m256i*)scratch;  // decoded tile: nb blocks x 8 rows x 2 vectors
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    if (M == 1) {
      const int16_t* xq = A.q16;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t g = 0; g < ng; g++) {
        const uint8_t* gp = tile + 256 + g * W.group_bytes;
        const __m256 sc = _mm256_loadu_ps((const float*)gp);
        for (int64_t i = 0; i < bpg; i++) {
          const int64_t b = g * bpg + i;
          const uint8_t* blk = gp + 32 + i * 128;
          const __m256i a0 = _mm256_loadu_si256((const __m256i*)(xq + b * QK));
          const __m256i a1 = _mm256_loadu_si256((const __m256i*)(xq + b * QK + 16));
          __m256i s[8];
          for (int r = 0; r < NR; r++) {
            __m256i c0, c1;
            cb_decode(blk + r * 16, tile + r * 32, c0, c1);
            s[r] = _mm256_add_epi32(_mm256_madd_epi16(c0, a0), _mm256_madd_epi16(c1, a1));
          }
          const __m256 ds = _mm256_mul_ps(sc, _mm256_set1_ps(A.d[b]));
          acc = _mm256_add_ps(acc, _mm256_mul_ps(ds, _mm256_cvtepi32_ps(reduce8x8(s))));
        }
      }
      store_tile(out, t, W.N, acc, bias);
      continue;
    }
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* gp = tile + 256 + g * W.group_bytes;
      for (int64_t i = 0; i < bpg; i++) {
        const int64_t b = g * bpg + i;
        for (int r = 0; r < NR; r++)
          cb_decode(gp + 32 + i * 128 + r * 16, tile + r * 32, db[b * 16 + 2 * r], db[b * 16 + 2 * r + 1]);
      }
    }
    for (int64_t m = 0; m < M; m++) {
      const int16_t* xq = A.q16 + m * K;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; b++) {
        const __m256 sc = _mm256_loadu_ps((const float*)(tile + 256 + (b / bpg) * W.group_bytes));
        const __m256i a0 = _mm256_loadu_si256((const __m256i*)(xq + b * QK));
        const __m256i a1 = _mm256_loadu_si256((const __m256i*)(xq + b * QK + 16));
        __m256i s[8];
        for (int r = 0; r < NR; r++)
          s[r] = _mm256_add_epi32(_mm256_madd_epi16(db[b * 16 + 2 * r], a0),
                                  _mm256_madd_epi16(db[b * 16 + 2 * r + 1], a1));
        const __m256 ds = _mm256_mul_ps(sc, _mm256_set1_ps(A.d[m * nb + b]));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(ds, _mm256_cvtepi32_ps(reduce8x8(s))));
      }
      store_tile(out + m * ldo, t, W.N, acc, bias);
    }
  }
}

// ---------------------------------------------------------------- FP32
// Every (m, n) output is one 8-lane FMA chain over k, a masked tail, then hsum8, so the
// result does not depend on how many rows/columns are computed together.
static const int32_t kMaskTab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

template <int MR, int NC>
static inline void f32_micro(const float* W, int64_t K, const float* x, int64_t n, float* out,
                             int64_t ldo, const float* bias) {
  __m256 acc[MR][NC];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NC; j++) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int j = 0; j < NC; j++) {
      const __m256 w = _mm256_loadu_ps(W + (n + j) * K + k);
      for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], w, acc[i][j]);
    }
  }
  if (k < K) {
    const __m256i mask = _mm256_loadu_si256((const __m256i*)(kMaskTab + 8 - (K - k)));
    __m256 xv[MR];
    for (int i = 0; i < MR; i++) xv[i] = _mm256_maskload_ps(x + i * K + k, mask);
    for (int j = 0; j < NC; j++) {
      const __m256 w = _mm256_maskload_ps(W + (n + j) * K + k, mask);
      for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], w, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NC; j++) {
      float r = hsum8(acc[i][j]);
      if (bias) r = r + bias[n + j];
      out[i * ldo + n + j] = r;
    }
}

template <int MR>
static inline void f32_rows(const float* W, int64_t K, const float* x, int64_t n0, int64_t n1,
                            float* out, int64_t ldo, const float* bias) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) f32_micro<MR, 4>(W, K, x, n, out, ldo, bias);
  for (; n < n1; n++) f32_micro<MR, 1>(W, K, x, n, out, ldo, bias);
}

void f32_gemm(const float* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t n0,
              int64_t n1, float* out, int64_t ldo, const float* bias) {
  (void)N;
  // Block over n so a strip of W stays in L2 while all rows of x pass over it.
  const int64_t nblk = M > 3 ? 64 : n1 - n0;
  for (int64_t nb0 = n0; nb0 < n1; nb0 += nblk) {
    const int64_t nb1 = nb0 + nblk < n1 ? nb0 + nblk : n1;
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) f32_rows<3>(W, K, x + m * K, nb0, nb1, out + m * ldo, ldo, bias);
    if (M - m == 2) f32_rows<2>(W, K, x + m * K, nb0, nb1, out + m * ldo, ldo, bias);
    if (M - m == 1) f32_rows<1>(W, K, x + m * K, nb0, nb1, out + m * ldo, ldo, bias);
  }
}

// ---------------------------------------------------------------- fused ops
void rms_norm(const float* x, const float* w, float* out, int64_t m0, int64_t m1, int64_t D,
              float eps) {
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * D;
    __m256 ss8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      ss8 = _mm256_fmadd_ps(v, v, ss8);
    }
    float ss = hsum8(ss8);
    for (; i < D; i++) ss = ss + xr[i] * xr[i];
    const float r = 1.f / __builtin_sqrtf(ss / (float)D + eps);
    const __m256 rv = _mm256_set1_ps(r);
    float* o = out + m * D;
    for (i = 0; i + 8 <= D; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), rv)));
    for (; i < D; i++) o[i] = w[i] * (xr[i] * r);
  }
}

void rope(const float* x, float* out, const float* cs, const float* sn, int64_t t0, int64_t t1,
          int64_t H, int64_t D) {
  const int64_t h2 = D / 2;
  for (int64_t t = t0; t < t1; t++) {
    const float* c = cs + t * h2;
    const float* s = sn + t * h2;
    for (int64_t h = 0; h < H; h++) {
      const float* xi = x + (t * H + h) * D;
      float* o = out + (t * H + h) * D;
      int64_t i = 0;
      for (; i + 8 <= h2; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(xi + i), x2 = _mm256_loadu_ps(xi + h2 + i);
        const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
        _mm256_storeu_ps(o + h2 + i, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
      }
      for (; i < h2; i++) {
        const float x1 = xi[i], x2 = xi[i + h2];
        const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
        o[i] = a - b;
        o[i + h2] = e + f;
      }
    }
  }
}

// exp(x) for x <= 0 (softmax inputs after subtracting the max), ~2 ulp.
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void attn_decode(const float* q, const float* k, const float* v, float* out, int64_t h0,
                 int64_t h1, int64_t H, int64_t Hkv, int64_t D, int64_t T, int64_t tstride,
                 float scale, float* sc) {
  if (D % 8) return scalar_table()->attn_decode(q, k, v, out, h0, h1, H, Hkv, D, T, tstride, scale, sc);
  const int64_t grp = H / Hkv;
  for (int64_t h = h0; h < h1; h++) {
    const float* qh = q + h * D;
    const float* kh = k + (h / grp) * tstride * D;
    const float* vh = v + (h / grp) * tstride * D;
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t < T; t++) {
      const float* kt = kh + t * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int64_t i = 0;
      for (; i + 16 <= D; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(kt + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i + 8), _mm256_loadu_ps(kt + i + 8), a1);
      }
      if (i < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(kt + i), a0);
      sc[t] = hsum8(_mm256_add_ps(a0, a1)) * scale;
    }
    float mx = -INFINITY;
    for (t = 0; t + 8 <= T; t += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(sc + t));
    mx = hmax8(mx8);
    for (; t < T; t++) mx = sc[t] > mx ? sc[t] : mx;
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= T; t += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mxv));
      _mm256_storeu_ps(sc + t, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    if (t < T) {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = t; j < T; j++) tmp[j - t] = sc[j] - mx;
      alignas(32) float e[8];
      _mm256_store_ps(e, exp256(_mm256_load_ps(tmp)));
      for (int64_t j = t; j < T; j++) {
        sc[j] = e[j - t];
        sum = sum + e[j - t];
      }
    }
    float* o = out + h * D;
    for (int64_t i = 0; i < D; i += 32) {
      // Up to 4 output vectors kept in registers while streaming over t.
      const int64_t nv = (D - i) / 8 < 4 ? (D - i) / 8 : 4;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (t = 0; t < T; t++) {
        const __m256 p = _mm256_set1_ps(sc[t]);
        const float* vt = vh + t * D + i;
        for (int64_t j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * j), acc[j]);
      }
      const __m256 inv = _mm256_set1_ps(1.f / sum);
      for (int64_t j = 0; j < nv; j++) _mm256_storeu_ps(o + i + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
  }
}

const KernelTable table = {"avx2", quantize_act, int_gemm, cb_gemm, f32_gemm,
                           rms_norm, rope,         attn_decode};

}  // namespace

const KernelTable* avx2_table() { return &table; }

}  // namespace jisu

#else  // not x86
#include "common.h"
namespace jisu {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace jisu
#endif
