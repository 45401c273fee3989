// pybind11 module jisu._kernels: CPU-feature dispatch (the one KernelTable every kernel is called
// through), the drivers that split each op across threads, the row decoder of packed weights, and
// the bindings. Python passes raw addresses and ints (tensor.data_ptr()) so a call costs well under
// a microsecond of binding overhead.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "driver.h"

namespace py = pybind11;

namespace jisu {
void register_sampler(py::module_& m);  // sampler.cpp: batched token sampling

namespace {

const KernelTable* g_kt = nullptr;  // active ISA

struct Features {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false,
       avx512vl = false, avx512vnni = false, avx512dq = false, neon = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
  f.neon = true;
#endif
  return f;
}

const Features& features() {
  static Features f = detect();
  return f;
}

std::vector<std::pair<std::string, const KernelTable*>> usable_tables() {
  std::vector<std::pair<std::string, const KernelTable*>> v;
  const Features& f = features();
  if (avx512_table() && f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.fma && f.f16c)
    v.push_back({"avx512", avx512_table()});
  if (avx2_table() && f.avx2 && f.fma && f.f16c) v.push_back({"avx2", avx2_table()});
  if (neon_table() && f.neon) v.push_back({"neon", neon_table()});
  v.push_back({"scalar", scalar_table()});
  return v;
}

void set_isa(const std::string& name) {
  for (auto& p : usable_tables())
    if (name == "best" || p.first == name) {
      g_kt = p.second;
      return;
    }
  throw std::invalid_argument("jisu._kernels: ISA '" + name + "' is not available on this CPU");
}

// ---------------------------------------------------------------- scratch memory
struct AlignedBuf {
  uint8_t* p = nullptr;
  size_t n = 0;
  uint8_t* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 4095) & ~(size_t)4095;
      p = (uint8_t*)std::aligned_alloc(64, n);
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
};
AlignedBuf g_act;                  // quantized activations
AlignedBuf g_prep;                 // KernelTable::gg_prep's operands
std::vector<AlignedBuf> g_thread;  // per-thread scratch

// Outlier-block refinement threshold of the activations (ActQ::refine; 0 = off).
std::atomic<float> g_act_refine{0.f};

// panel_mr: rows per panel group (0: no panel; see ActQ::pq). want_qv: the kernels read ActQ::qv
// under dense refinement.
ActQ act_buffers(int64_t M, int64_t K, bool need_q16, int64_t panel_mr, bool want_qv, float refine) {
  const int64_t nb = K / QK;
  auto up = [](int64_t b) { return (b + 63) & ~(int64_t)63; };
  if (!(refine == 0.f || dense_refine_threshold(refine))) panel_mr = 0;
  const int64_t mp = panel_mr ? (M + panel_mr - 1) / panel_mr * panel_mr : 0;  // panel rows
  const int64_t bq = up(M * K), bf = up(M * nb * 4), bq16 = need_q16 ? up(M * K * 2) : 0, brf = up(M * nb);
  const int64_t bpq = up(mp * K), bpq2 = refine > 0.f ? bpq : 0, bpf = up(mp * nb * PANEL_FIELDS * 4);
  const int64_t bqv = want_qv && dense_refine_threshold(refine) ? up(M * K * 2) : 0;
  uint8_t* p = g_act.get(2 * bq + 6 * bf + bq16 + brf + bpq + bpq2 + bpf + bqv);
  ActQ A;
  A.K = K;
  A.refine = refine;
  if (panel_mr) {
    uint8_t* pp = p + 2 * bq + 6 * bf + bq16 + brf;
    A.pmr = panel_mr;
    A.pq = (int8_t*)pp;
    A.pq2 = bpq2 ? (int8_t*)(pp + bpq) : nullptr;
    A.pf = (int32_t*)(pp + bpq + bpq2);
  }
  A.q = (int8_t*)p;
  A.d = (float*)(p + bq);
  A.s = (int32_t*)(p + bq + bf);
  A.sd = (float*)(p + bq + 2 * bf);
  A.dr = (float*)(p + bq + 3 * bf);
  A.sr = (int32_t*)(p + bq + 4 * bf);
  A.sdr = (float*)(p + bq + 5 * bf);
  A.q2 = (int8_t*)(p + bq + 6 * bf);
  A.rf = p + 2 * bq + 6 * bf;
  A.q16 = need_q16 ? (int16_t*)(p + 2 * bq + 6 * bf + brf) : nullptr;
  A.qv = bqv ? (int16_t*)(p + 2 * bq + 6 * bf + bq16 + brf + bpq + bpq2 + bpf) : nullptr;
  return A;
}

uint8_t* thread_scratch(int tid, size_t bytes) {
  return g_thread[tid].get(bytes);
}

void reserve_threads(int nth) {
  if ((int)g_thread.size() < nth) g_thread.resize(nth);
}

// Minimum work (weight bytes) per thread before an op is split (threading costs ~1 us),
// and the work per chunk that threads claim dynamically.
std::atomic<int64_t> g_min_bytes_per_thread{16384};
constexpr int64_t kChunkBytes = 32768;

int pick_threads(int64_t work_bytes, int64_t max_parts) {
  int nth = pool_max_threads();
  const int64_t per = g_min_bytes_per_thread.load(std::memory_order_relaxed);
  if (per > 0) {
    const int64_t by_bytes = work_bytes / per;
    if (by_bytes < nth) nth = by_bytes < 1 ? 1 : (int)by_bytes;
  }
  if (max_parts < nth) nth = max_parts < 1 ? 1 : (int)max_parts;
  return nth;
}

// Chunks for nth threads over `parts` units of `work_bytes` total.
int64_t pick_chunks(int nth, int64_t work_bytes, int64_t parts) {
  if (nth <= 1) return 1;
  int64_t c = work_bytes / kChunkBytes;
  if (c < 2 * nth) c = 2 * nth;
  if (c > 16 * nth) c = 16 * nth;
  return c < parts ? c : parts;
}

int64_t desc_bytes(const PackedDesc& W) {
  if (W.kind == KIND_F32) return W.N * W.K * 4;
  if (W.kind == KIND_GGML) return W.N * W.row_bytes;
  return W.ntiles * W.tile_bytes;
}

// ---------------------------------------------------------------- linear
struct LinearJob {
  const KernelTable* kt;
  const PackedDesc* W;
  const float* x;
  float* out;
  const float* bias;
  int64_t M;
  ActQ A;
  bool q16;
};

void quant_task(void* ctx, int64_t c, int64_t nc, int) {
  LinearJob& j = *(LinearJob*)ctx;
  int64_t m0, m1;
  if (j.A.gp) {  // whole units of 16 rows (gg_prep's)
    int64_t u0, u1;
    chunk_range(c, nc, (j.M + 15) / 16, u0, u1);
    if (u0 >= u1) return;
    m0 = 16 * u0, m1 = std::min<int64_t>(16 * u1, j.M);
    j.kt->quantize_act(j.x, m0, m1, j.A, j.q16);
    j.kt->gg_prep(*j.W, j.A, j.M, u0, u1);
    return;
  }
  chunk_range(c, nc, j.M, m0, m1);
  if (m0 < m1) {
    j.kt->quantize_act(j.x, m0, m1, j.A, j.q16);
    if (j.A.pmr) j.kt->panel(*j.W, j.A, m0, m1);
  }
}

void linear_task(void* ctx, int64_t c, int64_t nc, int tid) {
  LinearJob& j = *(LinearJob*)ctx;
  const PackedDesc& W = *j.W;
  if (W.kind == KIND_F32) {
    int64_t a, b;  // in units of 4 rows (the micro-kernel width)
    chunk_range(c, nc, (W.N + 3) / 4, a, b);
    const int64_t n0 = a * 4, n1 = b * 4 < W.N ? b * 4 : W.N;
    if (n0 < n1) j.kt->f32_gemm(W.f32, W.N, W.K, j.x, j.M, n0, n1, j.out, W.N, j.bias);
    return;
  }
  if (W.kind == KIND_GGML) {  // in units of NR rows (16 under gg_prep: its GEMM's panels)
    const int64_t u = j.A.gp ? 16 : NR;
    int64_t a, b;
    chunk_range(c, nc, (W.N + u - 1) / u, a, b);
    const int64_t n0 = a * u, n1 = b * u < W.N ? b * u : W.N;
    if (n0 < n1) j.kt->gg_gemm(W, j.x, j.A, j.M, n0, n1, j.out, W.N, j.bias);
    return;
  }
  int64_t t0, t1;
  if (j.M > 1) {  // whole pairs of tiles (the 512-bit GEMM's unit; a lone tile takes a slower path)
    chunk_range(c, nc, (W.ntiles + 1) / 2, t0, t1);
    t0 *= 2;
    t1 = std::min<int64_t>(2 * t1, W.ntiles);
  } else {
    chunk_range(c, nc, W.ntiles, t0, t1);
  }
  if (t0 >= t1) return;
  uint8_t* scr = j.M > 1 ? g_thread[tid].p : nullptr;
  if (W.kind == KIND_INT)
    j.kt->int_gemm(W, j.A, j.M, t0, t1, j.out, W.N, j.bias, scr);
  else
    j.kt->cb_gemm(W, j.A, j.M, t0, t1, j.out, W.N, j.bias, scr);
}

}  // namespace

