// Scalar reference of the GGML kind's types Q5_0, Q5_1, IQ4_NL (blocks of 32 values), F16 and BF16
// (layouts and the float operation order every ISA repeats: ggml_q32.h).
#include "ggml_q32.h"

#include <cmath>
#include <cstring>

namespace jisu {

namespace {

uint16_t rd16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

float bf16_to_f32(uint16_t h) {
  const uint32_t b = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

int64_t block_bytes(int gtype) {
  return gtype == GG_Q5_0 ? 22 : gtype == GG_Q5_1 ? 24 : gtype == GG_IQ4_NL ? 18 : 0;
}

// The integer codes c[32] of one quantized block, its scale d and (Q5_1) its minimum m.
void decode_block(int gtype, const uint8_t* p, int32_t* c, float& d, float& m) {
  d = f16_to_f32(rd16(p));
  m = 0.f;
  if (gtype == GG_IQ4_NL) {
    for (int j = 0; j < 16; j++) {
      c[j] = IQ4NL_VALUES[p[2 + j] & 15];
      c[j + 16] = IQ4NL_VALUES[p[2 + j] >> 4];
    }
    return;
  }
  const int off = gtype == GG_Q5_0 ? 16 : 0;
  if (gtype == GG_Q5_1) m = f16_to_f32(rd16(p + 2));
  const uint8_t* qh = p + (gtype == GG_Q5_1 ? 4 : 2);
  const uint8_t* qs = qh + 4;
  const uint32_t h = (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) | ((uint32_t)qh[3] << 24);
  for (int j = 0; j < 16; j++) {
    c[j] = (int32_t)((qs[j] & 15) | (((h >> j) & 1) << 4)) - off;
    c[j + 16] = (int32_t)((qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4)) - off;
  }
}

void gemm_quant(const PackedDesc& W, const ActQ& A, int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo,
                const float* bias) {
  const int64_t K = W.K, nb = K / QK, bb = block_bytes(W.gtype);
  const bool refine = A.refine > 0.f;
  int32_t c[QK];
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = W.data + n * W.row_bytes;
    for (int64_t mi = 0; mi < M; mi++) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; b++) {
        float d, mn;
        decode_block(W.gtype, row + b * bb, c, d, mn);
        const int64_t i = mi * nb + b;
        const int8_t* v = A.q + mi * K + b * QK;
        int32_t isum = 0;
        for (int j = 0; j < QK; j++) isum += c[j] * v[j];
        if (refine && A.rf[i]) {
          const int8_t* v2 = A.q2 + mi * K + b * QK;
          int32_t s2 = 0;
          for (int j = 0; j < QK; j++) s2 += c[j] * v2[j];
          isum = 128 * isum + s2;
        }
        acc = std::fma(d * A.dr[i], (float)isum, acc);
        if (W.gtype == GG_Q5_1) acc = std::fma(mn, A.sdr[i], acc);
      }
      if (bias) acc = acc + bias[n];
      out[mi * ldo + n] = acc;
    }
  }
}

void gemm_half(const PackedDesc& W, const float* x, int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo,
               const float* bias) {
  const int64_t K = W.K, K8 = K & ~(int64_t)7;
  const bool bf = W.gtype == GG_BF16;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = W.data + n * W.row_bytes;
    for (int64_t mi = 0; mi < M; mi++) {
      const float* xr = x + mi * K;
      float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < K8; k++) {
        const uint16_t h = rd16(row + 2 * k);
        l[k & 7] = std::fma(bf ? bf16_to_f32(h) : f16_to_f32(h), xr[k], l[k & 7]);
      }
      float acc = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
      for (int64_t k = K8; k < K; k++) {
        const uint16_t h = rd16(row + 2 * k);
        acc = std::fma(bf ? bf16_to_f32(h) : f16_to_f32(h), xr[k], acc);
      }
      if (bias) acc = acc + bias[n];
      out[mi * ldo + n] = acc;
    }
  }
}

}  // namespace

bool q32_has(int gtype) {
  return gtype == GG_Q5_0 || gtype == GG_Q5_1 || gtype == GG_IQ4_NL || gtype == GG_F16 || gtype == GG_BF16;
}

void q32_dequant_row(int gtype, const uint8_t* row, int64_t K, float* out) {
  if (gtype == GG_F16 || gtype == GG_BF16) {
    for (int64_t k = 0; k < K; k++) out[k] = gtype == GG_BF16 ? bf16_to_f32(rd16(row + 2 * k)) : f16_to_f32(rd16(row + 2 * k));
    return;
  }
  const int64_t bb = block_bytes(gtype);
  int32_t c[QK];
  for (int64_t b = 0; b < K / QK; b++) {
    float d, m;
    decode_block(gtype, row + b * bb, c, d, m);
    float* o = out + b * QK;
    if (gtype == GG_Q5_1)
      for (int j = 0; j < QK; j++) o[j] = d * (float)c[j] + m;
    else
      for (int j = 0; j < QK; j++) o[j] = d * (float)c[j];
  }
}

void q32_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0, int64_t n1,
                      float* out, int64_t ldo, const float* bias) {
  if (W.gtype == GG_F16 || W.gtype == GG_BF16)
    gemm_half(W, x, M, n0, n1, out, ldo, bias);
  else
    gemm_quant(W, A, M, n0, n1, out, ldo, bias);
}

}  // namespace jisu
