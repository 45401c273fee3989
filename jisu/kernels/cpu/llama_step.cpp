// One native forward step of a pre-norm decoder over a paged KV cache: the Llama family (Llama
// 2/3, Mistral, SmolLM, Qwen2 q/k/v bias, Qwen3 q/k RMSNorm, optional sliding window) and Gemma 2/3
// (scaled embeddings, norms after the attention and the MLP, GeLU-tanh gate, attention and final
// logit soft-capping, per-layer sliding windows and RoPE tables).
//
// The model handle (NativeModel) holds only pointers: Python keeps the weights alive. A step
// takes T tokens from S sequences (sequence s appends q_lens[s] tokens after its starts[s]
// cached positions; tokens are back to back), writes their K/V into the cache
// [num_blocks, Hkv, block_size, D] per layer (fp32, or IEEE half; Hkv the layer's own) through
// each sequence's block table, and returns the logits of the requested rows. Everything per token is computed
// independently of the other tokens in the step (the linear kernels' per-row results do not
// depend on M, and attention runs per (token, head) with an order of operations fixed by the
// token's own positions only), so a sequence's logits are bitwise the same alone or in any
// batch, and the same for any block size.
//
// Every kernel it runs comes from the active ISA's KernelTable (linear, RMSNorm, RoPE, paged
// attention, SiLU / GeLU gates, the half KV store), so the ISA is chosen in one place (set_isa).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "driver.h"
#include "lowrank.h"

namespace py = pybind11;

namespace jisu {
namespace {

// ---------------------------------------------------------------- small helpers
struct FBuf {  // grow-only, 64-byte aligned float buffer
  float* p = nullptr;
  size_t n = 0;
  FBuf() = default;
  FBuf(const FBuf&) = delete;
  FBuf& operator=(const FBuf&) = delete;
  FBuf(FBuf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr, o.n = 0; }
  ~FBuf() { std::free(p); }
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((want * 4) + 4095) & ~(size_t)4095;
      p = (float*)std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      n = bytes / 4;
    }
    return p;
  }
};

// Threads for a piece of the step with work_bytes of work: all of them, or one below 64 KB
// (threading costs ~1-5 us).
int step_threads(int64_t work_bytes) { return work_bytes < 65536 ? 1 : pool_max_threads(); }

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// n values into the cache at element offset off: copied, or rounded to half (bitwise what torch's
// .half() gives).
void store_kv(const KernelTable* kt, void* cache, int64_t off, const float* src, int64_t n, bool half) {
  if (half) kt->to_half(src, (uint16_t*)cache + off, n);
  else std::memcpy((float*)cache + off, src, n * 4);
}

// ---------------------------------------------------------------- the model
struct Layer {
  const PackedDesc* qkv[3] = {nullptr, nullptr, nullptr};  // one fused [q|k|v] or three
  const float* qkv_bias[3] = {nullptr, nullptr, nullptr};
  int nqkv = 0;
  const PackedDesc* o = nullptr;
  const PackedDesc* gu[2] = {nullptr, nullptr};  // one fused [gate|up] or two
  int ngu = 0;
  const PackedDesc* down = nullptr;
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* attn_post = nullptr;  // norm of the attention block's output (Gemma), or null
  const float* mlp_post = nullptr;   // norm of the MLP's output (Gemma), or null
  int64_t window = 0;  // 0: full causal attention
  int rope = 0;        // index of its RoPE table (Gemma 3: the sliding layers have their own base)
  int64_t F = 0, H = 0, Hkv = 0;  // its MLP width and head counts (a pruned layer's may be below the model's)
};

// cos/sin of one set of inverse frequencies, grown on demand.
struct RopeTable {
  std::vector<float> inv_freq, cos, sin;
  int64_t len = 0;
};

struct Stats {
  double linear = 0, attn = 0, other = 0, total = 0;
  int64_t steps = 0, tokens = 0;
};

