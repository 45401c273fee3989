// GGML kind, types Q5_0, Q5_1, IQ4_NL (blocks of 32 values), F16 and BF16: the scalar reference
// (ggml_q32.cpp) each ISA's kernels (ggml_q32_x86.inc, ggml_q32_neon.inc) are tested against.
#pragma once
#include <cstdint>

#include "common.h"

namespace jisu {

// Whether this file runs ggml type gtype.
bool q32_has(int gtype);
// Row of K values of type gtype (raw bytes) as fp32.
void q32_dequant_row(int gtype, const uint8_t* row, int64_t K, float* out);
// The reference of KernelTable::gg_gemm for this file's types.
void q32_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                      int64_t n1, float* out, int64_t ldo, const float* bias);

}  // namespace jisu
