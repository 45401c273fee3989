// Scalar reference of the GGML kind's types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (super-blocks of 256 values):
// the row decoder (equal to gguf.quants.dequantize) and the GEMM every ISA's kernels are checked against.
#include "ggml_kq.h"

#include <cmath>
#include <vector>

namespace jisu {

namespace {

// Integer weight w[i] of each of the super-block's 256 values (u - o; IQ4_XS: kvalues[q]).
void kq_weights(int gtype, const uint8_t* b, int8_t w[256]) {
  for (int i = 0; i < 256; i++) {
    int q;
    switch (gtype) {
      case GG_Q2_K: q = (b[16 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3; break;
      case GG_Q3_K: {
        const int lo = (b[32 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
        q = lo + 4 * ((b[i % 32] >> (i / 32)) & 1) - 4;
        break;
      }
      case GG_Q4_K: q = (b[16 + 32 * (i / 64) + i % 32] >> (4 * ((i / 32) % 2))) & 15; break;
      case GG_Q5_K:
        q = ((b[48 + 32 * (i / 64) + i % 32] >> (4 * ((i / 32) % 2))) & 15) | (((b[16 + i % 32] >> (i / 32)) & 1) << 4);
        break;
      case GG_Q6_K: {
        const int lo = (b[64 * (i / 128) + i % 64] >> (4 * ((i / 64) % 2))) & 15;
        const int hi = (b[128 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
        q = (lo | hi << 4) - 32;
        break;
      }
      default: q = KQ_KVALUES[(b[8 + 16 * (i / 32) + i % 16] >> (4 * ((i % 32) / 16))) & 15]; break;  // IQ4_XS
    }
    w[i] = (int8_t)q;
  }
}

}  // namespace

bool kq_has(int gtype) { return kq_block_bytes(gtype) != 0; }

void kq_dequant_row(int gtype, const uint8_t* row, int64_t K, float* out) {
  const int bb = kq_block_bytes(gtype);
  const bool has_min = kq_has_min(gtype);
  int8_t w[256];
  int32_t sc[16], mn[16];
  float D, Dm;
  for (int64_t s = 0; s < K / 256; s++) {
    const uint8_t* b = row + s * bb;
    kq_weights(gtype, b, w);
    kq_scales(gtype, b, sc, mn, D, Dm);
    for (int i = 0; i < 256; i++) {  // gguf: (d * sc) * q - dmin * mn, in float32 steps
      const float dl = D * (float)sc[i / 16];
      float v = dl * (float)w[i];
      if (has_min) v = v - Dm * (float)mn[i / 16];
      out[s * 256 + i] = v;
    }
  }
}

void kq_gemm_scalar(const PackedDesc& W, const float*, const ActQ& A, int64_t M, int64_t n0, int64_t n1,
                    float* out, int64_t ldo, const float* bias) {
  const int gtype = W.gtype, bb = kq_block_bytes(gtype);
  const bool has_min = kq_has_min(gtype), refine = A.refine > 0.f && A.rf && A.q2;
  const int64_t K = W.K, nsb = K / 256, nb = K / 32;
  int8_t w[256];
  int32_t sc[16], mn[16];
  float D, Dm;
  std::vector<float> acc((size_t)M * 8);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = W.data + n * W.row_bytes;
    for (auto& a : acc) a = 0.f;
    for (int64_t s = 0; s < nsb; s++) {
      const uint8_t* b = row + s * bb;
      kq_weights(gtype, b, w);
      kq_scales(gtype, b, sc, mn, D, Dm);
      for (int64_t m = 0; m < M; m++) {
        const int8_t* q = A.q + m * K + s * 256;
        const int8_t* q2 = refine ? A.q2 + m * K + s * 256 : nullptr;
        for (int k = 0; k < 8; k++) {
          const int64_t i = m * nb + s * 8 + k;
          const bool rf = refine && A.rf[i];
          int64_t isum = 0, msum = 0;
          for (int h = 0; h < 2; h++) {
            int64_t dot = 0, sum = 0;
            for (int j = 32 * k + 16 * h; j < 32 * k + 16 * h + 16; j++) {
              const int64_t v = rf ? 128 * (int64_t)q[j] + q2[j] : q[j];
              dot += w[j] * v, sum += v;
            }
            isum += sc[2 * k + h] * dot, msum += mn[2 * k + h] * sum;
          }
          const float fi = (float)(int32_t)isum;
          const float t = has_min ? std::fmaf(fi, D, -((float)(int32_t)msum * Dm)) : fi * D;
          acc[m * 8 + k] = std::fmaf(t, A.dr[i], acc[m * 8 + k]);
        }
      }
    }
    for (int64_t m = 0; m < M; m++) {
      const float* a = &acc[m * 8];
      const float u0 = (a[0] + a[4]) + (a[2] + a[6]), u1 = (a[1] + a[5]) + (a[3] + a[7]);
      float r = u0 + u1;
      if (bias) r += bias[n];
      out[m * ldo + n] = r;
    }
  }
}

}  // namespace jisu
