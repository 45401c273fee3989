// Shared declarations of jisu's CPU kernels: packed-weight descriptors, the per-ISA
// kernel table, fp16 helpers and the thread-pool API. The packed byte layouts are
// documented here once; every ISA (scalar, AVX2, AVX-512, NEON) reads the same bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <mutex>

namespace jisu {

// Activations are quantized to int8 in blocks of QK values (like llama.cpp's Q8_0).
constexpr int QK = 32;
// Weight rows are interleaved in tiles of NR rows; N is padded up to a multiple of NR.
constexpr int NR = 8;

// ---------------------------------------------------------------------------------
// Packed layouts (byte streams, one per weight, tile-major: tile t = rows 8t..8t+7).
//
// INT (bits 2/3/4/8, group g = multiple of 32; per-channel int8 is g = K with an f32
// scale array instead of inline scales):
//   tile = for each group: [8 x f16 scale][8 x f16 min, asym only][g/32 blocks]
//   value = (q - off) * scale  (sym, off = 2^(bits-1))     or  q * scale + min (asym)
//   A block holds 8 rows x 32 codes, arranged "vertically": code (row r, k = 4j+t) of
//   block-quad j lives in lane r (bytes 4r..4r+3) of 32-byte vector j, so one int8
//   activation broadcast of x[4j..4j+3] multiplies all 8 rows at once and the int32
//   lanes end up holding per-row sums (no horizontal reductions).
//     bits 8: 8 vectors of int8 (256 B)
//     bits 4: 4 vectors; vector v holds quad v in low nibbles, quad v+4 in high (128 B)
//     bits 2: 2 vectors; vector v holds quads v, v+2, v+4, v+6 at bits 0,2,4,6 (64 B)
//     bits 3: 3 vectors (96 B); byte (4r+t) of vector v holds the code of quad 2v in
//             bits 0-2, of quad 2v+1 in bits 4-6, and bit v of the codes of quads 6
//             and 7 in bits 3 and 7: two shifts and masks per vector unpack quads 0-5,
//             and quads 6/7 gather one bit from each vector (20 AVX2 ops per block).
//
// CODEBOOK (4-bit index into a per-row 16-entry table, optional group scale):
//   tile = [8 rows x (16 B table low bytes, 16 B table high bytes)] then per group:
//          [8 x f32 scale (group scale * table scale)][g/32 blocks of 8 rows x 16 B]
//   The per-row f32 table is stored as int16 (max |entry| -> 32767) with its scale
//   folded into the f32 group scale. Within a row-block the 16 bytes hold index k in
//   the low nibble of byte k (k<16) and index k+16 in the high nibble.
//
// F32: the plain row-major [N, K] fp32 matrix (no repacking).
//
// GGML: a GGUF tensor's own bytes, row-major (row n at data + n * row_bytes), read in place from
// the memory-mapped file (no repacking, no copy). gtype is the ggml type id (GgmlType); each row
// is K / block_size blocks of that type (layouts: ggml-common.h, or ggml_q32.h / ggml_kq.h).
// ---------------------------------------------------------------------------------

enum Kind : int { KIND_INT = 0, KIND_CODEBOOK = 1, KIND_F32 = 2, KIND_GGML = 3 };

// ggml type ids (the values GGUF files store) of the types the GGML kind runs.
enum GgmlType : int {
  GG_F32 = 0, GG_F16 = 1, GG_Q4_0 = 2, GG_Q4_1 = 3, GG_Q5_0 = 6, GG_Q5_1 = 7, GG_Q8_0 = 8,
  GG_Q2_K = 10, GG_Q3_K = 11, GG_Q4_K = 12, GG_Q5_K = 13, GG_Q6_K = 14, GG_IQ4_NL = 20,
  GG_IQ4_XS = 23, GG_BF16 = 30,
};

struct PackedDesc {
  int kind = KIND_INT;
  int bits = 4;           // INT: 2, 3, 4, 8
  int asym = 0;           // INT: 1 if mins are stored
  int per_channel = 0;    // INT bits 8: scale is chan_scale[N] f32, no inline scales
  int64_t group = 32;     // group size (multiple of 32)
  int64_t N = 0, K = 0;
  int64_t ntiles = 0;     // ceil(N / 8)
  int64_t tile_bytes = 0; // bytes per tile in data
  int64_t group_bytes = 0;
  const uint8_t* data = nullptr;
  const float* chan_scale = nullptr;  // per-channel int8 scales [ntiles*8]
  const float* f32 = nullptr;         // F32 weights [N, K]
  int gtype = -1;                     // GGML: the ggml type id
  int64_t row_bytes = 0;              // GGML: bytes per row
};

// Bytes of one 8-row x 32-code block for an INT format.
static inline int64_t int_block_bytes(int bits) {
  return bits == 8 ? 256 : bits == 4 ? 128 : bits == 3 ? 96 : 64;
}

// Code of (row r, k in 0..31) in one 8-row INT block (the reference decoding of the layouts above).
static inline int int_code(const uint8_t* blk, int bits, int r, int k) {
  const int j = k >> 2, t = k & 3, lane = 4 * r + t;
  switch (bits) {
    case 8: return (int8_t)blk[j * 32 + lane];
    case 4: return (blk[(j & 3) * 32 + lane] >> ((j >> 2) * 4)) & 15;
    case 2: return (blk[(j & 1) * 32 + lane] >> ((j >> 1) * 2)) & 3;
    default: {  // 3
      if (j < 6) return (blk[(j >> 1) * 32 + lane] >> ((j & 1) * 4)) & 7;
      const int sh = j == 6 ? 3 : 7;
      return ((blk[lane] >> sh) & 1) | (((blk[32 + lane] >> sh) & 1) << 1) | (((blk[64 + lane] >> sh) & 1) << 2);
    }
  }
}

// Quantized activations for M rows (filled by quantize_act of the active ISA).
//
// Refined blocks: a block whose absolute maximum exceeds `refine` times the mean of its row's
// block maxima (an outlier channel: it would round the block's other values to a few levels)
// also carries its rounding residual, q2 = round(128 * (x/d - q)) in [-64, 64], so that
// x ~ d * (q + q2 / 128) (error <= d/256 instead of d/2). The INT kernels then use the exact
// integer sum 128 * dot(w, q) + dot(w, q2) with the block scale dr = d / 128 and sum
// sr = 128 * s + sum(q2); an unrefined block has rf = 0, dr = d, sr = s, sdr = sd, and q2 = 0
// (written only when refinement is on). The codebook kernels read q16 / d / s / sd (unrefined).
// `refine` = 0 turns it off; every ISA decides the same blocks (block maxima are exact and the
// mean is one scalar sum in block order).
struct ActQ {
  int64_t K = 0;
  float refine = 0.f;      // threshold (x mean block max); 0 = off
  int8_t* q = nullptr;     // [M][K] int8, natural order
  float* d = nullptr;      // [M][K/32] block scale
  int32_t* s = nullptr;    // [M][K/32] sum of the block's int8 values
  float* sd = nullptr;     // [M][K/32] d * s (float), used by asym mins
  int16_t* q16 = nullptr;  // [M][K] int16, codebook order (see quantize_act)
  int8_t* q2 = nullptr;    // [M][K] residual codes of refined blocks (0 elsewhere), natural order
  uint8_t* rf = nullptr;   // [M][K/32] 1 = refined block
  float* dr = nullptr;     // [M][K/32] INT kernels' block scale (d / 128 when refined)
  int32_t* sr = nullptr;   // [M][K/32] INT kernels' block sum (128 s + sum(q2) when refined)
  float* sdr = nullptr;    // [M][K/32] dr * sr (float)
  // Panel (kernels whose table sets panel_mr; built per linear call by KernelTable::panel): rows
  // in groups of pmr, each group's rows interleaved per block, [grp][b][pmr][32] (pq; pq2 the
  // residual codes), so one pointer reaches every row of a group at fixed offsets, and the INT
  // kernels' per-block integers and scales as pf [grp][b][PANEL_FIELDS][pmr] (see PanelField).
  int64_t pmr = 0;         // rows per group; 0 = no panel
  int8_t* pq = nullptr;
  int8_t* pq2 = nullptr;   // only when refinement is on
  int32_t* pf = nullptr;
  // [M][K] int16, natural order: q, or 128 q + q2 in a refined block (the INT kernels' exact block
  // integers come out of one int16 dot product). Filled by quantize_act when not null: for INT
  // weights under dense refinement on a table that sets qv_gemm (M > 1).
  int16_t* qv = nullptr;
  // KernelTable::gg_prep's operands for gg_gemm, laid out once per linear call (null: gg_gemm makes its own).
  uint8_t* gp = nullptr;
};

// Fields of a panel block, for a row whose block integer sum with the codes is p and with the
// residual codes p2 (see ActQ): isum = ((INIT + p) << SHIFT) + p2 + POST equals the INT kernels'
// isum minus the format's offset term (sr << OSH; 0 for formats without an offset), exactly.
enum PanelField { PF_INIT = 0, PF_SHIFT, PF_POST, PF_DR, PF_SDR, PANEL_FIELDS };

// The refinement of one quantized block (shared by every ISA's quantize_act): given the
// block's values x, its scale inverse id and codes q, writes q2 and returns sum(q2).
static inline int32_t refine_block(const float* x, float id, const int8_t* q, int8_t* q2) {
  int32_t s2 = 0;
  for (int i = 0; i < QK; i++) {
    const float v = x[i] * id;                          // the value q was rounded from
    const float r = (v - (float)q[i]) * 128.f;          // exact: |v - q| <= 1/2, a power-of-2 scale
    const int c = (int)std::nearbyint(r);
    q2[i] = (int8_t)(c > 127 ? 127 : c < -127 ? -127 : c);
    s2 += q2[i];
  }
  return s2;
}

// The per-row threshold on block maxima amax[0..nb) (+inf when refinement is off).
static inline float refine_threshold(const float* amax, int64_t nb, float refine) {
  if (!(refine > 0.f) || nb <= 0) return INFINITY;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; b++) sum = sum + amax[b];
  return refine * (sum / (float)nb);
}

