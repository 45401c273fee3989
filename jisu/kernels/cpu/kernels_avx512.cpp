// AVX-512 kernels (placeholder until written).
#include "common.h"
namespace jisu {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace jisu