const KernelTable* active_kernels() { return g_kt; }

// linear under the activation setting `refine` (ActQ::refine).
void linear_at(const PackedDesc& W, const float* x, float* out, int64_t M, const float* bias, float refine) {
  if (M <= 0) return;
  LinearJob j;
  j.kt = g_kt;
  j.W = &W;
  j.x = x;
  j.out = out;
  j.bias = bias;
  j.M = M;
  // Work estimate: weight bytes for small M (memory-bound), ~M times that when compute-bound.
  const int64_t bytes = desc_bytes(W) * (M < 4 ? M : 4 * M);
  int nth;
  int64_t nc;
  if (W.kind == KIND_F32) {
    const int64_t parts = (W.N + 3) / 4;
    nth = pick_threads(bytes, parts);
    nc = pick_chunks(nth, bytes, parts);
  } else if (W.kind == KIND_GGML) {
    const int64_t parts = (W.N + NR - 1) / NR;
    nth = pick_threads(bytes, parts);
    nc = pick_chunks(nth, bytes, parts);
    j.q16 = false;
    if (gg_quantized(W.gtype)) {
      j.A = act_buffers(M, W.K, false, 0, false, refine);
      const size_t prep = g_kt->gg_prep_bytes ? g_kt->gg_prep_bytes(W, j.A, M) : 0;
      if (prep) {
        j.A.gp = g_prep.get(prep);
        nc = std::min<int64_t>(nc, (W.N + 15) / 16);
      }
      const int64_t units = prep ? (M + 15) / 16 : M;
      if (M * W.K >= 65536 && nth > 1)
        pool_run(quant_task, &j, units < 4 * nth ? units : 4 * nth, nth);
      else
        quant_task(&j, 0, 1, 0);
    }
  } else {
    const int64_t parts = M > 1 ? (W.ntiles + 1) / 2 : W.ntiles;
    nth = pick_threads(bytes, parts);
    nc = pick_chunks(nth, bytes, parts);
    j.q16 = W.kind == KIND_CODEBOOK;
    const bool gemm_int = W.kind == KIND_INT && M > (g_kt->int_gemv_rows ? g_kt->int_gemv_rows(W) : 1);
    j.A = act_buffers(M, W.K, j.q16, gemm_int && g_kt->panel ? g_kt->panel_mr : 0, gemm_int && g_kt->qv_gemm,
                      refine);
    if (M * W.K >= 65536 && nth > 1)
      pool_run(quant_task, &j, M < 4 * nth ? M : 4 * nth, nth);
    else
      quant_task(&j, 0, 1, 0);
    if (M > 1) {
      reserve_threads(nth);
      for (int t = 0; t < nth; t++) thread_scratch(t, gemm_scratch_bytes(W));
    }
  }
  pool_run(linear_task, &j, nc, nth);
}

