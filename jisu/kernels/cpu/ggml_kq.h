// GGML kind, types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (super-blocks of 256 values): the scalar reference
// (ggml_kq.cpp) each ISA's kernels (ggml_kq_x86.inc, ggml_kq_neon.inc) are tested against.
//
// Super-block layouts (bytes, in order; fp16 = IEEE half; value index i in 0..255):
//   Q2_K   84: scales[16] (lo nibble scale, hi nibble min, per 16), qs[64], d, dmin.
//              q(i) = (qs[32 (i/128) + i%32] >> 2 ((i/32)%4)) & 3;  w = d sc q - dmin mn.
//   Q3_K  110: hmask[32], qs[64], scales[12] (16 x 6 bits), d.  low2 as Q2_K, h = (hmask[i%32] >> i/32) & 1,
//              q = low2 + 4 h - 4 in -4..3;  w = d (sc - 32) q.
//   Q4_K  144: d, dmin, scales[12] (8 x 6-bit scale, 8 x 6-bit min, per 32), qs[128].
//              q(i) = (qs[32 (i/64) + i%32] >> 4 ((i/32)%2)) & 15;  w = d sc q - dmin mn.
//   Q5_K  176: d, dmin, scales[12], qh[32], qs[128]; q = Q4_K's q | ((qh[i%32] >> i/32) & 1) << 4.
//   Q6_K  210: ql[128], qh[64], scales[16] (int8, per 16), d.  low4 = (ql[64 (i/128) + i%64] >> 4 ((i/64)%2)) & 15,
//              high2 = (qh[32 (i/128) + i%32] >> 2 ((i/32)%4)) & 3, q = low4 | high2 << 4;  w = d sc (q - 32).
//   IQ4_XS 136: d, scales_h (u16, 2 bits per 32), scales_l[4] (4 bits per 32), qs[128] (16 bytes per 32:
//              lo nibbles values 0..15, hi nibbles 16..31);  w = d (ls - 32) kvalues[q].
//
// Dot product with the per-32 int8 activations (ActQ): each super-block is decoded into integer weights
// u - o (u unsigned codes, o the type's offset: 32 for Q6_K, 4 for Q3_K, else 0; IQ4_XS: kvalues), a
// per-16 integer scale sc and (Q2_K, Q4_K, Q5_K) a per-16 integer min mn. For activation block b (32
// values v, halves h = 0, 1 of 16 values with sums S_h), exactly in int32:
//   I_b = sum_h sc_h * (dot_h(u, v) - o S_h),   Mn_b = sum_h mn_h S_h
// then per row lane b of an 8-float accumulator (one lane per 32-block of a super-block):
//   t = fma(float(I_b), D, -(float(Mn_b) * Dm))  (types with mins; else t = float(I_b) * D)
//   acc_b = fma(t, dr_b, acc_b)
// (Q4_K / Q5_K: one scale and min per 32, so I_b = sc (dot_0 + dot_1) and Mn_b = mn A.sr[b], the same integers)
// and the row's result is the fixed-order sum ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) (+ bias). Every ISA
// follows these float steps, so each agrees with the scalar reference bit for bit and no row depends on M.
#pragma once
#include <cstdint>

#include "common.h"

namespace jisu {

// Whether this file runs ggml type gtype.
bool kq_has(int gtype);
// Row of K values of type gtype (raw bytes) as fp32.
void kq_dequant_row(int gtype, const uint8_t* row, int64_t K, float* out);
// The reference of KernelTable::gg_gemm for this file's types.
void kq_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                      int64_t n1, float* out, int64_t ldo, const float* bias);

// IQ4_NL / IQ4_XS code book.
static constexpr int8_t KQ_KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Bytes of one super-block of a K-quant type (0 for other types).
static inline int kq_block_bytes(int gtype) {
  switch (gtype) {
    case GG_Q2_K: return 84;
    case GG_Q3_K: return 110;
    case GG_Q4_K: return 144;
    case GG_Q5_K: return 176;
    case GG_Q6_K: return 210;
    case GG_IQ4_XS: return 136;
    default: return 0;
  }
}

static inline uint16_t kq_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// Integer weights' offset o (see above) and whether the type has mins.
static inline int kq_offset(int gtype) { return gtype == GG_Q6_K ? 32 : gtype == GG_Q3_K ? 4 : 0; }
static inline bool kq_has_min(int gtype) { return gtype == GG_Q2_K || gtype == GG_Q4_K || gtype == GG_Q5_K; }

// The scales of one super-block: per-16 integer scale sc[16] and min mn[16] (0 for types without mins),
// D and Dm (0 without mins) as floats. Shared by every ISA (a few scalar operations per 256 values).
static inline void kq_scales(int gtype, const uint8_t* b, int32_t sc[16], int32_t mn[16], float& D, float& Dm) {
  Dm = 0.f;
  switch (gtype) {
    case GG_Q2_K:
      for (int g = 0; g < 16; g++) sc[g] = b[g] & 15, mn[g] = b[g] >> 4;
      D = f16_to_f32(kq_u16(b + 80)), Dm = f16_to_f32(kq_u16(b + 82));
      return;
    case GG_Q3_K: {
      const uint8_t* s = b + 96;
      for (int g = 0; g < 16; g++) {
        const int lo = g < 8 ? s[g] & 15 : s[g - 8] >> 4, hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        sc[g] = (lo | hi << 4) - 32, mn[g] = 0;
      }
      D = f16_to_f32(kq_u16(b + 108));
      return;
    }
    case GG_Q4_K: case GG_Q5_K: {
      const uint8_t* s = b + 4;
      for (int j = 0; j < 8; j++) {
        int c, m;
        if (j < 4) c = s[j] & 63, m = s[j + 4] & 63;
        else c = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30), m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        sc[2 * j] = sc[2 * j + 1] = c, mn[2 * j] = mn[2 * j + 1] = m;
      }
      D = f16_to_f32(kq_u16(b)), Dm = f16_to_f32(kq_u16(b + 2));
      return;
    }
    case GG_Q6_K:
      for (int g = 0; g < 16; g++) sc[g] = (int8_t)b[192 + g], mn[g] = 0;
      D = f16_to_f32(kq_u16(b + 208));
      return;
    default: {  // IQ4_XS
      const int sh = kq_u16(b + 2);
      for (int j = 0; j < 8; j++) {
        const int ls = ((b[4 + j / 2] >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4);
        sc[2 * j] = sc[2 * j + 1] = ls - 32, mn[2 * j] = mn[2 * j + 1] = 0;
      }
      D = f16_to_f32(kq_u16(b));
      return;
    }
  }
}

}  // namespace jisu
