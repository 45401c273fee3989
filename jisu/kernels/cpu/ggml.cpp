// The GGML kind: GGUF tensors multiplied in their own block layouts, straight from the memory-mapped
// file. This file holds what every type shares (block sizes, the reference dispatch); the types'
// kernels live in ggml_q32.* (32-value blocks and 16-bit weights) and ggml_kq.* (256-value
// K-quant super-blocks).
#include <stdexcept>

#include "common.h"
#include "ggml_kq.h"
#include "ggml_q32.h"

namespace jisu {

namespace {
// (values per block, bytes per block) of a ggml type; (0, 0) for a type the kind does not know.
void block_shape(int gtype, int64_t& bs, int64_t& bytes) {
  switch (gtype) {
    case GG_F32: bs = 1, bytes = 4; return;
    case GG_F16: case GG_BF16: bs = 1, bytes = 2; return;
    case GG_Q4_0: bs = 32, bytes = 18; return;
    case GG_Q4_1: bs = 32, bytes = 20; return;
    case GG_Q5_0: bs = 32, bytes = 22; return;
    case GG_Q5_1: bs = 32, bytes = 24; return;
    case GG_Q8_0: bs = 32, bytes = 34; return;
    case GG_IQ4_NL: bs = 32, bytes = 18; return;
    case GG_Q2_K: bs = 256, bytes = 84; return;
    case GG_Q3_K: bs = 256, bytes = 110; return;
    case GG_Q4_K: bs = 256, bytes = 144; return;
    case GG_Q5_K: bs = 256, bytes = 176; return;
    case GG_Q6_K: bs = 256, bytes = 210; return;
    case GG_IQ4_XS: bs = 256, bytes = 136; return;
    default: bs = 0, bytes = 0;
  }
}
}  // namespace

bool gg_supported(int gtype) { return q32_has(gtype) || kq_has(gtype); }

int64_t gg_row_bytes(int gtype, int64_t K) {
  int64_t bs, bytes;
  block_shape(gtype, bs, bytes);
  if (bs == 0 || K <= 0 || K % bs) return 0;
  return K / bs * bytes;
}

bool gg_quantized(int gtype) { return !(gtype == GG_F32 || gtype == GG_F16 || gtype == GG_BF16); }

void gg_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                    int64_t n1, float* out, int64_t ldo, const float* bias) {
  if (q32_has(W.gtype))
    q32_gemm_scalar(W, x, A, M, n0, n1, out, ldo, bias);
  else if (kq_has(W.gtype))
    kq_gemm_scalar(W, x, A, M, n0, n1, out, ldo, bias);
  else
    throw std::logic_error("gg_gemm: unsupported ggml type");
}

void gg_dequant_row(const PackedDesc& W, int64_t n, float* out) {
  const uint8_t* row = W.data + n * W.row_bytes;
  if (q32_has(W.gtype))
    q32_dequant_row(W.gtype, row, W.K, out);
  else if (kq_has(W.gtype))
    kq_dequant_row(W.gtype, row, W.K, out);
  else
    throw std::logic_error("gg_dequant_row: unsupported ggml type");
}

}  // namespace jisu