void linear(uintptr_t desc, uintptr_t x, uintptr_t out, int64_t M, uintptr_t bias) {
  linear_at(*(const PackedDesc*)desc, (const float*)x, (float*)out, M, (const float*)bias, g_act_refine.load());
}

// ---------------------------------------------------------------- the LM head's rescoring
namespace {
std::atomic<bool> g_head_rescore{false};
}  // namespace

// Not 8-bit INT weights: their one-row GEMV runs refined blocks at the plain blocks' cost (biased
// codes, one pass), so rescoring would only add its scans there (measured). The choice depends on
// the weight alone, never on the step's rows, so each row's logits stay batch invariant.
bool head_rescorable(const PackedDesc& W) {
  return (W.kind == KIND_INT && W.bits != 8) || (W.kind == KIND_GGML && gg_quantized(W.gtype));
}

void set_head_rescore(bool on) { g_head_rescore.store(on); }
bool get_head_rescore() { return g_head_rescore.load(); }

void head_row_norms(const PackedDesc& W, float* out) {
  parallel_for(W.N, pool_max_threads(), [&](int64_t a, int64_t b, int) {
    std::vector<float> row(W.K);
    for (int64_t n = a; n < b; n++) {
      dequant_row(W, n, row.data());
      double s = 0;
      for (int64_t k = 0; k < W.K; k++) s += (double)row[k] * row[k];
      out[n] = (float)(std::sqrt(s) * (1.0 + 1e-6));  // rounded up: an upper bound of the row's norm
    }
  }, 16);
}

