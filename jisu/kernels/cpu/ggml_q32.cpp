// Scalar reference of the GGML kind's types Q5_0, Q5_1, IQ4_NL (blocks of 32 values), F16 and BF16.
#include "ggml_q32.h"

namespace jisu {

bool q32_has(int) { return false; }

void q32_dequant_row(int, const uint8_t*, int64_t, float*) {}

void q32_gemm_scalar(const PackedDesc&, const float*, const ActQ&, int64_t, int64_t, int64_t, float*, int64_t,
                      const float*) {}

}  // namespace jisu
