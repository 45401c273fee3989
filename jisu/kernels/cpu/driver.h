// Entry points module.cpp shares with the other translation units of jisu._kernels
// (llama_step.cpp runs whole model steps through the same linear driver and kernel table),
// and the one way work is split across the thread pool.
#pragma once
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>

#include "common.h"

namespace jisu {

// The kernel table selected by set_isa (module.cpp).
const KernelTable* active_kernels();

// out[M, W.N] = x[M, W.K] @ W^T (+ bias): quantizes x once, splits W's tiles across the pool.
void linear(uintptr_t desc, uintptr_t x, uintptr_t out, int64_t M, uintptr_t bias);

// The native step's LM head: out[M, W.N] = x @ W^T. Under dense refinement (ops.PRECISE) with
// set_head_rescore(true) (faithful steps) and a quantized W (head_rescorable), every row first runs
// plain int8 blocks; the rows whose refined logit could reach the largest lower bound of a refined
// logit (bounds from wnorm[n] >= |W_n|, see module.cpp) are recomputed refined. The argmax is the
// refined linear's, bit for bit; other rows keep plain values. Otherwise it is linear. Returns
// whether it rescored.
bool linear_head(const PackedDesc& W, const float* x, float* out, int64_t M, const float* wnorm);
bool head_rescorable(const PackedDesc& W);
// out[n] >= |row n of W| (Euclidean norm of the decoded row), for linear_head.
void head_row_norms(const PackedDesc& W, float* out);
void set_head_rescore(bool on);
bool get_head_rescore();

// Row n of a packed weight as fp32 (the reference decoding of the layouts in common.h).
void dequant_row(const PackedDesc& W, int64_t n, float* out);

// Chunk c of nc over n units: [a, b).
inline void chunk_range(int64_t c, int64_t nc, int64_t n, int64_t& a, int64_t& b) {
  a = n * c / nc;
  b = n * (c + 1) / nc;
}

// Runs f(a, b, tid) over [0, n) on nth threads, in up to chunks_per_thread * nth chunks that the
// threads claim dynamically (tid < nth: per-thread scratch). f must not throw.
template <class F>
void parallel_for(int64_t n, int nth, F&& f, int64_t chunks_per_thread = 4) {
  if (nth <= 1 || n < 2) {
    f((int64_t)0, n, 0);
    return;
  }
  struct Ctx {
    F* f;
    int64_t n;
  } ctx{&f, n};
  const int64_t nc = std::min<int64_t>(n, chunks_per_thread * (int64_t)nth);
  pool_run(
      [](void* c, int64_t ch, int64_t nch, int tid) {
        Ctx& x = *(Ctx*)c;
        int64_t a, b;
        chunk_range(ch, nch, x.n, a, b);
        if (a < b) (*x.f)(a, b, tid);
      },
      &ctx, nc, nth);
}

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

// Registers llama_step.cpp's binding (NativeModel) on the module.
void register_llama_step(pybind11::module_& m);

}  // namespace jisu