class NativeModel {
 public:
  // activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU); attn_softcap > 0: tanh soft-capping of
  // the scaled attention scores. inv_freq: RoPE table 0 (add_rope adds more). inter / H / Hkv: the
  // largest MLP width and head counts (set_layer may give a layer smaller ones).
  NativeModel(int64_t hidden, int64_t inter, int64_t n_layers, int64_t H, int64_t Hkv, int64_t D,
              int64_t vocab, double eps, double scale, uintptr_t inv_freq, const std::string& activation,
              double attn_softcap)
      : hidden_(hidden), inter_(inter), H_(H), Hkv_(Hkv), D_(D), vocab_(vocab), eps_((float)eps),
        scale_((float)scale), attn_softcap_((float)attn_softcap), layers_(n_layers) {
    if (hidden <= 0 || inter <= 0 || n_layers <= 0 || H <= 0 || Hkv <= 0 || D <= 0 || D % 2 || vocab <= 0)
      throw std::invalid_argument("NativeModel: bad config");
    if (activation != "silu" && activation != "gelu_tanh")
      throw std::invalid_argument("NativeModel: activation must be silu or gelu_tanh, not " + activation);
    if (!(attn_softcap >= 0)) throw std::invalid_argument("NativeModel: attn_softcap must be >= 0");
    gelu_ = activation == "gelu_tanh";
    add_rope(inv_freq);
  }

  // Another RoPE table (D/2 inverse frequencies); returns its index for set_layer.
  int64_t add_rope(uintptr_t inv_freq) {
    if (!inv_freq) throw std::invalid_argument("add_rope: no inverse frequencies");
    const float* f = (const float*)inv_freq;
    ropes_.emplace_back();
    ropes_.back().inv_freq.assign(f, f + D_ / 2);
    return (int64_t)ropes_.size() - 1;
  }

  void set_layer(int64_t i, std::vector<uintptr_t> qkv, std::vector<uintptr_t> qkv_bias, uintptr_t o,
                 std::vector<uintptr_t> gu, uintptr_t down, uintptr_t attn_norm, uintptr_t ffn_norm,
                 uintptr_t q_norm, uintptr_t k_norm, int64_t window, int64_t rope, uintptr_t attn_post_norm,
                 uintptr_t mlp_post_norm, int64_t inter, int64_t heads, int64_t kv_heads) {
    if (i < 0 || i >= (int64_t)layers_.size()) throw std::out_of_range("set_layer: layer index");
    if (rope < 0 || rope >= (int64_t)ropes_.size()) throw std::out_of_range("set_layer: RoPE table index");
    Layer& L = layers_[i];
    // per-layer sizes: 0 = the model's; at most the model's (its buffers are sized by them)
    L.F = inter ? inter : inter_, L.H = heads ? heads : H_, L.Hkv = kv_heads ? kv_heads : Hkv_;
    if (L.F <= 0 || L.F > inter_ || L.H <= 0 || L.H > H_ || L.Hkv <= 0 || L.Hkv > Hkv_ || L.H % L.Hkv)
      throw std::invalid_argument("set_layer: bad per-layer MLP width or head counts");
    const int64_t inter_l = L.F, nq = L.H * D_, nkv = L.Hkv * D_;
    if (qkv.size() == 1) {
      check(qkv[0], nq + 2 * nkv, hidden_, "qkv");
    } else if (qkv.size() == 3) {
      check(qkv[0], nq, hidden_, "q");
      check(qkv[1], nkv, hidden_, "k");
      check(qkv[2], nkv, hidden_, "v");
    } else {
      throw std::invalid_argument("set_layer: qkv needs 1 or 3 weights");
    }
    if (qkv_bias.size() != qkv.size()) throw std::invalid_argument("set_layer: one bias (or 0) per qkv weight");
    L.nqkv = (int)qkv.size();
    for (int j = 0; j < L.nqkv; j++) {
      L.qkv[j] = (const PackedDesc*)qkv[j];
      L.qkv_bias[j] = (const float*)qkv_bias[j];
    }
    check(o, hidden_, nq, "o");
    L.o = (const PackedDesc*)o;
    if (gu.size() == 1) {
      check(gu[0], 2 * inter_l, hidden_, "gate_up");
    } else if (gu.size() == 2) {
      check(gu[0], inter_l, hidden_, "gate");
      check(gu[1], inter_l, hidden_, "up");
    } else {
      throw std::invalid_argument("set_layer: gate/up needs 1 or 2 weights");
    }
    L.ngu = (int)gu.size();
    for (int j = 0; j < L.ngu; j++) L.gu[j] = (const PackedDesc*)gu[j];
    check(down, hidden_, inter_l, "down");
    L.down = (const PackedDesc*)down;
    if (!attn_norm || !ffn_norm) throw std::invalid_argument("set_layer: norms are required");
    L.attn_norm = (const float*)attn_norm;
    L.ffn_norm = (const float*)ffn_norm;
    L.q_norm = (const float*)q_norm;
    L.k_norm = (const float*)k_norm;
    if ((q_norm == 0) != (k_norm == 0)) throw std::invalid_argument("set_layer: q_norm and k_norm go together");
    L.window = window > 0 ? window : 0;
    L.rope = (int)rope;
    L.attn_post = (const float*)attn_post_norm;
    L.mlp_post = (const float*)mlp_post_norm;
  }

