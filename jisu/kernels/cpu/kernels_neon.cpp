// ARM NEON (baseline AArch64) kernels: INT-format GEMV/GEMM, fp32 GEMM, RMSNorm, RoPE.
// Every other table entry (activation quantization, the codebook format, SiLU, the half
// store, both attentions) is the scalar kernel's.
// The integer dot products widen int8 x int8 to int16 (vmull) and pairwise-accumulate into
// int32, giving the same exact block sums as every other ISA, and the float steps are the
// scalar kernel's (multiply, fused multiply-add), so results are bitwise equal to scalar.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "common.h"

namespace jisu {
namespace {

// Codes of quad j (8 rows x 4 k) of one INT block as two int8x16 (rows 0-3, rows 4-7).
template <int BITS>
static inline void quad_codes(const uint8_t* blk, int j, int8x16_t& lo, int8x16_t& hi) {
  if constexpr (BITS == 8) {
    lo = vld1q_s8((const int8_t*)blk + 32 * j);
    hi = vld1q_s8((const int8_t*)blk + 32 * j + 16);
  } else if constexpr (BITS == 4) {
    const uint8x16_t a = vld1q_u8(blk + 32 * (j & 3)), b = vld1q_u8(blk + 32 * (j & 3) + 16);
    const uint8x16_t m = vdupq_n_u8(15);
    if (j < 4) {
      lo = vreinterpretq_s8_u8(vandq_u8(a, m));
      hi = vreinterpretq_s8_u8(vandq_u8(b, m));
    } else {
      lo = vreinterpretq_s8_u8(vshrq_n_u8(a, 4));
      hi = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
    }
  } else if constexpr (BITS == 3) {
    const uint8x16_t m7 = vdupq_n_u8(7);
    if (j < 6) {
      const int8x16_t s = vdupq_n_s8((int8_t)(-(j & 1) * 4));  // right shift by 0 or 4
      lo = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * (j >> 1)), s), m7));
      hi = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * (j >> 1) + 16), s), m7));
    } else {  // bit v of the code is bit 3 (quad 6) or 7 (quad 7) of vector v
      const int sh = j == 6 ? 3 : 7;
      uint8x16_t a = vdupq_n_u8(0), b = a;
      for (int v = 0; v < 3; v++) {
        const int8x16_t s = vdupq_n_s8((int8_t)(v - sh));  // bit sh -> bit v
        const uint8x16_t mv = vdupq_n_u8((uint8_t)(1 << v));
        a = vorrq_u8(a, vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * v), s), mv));
        b = vorrq_u8(b, vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * v + 16), s), mv));
      }
      lo = vreinterpretq_s8_u8(a);
      hi = vreinterpretq_s8_u8(b);
    }
  } else {
    const int sh = (j >> 1) * 2;
    const int8x16_t s = vdupq_n_s8((int8_t)-sh);  // right shift by sh
    const uint8x16_t m = vdupq_n_u8(3);
    const uint8x16_t a = vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * (j & 1)), s), m);
    const uint8x16_t b = vandq_u8(vshlq_u8(vld1q_u8(blk + 32 * (j & 1) + 16), s), m);
    lo = vreinterpretq_s8_u8(a);
    hi = vreinterpretq_s8_u8(b);
  }
}

// Exact per-row block sums for 8 rows: r0..r3 in s03, r4..r7 in s47.
template <int BITS>
static inline void block_isum(const uint8_t* blk, const int8_t* xb, int32x4_t& s03, int32x4_t& s47) {
  int32x4_t a01 = vdupq_n_s32(0), a23 = a01, a45 = a01, a67 = a01;
  for (int j = 0; j < 8; j++) {
    int8x16_t lo, hi;
    quad_codes<BITS>(blk, j, lo, hi);
    int32_t v;
    std::memcpy(&v, xb + 4 * j, 4);
    const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(v));
    a01 = vpadalq_s16(a01, vmull_s8(vget_low_s8(lo), vget_low_s8(x)));
    a23 = vpadalq_s16(a23, vmull_high_s8(lo, x));
    a45 = vpadalq_s16(a45, vmull_s8(vget_low_s8(hi), vget_low_s8(x)));
    a67 = vpadalq_s16(a67, vmull_high_s8(hi, x));
  }
  s03 = vpaddq_s32(a01, a23);
  s47 = vpaddq_s32(a45, a67);
}