// Finishes one block for the INT kernels (shared by every ISA's quantize_act), after d, s and sd:
// block i = m * nb + b with values xb, scale inverse id and codes q; refined when amax > thr (thr
// from refine_threshold). q2 is computed for a refined block and zeroed for the others only when
// refinement is on (the kernels read it only then).
// The INT kernels' fields of a refined block i (scale d, code sum s, residual code sum s2).
static inline void set_refined(ActQ& A, int64_t i, float d, int32_t s, int32_t s2) {
  A.rf[i] = 1;
  A.dr[i] = d * (1.f / 128.f);
  A.sr[i] = 128 * s + s2;
  A.sdr[i] = A.dr[i] * (float)A.sr[i];
}

static inline void refine_fields(ActQ& A, int64_t i, const float* xb, float id, const int8_t* q, int8_t* q2,
                                 float amax, float thr, float d, int32_t s, float sd) {
  const bool refined = amax > thr;
  A.rf[i] = refined ? 1 : 0;
  if (refined) {
    set_refined(A, i, d, s, refine_block(xb, id, q, q2));
  } else {
    if (thr != INFINITY) std::memset(q2, 0, QK);
    A.dr[i] = d;
    A.sr[i] = s;
    A.sdr[i] = sd;
  }
}

// One token's attention over a paged KV cache (the native step): the query heads of KV head hk
// attend to the sequence's cached positions [lo, hi], found through its block table.
struct PagedAttn {
  const void* kc;        // this layer's K cache [num_blocks, Hkv, bs, D]: fp32, or IEEE half
  const void* vc;        // its V cache, the same layout
  const int32_t* table;  // the sequence's block table
  int64_t bs, Hkv, D, hk, lo, hi;  // block size, KV heads, head size, this KV head, positions
  float scale;           // applied to q . k before the softmax
  float softcap = 0.f;   // > 0: each scaled score s becomes tanh(s / softcap) * softcap (Gemma)
  bool half = false;     // the cache holds IEEE half (widened exactly on load)
  // Software prefetch of the rows: for a decode step, whose sequences' cached rows come from DRAM
  // in runs of one block. A prefill's queries read rows that the step just wrote and that the
  // previous query read (in cache): there the prefetch loops only cost time (~20 % of attention).
  bool prefetch = true;
};

