// The GGML kind's Q5_0, Q5_1, IQ4_NL, F16 and BF16 kernels of each ISA compiled here (AVX2, AVX-512 on
// x86; NEON on AArch64, run under qemu) against the scalar reference, bitwise: random blocks, activations
// with outlier channels (refinement off, sparse and dense), several M, N not a multiple of 8 and split
// row ranges; also the batch invariance of each ISA (a row of M > 1 equals the same row alone).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"
#include "ggml_q32.h"
using namespace jisu;

static float frand() { return rand() / (float)RAND_MAX; }

// Random rows of a type: random bytes, 16-bit scale fields set to sane values, finite 16-bit floats.
static std::vector<uint8_t> random_rows(int gtype, int64_t N, int64_t K, int64_t rb) {
  std::vector<uint8_t> d(N * rb + 64);
  for (auto& b : d) b = rand();
  for (int64_t n = 0; n < N; n++) {
    uint8_t* row = d.data() + n * rb;
    if (gtype == GG_F16 || gtype == GG_BF16) {
      for (int64_t k = 0; k < K; k++) {
        const float v = (frand() - 0.5f) * 4.f;
        uint16_t h;
        if (gtype == GG_F16) {
          h = f32_to_f16(v);
        } else {
          uint32_t u;
          memcpy(&u, &v, 4);
          h = (uint16_t)(u >> 16);
        }
        memcpy(row + 2 * k, &h, 2);
      }
      continue;
    }
    const int64_t bb = gtype == GG_Q5_0 ? 22 : gtype == GG_Q5_1 ? 24 : 18;
    for (int64_t b = 0; b < K / 32; b++) {
      const uint16_t s = f32_to_f16((frand() + 0.05f) * 0.02f), m = f32_to_f16(-(frand() + 0.05f) * 0.2f);
      memcpy(row + b * bb, &s, 2);
      if (gtype == GG_Q5_1) memcpy(row + b * bb + 2, &m, 2);
    }
  }
  return d;
}

struct Act {
  std::vector<int8_t> q, q2;
  std::vector<float> d, sd, dr, sdr;
  std::vector<int32_t> s, sr;
  std::vector<int16_t> q16;
  std::vector<uint8_t> rf;
  ActQ A;
  Act(int64_t M, int64_t K, float refine)
      : q(M * K), q2(M * K), d(M * K / 32 + 1), sd(M * K / 32 + 1), dr(M * K / 32 + 1), sdr(M * K / 32 + 1),
        s(M * K / 32 + 1), sr(M * K / 32 + 1), q16(M * K), rf(M * K / 32 + 1) {
    A.K = K; A.refine = refine; A.q = q.data(); A.d = d.data(); A.s = s.data(); A.sd = sd.data();
    A.q16 = q16.data(); A.q2 = q2.data(); A.rf = rf.data(); A.dr = dr.data(); A.sr = sr.data(); A.sdr = sdr.data();
  }
};