  // embed_f32: [vocab, hidden] table, or embed_desc: a packed [vocab, hidden] weight; its rows are
  // multiplied by embed_scale (1: not at all). final_softcap > 0: the logits become
  // tanh(l / final_softcap) * final_softcap.
  void set_globals(uintptr_t embed_f32, uintptr_t embed_desc, uintptr_t head_desc, uintptr_t final_norm,
                   double embed_scale, double final_softcap) {
    if ((embed_f32 == 0) == (embed_desc == 0)) throw std::invalid_argument("set_globals: give one embedding");
    if (!(final_softcap >= 0)) throw std::invalid_argument("set_globals: final_softcap must be >= 0");
    embed_scale_ = (float)embed_scale;
    final_softcap_ = (float)final_softcap;
    if (embed_desc) check(embed_desc, vocab_, hidden_, "embedding");
    check(head_desc, vocab_, hidden_, "lm_head");
    if (!final_norm) throw std::invalid_argument("set_globals: final norm is required");
    emb_f32_ = (const float*)embed_f32;
    emb_ = (const PackedDesc*)embed_desc;
    head_ = (const PackedDesc*)head_desc;
    final_norm_ = (const float*)final_norm;
    head_norms_.clear();
  }

  void forward(uintptr_t tokens_p, int64_t T, int64_t S, uintptr_t qlens_p, uintptr_t starts_p,
               uintptr_t tables_p, int64_t max_blocks, uintptr_t kptrs_p, uintptr_t vptrs_p,
               int64_t block_size, int64_t num_blocks, uintptr_t rows_p, int64_t R, uintptr_t logits_p,
               bool kv_half);

  // A low-rank term y += A (B x) on the linear whose descriptor is at `desc` (lowrank.h: B int8
  // [segments * r, K] and f32 row scales, A int8 tiles and f32 row scales, the rows of each segment).
  void set_lowrank(uintptr_t desc, uintptr_t b, uintptr_t b_scale, uintptr_t a, uintptr_t a_scale, int64_t r,
                   std::vector<int64_t> seg_rows) {
    if (!desc) throw std::invalid_argument("set_lowrank: no weight");
    const PackedDesc& d = *(const PackedDesc*)desc;
    LowRank L;
    L.N = d.N, L.K = d.K, L.r = r;
    L.b = (const int8_t*)b, L.sb = (const float*)b_scale, L.a = (const int8_t*)a, L.sa = (const float*)a_scale;
    L.seg_rows = std::move(seg_rows);
    L.init();
    lowrank_[(const PackedDesc*)desc] = std::move(L);
  }

  py::dict stats() const {  // a Python dict built field by field, as module.cpp's cpu_features
    py::dict d;
    d["linear_s"] = st_.linear;
    d["attention_s"] = st_.attn;
    d["other_s"] = st_.other;
    d["total_s"] = st_.total;
    d["steps"] = st_.steps;
    d["tokens"] = st_.tokens;
    return d;
  }
  void reset_stats() { st_ = Stats(); }
  bool profile = false;

 private:
  void check(uintptr_t p, int64_t N, int64_t K, const char* what) const {
    if (!p) throw std::invalid_argument(std::string("NativeModel: missing weight ") + what);
    const PackedDesc& d = *(const PackedDesc*)p;
    if (d.N != N || d.K != K)
      throw std::invalid_argument(std::string("NativeModel: weight ") + what + " has shape [" + std::to_string(d.N) +
                                  ", " + std::to_string(d.K) + "], expected [" + std::to_string(N) + ", " +
                                  std::to_string(K) + "]");
  }