// Work functions each ISA provides. Tiles [t0, t1) of W for activation rows [0, M).
// out is [M][ldo] (first N columns written); bias may be null.
struct KernelTable {
  const char* name;
  // Fills rows [m0, m1) of A from fp32 x [M][K]; need_q16: also fill q16.
  void (*quantize_act)(const float* x, int64_t m0, int64_t m1, ActQ& A, bool need_q16);
  void (*int_gemm)(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
                   float* out, int64_t ldo, const float* bias, uint8_t* scratch);
  void (*cb_gemm)(const PackedDesc& W, const ActQ& A, int64_t M, int64_t t0, int64_t t1,
                  float* out, int64_t ldo, const float* bias, uint8_t* scratch);
  // fp32 weights: rows [n0, n1) of W [N,K], activations x [M][K].
  void (*f32_gemm)(const float* W, int64_t N, int64_t K, const float* x, int64_t M,
                   int64_t n0, int64_t n1, float* out, int64_t ldo, const float* bias);
  // RMSNorm of rows [m0, m1): out = w * (x * 1/sqrt(mean(x^2) + eps)).
  void (*rms_norm)(const float* x, const float* w, float* out, int64_t m0, int64_t m1,
                   int64_t D, float eps);
  // Rotate-half (neox) RoPE for tokens [t0, t1) of x [T][H][D], cos/sin [T][D/2].
  void (*rope)(const float* x, float* out, const float* cos, const float* sin, int64_t t0,
               int64_t t1, int64_t H, int64_t D);
  // One-token attention for q heads [h0, h1): q [H][D], k/v [Hkv][tstride][D] (first T
  // rows valid), out [H][D]; scores scratch of T floats.
  void (*attn_decode)(const float* q, const float* k, const float* v, float* out, int64_t h0,
                      int64_t h1, int64_t H, int64_t Hkv, int64_t D, int64_t T,
                      int64_t tstride, float scale, float* scratch);
  // Paged attention of one token for the nh query heads q [nh][D] of KV head a.hk (the native
  // step's attention), out [nh][D]; scratch of nh * n + 2 * n + 32 floats, n = hi - lo + 1.
  void (*attn_paged)(const PagedAttn& a, const float* q, float* out, int64_t nh, float* scratch);
  // out[i] = silu(g[i]) * u[i] for i < n (the MLP's gate).
  void (*silu_mul)(const float* g, const float* u, float* out, int64_t n);
  // out[i] = gelu_tanh(g[i]) * u[i] for i < n (Gemma's gate; GeLU's tanh approximation).
  void (*gelu_mul)(const float* g, const float* u, float* out, int64_t n);
  // n floats to IEEE half, rounded to nearest even as torch's .half() (the fp16 KV cache).
  void (*to_half)(const float* src, uint16_t* dst, int64_t n);
  // Optional (null / 0 when the ISA has none): int_gemm reads the activations through a panel of
  // panel_mr-row groups (ActQ::pq) for M > 1 when refinement is off or dense; panel() fills
  // rows [m0, m1) of it after quantize_act, for the format of W.
  int panel_mr;
  void (*panel)(const PackedDesc& W, ActQ& A, int64_t m0, int64_t m1);
  // 1: int_gemm reads ActQ::qv for INT weights under dense refinement (M > 1): on AVX2 without VNNI
  // one int16 dot product of the codes with 128 q + q2 replaces the two int8 passes (8-bit codes:
  // half the multiplies; 4-bit: 6 rows per pass instead of 4, +10-20 % measured).
  int qv_gemm;
  // Optional (null: one row): for INT weights W, int_gemm runs its M = 1 kernel for up to int_gemv_rows(W)
  // activation rows (each weight block unpacked once for all of them), which need neither the panel nor qv.
  int (*int_gemv_rows)(const PackedDesc& W);
  // GGML weights (KIND_GGML): out rows [n0, n1) of W for activation rows [0, M). Quantized types
  // read A (quantize_act of x: per block b of 32 values, x ~ dr[b] * v with v = q, or, when
  // A.refine > 0 and A.rf[b] = 1 (a refined block), v = 128 q + q2; sum(v) = sr[b] and
  // sdr[b] = dr[b] * sr[b]; unrefined, dr = d and sr = s); 16-bit
  // types (F16, BF16) read x [M][K] directly. The row results must not depend on M (a batch row
  // equals the same row alone, bit for bit).
  void (*gg_gemm)(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                  int64_t n1, float* out, int64_t ldo, const float* bias);
  // Optional (null where the ISA has none): activation operands gg_gemm would otherwise lay out in every call
  // (the AVX-512 build's tile multiplies on a CPU with AMX-INT8, for large enough M). gg_prep_bytes(W, A, M) is their
  // size (0: none for this call); gg_prep fills the units of 16 rows [u0, u1) of A.gp after quantize_act
  // filled those rows, so the threads that quantize the activations lay them out too.
  size_t (*gg_prep_bytes)(const PackedDesc& W, const ActQ& A, int64_t M);
  void (*gg_prep)(const PackedDesc& W, ActQ& A, int64_t M, int64_t u0, int64_t u1);
};

