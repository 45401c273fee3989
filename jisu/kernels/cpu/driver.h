// Entry points module.cpp shares with the other translation units of jisu._kernels
// (forward.cpp runs whole model steps through the same linear driver and kernel table).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <mutex>
#include <utility>

#include "common.h"

namespace jisu {

// The kernel table selected by set_isa (module.cpp).
const KernelTable* active_kernels();

// out[M, W.N] = x[M, W.K] @ W^T (+ bias): quantizes x once, splits W's tiles across the pool.
void linear(uintptr_t desc, uintptr_t x, uintptr_t out, int64_t M, uintptr_t bias);

// Wraps a free function for pybind11 so that it runs without the GIL, under native_mutex().
// Only for functions whose arguments are plain numbers and addresses (no Python objects).
template <typename R, typename... A>
auto unlocked(R (*f)(A...)) {
  return [f](A... a) -> R {
    pybind11::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(native_mutex());
    return f(std::forward<A>(a)...);
  };
}

// Registers forward.cpp's bindings (NativeModel, dequant_rows) on the module.
void register_forward(pybind11::module_& m);

}  // namespace jisu
