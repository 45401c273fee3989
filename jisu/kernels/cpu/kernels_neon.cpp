// ARM NEON kernels (placeholder until written).
#include "common.h"
namespace jisu {
const KernelTable* neon_table() { return nullptr; }
}  // namespace jisu