// Refinement thresholds below the mean block maximum refine nearly every block (ops.PRECISE):
// the kernels then take the residual codes' dot products for every block in one pass.
static inline bool dense_refine_threshold(float refine) { return refine > 0.f && refine < 1.f; }
static inline bool dense_refine(const ActQ& A) { return dense_refine_threshold(A.refine); }

// Scratch bytes int_gemm / cb_gemm need per thread for M > 1 (unpacked tile).
static inline int64_t gemm_scratch_bytes(const PackedDesc& W) {
  return (W.K / 32) * 512 + (W.K / W.group + 1) * 4 * NR * 4 + 1024;  // pair scales: 2 x 16 floats per group
}

// The GGML kind (ggml.cpp): whether a type id runs, its bytes per row of K values (0: K is not a
// whole number of blocks), whether its kernels read quantized activations, the scalar reference
// GEMM every ISA falls back to for types it has no kernel of, and the reference row decoder.
bool gg_supported(int gtype);
int64_t gg_row_bytes(int gtype, int64_t K);
bool gg_quantized(int gtype);
void gg_gemm_scalar(const PackedDesc& W, const float* x, const ActQ& A, int64_t M, int64_t n0,
                    int64_t n1, float* out, int64_t ldo, const float* bias);
void gg_dequant_row(const PackedDesc& W, int64_t n, float* out);

