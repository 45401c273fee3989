// Portable scalar kernels: the reference every SIMD path is tested against, and the
// fallback on CPUs without a SIMD path. They read the same packed layouts (common.h).
// For the int8-activation formats the per-block float steps (one multiply, one fused
// multiply-add) are the ones the SIMD kernels do, so scalar and SIMD results are bitwise
// equal there.
//
// Sections, in the order kernels_x86.inc and kernels_neon.cpp follow:
//   activations  quantize_act (int8 blocks, refinement)
//   int GEMM     int_gemm (2/3/4/8-bit, sym / asym / per-channel)
//   codebook     cb_gemm (4-bit index into a per-row table)
//   f32          f32_gemm
//   fused ops    rms_norm, rope, silu_mul, to_half
//   attention    attn_decode (contiguous cache); the paged attention is in attention.cpp
#include <algorithm>
#include <cmath>

#include "common.h"

namespace jisu {
namespace {

// ---------------------------------------------------------------- activations
void quantize_act(const float* x, int64_t m0, int64_t m1, ActQ& A, bool need_q16) {
  const int64_t K = A.K, nb = K / QK;
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * K;
    float* amax_b = A.dr + m * nb;  // block maxima first (dr is overwritten below)
    for (int64_t b = 0; b < nb; b++) {
      float amax = 0.f;
      for (int i = 0; i < QK; i++) amax = std::max(amax, std::fabs(xr[b * QK + i]));
      amax_b[b] = amax;
    }
    const float thr = refine_threshold(amax_b, nb, A.refine);
    for (int64_t b = 0; b < nb; b++) {
      const float* xb = xr + b * QK;
      const float amax = amax_b[b];
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      int8_t* q = A.q + m * K + b * QK;
      int32_t s = 0;
      for (int i = 0; i < QK; i++) {
        q[i] = (int8_t)std::nearbyint(xb[i] * id);
        s += q[i];
      }
      A.d[m * nb + b] = d;
      A.s[m * nb + b] = s;
      A.sd[m * nb + b] = d * (float)s;
      refine_fields(A, m * nb + b, xb, id, q, A.q2 + m * K + b * QK, amax, thr, d, s, A.sd[m * nb + b]);
      if (need_q16) {
        // Order used by the SIMD codebook kernel: [0..7,16..23] then [8..15,24..31].
        int16_t* o = A.q16 + m * K + b * QK;
        for (int i = 0; i < 8; i++) {
          o[i] = q[i];
          o[8 + i] = q[16 + i];
          o[16 + i] = q[8 + i];
          o[24 + i] = q[24 + i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------- int GEMM
void int_gemm(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
              float* out, int64_t ldo, const float* bias, uint8_t*) {
  const int64_t K = W.K, nb = K / QK, G = W.group, bpg = G / QK, ng = K / G;
  const int64_t bb = int_block_bytes(W.bits);
  const int off = (W.bits == 8 || W.asym) ? 0 : 1 << (W.bits - 1);
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    for (int r = 0; r < NR; r++) {
      const int64_t n = t * NR + r;
      if (n >= W.N) break;
      for (int64_t m = 0; m < M; m++) {
        const int8_t* xq = A.q + m * K;
        const float* dx = A.dr + m * nb;
        float acc = 0.f;
        for (int64_t g = 0; g < ng; g++) {
          const uint8_t* gp = tile + g * W.group_bytes;
          float d = 0.f, mn = 0.f;
          if (!W.per_channel) {
            d = f16_to_f32(((const uint16_t*)gp)[r]);
            if (W.asym) mn = f16_to_f32(((const uint16_t*)gp)[NR + r]);
            gp += 16 * (1 + W.asym);
          }
          for (int64_t i = 0; i < bpg; i++) {
            const int64_t b = g * bpg + i;
            const uint8_t* blk = gp + i * bb;
            int32_t isum = 0;
            for (int k = 0; k < QK; k++) isum += int_code(blk, W.bits, r, k) * xq[b * QK + k];
            if (A.rf[m * nb + b]) {  // refined block: 128 * dot(w, q) + dot(w, q2)
              const int8_t* x2 = A.q2 + m * K + b * QK;
              int32_t i2 = 0;
              for (int k = 0; k < QK; k++) i2 += int_code(blk, W.bits, r, k) * x2[k];
              isum = 128 * isum + i2;
            }
            isum -= off * A.sr[m * nb + b];
            // std::fma: the SIMD kernels use FMA here; results stay bitwise equal.
            if (W.per_channel) {
              acc = std::fma(dx[b], (float)isum, acc);
            } else {
              const float ds = d * dx[b];
              acc = std::fma(ds, (float)isum, acc);
              if (W.asym) acc = std::fma(mn, A.sdr[m * nb + b], acc);
            }
          }
        }
        if (W.per_channel) acc = acc * W.chan_scale[n];
        if (bias) acc = acc + bias[n];
        out[m * ldo + n] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------- codebook
void cb_gemm(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
             float* out, int64_t ldo, const float* bias, uint8_t*) {
  const int64_t K = W.K, nb = K / QK, G = W.group, bpg = G / QK, ng = K / G;
  for (int64_t t = t0; t < t1; t++) {
    const uint8_t* tile = W.data + t * W.tile_bytes;
    for (int r = 0; r < NR; r++) {
      const int64_t n = t * NR + r;
      if (n >= W.N) break;
      const uint8_t* lo = tile + r * 32;
      const uint8_t* hi = lo + 16;
      int16_t table[16];
      for (int i = 0; i < 16; i++) table[i] = (int16_t)(lo[i] | (hi[i] << 8));
      for (int64_t m = 0; m < M; m++) {
        const int8_t* xq = A.q + m * K;
        const float* dx = A.d + m * nb;
        float acc = 0.f;
        for (int64_t g = 0; g < ng; g++) {
          const uint8_t* gp = tile + 256 + g * W.group_bytes;
          float sc;
          std::memcpy(&sc, gp + 4 * r, 4);
          for (int64_t i = 0; i < bpg; i++) {
            const int64_t b = g * bpg + i;
            const uint8_t* row = gp + 32 + i * 128 + r * 16;
            int32_t isum = 0;
            for (int k = 0; k < 16; k++) {
              isum += table[row[k] & 15] * xq[b * QK + k];
              isum += table[row[k] >> 4] * xq[b * QK + 16 + k];
            }
            const float ds = sc * dx[b];
            acc = std::fma(ds, (float)isum, acc);
          }
        }
        if (bias) acc = acc + bias[n];
        out[m * ldo + n] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------- f32
void f32_gemm(const float* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t n0,
              int64_t n1, float* out, int64_t ldo, const float* bias) {
  (void)N;
  for (int64_t n = n0; n < n1; n++) {
    const float* w = W + n * K;
    for (int64_t m = 0; m < M; m++) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; k++) acc = acc + xr[k] * w[k];
      if (bias) acc = acc + bias[n];
      out[m * ldo + n] = acc;
    }
  }
}

// ---------------------------------------------------------------- fused ops
void rms_norm(const float* x, const float* w, float* out, int64_t m0, int64_t m1, int64_t D,
              float eps) {
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; i++) ss = ss + xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) out[m * D + i] = w[i] * (xr[i] * r);
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
      for (int64_t i = 0; i < h2; i++) {
        const float x1 = xi[i], x2 = xi[i + h2];
        // Same rounding as HF's q*cos + rotate_half(q)*sin (two products, one add).
        const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
        o[i] = a - b;
        o[i + h2] = e + f;
      }
    }
  }
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) * u: torch's gelu(approximate="tanh") formula
void gelu_mul(const float* g, const float* u, float* out, int64_t n) {
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  for (int64_t i = 0; i < n; i++) {
    const float x = g[i];
    out[i] = 0.5f * x * (1.f + std::tanh(beta * (x + kappa * x * x * x))) * u[i];
  }
}

void to_half(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

// ---------------------------------------------------------------- attention
void attn_decode(const float* q, const float* k, const float* v, float* out, int64_t h0,
                 int64_t h1, int64_t H, int64_t Hkv, int64_t D, int64_t T, int64_t tstride,
                 float scale, float* sc) {
  const int64_t grp = H / Hkv;
  for (int64_t h = h0; h < h1; h++) {
    const float* qh = q + h * D;
    const float* kh = k + (h / grp) * tstride * D;
    const float* vh = v + (h / grp) * tstride * D;
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
      float s = 0.f;
      for (int64_t i = 0; i < D; i++) s = s + qh[i] * kh[t * D + i];
      sc[t] = s * scale;
      mx = std::max(mx, sc[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; t++) {
      sc[t] = std::exp(sc[t] - mx);
      sum = sum + sc[t];
    }
    float* o = out + h * D;
    for (int64_t i = 0; i < D; i++) o[i] = 0.f;
    for (int64_t t = 0; t < T; t++)
      for (int64_t i = 0; i < D; i++) o[i] = o[i] + sc[t] * vh[t * D + i];
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < D; i++) o[i] = o[i] * inv;
  }
}

const KernelTable table = {.name = "scalar", .quantize_act = quantize_act, .int_gemm = int_gemm,
                           .cb_gemm = cb_gemm, .f32_gemm = f32_gemm, .rms_norm = rms_norm, .rope = rope,
                           .attn_decode = attn_decode, .attn_paged = attn_paged_scalar,
                           .silu_mul = silu_mul, .gelu_mul = gelu_mul, .to_half = to_half, .panel_mr = 0, .panel = nullptr,
                           .qv_gemm = 0, .gg_gemm = gg_gemm_scalar};

}  // namespace

const KernelTable* scalar_table() { return &table; }

}  // namespace jisu