  void ensure_rope(RopeTable& r, int64_t npos) const {
    if (npos <= r.len) return;
    const int64_t h2 = D_ / 2;
    int64_t n = std::max<int64_t>({npos, 2 * r.len, 256});
    r.cos.resize(n * h2);
    r.sin.resize(n * h2);
    for (int64_t p = r.len; p < n; p++)
      for (int64_t i = 0; i < h2; i++) {
        // the angle rounded to float first, as the reference's float32 table
        const float ang = (float)p * r.inv_freq[i];
        r.cos[p * h2 + i] = (float)std::cos((double)ang);
        r.sin[p * h2 + i] = (float)std::sin((double)ang);
      }
    r.len = n;
  }

  // rotate-half RoPE of nh heads of x at position pos, in place
  void rope(const KernelTable* kt, const RopeTable& r, float* x, int64_t nh, int64_t pos) const {
    const int64_t h2 = D_ / 2;
    kt->rope(x, x, r.cos.data() + pos * h2, r.sin.data() + pos * h2, 0, 1, nh, D_);
  }

  void embed_row(int64_t tok, float* out) const {
    if (emb_f32_)
      std::memcpy(out, emb_f32_ + tok * hidden_, hidden_ * 4);
    else
      dequant_row(*emb_, tok, out);
    if (embed_scale_ != 1.f)  // one rounded product, as the reference's fp32 multiply
      for (int64_t i = 0; i < hidden_; i++) out[i] = out[i] * embed_scale_;
  }

  int64_t hidden_, inter_, H_, Hkv_, D_, vocab_;
  float eps_, scale_, attn_softcap_;
  bool gelu_ = false;
  float embed_scale_ = 1.f, final_softcap_ = 0.f;
  std::vector<Layer> layers_;
  const float* emb_f32_ = nullptr;
  const PackedDesc* emb_ = nullptr;
  const PackedDesc* head_ = nullptr;
  std::vector<float> head_norms_;  // upper bounds of the head's row norms (linear_head), from the first faithful step
  const float* final_norm_ = nullptr;
  std::vector<RopeTable> ropes_;
  FBuf x_, h_, qkv_, q_, k_, v_, att_, tmp_, gu_, g_, u_, act_, xr_;
  std::vector<FBuf> thr_;
  std::vector<int64_t> pos_, seq_;
  std::unordered_map<const PackedDesc*, LowRank> lowrank_;  // low-rank terms by their linear
  FBuf lr_u_;
  Stats st_;
};

