// GGML kind, types Q5_0, Q5_1, IQ4_NL (blocks of 32 values), F16 and BF16: the scalar reference
// (ggml_q32.cpp) each ISA's kernels (ggml_q32_x86.inc, ggml_q32_neon.inc) are tested against.
//
// Block layouts (ggml-common.h), 32 values each, element j in 0..31:
//   Q5_0   {f16 d; u8 qh[4]; u8 qs[16]}          x = d * (q - 16)
//   Q5_1   {f16 d; f16 m; u8 qh[4]; u8 qs[16]}   x = d * q + m
//          q = 4 low bits (j < 16: low nibble of qs[j]; j >= 16: high nibble of qs[j - 16])
//              | bit j of the little-endian u32 qh, as bit 4
//   IQ4_NL {f16 d; u8 qs[16]}                    x = d * IQ4NL_VALUES[nibble], nibbles as above
// F16 / BF16: one 16-bit value per element.
//
// The reference's float operations, which every ISA repeats in the same order (results bitwise
// equal to it):
//   quantized: per row and activation row, over blocks b in order, with the exact integer
//     isum = sum_j c_j v_j (c: Q5_0 q - 16, Q5_1 q, IQ4_NL the table value; v: the activation
//     codes, 128 q + q2 in a refined block):
//       acc = fma(d * dr[b], (float)isum, acc)          (Q5_1 then: acc = fma(m, sdr[b], acc))
//   F16 / BF16: 8 lanes, lane l = fma-accumulation of w[k] x[k] over k = l mod 8, k < K8 = K & ~7
//     in k order; their sum as hsum8 (x86_math.h) adds them, ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7));
//     then acc = fma(w[k], x[k], acc) for k in [K8, K).
//   then out = acc + bias[n] when bias.
#pragma once
#include <cstdint>

#include "common.h"

namespace jisu {

// The IQ4_NL code book (kvalues_iq4nl).
static constexpr int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

// Whether this file runs ggml type gtype.
bool q32_has(int gtype);
// Row of K values of type gtype (raw bytes) as fp32.
void q32_dequant_row(int gtype, const uint8_t* row, int64_t K, float* out);
// The reference of KernelTable::gg_gemm for this file's types.
void q32_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                      int64_t n1, float* out, int64_t ldo, const float* bias);

}  // namespace jisu