static inline float32x4_t f16x4(const uint8_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t*)p)));
}

template <int BITS, bool ASYM, bool PC>
static void int_gemm_t(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
                       float* out, int64_t ldo, const float* bias) {
  const int64_t K = W.K, nb = K / QK, bpg = W.group / QK, ng = K / W.group, bb = int_block_bytes(BITS);
  const int32_t off = (BITS == 8 || ASYM) ? 0 : 1 << (BITS - 1);
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    for (int64_t m = 0; m < M; m++) {
      const int8_t* xq = A.q + m * K;
      const float* dx = A.dr + m * nb;   // the INT kernels' refined scale / sums (common.h)
      const int32_t* sx = A.sr + m * nb;
      const float* sd = A.sdr + m * nb;
      const uint8_t* rf = A.rf + m * nb;
      const int8_t* xq2 = A.q2 + m * K;
      float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = acc0, d0 = acc0, d1 = acc0, m0 = acc0, m1 = acc0;
      for (int64_t g = 0; g < ng; g++) {
        const uint8_t* gp = tile + g * W.group_bytes;
        if constexpr (!PC) {
          d0 = f16x4(gp);
          d1 = f16x4(gp + 8);
          if constexpr (ASYM) {
            m0 = f16x4(gp + 16);
            m1 = f16x4(gp + 24);
          }
          gp += ASYM ? 32 : 16;
        }
        for (int64_t i = 0; i < bpg; i++) {
          const int64_t b = g * bpg + i;
          int32x4_t s03, s47;
          block_isum<BITS>(gp + i * bb, xq + b * QK, s03, s47);
          if (rf[b]) {  // refined block: 128 * dot(w, q) + dot(w, q2)
            int32x4_t r03, r47;
            block_isum<BITS>(gp + i * bb, xq2 + b * QK, r03, r47);
            s03 = vaddq_s32(vshlq_n_s32(s03, 7), r03);
            s47 = vaddq_s32(vshlq_n_s32(s47, 7), r47);
          }
          if (off) {
            const int32x4_t o = vdupq_n_s32(off * sx[b]);
            s03 = vsubq_s32(s03, o);
            s47 = vsubq_s32(s47, o);
          }
          if constexpr (PC) {
            const float32x4_t dv = vdupq_n_f32(dx[b]);
            acc0 = vfmaq_f32(acc0, dv, vcvtq_f32_s32(s03));
            acc1 = vfmaq_f32(acc1, dv, vcvtq_f32_s32(s47));
          } else {
            const float32x4_t dv = vdupq_n_f32(dx[b]);
            acc0 = vfmaq_f32(acc0, vmulq_f32(d0, dv), vcvtq_f32_s32(s03));
            acc1 = vfmaq_f32(acc1, vmulq_f32(d1, dv), vcvtq_f32_s32(s47));
            if constexpr (ASYM) {
              const float32x4_t sv = vdupq_n_f32(sd[b]);
              acc0 = vfmaq_f32(acc0, m0, sv);
              acc1 = vfmaq_f32(acc1, m1, sv);
            }
          }
        }
      }
      if constexpr (PC) {
        acc0 = vmulq_f32(acc0, vld1q_f32(W.chan_scale + t * NR));
        acc1 = vmulq_f32(acc1, vld1q_f32(W.chan_scale + t * NR + 4));
      }
      float r[8];
      vst1q_f32(r, acc0);
      vst1q_f32(r + 4, acc1);
      float* o = out + m * ldo;
      for (int k = 0; k < NR && t * NR + k < W.N; k++) {
        const int64_t n = t * NR + k;
        o[n] = bias ? r[k] + bias[n] : r[k];
      }
    }
  }
}