void NativeModel::forward(uintptr_t tokens_p, int64_t T, int64_t S, uintptr_t qlens_p, uintptr_t starts_p,
                          uintptr_t tables_p, int64_t max_blocks, uintptr_t kptrs_p, uintptr_t vptrs_p,
                          int64_t bs, int64_t num_blocks, uintptr_t rows_p, int64_t R, uintptr_t logits_p,
                          bool kv_half) {
  if (!head_) throw std::runtime_error("NativeModel: set_globals was not called");
  for (const Layer& L : layers_)
    if (!L.o) throw std::runtime_error("NativeModel: a layer was not set");
  const int64_t* tokens = (const int64_t*)tokens_p;
  const int32_t* qlens = (const int32_t*)qlens_p;
  const int32_t* starts = (const int32_t*)starts_p;
  const int32_t* tables = (const int32_t*)tables_p;
  const int64_t* kptrs = (const int64_t*)kptrs_p;
  const int64_t* vptrs = (const int64_t*)vptrs_p;
  const int32_t* rows = (const int32_t*)rows_p;
  float* logits = (float*)logits_p;
  if (T <= 0 || S <= 0 || bs <= 0 || max_blocks <= 0 || R < 0) throw std::invalid_argument("forward: bad sizes");

  // ---- validate the step and lay out per-token position / sequence
  pos_.resize(T);
  seq_.resize(T);
  int64_t t = 0, max_pos = 0;
  for (int64_t s = 0; s < S; s++) {
    const int64_t a = starts[s], n = qlens[s];
    if (a < 0 || n < 0 || t + n > T) throw std::invalid_argument("forward: q_lens / starts do not match the tokens");
    const int64_t nblk = (a + n + bs - 1) / bs;
    if (nblk > max_blocks) throw std::invalid_argument("forward: a sequence runs past its block table (KV cache full?)");
    for (int64_t b = 0; b < nblk; b++) {
      const int32_t id = tables[s * max_blocks + b];
      if (id < 0 || id >= num_blocks) throw std::invalid_argument("forward: block id out of range");
    }
    for (int64_t i = 0; i < n; i++, t++) {
      pos_[t] = a + i;
      seq_[t] = s;
    }
    if (n) max_pos = std::max(max_pos, a + n - 1);
  }
  if (t != T) throw std::invalid_argument("forward: sum(q_lens) != number of tokens");
  for (int64_t i = 0; i < T; i++)
    if (tokens[i] < 0 || tokens[i] >= vocab_) throw std::invalid_argument("forward: token id out of range");
  for (int64_t r = 0; r < R; r++)
    if (rows[r] < 0 || rows[r] >= T) throw std::invalid_argument("forward: logits row out of range");
  for (RopeTable& r : ropes_) ensure_rope(r, max_pos + 1);

  const bool prof = profile;
  const KernelTable* kt = active_kernels();
  const double t_start = now_s();
  double t_lin = 0, t_att = 0;
  auto lin = [&](const PackedDesc* W, const float* in, float* out, const float* bias) {
    const double t0 = prof ? now_s() : 0;
    linear((uintptr_t)W, (uintptr_t)in, (uintptr_t)out, T, (uintptr_t)bias);
    if (!lowrank_.empty()) {  // y += A (B x) where the linear carries a low-rank term
      const auto it = lowrank_.find(W);
      if (it != lowrank_.end()) lowrank_add(it->second, in, T, out, W->N, lr_u_.get(T * it->second.u_size()));
    }
    if (prof) t_lin += now_s() - t0;
  };

  const int64_t E = hidden_, D = D_;
  float* x = x_.get(T * E);
  float* h = h_.get(T * E);
  float* att = att_.get(T * H_ * D);
  float* tmp = tmp_.get(T * E);
  float* act = act_.get(T * inter_);
  for (int64_t i = 0; i < T; i++) embed_row(tokens[i], x + i * E);
  const int nth = pool_max_threads();
  if ((int64_t)thr_.size() < nth) thr_.resize(nth);

  for (size_t li = 0; li < layers_.size(); li++) {
    const Layer& L = layers_[li];
    const int64_t F = L.F, H = L.H, Hkv = L.Hkv, G = H / Hkv, nq = H * D, nkv = Hkv * D;
    const RopeTable& rt = ropes_[L.rope];
    void* kcache = (void*)kptrs[li];
    void* vcache = (void*)vptrs[li];
    // ---- attention block
    parallel_for(T, step_threads(T * E * 8),
                 [&](int64_t a, int64_t b, int) { kt->rms_norm(x, L.attn_norm, h, a, b, E, eps_); });
    float *q, *k, *v;
    int64_t qs, ks, vs;  // row strides
    if (L.nqkv == 1) {
      float* qkv = qkv_.get(T * (nq + 2 * nkv));
      lin(L.qkv[0], h, qkv, L.qkv_bias[0]);
      q = qkv, k = qkv + nq, v = qkv + nq + nkv;
      qs = ks = vs = nq + 2 * nkv;
    } else {
      q = q_.get(T * nq), k = k_.get(T * nkv), v = v_.get(T * nkv);
      lin(L.qkv[0], h, q, L.qkv_bias[0]);
      lin(L.qkv[1], h, k, L.qkv_bias[1]);
      lin(L.qkv[2], h, v, L.qkv_bias[2]);
      qs = nq, ks = vs = nkv;
    }
    const double ta = prof ? now_s() : 0;
    // q/k norm, RoPE, and the new K/V into the cache (before any token attends)
    parallel_for(T, step_threads(T * (nq + 2 * nkv) * 16), [&](int64_t a, int64_t b, int) {
      for (int64_t i = a; i < b; i++) {
        float* qi = q + i * qs;
        float* ki = k + i * ks;
        const float* vi = v + i * vs;
        if (L.q_norm) {
          kt->rms_norm(qi, L.q_norm, qi, 0, H, D, eps_);
          kt->rms_norm(ki, L.k_norm, ki, 0, Hkv, D, eps_);
        }
        rope(kt, rt, qi, H, pos_[i]);
        rope(kt, rt, ki, Hkv, pos_[i]);
        const int64_t p = pos_[i];
        const int64_t blk = tables[seq_[i] * max_blocks + p / bs];
        for (int64_t hk = 0; hk < Hkv; hk++) {
          const int64_t off = ((blk * Hkv + hk) * bs + p % bs) * D;
          store_kv(kt, kcache, off, ki + hk * D, D, kv_half);
          store_kv(kt, vcache, off, vi + hk * D, D, kv_half);
        }
      }
    });
    // attention: one task per (token, KV head), or per (token, head) when that is too few
    const bool split_heads = G > 1 && T * Hkv < 2 * nth;
    const int64_t per_tok = split_heads ? H : Hkv;
    int64_t work = 0, max_n = 1;
    for (int64_t i = 0; i < T; i++) {
      const int64_t n = std::min<int64_t>(pos_[i] + 1, L.window ? L.window : pos_[i] + 1);
      work += n * nkv * (kv_half ? 4 : 8);
      max_n = std::max(max_n, n);
    }
    // scores of up to G heads, and the AVX-512 kernel's row offsets (64-bit, aligned)
    for (int th = 0; th < nth; th++) thr_[th].get(G * max_n + 2 * max_n + 32);  // here: tasks must not throw
    parallel_for(T * per_tok, step_threads(work), [&](int64_t a, int64_t b, int tid) {
      for (int64_t task = a; task < b; task++) {
        const int64_t i = task / per_tok, u = task % per_tok;
        const int64_t hk = split_heads ? u / G : u;
        const int64_t h0 = split_heads ? u : hk * G, nh = split_heads ? 1 : G;
        PagedAttn A;
        A.kc = kcache;
        A.vc = vcache;
        A.table = tables + seq_[i] * max_blocks;
        A.bs = bs;
        A.Hkv = Hkv;
        A.D = D;
        A.hk = hk;
        A.hi = pos_[i];
        A.lo = L.window ? std::max<int64_t>(0, pos_[i] - L.window + 1) : 0;
        A.scale = scale_;
        A.softcap = attn_softcap_;
        A.half = kv_half;
        A.prefetch = qlens[seq_[i]] <= 1;
        kt->attn_paged(A, q + i * qs + h0 * D, att + i * nq + h0 * D, nh, thr_[tid].p);
      }
    }, 16);
    if (prof) t_att += now_s() - ta;
    lin(L.o, att, tmp, nullptr);
    // (the output's norm,) residual, then the MLP's norm
    parallel_for(T, step_threads(T * E * 12), [&](int64_t a, int64_t b, int) {
      if (L.attn_post) kt->rms_norm(tmp, L.attn_post, tmp, a, b, E, eps_);
      for (int64_t i = a * E; i < b * E; i++) x[i] = x[i] + tmp[i];
      kt->rms_norm(x, L.ffn_norm, h, a, b, E, eps_);
    });
    // ---- MLP
    const float *g, *up;
    int64_t gs;
    if (L.ngu == 1) {
      float* gu = gu_.get(T * 2 * F);
      lin(L.gu[0], h, gu, nullptr);
      g = gu, up = gu + F, gs = 2 * F;
    } else {
      float* gb = g_.get(T * F);
      float* ub = u_.get(T * F);
      lin(L.gu[0], h, gb, nullptr);
      lin(L.gu[1], h, ub, nullptr);
      g = gb, up = ub, gs = F;
    }
    parallel_for(T, step_threads(T * F * 12), [&](int64_t a, int64_t b, int) {
      auto gate = gelu_ ? kt->gelu_mul : kt->silu_mul;
      for (int64_t i = a; i < b; i++) gate(g + i * gs, up + i * gs, act + i * F, F);
    });
    lin(L.down, act, tmp, nullptr);
    parallel_for(T, step_threads(T * E * 8), [&](int64_t a, int64_t b, int) {
      if (L.mlp_post) kt->rms_norm(tmp, L.mlp_post, tmp, a, b, E, eps_);
      for (int64_t i = a * E; i < b * E; i++) x[i] = x[i] + tmp[i];
    });
  }
  // ---- final norm and the LM head for the requested rows
  if (R > 0) {
    float* xr = xr_.get(R * E);
    for (int64_t r = 0; r < R; r++) kt->rms_norm(x + (int64_t)rows[r] * E, final_norm_, xr + r * E, 0, 1, E, eps_);
    const double t0 = prof ? now_s() : 0;
    if (head_norms_.empty() && get_head_rescore() && head_rescorable(*head_)) {  // first faithful step
      head_norms_.resize(vocab_);
      head_row_norms(*head_, head_norms_.data());
    }
    linear_head(*head_, xr, logits, R, head_norms_.empty() ? nullptr : head_norms_.data());
    if (prof) t_lin += now_s() - t0;
    if (final_softcap_ > 0.f) {  // as the reference: tanh(l / cap) * cap
      const float cap = final_softcap_;
      const int64_t n = R * vocab_;
      parallel_for((n + 4095) / 4096, step_threads(n * 32), [&](int64_t a, int64_t b, int) {
        for (int64_t i = a * 4096; i < std::min(n, b * 4096); i++) logits[i] = std::tanh(logits[i] / cap) * cap;
      });
    }
  }
  if (prof) {
    const double total = now_s() - t_start;
    st_.linear += t_lin;
    st_.attn += t_att;
    st_.other += total - t_lin - t_att;
    st_.total += total;
  }
  st_.steps++;
  st_.tokens += T;
}

}  // namespace