namespace {
// Row m of A (quantize_act's fields only: no panel, qv or gp) as a one-row ActQ.
ActQ act_row(const ActQ& A, int64_t m) {
  const int64_t K = A.K, nb = K / QK;
  ActQ R = A;
  R.q = A.q + m * K;
  R.q2 = A.q2 ? A.q2 + m * K : nullptr;
  R.d = A.d + m * nb;
  R.s = A.s + m * nb;
  R.sd = A.sd + m * nb;
  R.rf = A.rf + m * nb;
  R.dr = A.dr + m * nb;
  R.sr = A.sr + m * nb;
  R.sdr = A.sdr + m * nb;
  return R;
}

// Recomputes refined the rows of out (one activation row, refined A) that could hold the refined
// argmax; nth threads for the recomputation (1 inside a parallel loop).
void rescore_row(const PackedDesc& W, const float* x, const ActQ& A, const float* wnorm, float* o, int nth) {
  const int64_t N = W.N, K = W.K, nb = K / QK;
  // The refined row is x ~ d (q + q2 / 128) per block, the plain row d q: the refined logit of row
  // n differs from the plain one by W_n . e, e = d q2 / 128 (both up to float rounding), so by at
  // most |W_n| |e| (Cauchy-Schwarz). Rounding is within ~nb ulps of sum |W_nj x_j| <= |W_n| |x|,
  // given a wide margin (1e-4 relative) here.
  double e2 = 0, x2 = 0;
  for (int64_t b = 0; b < nb; b++) {
    int64_t qq = 0, rr = 0;
    for (int i = 0; i < QK; i++) {
      const int64_t q = A.q[b * QK + i], r = A.rf[b] ? A.q2[b * QK + i] : 0;
      qq += q * q;
      rr += r * r;
    }
    const double d = A.d[b];
    x2 += d * d * (double)qq;
    e2 += d * d * (double)rr / 16384.0;
  }
  const double en = std::sqrt(e2), xn = std::sqrt(x2);
  const float c = (float)(en * (1 + 1e-4) + 1e-4 * (xn + en));
  // the largest lower bound of a refined logit, in vectors of 4 lanes (GCC's vector extensions:
  // SSE / NEON, whatever the ISA the file is built for)
  typedef float v4f __attribute__((vector_size(16)));
  typedef int v4i __attribute__((vector_size(16)));
  const v4f cv = {c, c, c, c};
  v4f m0 = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, m1 = m0;
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8) {
    v4f a, b, wa, wb;
    std::memcpy(&a, o + n0, 16), std::memcpy(&b, o + n0 + 4, 16);
    std::memcpy(&wa, wnorm + n0, 16), std::memcpy(&wb, wnorm + n0 + 4, 16);
    a = a - wa * cv, b = b - wb * cv;
    m0 = m0 > a ? m0 : a, m1 = m1 > b ? m1 : b;
  }
  float lo = -INFINITY;
  for (int j = 0; j < 4; j++) lo = std::max(lo, std::max(m0[j], m1[j]));
  for (int64_t n = n0; n < N; n++) lo = std::max(lo, o[n] - wnorm[n] * c);
  // Rows whose refined logit may reach lo, in runs (INT weights by whole tiles). Every other row's
  // refined logit is below lo, which the best lower bound's row reaches: none of them is the argmax.
  std::vector<std::pair<int64_t, int64_t>> runs;
  const int64_t unit = W.kind == KIND_INT ? NR : 1;
  const v4f lov = {lo, lo, lo, lo};
  for (int64_t n = 0; n < N; n++) {
    if (n % 16 == 0 && n + 16 <= N) {  // skip 16 rows at a time where none qualifies
      v4i any = {0, 0, 0, 0};
      for (int j = 0; j < 16; j += 4) {
        v4f a, wa;
        std::memcpy(&a, o + n + j, 16), std::memcpy(&wa, wnorm + n + j, 16);
        any |= (v4i)(a + wa * cv >= lov);
      }
      if (!(any[0] | any[1] | any[2] | any[3])) {
        n += 15;
        continue;
      }
    }
    if (!(o[n] + wnorm[n] * c >= lo)) continue;
    const int64_t a = n / unit * unit, b = std::min(N, a + unit);
    if (!runs.empty() && runs.back().second >= a)
      runs.back().second = b;
    else
      runs.push_back({a, b});
    n = b - 1;
  }
  int64_t rows = 0;
  for (auto& r : runs) rows += r.second - r.first;
  auto recompute = [&](int64_t ra, int64_t rb, int) {
    for (int64_t r = ra; r < rb; r++) {
      const int64_t a = runs[r].first, b = runs[r].second;
      if (W.kind == KIND_INT)
        g_kt->int_gemm(W, A, 1, a / NR, (b + NR - 1) / NR, o, N, nullptr, nullptr);
      else
        g_kt->gg_gemm(W, x, A, 1, a, b, o, N, nullptr);
    }
  };
  if (nth > 1 && rows * K >= (1 << 20))
    parallel_for((int64_t)runs.size(), nth, [&](int64_t a, int64_t b, int t) { recompute(a, b, t); });
  else
    recompute(0, (int64_t)runs.size(), 0);
}
}  // namespace

