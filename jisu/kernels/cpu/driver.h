// Entry points module.cpp shares with the other translation units of jisu._kernels
// (forward.cpp runs whole model steps through the same linear driver and kernel table).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"

namespace jisu {

// The kernel table selected by set_isa (module.cpp).
const KernelTable* active_kernels();

// out[M, W.N] = x[M, W.K] @ W^T (+ bias): quantizes x once, splits W's tiles across the pool.
void linear(uintptr_t desc, uintptr_t x, uintptr_t out, int64_t M, uintptr_t bias);

// Registers forward.cpp's bindings (NativeModel, dequant_rows) on the module.
void register_forward(pybind11::module_& m);

}  // namespace jisu