void register_llama_step(py::module_& m) {
  py::class_<NativeModel>(m, "NativeModel",
                          "A Llama-family or Gemma model step over a paged KV cache (see jisu.engine.native_runner).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, uintptr_t,
                    const std::string&, double>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("num_layers"), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("vocab"), py::arg("eps"), py::arg("scale"),
           py::arg("inv_freq"), py::arg("activation") = "silu", py::arg("attn_softcap") = 0.0)
      .def("add_rope", &NativeModel::add_rope, py::arg("inv_freq"),
           "another RoPE table (D/2 fp32 inverse frequencies at this address); returns its index")
      .def("set_layer", &NativeModel::set_layer, py::arg("i"), py::arg("qkv"), py::arg("qkv_bias"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("window"), py::arg("rope") = 0, py::arg("attn_post_norm") = 0,
           py::arg("mlp_post_norm") = 0, py::arg("intermediate") = 0, py::arg("num_heads") = 0,
           py::arg("num_kv_heads") = 0)
      .def("set_globals", &NativeModel::set_globals, py::arg("embed_f32"), py::arg("embed_desc"),
           py::arg("head_desc"), py::arg("final_norm"), py::arg("embed_scale") = 1.0, py::arg("final_softcap") = 0.0)
      .def("forward",
           [](NativeModel& self, uintptr_t tokens, int64_t T, int64_t S, uintptr_t qlens, uintptr_t starts,
              uintptr_t tables, int64_t max_blocks, uintptr_t kptrs, uintptr_t vptrs, int64_t bs, int64_t nb,
              uintptr_t rows, int64_t R, uintptr_t logits, bool kv_half) {
             py::gil_scoped_release nogil;  // other Python threads run while the step computes
             std::lock_guard<std::mutex> lock(native_mutex());
             self.forward(tokens, T, S, qlens, starts, tables, max_blocks, kptrs, vptrs, bs, nb, rows, R, logits,
                          kv_half);
           },
           "forward(tokens_i64, T, S, q_lens_i32, starts_i32, tables_i32, max_blocks, k_ptrs_i64, v_ptrs_i64, "
           "block_size, num_blocks, rows_i32, R, logits_f32, kv_half): addresses of contiguous buffers; the "
           "cache is fp32, or IEEE half when kv_half",
           py::arg("tokens"), py::arg("T"), py::arg("S"), py::arg("q_lens"), py::arg("starts"), py::arg("tables"),
           py::arg("max_blocks"), py::arg("k_ptrs"), py::arg("v_ptrs"), py::arg("block_size"), py::arg("num_blocks"),
           py::arg("rows"), py::arg("R"), py::arg("logits"), py::arg("kv_half") = false)
      .def("set_lowrank", &NativeModel::set_lowrank, py::arg("desc"), py::arg("b"), py::arg("b_scale"), py::arg("a"),
           py::arg("a_scale"), py::arg("rank"), py::arg("seg_rows"),
           "a low-rank term y += A (B x) on the linear at desc (see cpu/lowrank.h)")
      .def("stats", &NativeModel::stats)
      .def("reset_stats", &NativeModel::reset_stats)
      .def_readwrite("profile", &NativeModel::profile);
}

}  // namespace jisu