bool linear_head(const PackedDesc& W, const float* x, float* out, int64_t M, const float* wnorm) {
  const float refine = g_act_refine.load();
  if (!wnorm || !g_head_rescore.load() || !dense_refine_threshold(refine) || !head_rescorable(W)) {
    linear_at(W, x, out, M, nullptr, refine);
    return false;
  }
  linear_at(W, x, out, M, nullptr, 0.f);  // plain int8 blocks
  if (M <= 0) return true;
  const int64_t K = W.K;
  ActQ A = act_buffers(M, K, false, 0, false, refine);
  g_kt->quantize_act(x, 0, M, A, false);
  const int nth = pool_max_threads();
  if (M == 1) {
    rescore_row(W, x, A, wnorm, out, nth);
  } else {
    parallel_for(M, std::min<int64_t>(M, nth), [&](int64_t a, int64_t b, int) {
      for (int64_t m = a; m < b; m++) rescore_row(W, x + m * K, act_row(A, m), wnorm, out + m * W.N, 1);
    }, 1);
  }
  return true;
}

// ---------------------------------------------------------------- packed rows
void dequant_row(const PackedDesc& W, int64_t n, float* out) {
  if (n < 0 || n >= W.N) throw std::out_of_range("dequant_row: row out of range");
  const int64_t K = W.K;
  if (W.kind == KIND_F32) {
    std::memcpy(out, W.f32 + n * K, K * 4);
    return;
  }
  if (W.kind == KIND_GGML) {
    gg_dequant_row(W, n, out);
    return;
  }
  const int64_t t = n / NR, r = n % NR, ng = K / W.group, bpg = W.group / QK;
  const uint8_t* tile = W.data + t * W.tile_bytes;
  if (W.kind == KIND_CODEBOOK) {
    float tab[16];
    for (int e = 0; e < 16; e++) {
      const int16_t v = (int16_t)((uint16_t)tile[r * 32 + e] | ((uint16_t)tile[r * 32 + 16 + e] << 8));
      tab[e] = (float)v;
    }
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* gp = tile + 256 + g * W.group_bytes;
      float s;
      std::memcpy(&s, gp + 4 * r, 4);
      for (int64_t i = 0; i < bpg; i++) {
        const uint8_t* b = gp + 32 + i * 128 + r * 16;
        float* o = out + (g * bpg + i) * QK;
        for (int k = 0; k < 16; k++) {
          o[k] = tab[b[k] & 15] * s;
          o[k + 16] = tab[b[k] >> 4] * s;
        }
      }
    }
    return;
  }
  // INT: codes of row r live in bytes 4r..4r+3 of each 32-byte vector (see common.h)
  const int bits = W.bits;
  const int64_t bb = int_block_bytes(bits), sbytes = W.per_channel ? 0 : 16 * (1 + W.asym);
  const float off = (bits == 8 || W.asym) ? 0.f : (float)(1 << (bits - 1));
  for (int64_t g = 0; g < ng; g++) {
    const uint8_t* gp = tile + g * W.group_bytes;
    float s = 0.f, mn = 0.f;
    if (W.per_channel) {
      s = W.chan_scale[n];
    } else {
      uint16_t h;
      std::memcpy(&h, gp + 2 * r, 2);
      s = f16_to_f32(h);
      if (W.asym) {
        std::memcpy(&h, gp + 16 + 2 * r, 2);
        mn = f16_to_f32(h);
      }
    }
    for (int64_t i = 0; i < bpg; i++) {
      const uint8_t* b = gp + sbytes + i * bb;
      float* o = out + (g * bpg + i) * QK;
      for (int k = 0; k < QK; k++) {
        const float q = (float)int_code(b, bits, (int)r, k);
        if (W.asym)
          o[k] = q * s + mn;
        else if (bits == 8)
          o[k] = q * s;
        else
          o[k] = (q - off) * s;
      }
    }
  }
}