const KernelTable* scalar_table();
const KernelTable* avx2_table();    // null when not compiled (non-x86)
const KernelTable* avx512_table();  // null when not compiled
const KernelTable* neon_table();    // null when not compiled (non-aarch64)

// The paged attention kernels (attention.cpp) the tables point at: the scalar reference, AVX2 (D
// a multiple of 8, else scalar) and AVX-512 (D a multiple of 16, else AVX2; x86 only).
void attn_paged_scalar(const PagedAttn& a, const float* q, float* out, int64_t nh, float* scratch);
void attn_paged_avx2(const PagedAttn& a, const float* q, float* out, int64_t nh, float* scratch);
void attn_paged_avx512(const PagedAttn& a, const float* q, float* out, int64_t nh, float* scratch);

// ---------------------------------------------------------------------------------
// IEEE half <-> float, portable (used by the scalar path and at pack time).
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; e++; } while (!(man & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float -> IEEE half, rounding to nearest even (torch's .half() and F16C's cvtps_ph give the same
// bits), overflow to inf, NaN kept quiet.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint16_t o;
  if (x >= (uint32_t)(127 + 16) << 23) {  // >= 65536, inf or NaN
    o = x > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (x < (uint32_t)113 << 23) {  // < 2^-14: a half subnormal or zero
    // adding 0.5 places the half's subnormal units in the float's low mantissa bits; the float
    // addition rounds to nearest even
    const uint32_t magic_u = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
    float magic, v;
    std::memcpy(&magic, &magic_u, 4);
    std::memcpy(&v, &x, 4);
    v += magic;
    uint32_t b;
    std::memcpy(&b, &v, 4);
    o = (uint16_t)(b - magic_u);
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;  // rebias, round half to even
    o = (uint16_t)(x >> 13);                            // a carry into exponent 31 gives inf
  }
  return (uint16_t)(o | sign);
}

// Thread pool. A job is split into nchunks chunks that the caller (tid 0) and any awake
// workers claim dynamically, so a descheduled worker never stalls the caller for long
// (the machine may be oversubscribed). fn(ctx, chunk, nchunks, tid) runs once per chunk;
// tid < nthreads identifies the thread (for per-thread scratch).
using TaskFn = void (*)(void* ctx, int64_t chunk, int64_t nchunks, int tid);
void pool_run(TaskFn fn, void* ctx, int64_t nchunks, int nthreads);
// The kernels share process-wide scratch (quantized activations, per-thread buffers) and one
// thread pool, so native calls run one at a time. The Python bindings release the GIL and take
// this lock instead: other Python threads (an HTTP server's event loop, a tokenizer) keep running
// while a step computes.
std::mutex& native_mutex();
int pool_max_threads();
void pool_set_threads(int n);
void pool_set_spin_us(int us);
int pool_get_spin_us();

}  // namespace jisu