static int check(const KernelTable* S, const KernelTable* V) {
  printf("testing %s vs scalar\n", V->name);
  int fails = 0;
  srand(7);
  const int types[] = {GG_Q5_0, GG_Q5_1, GG_IQ4_NL, GG_F16, GG_BF16};
  for (int gtype : types) {
    if (!q32_has(gtype)) { printf("type %d not run\n", gtype); fails++; continue; }
    const bool quant = gg_quantized(gtype);
    for (int64_t K : {32, 256, 352, 1024}) for (int64_t K2 : {0, 3}) for (int64_t N : {1, 5, 13, 67}) {
      const int64_t KK = quant ? K : K + K2;
      if (quant && K2) continue;
      PackedDesc W;
      W.kind = KIND_GGML; W.gtype = gtype; W.N = N; W.K = KK; W.row_bytes = gg_row_bytes(gtype, KK);
      std::vector<uint8_t> data = random_rows(gtype, N, KK, W.row_bytes);
      W.data = data.data();
      std::vector<float> bias(N);
      for (auto& v : bias) v = frand();
      for (float refine : {0.f, 1.5f, 0.5f}) {
        if (!quant && refine > 0.f) continue;
        for (int64_t M : {1, 2, 3, 4, 5, 7, 8, 9}) {
          std::vector<float> x(M * KK);
          for (auto& v : x) v = frand() - 0.5f;
          for (int64_t i = 0; i < M * KK; i += 37) x[i] *= 40.f;  // outlier channels
          Act a(M, KK, refine);
          if (quant) S->quantize_act(x.data(), 0, M, a.A, false);
          std::vector<float> o1(M * N), o2(M * N, NAN), o3(M * N, NAN);
          S->gg_gemm(W, x.data(), a.A, M, 0, N, o1.data(), N, bias.data());
          V->gg_gemm(W, x.data(), a.A, M, 0, N, o2.data(), N, bias.data());
          const int64_t cut = N > 8 ? 8 : N;  // the same rows in two ranges
          V->gg_gemm(W, x.data(), a.A, M, 0, cut, o3.data(), N, nullptr);
          if (cut < N) V->gg_gemm(W, x.data(), a.A, M, cut, N, o3.data(), N, bias.data());
          for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < cut; n++) o3[m * N + n] += bias[n];
          for (int64_t i = 0; i < M * N; i++) {
            const bool bad = memcmp(&o1[i], &o2[i], 4) != 0;
            const bool bad3 = i % N >= cut && memcmp(&o1[i], &o3[i], 4) != 0;
            if (bad || bad3) {
              if (fails < 10)
                printf("MISMATCH type=%d K=%ld N=%ld M=%ld refine=%g i=%ld scalar %.9g %s %.9g split %.9g\n", gtype,
                       (long)KK, (long)N, (long)M, refine, (long)i, o1[i], V->name, o2[i], o3[i]);
              fails++;
              break;
            }
          }
          // batch invariance: each row alone
          for (int64_t m = 0; m < M && M > 1; m++) {
            Act a1(1, KK, refine);
            if (quant) S->quantize_act(x.data() + m * KK, 0, 1, a1.A, false);
            std::vector<float> o4(N);
            V->gg_gemm(W, x.data() + m * KK, a1.A, 1, 0, N, o4.data(), N, bias.data());
            if (memcmp(o4.data(), o2.data() + m * N, 4 * N)) {
              if (fails < 10) printf("BATCH MISMATCH type=%d K=%ld N=%ld M=%ld m=%ld\n", gtype, (long)KK, (long)N, (long)M, (long)m);
              fails++;
              break;
            }
          }
        }
      }
    }
  }
  // the reference itself against the dequantized rows (float64 sums of dequantized weights times
  // the activations the kernels see)
  for (int gtype : types) {
    const int64_t K = 256, N = 9, M = 3;
    const bool quant = gg_quantized(gtype);
    PackedDesc W;
    W.kind = KIND_GGML; W.gtype = gtype; W.N = N; W.K = K; W.row_bytes = gg_row_bytes(gtype, K);
    std::vector<uint8_t> data = random_rows(gtype, N, K, W.row_bytes);
    W.data = data.data();
    std::vector<float> x(M * K), w(K), o(M * N);
    for (auto& v : x) v = frand() - 0.5f;
    Act a(M, K, 0.f);
    if (quant) S->quantize_act(x.data(), 0, M, a.A, false);
    S->gg_gemm(W, x.data(), a.A, M, 0, N, o.data(), N, nullptr);
    for (int64_t n = 0; n < N; n++) {
      q32_dequant_row(gtype, W.data + n * W.row_bytes, K, w.data());
      for (int64_t m = 0; m < M; m++) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; k++) {
          const double xv = quant ? (double)a.d[m * K / 32 + k / 32] * a.q[m * K + k] : x[m * K + k];
          ref += (double)w[k] * xv;
          mag += fabs((double)w[k] * xv);
        }
        if (fabs(ref - o[m * N + n]) > 1e-5 * mag + 1e-6) {
          if (fails < 10) printf("REFERENCE type=%d n=%ld m=%ld %g vs %g\n", gtype, (long)n, (long)m, o[m * N + n], ref);
          fails++;
        }
      }
    }
  }
  return fails;
}

int main() {
  const KernelTable* S = scalar_table();
  int fails = 0;
  if (neon_table()) fails += check(S, neon_table());
  if (avx2_table()) fails += check(S, avx2_table());
#if defined(__x86_64__)
  if (avx512_table() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    fails += check(S, avx512_table());
#endif
  printf("%d failures in all\n", fails);
  return fails != 0;
}