namespace {

// Dense fp32 weight [N, K] given by address (no descriptor object needed).
void linear_f32(uintptr_t w, int64_t N, int64_t K, uintptr_t x, uintptr_t out, int64_t M,
                uintptr_t bias) {
  PackedDesc d;
  d.kind = KIND_F32;
  d.N = N;
  d.K = K;
  d.group = K;
  d.f32 = (const float*)w;
  linear((uintptr_t)&d, x, out, M, bias);
}

// ---------------------------------------------------------------- fused ops
void rms_norm(uintptr_t x, uintptr_t w, uintptr_t out, int64_t M, int64_t D, float eps) {
  const KernelTable* kt = g_kt;
  parallel_for(M, pick_threads(M * D * 8, M), [&](int64_t a, int64_t b, int) {
    kt->rms_norm((const float*)x, (const float*)w, (float*)out, a, b, D, eps);
  });
}

void rope(uintptr_t x, uintptr_t out, uintptr_t c, uintptr_t s, int64_t T, int64_t H, int64_t D) {
  const KernelTable* kt = g_kt;
  parallel_for(T, pick_threads(T * H * D * 8, T), [&](int64_t a, int64_t b, int) {
    kt->rope((const float*)x, (float*)out, (const float*)c, (const float*)s, a, b, H, D);
  });
}

void attn_decode(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t H, int64_t Hkv,
                 int64_t D, int64_t T, int64_t tstride, float scale) {
  if (T <= 0 || Hkv <= 0 || H % Hkv != 0 || tstride < T) throw std::invalid_argument("attn_decode: bad shapes");
  const KernelTable* kt = g_kt;
  const int nth = pick_threads(2 * H * T * D * 4, H);
  reserve_threads(nth);
  for (int t = 0; t < nth; t++) thread_scratch(t, (T + 16) * 4);
  parallel_for(H, nth, [&](int64_t a, int64_t b, int tid) {  // a chunk per head
    kt->attn_decode((const float*)q, (const float*)k, (const float*)v, (float*)out, a, b, H, Hkv, D, T, tstride,
                    scale, (float*)g_thread[tid].p);
  }, H);
}

// ---------------------------------------------------------------- descriptors
struct Desc {
  PackedDesc d;
  uintptr_t addr() const { return (uintptr_t)&d; }
};

std::unique_ptr<Desc> make_int(uintptr_t data, int64_t N, int64_t K, int bits, bool asym,
                               bool per_channel, int64_t group, uintptr_t chan_scale) {
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) throw std::invalid_argument("bits must be 2, 3, 4 or 8");
  if (group % QK || K % group || N <= 0) throw std::invalid_argument("bad group/K/N");
  if (per_channel && (bits != 8 || asym || group != K)) throw std::invalid_argument("per-channel is int8 sym with group == K");
  auto D = std::make_unique<Desc>();
  PackedDesc& d = D->d;
  d.kind = KIND_INT;
  d.bits = bits;
  d.asym = asym;
  d.per_channel = per_channel;
  d.group = group;
  d.N = N;
  d.K = K;
  d.ntiles = (N + NR - 1) / NR;
  d.group_bytes = (per_channel ? 0 : 16 * (1 + asym)) + group / QK * int_block_bytes(bits);
  d.tile_bytes = d.group_bytes * (K / group);
  d.data = (const uint8_t*)data;
  d.chan_scale = (const float*)chan_scale;
  return D;
}

