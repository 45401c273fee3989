// GGML kind, types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (super-blocks of 256 values): the scalar reference
// (ggml_kq.cpp) each ISA's kernels (ggml_kq_x86.inc, ggml_kq_neon.inc) are tested against.
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

}  // namespace jisu