void int_gemm(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1, float* out,
              int64_t ldo, const float* bias, uint8_t*) {
#define JISU_CASE(B, AS, PC) \
  if (W.bits == B && W.asym == AS && W.per_channel == PC) return int_gemm_t<B, AS, PC>(W, A, M, t0, t1, out, ldo, bias);
  JISU_CASE(4, 0, 0) JISU_CASE(4, 1, 0) JISU_CASE(8, 0, 0) JISU_CASE(8, 0, 1) JISU_CASE(8, 1, 0)
  JISU_CASE(3, 0, 0) JISU_CASE(3, 1, 0) JISU_CASE(2, 0, 0) JISU_CASE(2, 1, 0)
#undef JISU_CASE
}

// fp32: one 4-lane FMA chain per (m, n), a scalar tail, a fixed reduction: M-independent.
void f32_gemm(const float* W, int64_t, int64_t K, const float* x, int64_t M, int64_t n0,
              int64_t n1, float* out, int64_t ldo, const float* bias) {
  for (int64_t n = n0; n < n1; n++) {
    const float* w = W + n * K;
    for (int64_t m = 0; m < M; m++) {
      const float* xr = x + m * K;
      float32x4_t acc = vdupq_n_f32(0.f);
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) acc = vfmaq_f32(acc, vld1q_f32(xr + k), vld1q_f32(w + k));
      float r = vaddvq_f32(acc);
      for (; k < K; k++) r = std::fma(xr[k], w[k], r);
      if (bias) r = r + bias[n];
      out[m * ldo + n] = r;
    }
  }
}

// The loops below repeat kernels_scalar.cpp's shape on purpose: each NEON kernel sits beside the
// scalar reference it is checked against (tests/kernels/test_cross_isa.py, under qemu).
void rms_norm(const float* x, const float* w, float* out, int64_t m0, int64_t m1, int64_t D,
              float eps) {
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * D;
    float32x4_t ss4 = vdupq_n_f32(0.f);
    int64_t i = 0;
    for (; i + 4 <= D; i += 4) {
      const float32x4_t v = vld1q_f32(xr + i);
      ss4 = vfmaq_f32(ss4, v, v);
    }
    float ss = vaddvq_f32(ss4);
    for (; i < D; i++) ss = ss + xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / (float)D + eps);
    float* o = out + m * D;
    for (i = 0; i + 4 <= D; i += 4)
      vst1q_f32(o + i, vmulq_f32(vld1q_f32(w + i), vmulq_n_f32(vld1q_f32(xr + i), r)));
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
      for (; i + 4 <= h2; i += 4) {
        const float32x4_t x1 = vld1q_f32(xi + i), x2 = vld1q_f32(xi + h2 + i);
        const float32x4_t cv = vld1q_f32(c + i), sv = vld1q_f32(s + i);
        vst1q_f32(o + i, vsubq_f32(vmulq_f32(x1, cv), vmulq_f32(x2, sv)));
        vst1q_f32(o + h2 + i, vaddq_f32(vmulq_f32(x2, cv), vmulq_f32(x1, sv)));
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

// ---------------------------------------------------------------- GGML kind
#include "ggml_q32_neon.inc"
#include "ggml_kq_neon.inc"

void gg_gemm(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0, int64_t n1, float* out,
             int64_t ldo, const float* bias) {
  if (q32_gemm_simd(W, x, A, M, n0, n1, out, ldo, bias)) return;
  if (kq_gemm_simd(W, x, A, M, n0, n1, out, ldo, bias)) return;
  gg_gemm_scalar(W, x, A, M, n0, n1, out, ldo, bias);
}

KernelTable make_table() {
  const KernelTable* s = scalar_table();
  KernelTable t = *s;
  t.name = "neon";
  t.int_gemm = int_gemm;
  t.f32_gemm = f32_gemm;
  t.rms_norm = rms_norm;
  t.rope = rope;
  t.gg_gemm = gg_gemm;
  return t;
}

}  // namespace

const KernelTable* neon_table() {
  static const KernelTable t = make_table();
  return &t;
}

}  // namespace jisu

#else
#include "common.h"
namespace jisu {
const KernelTable* neon_table() { return nullptr; }
}  // namespace jisu
#endif