std::unique_ptr<Desc> make_codebook(uintptr_t data, int64_t N, int64_t K, int64_t group) {
  if (group % QK || K % group || N <= 0) throw std::invalid_argument("bad group/K/N");
  auto D = std::make_unique<Desc>();
  PackedDesc& d = D->d;
  d.kind = KIND_CODEBOOK;
  d.bits = 4;
  d.group = group;
  d.N = N;
  d.K = K;
  d.ntiles = (N + NR - 1) / NR;
  d.group_bytes = 32 + group / QK * 128;
  d.tile_bytes = 256 + d.group_bytes * (K / group);
  d.data = (const uint8_t*)data;
  return D;
}

std::unique_ptr<Desc> make_f32(uintptr_t w, int64_t N, int64_t K) {
  auto D = std::make_unique<Desc>();
  D->d.kind = KIND_F32;
  D->d.N = N;
  D->d.K = K;
  D->d.group = K;
  D->d.f32 = (const float*)w;
  return D;
}

// A GGUF tensor's bytes in place: N rows of K values of ggml type gtype.
std::unique_ptr<Desc> make_ggml(uintptr_t data, int64_t N, int64_t K, int gtype) {
  if (!gg_supported(gtype)) throw std::invalid_argument("ggml type " + std::to_string(gtype) + " has no kernel");
  const int64_t rb = gg_row_bytes(gtype, K);
  if (rb == 0 || N <= 0) throw std::invalid_argument("bad N/K for the ggml type");
  if (gg_quantized(gtype) && K % QK) throw std::invalid_argument("K must be a multiple of 32");
  auto D = std::make_unique<Desc>();
  PackedDesc& d = D->d;
  d.kind = KIND_GGML;
  d.gtype = gtype;
  d.N = N;
  d.K = K;
  d.group = K;
  d.row_bytes = rb;
  d.ntiles = (N + NR - 1) / NR;
  d.data = (const uint8_t*)data;
  return D;
}

void dequant_rows(uintptr_t desc, uintptr_t ids_p, int64_t n, uintptr_t out_p) {
  const PackedDesc& W = *(const PackedDesc*)desc;
  const int64_t* ids = (const int64_t*)ids_p;
  float* out = (float*)out_p;
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= W.N) throw std::out_of_range("dequant_rows: row id out of range");
  for (int64_t i = 0; i < n; i++) dequant_row(W, ids[i], out + i * W.K);
}

}  // namespace
}  // namespace jisu

