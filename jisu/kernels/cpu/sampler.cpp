// Batched token sampling over fp32 logits rows [rows, V]: penalties, temperature, top-k, top-p,
// min-p and seeded inverse-CDF draws, with the raw log-prob of the drawn token and the top-n
// alternatives; the sparse filtered distribution of a row and speculative sampling's rejection
// step. Scalar C++ (the exp pass is written so that the compiler vectorizes it). The math follows
// the Python reference jisu/engine/sampler.py; see there for the definition of each filter.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "driver.h"

namespace py = pybind11;

namespace jisu {
namespace {

// ---------------------------------------------------------------- keyed uniforms
inline uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A uniform in [0, 1) keyed by (seed, position, stream); 53 bits (the reference's keyed_uniform).
double keyed_uniform(uint64_t seed, int64_t position, int64_t stream) {
  const uint64_t z = mix64(mix64(seed) ^ ((uint64_t)position * 8u + (uint64_t)stream));
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

// ---------------------------------------------------------------- exp
// The loops below vectorize only when comparisons may be if-converted (they raise no traps here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
// x86: AVX-512 and AVX2 copies of the passes over the whole row, picked at load time (same
// results: no contraction, and every sum keeps its lanes' order).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JISU_AVX2_CLONE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JISU_AVX2_CLONE
#endif

// exp(x) for x <= 0 in fp32 (about 1 ulp), 0 below -87; plain arithmetic so loops vectorize.
inline float fexp(float x) {
  const float keep = x > -87.0f ? 1.0f : 0.0f;
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const int32_t e = ((int32_t)n + 127) << 23;
  float sc;
  std::memcpy(&sc, &e, 4);
  return p * sc * keep;
}

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 256;  // elements per block of the weight pass (sums, maxima)
constexpr int64_t kPartitionMax = 4096;  // top-p partitions at most this many candidates, else bins

JISU_AVX2_CLONE float row_max(const float* x, int64_t n) {
  float acc[kLanes];
  int64_t i = 0;
  if (n >= kLanes) {
    for (int j = 0; j < kLanes; j++) acc[j] = x[j];
    for (i = kLanes; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; j++) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  } else {
    for (int j = 0; j < kLanes; j++) acc[j] = x[0];
  }
  float m = acc[0];
  for (int j = 1; j < kLanes; j++) m = acc[j] > m ? acc[j] : m;
  for (; i < n; i++) m = x[i] > m ? x[i] : m;
  return m;
}

int64_t row_argmax(const float* x, int64_t n) {  // the first of equal maxima
  constexpr int64_t B = 1024;
  float best = 0.f;
  int64_t first = -1;
  for (int64_t a = 0; a < n; a += B) {  // the first block holding the maximum, then its first index
    const float m = row_max(x + a, std::min(B, n - a));
    if (first < 0 || m > best) {
      best = m;
      first = a;
    }
  }
  for (int64_t i = first, e = std::min(n, first + B); i < e; i++)
    if (x[i] == best) return i;
  return 0;  // NaN
}

JISU_AVX2_CLONE void exp_into(const float* __restrict x, float* __restrict w, int64_t n, float m, float s) {
  for (int64_t i = 0; i < n; i++) w[i] = fexp((x[i] - m) * s);
}

// w[i] = exp((x[i] - m) * s) over [a, b) (b - a <= kBlock); returns the sum, sets *mx the maximum.
JISU_AVX2_CLONE double weight_block(const float* x, float* w, int64_t a, int64_t b, float m, float s, float* mx) {
  exp_into(x + a, w + a, b - a, m, s);
  double acc[8] = {0};
  float hi[8] = {0};
  int64_t i = a;
  for (; i + 8 <= b; i += 8)
    for (int j = 0; j < 8; j++) {
      acc[j] += (double)w[i + j];
      hi[j] = w[i + j] > hi[j] ? w[i + j] : hi[j];
    }
  double sum = 0;
  float h = 0.f;
  for (int j = 0; j < 8; j++) {
    sum += acc[j];
    h = hi[j] > h ? hi[j] : h;
  }
  for (; i < b; i++) {
    sum += (double)w[i];
    h = w[i] > h ? w[i] : h;
  }
  *mx = h;
  return sum;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- rows
struct RowParams {
  double temperature, top_p, min_p, rep, presence, frequency;
  int64_t top_k;
  uint64_t seed;
  int64_t position;
  const float* counts;   // [V] generated-token counts, or null (no penalties)
  const uint8_t* seen;   // [V] prompt tokens (bool), or null
  int64_t n_top;         // < 0: no log-probs; else the drawn token's and the top n_top
};

constexpr int kF = 6, kI = 6;  // doubles and int64 per row in the packed parameter arrays

RowParams unpack(const double* f, const int64_t* i) {
  RowParams p;
  p.temperature = f[0];
  p.top_p = f[1];
  p.min_p = f[2];
  p.rep = f[3];
  p.presence = f[4];
  p.frequency = f[5];
  p.top_k = i[0];
  p.seed = (uint64_t)i[1];
  p.position = i[2];
  p.counts = (const float*)(uintptr_t)i[3];
  p.seen = (const uint8_t*)(uintptr_t)i[4];
  p.n_top = i[5];
  return p;
}

struct Cand {
  float w;
  int32_t id;
};
inline bool before(const Cand& a, const Cand& b) {  // descending weight, then ascending id
  return a.w > b.w || (a.w == b.w && a.id < b.id);
}

// A row's kept tokens as a rule over its weights, for large kept sets (they are not listed): t is
// kept when w > hi, or w == hi and t <= id_hi (before(t, cutoff) or t is the cutoff).
struct Rule {
  float hi;
  int32_t id_hi;
};

// The rule keeping the tokens at or before (hi, id_hi) whose weight is also >= min_p.
Rule make_rule(float hi, int32_t id_hi, double min_p) {
  float m = (float)min_p;  // the least float >= min_p: w >= min_p as a float comparison
  if ((double)m < min_p) m = std::nextafter(m, 2.0f);
  if (m > hi) return {m, INT32_MAX};
  return {hi, id_hi};
}

struct Scratch {
  std::vector<float> pen, w, heap;
  std::vector<double> bsum;
  std::vector<float> bmax;
  std::vector<Cand> cand, cbuf;
  std::vector<std::pair<int32_t, double>> kept;  // (id, weight)
  bool by_rule = false;                          // the kept tokens are those `rule` keeps in w
  Rule rule;
  std::vector<double> hmass, hmass2, ksum;
  std::vector<int64_t> hcnt, hcnt2;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The top-p prefix of c (weights w, any order): moves the kept ones to the front (unordered) and
// returns their count. Kept: in `before` order, while the mass before a token is < target.
int64_t top_p_prefix(Cand* c, int64_t n, double target) {
  int64_t lo = 0, hi = n;  // c[0, lo) kept for sure; the crossing lies in [lo, hi)
  double mass = 0;         // of c[0, lo)
  while (hi - lo > 24) {
    // median of three as the pivot; partition [lo, hi) into those before it and the rest
    Cand a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi - 1];
    if (before(b, a)) std::swap(a, b);
    if (before(d, b)) std::swap(b, d);
    if (before(b, a)) std::swap(a, b);
    const Cand pv = b;
    int64_t k = lo;
    double part = 0;
    for (int64_t i = lo; i < hi; i++)
      if (before(c[i], pv)) {
        part += c[i].w;
        std::swap(c[i], c[k++]);
      }
    if (mass + part >= target) {
      if (k == lo) break;  // cannot happen with a strict order; stay safe
      hi = k;            // the crossing is among those before the pivot
    } else {
      mass += part;
      // the pivot itself comes next: keep it and go on after it
      int64_t pi = k;
      while (pi < hi && !(c[pi].w == pv.w && c[pi].id == pv.id)) pi++;
      std::swap(c[k], c[pi]);
      mass += c[k].w;
      lo = k + 1;
      if (mass >= target) return lo;
    }
  }
  std::sort(c + lo, c + hi, before);
  for (int64_t i = lo; i < hi; i++) {
    if (mass >= target) return i;
    mass += c[i].w;
  }
  return hi;
}

// ---------------------------------------------------------------- top-p over the whole row
// A positive float's bits order like its value: weights are binned by their top bits (exponent
// and mantissa), a bin's mass and count tell which bin the top-p boundary crosses, and only that
// bin's tokens are ever sorted, so a flat distribution (top-p keeping most of a 150k vocabulary)
// costs two scans instead of a sort of the row.
inline uint32_t fbits(float w) {
  uint32_t u;
  std::memcpy(&u, &w, 4);
  return u;
}

struct Cutoff {  // the last kept token in `before` order
  float w;
  int32_t id;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
inline bool kept_by(const Rule& r, float x, int32_t i) { return (x > r.hi) | ((x == r.hi) & (i <= r.id_hi)); }

// The kept mass of w[a, e) (e - a <= kBlock), in 8 lanes like weight_block.
JISU_AVX2_CLONE double kept_block_sum(const float* __restrict w, int64_t a, int64_t e, const Rule& r) {
  float t[kBlock];
  const int32_t n = (int32_t)(e - a), id = r.id_hi - (int32_t)a;  // (ids < 2^31: id_hi - a fits)
  const float hi = r.hi;
  for (int32_t i = 0; i < n; i++) {
    const float x = w[a + i];
    t[i] = (x > hi || (x == hi && i <= id)) ? x : 0.f;
  }
  double acc[8] = {0};
  int32_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += (double)t[i + j];
  double sum = 0;
  for (int j = 0; j < 8; j++) sum += acc[j];
  for (; i < n; i++) sum += (double)t[i];
  return sum;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// f(id, w) for every kept token, in ascending id order.
template <class F>
void for_kept(const float* w, int64_t V, const float* bmax, const Rule& r, F&& f) {
  for (int64_t b = 0, nb = (V + kBlock - 1) / kBlock; b < nb; b++) {
    if (!(bmax[b] >= r.hi)) continue;
    for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++)
      if (kept_by(r, w[i], (int32_t)i)) f(i, w[i]);
  }
}

// Where top-p stops: the last token (in `before` order) whose preceding mass is < need, among the
// tokens of weight >= lb, or of weight >= floor_lb when those do not hold need.
Cutoff top_p_cutoff(const float* w, int64_t V, const float* bmax, float lb, float floor_lb, double need,
                    Scratch& s) {
  constexpr int kShift1 = 19, kBins1 = 1 << (32 - kShift1 - 1);  // sign bit is 0
  constexpr int kShift2 = 6, kBins2 = 1 << (kShift1 - kShift2);
  const int64_t nb = (V + kBlock - 1) / kBlock;
  std::vector<double>& mass = s.hmass;
  std::vector<int64_t>& cnt = s.hcnt;
  for (;;) {
    mass.assign(kBins1, 0.0);
    cnt.assign(kBins1, 0);
    double total = 0;
    for (int64_t b = 0; b < nb; b++) {
      if (!(bmax[b] >= lb)) continue;
      for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++) {
        const float x = w[i];
        if (x >= lb) {
          const uint32_t k = fbits(x) >> kShift1;
          mass[k] += (double)x;
          cnt[k]++;
          total += (double)x;
        }
      }
    }
    if (total >= need || lb <= floor_lb) break;
    lb = floor_lb;
  }
  double above = 0;
  int k1 = kBins1 - 1;
  for (; k1 >= 0; k1--) {
    if (cnt[k1] == 0) continue;
    if (above + mass[k1] >= need) break;
    above += mass[k1];
  }
  if (k1 < 0) {  // the candidates hold less than need (rounding): keep them all
    return {lb, INT32_MAX};
  }
  // the crossing bin's tokens
  if ((int64_t)s.cbuf.size() < cnt[k1] + 1) s.cbuf.resize(cnt[k1] + 1);
  Cand* c = s.cbuf.data();
  int64_t n = 0;
  for (int64_t b = 0; b < nb; b++) {
    if (!(bmax[b] >= lb) || (fbits(bmax[b]) >> kShift1) < (uint32_t)k1) continue;
    for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++) {
      c[n] = {w[i], (int32_t)i};
      n += (w[i] >= lb) & ((fbits(w[i]) >> kShift1) == (uint32_t)k1);
    }
  }
  int64_t lo = 0, hi = n;
  if (n > 64) {  // a finer histogram within the bin
    std::vector<double>& m2 = s.hmass2;
    std::vector<int64_t>& c2 = s.hcnt2;
    m2.assign(kBins2, 0.0);
    c2.assign(kBins2, 0);
    for (int64_t i = 0; i < n; i++) {
      const uint32_t k = (fbits(c[i].w) >> kShift2) & (kBins2 - 1);
      m2[k] += (double)c[i].w;
      c2[k]++;
    }
    int k2 = -1;  // the sub-bin crossing need (the last non-empty one if rounding leaves none)
    double before_k2 = above;
    for (int k = kBins2 - 1; k >= 0; k--) {
      if (c2[k] == 0) continue;
      k2 = k;
      before_k2 = above;
      if (above + m2[k] >= need) break;
      above += m2[k];
    }
    above = before_k2;
    int64_t m = 0;  // the sub-bin's tokens to the front
    for (int64_t i = 0; i < n; i++)
      if (((fbits(c[i].w) >> kShift2) & (kBins2 - 1)) == (uint32_t)k2) std::swap(c[i], c[m++]);
    hi = m;
  }
  std::sort(c + lo, c + hi, before);
  Cutoff cut = {c[lo].w, c[lo].id};
  for (int64_t i = lo; i < hi; i++) {
    if (above >= need) break;
    above += c[i].w;
    cut = {c[i].w, c[i].id};
  }
  return cut;
}

// The kept tokens of row x (penalized) with their weights, in ascending id order, in s.kept; or
// none when every token is kept with weight s.w (then *all = true; block sums in s.bsum).
void filter_row(const float* x, int64_t V, const RowParams& P, Scratch& s, bool* all) {
  const float m = row_max(x, V);
  const float it = (float)(1.0 / P.temperature);
  s.kept.clear();
  s.by_rule = false;
  *all = false;
  if (P.top_k > 0 && P.top_k < V) {
    // the k-th largest logit (a min-heap of the k largest), then every logit >= it
    std::vector<float>& h = s.heap;
    h.assign(x, x + P.top_k);
    std::make_heap(h.begin(), h.end(), std::greater<float>());
    for (int64_t i = P.top_k; i < V; i++)
      if (x[i] > h.front()) {
        std::pop_heap(h.begin(), h.end(), std::greater<float>());
        h.back() = x[i];
        std::push_heap(h.begin(), h.end(), std::greater<float>());
      }
    const float kth = h.front();
    s.cand.clear();
    for (int64_t i = 0; i < V; i++)
      if (x[i] >= kth) s.cand.push_back({fexp((x[i] - m) * it), (int32_t)i});
  } else {
    const int64_t nb = (V + kBlock - 1) / kBlock;
    s.w.resize(V);
    s.bsum.resize(nb);
    s.bmax.resize(nb);
    double Z = 0;
    for (int64_t b = 0; b < nb; b++) {
      s.bsum[b] = weight_block(x, s.w.data(), b * kBlock, std::min(V, (b + 1) * kBlock), m, it, &s.bmax[b]);
      Z += s.bsum[b];
    }
    if (P.top_p >= 1.0 && P.min_p <= 0.0) {
      *all = true;
      return;
    }
    if (P.top_p >= 1.0) {  // min-p alone
      s.by_rule = true;
      s.rule = make_rule(0.f, INT32_MAX, P.min_p);
      return;
    }
    // Only tokens weighing >= (1 - top_p) Z / V can be kept (those below weigh less than what
    // top-p drops). Usually the tokens of weight >= 1e-2 (of the largest) hold the mass needed and
    // are few: they are partitioned; otherwise (a flat distribution) the weights are binned.
    const double need = P.top_p * Z;
    const float floor_lb = (float)((1.0 - P.top_p) * Z / (double)V * 0.5);
    const float lb = std::max(floor_lb, 1e-2f);
    if ((int64_t)s.cbuf.size() < V + 1) s.cbuf.resize(V + 1);
    Cand* c = s.cbuf.data();
    int64_t n = 0;
    double mass = 0;
    for (int64_t b = 0; b < nb && n <= kPartitionMax; b++)
      if (s.bmax[b] >= lb)
        for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++) {
          c[n] = {s.w[i], (int32_t)i};
          const bool in = s.w[i] >= lb;
          mass += in ? (double)s.w[i] : 0.0;
          n += in;
        }
    if (n <= kPartitionMax && mass >= need) {
      n = top_p_prefix(c, n, need);
      for (int64_t i = 0; i < n; i++)
        if ((double)c[i].w >= P.min_p) s.kept.push_back({c[i].id, (double)c[i].w});
      std::sort(s.kept.begin(), s.kept.end());
      return;
    }
    const Cutoff cut = top_p_cutoff(s.w.data(), V, s.bmax.data(), n <= kPartitionMax ? floor_lb : lb, floor_lb,
                                     need, s);
    s.by_rule = true;
    s.rule = make_rule(cut.w, cut.id, P.min_p);
    return;
  }
  // top-k candidates: top-p over their mass, then min-p
  if (P.top_p < 1.0) {
    double Z = 0;
    for (const Cand& c : s.cand) Z += c.w;
    s.cand.resize(top_p_prefix(s.cand.data(), (int64_t)s.cand.size(), P.top_p * Z));
  }
  for (const Cand& c : s.cand)
    if ((double)c.w >= P.min_p) s.kept.push_back({c.id, (double)c.w});
  std::sort(s.kept.begin(), s.kept.end());
}

// The penalized row (a copy in s.pen) or x itself when the row has no penalties.
const float* penalize(const float* x, int64_t V, const RowParams& P, Scratch& s) {
  if (!P.counts || (P.rep == 1.0 && P.presence == 0.0 && P.frequency == 0.0)) return x;
  s.pen.assign(x, x + V);
  float* y = s.pen.data();
  if (P.rep != 1.0) {
    const float r = (float)P.rep;
    for (int64_t i = 0; i < V; i++)
      if (P.counts[i] > 0 || (P.seen && P.seen[i])) y[i] = y[i] > 0 ? y[i] / r : y[i] * r;
  }
  if (P.presence != 0.0 || P.frequency != 0.0) {
    const float fr = (float)P.frequency, pr = (float)P.presence;
    for (int64_t i = 0; i < V; i++)
      if (P.counts[i] != 0) y[i] = (y[i] - fr * P.counts[i]) - pr;
  }
  return y;
}

int64_t draw_row(Scratch& s, bool all, int64_t V, double u) {
  if (all) {
    double total = 0;
    for (double b : s.bsum) total += b;
    const double t = u * total;
    double cum = 0;
    const int64_t nb = (int64_t)s.bsum.size();
    int64_t last = -1;
    for (int64_t b = 0; b < nb; b++) {
      if (cum + s.bsum[b] <= t && b + 1 < nb) {
        cum += s.bsum[b];
        continue;
      }
      for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++) {
        if (s.w[i] <= 0.f) continue;
        cum += s.w[i];
        last = i;
        if (cum > t) return i;
      }
    }
    return last < 0 ? 0 : last;
  }
  if (s.by_rule) {  // the kept mass per block, then the crossing block's tokens
    const Rule& r = s.rule;
    const float lb = r.hi;
    const int64_t nb = (V + kBlock - 1) / kBlock;
    std::vector<double>& ks = s.ksum;
    ks.assign(nb, 0.0);
    double total = 0;
    for (int64_t b = 0; b < nb; b++)
      if (s.bmax[b] >= lb) total += ks[b] = kept_block_sum(s.w.data(), b * kBlock, std::min(V, (b + 1) * kBlock), r);
    const double t = u * total;
    double cum = 0;
    int64_t last = -1;
    for (int64_t b = 0; b < nb; b++) {
      if (ks[b] <= 0) continue;
      if (cum + ks[b] <= t) {
        cum += ks[b];
        last = b;
        continue;
      }
      for (int64_t i = b * kBlock, e = std::min(V, (b + 1) * kBlock); i < e; i++)
        if (kept_by(r, s.w[i], (int32_t)i)) {
          cum += s.w[i];
          if (cum > t) return i;
        }
      last = b;
    }
    if (last < 0) return 0;
    int64_t id = 0;  // rounding: the last kept token
    for (int64_t i = last * kBlock, e = std::min(V, (last + 1) * kBlock); i < e; i++)
      if (kept_by(r, s.w[i], (int32_t)i)) id = i;
    return id;
  }
  double total = 0;
  for (const auto& k : s.kept) total += k.second;
  const double t = u * total;
  double cum = 0;
  for (const auto& k : s.kept) {
    cum += k.second;
    if (cum > t) return k.first;
  }
  return s.kept.empty() ? 0 : s.kept.back().first;
}

// log-softmax of the raw row at `token`, and the top n (ids, log-probs), largest first.
double raw_logprobs(const float* x, int64_t V, int64_t token, int64_t n, int64_t* top_ids, double* top_lp,
                    Scratch& s) {
  const float m = row_max(x, V);
  double Z = 0;
  s.w.resize(std::min<int64_t>(V, kBlock));
  float mx;
  for (int64_t a = 0; a < V; a += kBlock) {
    const int64_t b = std::min(V, a + kBlock);
    Z += weight_block(x + a, s.w.data(), 0, b - a, m, 1.0f, &mx);
  }
  const double lse = (double)m + std::log(Z);
  if (n > 0) {
    n = std::min(n, V);
    s.cand.clear();
    for (int64_t i = 0; i < n; i++) s.cand.push_back({x[i], (int32_t)i});
    auto worse = [](const Cand& a, const Cand& b) { return before(a, b); };  // heap top: the worst kept
    std::make_heap(s.cand.begin(), s.cand.end(), worse);
    for (int64_t i = n; i < V; i++)
      if (x[i] > s.cand.front().w) {
        std::pop_heap(s.cand.begin(), s.cand.end(), worse);
        s.cand.back() = {x[i], (int32_t)i};
        std::push_heap(s.cand.begin(), s.cand.end(), worse);
      }
    std::sort(s.cand.begin(), s.cand.end(), before);
    for (int64_t i = 0; i < n; i++) {
      top_ids[i] = s.cand[i].id;
      top_lp[i] = (double)s.cand[i].w - lse;
    }
  }
  return (double)x[token] - lse;
}

void sample_one(const float* raw, int64_t V, const RowParams& P, int64_t* token, double* lp, int64_t* top_ids,
                double* top_lp) {
  Scratch& s = scratch();
  const float* x = penalize(raw, V, P, s);
  int64_t t;
  if (P.temperature <= 0.0) {
    t = row_argmax(x, V);
  } else {
    bool all;
    filter_row(x, V, P, s, &all);
    t = draw_row(s, all, V, keyed_uniform(P.seed, P.position, 0));
  }
  *token = t;
  if (P.n_top >= 0) *lp = raw_logprobs(raw, V, t, P.n_top, top_ids, top_lp, s);
}

// ---------------------------------------------------------------- entry points
void check_shape(int64_t rows, int64_t V, int64_t stride) {
  if (rows < 0 || V <= 0 || V > INT32_MAX || stride < V) throw std::invalid_argument("sampler: bad shapes");
}

void sample_rows(uintptr_t logits, int64_t rows, int64_t V, int64_t stride, uintptr_t fparams, uintptr_t iparams,
                 uintptr_t tokens, uintptr_t logprobs, uintptr_t top_ids, uintptr_t top_lp, int64_t max_top,
                 uintptr_t row_ids) {
  check_shape(rows, V, stride);
  const double* f = (const double*)fparams;
  const int64_t* ip = (const int64_t*)iparams;
  const int64_t* ids = (const int64_t*)row_ids;  // the logits row of each draw, or null: row r
  for (int64_t r = 0; r < rows; r++) {
    const RowParams P = unpack(f + r * kF, ip + r * kI);
    if (!(P.temperature >= 0.0) || !(P.top_p > 0.0 && P.top_p <= 1.0) || P.top_k < 0 || P.n_top > max_top)
      throw std::invalid_argument("sample_rows: bad parameters in row " + std::to_string(r));
  }
  const int nth = (int)std::min<int64_t>(rows, pool_max_threads());
  parallel_for(rows, nth, [&](int64_t a, int64_t b, int) {
    for (int64_t r = a; r < b; r++)
      sample_one((const float*)logits + (ids ? ids[r] : r) * stride, V, unpack(f + r * kF, ip + r * kI), (int64_t*)tokens + r,
                 (double*)logprobs + r, (int64_t*)top_ids + r * max_top, (double*)top_lp + r * max_top);
  }, 1);
}

// The filtered distribution of one row: ids (ascending) and probabilities; returns the count.
int64_t filtered_dist(uintptr_t logits, int64_t V, uintptr_t fparams, uintptr_t iparams, uintptr_t ids_out,
                      uintptr_t probs_out) {
  check_shape(1, V, V);
  const RowParams P = unpack((const double*)fparams, (const int64_t*)iparams);
  Scratch& s = scratch();
  const float* x = penalize((const float*)logits, V, P, s);
  int64_t* ids = (int64_t*)ids_out;
  double* probs = (double*)probs_out;
  if (P.temperature <= 0.0) {
    ids[0] = row_argmax(x, V);
    probs[0] = 1.0;
    return 1;
  }
  bool all;
  filter_row(x, V, P, s, &all);
  int64_t n = 0;
  double total = 0;
  if (all) {
    for (int64_t i = 0; i < V; i++)
      if (s.w[i] > 0.f) {
        ids[n] = i;
        probs[n++] = s.w[i];
        total += s.w[i];
      }
  } else if (s.by_rule) {
    for_kept(s.w.data(), V, s.bmax.data(), s.rule, [&](int64_t i, float x) {
      ids[n] = i;
      probs[n++] = x;
      total += x;
    });
  } else {
    for (const auto& k : s.kept) {
      ids[n] = k.first;
      probs[n++] = k.second;
      total += k.second;
    }
  }
  for (int64_t i = 0; i < n; i++) probs[i] /= total;
  return n;
}

double sparse_prob(const int64_t* ids, const double* p, int64_t n, int64_t t) {
  const int64_t* e = std::lower_bound(ids, ids + n, t);
  return e != ids + n && *e == t ? p[e - ids] : 0.0;
}

int64_t draw_sparse(const int64_t* ids, const double* w, int64_t n, double u) {
  double total = 0;
  for (int64_t i = 0; i < n; i++) total += w[i];
  const double t = u * total;
  double cum = 0;
  for (int64_t i = 0; i < n; i++) {
    cum += w[i];
    if (cum > t) return ids[i];
  }
  return n ? ids[n - 1] : 0;
}

// Speculative sampling's step (see the reference's rejection_sample): (token, accepted).
std::pair<int64_t, bool> rejection_sample(uintptr_t p_ids, uintptr_t p_probs, int64_t np, uintptr_t q_ids,
                                          uintptr_t q_probs, int64_t nq, int64_t token, double u_accept,
                                          double u_resample) {
  const int64_t *pi = (const int64_t*)p_ids, *qi = (const int64_t*)q_ids;
  const double *pp = (const double*)p_probs, *qp = (const double*)q_probs;
  if (np <= 0) throw std::invalid_argument("rejection_sample: empty target distribution");
  const double pt = sparse_prob(pi, pp, np, token), qt = sparse_prob(qi, qp, nq, token);
  if (pt > 0 && (qt <= 0 || u_accept * qt < pt)) return {token, true};
  std::vector<int64_t> ids;
  std::vector<double> r;
  int64_t a = 0, b = 0;
  while (a < np || b < nq) {  // merge the sorted id lists: max(p - q, 0)
    int64_t id;
    double v;
    if (b >= nq || (a < np && pi[a] < qi[b])) {
      id = pi[a];
      v = pp[a++];
    } else if (a >= np || qi[b] < pi[a]) {
      id = qi[b];
      v = -qp[b++];
    } else {
      id = pi[a];
      v = pp[a++] - qp[b++];
    }
    if (v > 0) {
      ids.push_back(id);
      r.push_back(v);
    }
  }
  double total = 0;
  for (double v : r) total += v;
  if (!(total > 0)) return {draw_sparse(pi, pp, np, u_resample), false};
  return {draw_sparse(ids.data(), r.data(), (int64_t)ids.size(), u_resample), false};
}

}  // namespace

void register_sampler(py::module_& m) {
  m.def("keyed_uniform", &keyed_uniform, py::arg("seed"), py::arg("position"), py::arg("stream") = 0,
        "A uniform in [0, 1) keyed by (seed as uint64, position, stream).");
  m.def("sample_rows", unlocked(&sample_rows),
        "sample_rows(logits_f32, rows, V, stride, fparams_f64[rows,6], iparams_i64[rows,6], tokens_i64[rows], "
        "logprobs_f64[rows], top_ids_i64[rows,max_top], top_lp_f64[rows,max_top], max_top, row_ids_i64[rows] or 0): "
        "one token per draw r, from logits row row_ids[r] (row r when 0). "
        "fparams: temperature (0 = greedy), top_p, min_p, repetition, presence, frequency penalties; iparams: "
        "top_k, seed, position, counts_f32 addr (or 0), prompt_seen_u8 addr (or 0), n_top (< 0: no log-probs)");
  m.def("filtered_dist", unlocked(&filtered_dist),
        "filtered_dist(logits_f32, V, fparams_f64[6], iparams_i64[6], ids_i64[V], probs_f64[V]) -> n: the row's "
        "sampling distribution (ascending ids)");
  m.def("rejection_sample", &rejection_sample,
        "rejection_sample(p_ids, p_probs, np, q_ids, q_probs, nq, token, u_accept, u_resample) -> (token, accepted)");
}

}  // namespace jisu