PYBIND11_MODULE(_kernels, m) {
  using namespace jisu;
  m.doc() = "jisu native CPU kernels (quantized GEMV/GEMM, fused ops). Use jisu.kernels.ops.";
  set_isa("best");

  m.def("cpu_features", []() {
    const Features& f = features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq;
    d["avx512vnni"] = f.avx512vnni;
    d["neon"] = f.neon;
    return d;
  });
  m.def("available_isas", []() {
    py::list l;
    for (auto& p : usable_tables()) l.append(p.first);
    return l;
  }, "ISAs usable on this CPU, best first.");
  m.def("set_isa", &set_isa, "Force an ISA ('avx512', 'avx2', 'neon', 'scalar' or 'best').");
  m.def("get_isa", []() { return std::string(g_kt->name); });
  m.def("set_num_threads", [](int n) { pool_set_threads(n); }, "Threads used (<= 0: default).");
  m.def("get_num_threads", []() { return pool_max_threads(); });
  m.def("set_spin_us", [](int us) { pool_set_spin_us(us); }, "How long idle workers spin before sleeping.");
  m.def("get_spin_us", []() { return pool_get_spin_us(); });
  m.def("set_act_refine", [](float r) {
    if (!(r >= 0.f) || std::isinf(r)) throw std::invalid_argument("set_act_refine: threshold must be finite and >= 0");
    g_act_refine.store(r);
  }, "Blocks of int8 activations whose max exceeds r x the row's mean block max also carry their "
     "rounding residual (0 = off).");
  m.def("get_act_refine", []() { return g_act_refine.load(); });
  m.def("set_min_bytes_per_thread", [](int64_t b) { g_min_bytes_per_thread.store(b); },
        "Smallest work (weight bytes) per thread before an op is split across threads.");
  m.def("get_min_bytes_per_thread", []() { return g_min_bytes_per_thread.load(); });

  py::class_<Desc>(m, "Desc")
      .def_property_readonly("addr", &Desc::addr)
      .def_property_readonly("tile_bytes", [](const Desc& d) { return d.d.tile_bytes; })
      .def_property_readonly("ntiles", [](const Desc& d) { return d.d.ntiles; })
      .def_property_readonly("group_bytes", [](const Desc& d) { return d.d.group_bytes; });
  m.def("make_int", &make_int, py::arg("data"), py::arg("N"), py::arg("K"), py::arg("bits"),
        py::arg("asym"), py::arg("per_channel"), py::arg("group"), py::arg("chan_scale"));
  m.def("make_codebook", &make_codebook, py::arg("data"), py::arg("N"), py::arg("K"), py::arg("group"));
  m.def("make_f32", &make_f32, py::arg("w"), py::arg("N"), py::arg("K"));
  m.def("make_ggml", &make_ggml, py::arg("data"), py::arg("N"), py::arg("K"), py::arg("gtype"));
  m.def("ggml_types", []() {
    py::list v;
    for (int t = 0; t < 64; t++)
      if (gg_supported(t)) v.append(t);
    return v;
  }, "ggml type ids the GGML kind runs natively.");
  m.def("ggml_row_bytes", &gg_row_bytes, "Bytes per row of K values of a ggml type (0: not whole blocks).");

  m.def("linear", unlocked(&linear), "linear(desc_addr, x_ptr, out_ptr, M, bias_ptr_or_0)");
  m.def("set_head_rescore", &set_head_rescore,
        "set_head_rescore(on): the native step's LM head under dense refinement runs plain int8 blocks and "
        "recomputes refined only the rows that could be the refined argmax (see linear_head)");
  m.def("get_head_rescore", &get_head_rescore);
  m.def("head_row_norms", unlocked(+[](uintptr_t desc, uintptr_t out) {
          head_row_norms(*(const PackedDesc*)desc, (float*)out);
        }), "head_row_norms(desc_addr, out_f32_addr): upper bounds of the rows' norms");
  m.def("linear_head", unlocked(+[](uintptr_t desc, uintptr_t x, uintptr_t out, int64_t M, uintptr_t norms) {
          return linear_head(*(const PackedDesc*)desc, (const float*)x, (float*)out, M, (const float*)norms);
        }), "linear_head(desc_addr, x_ptr, out_ptr, M, norms_addr): the native step's LM head (see driver.h)");
  m.def("linear_f32", unlocked(&linear_f32), "linear_f32(w_ptr, N, K, x_ptr, out_ptr, M, bias_ptr_or_0)");
  m.def("rms_norm", unlocked(&rms_norm), "rms_norm(x, w, out, M, D, eps)");
  m.def("rope", unlocked(&rope), "rope(x, out, cos, sin, T, H, D): neox rotate-half, x [T,H,D], cos/sin [T,D/2]");
  m.def("attn_decode", unlocked(&attn_decode), "attn_decode(q, k, v, out, H, Hkv, D, T, tstride, scale)");
  m.def("dequant_rows", unlocked(&dequant_rows), "dequant_rows(desc_addr, ids_i64_addr, n, out_f32_addr): rows of a packed weight");
  m.def(
      "to_half",
      [](uintptr_t src, uintptr_t dst, int64_t n) {
        if (n < 0) throw std::invalid_argument("to_half: n < 0");
        g_kt->to_half((const float*)src, (uint16_t*)dst, n);
      },
      "to_half(src_f32_addr, dst_u16_addr, n): fp32 -> IEEE half as the native step writes the KV cache "
      "(F16C on x86 with the SIMD kernels, else portable code)");
  register_llama_step(m);  // llama_step.cpp: NativeModel
  register_sampler(m);     // sampler.cpp: sample_rows, filtered_dist, rejection_sample
}
