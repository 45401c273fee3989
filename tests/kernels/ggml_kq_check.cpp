// K-quant GGML kernels (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) of each SIMD table (NEON on AArch64, AVX2 and
// AVX-512 on x86) against the scalar reference, bitwise, on random super-blocks: M = 1 and M > 1, refined
// activation blocks off, some and all, row splits, a bias, and activations at the int8 / residual extremes.
// test_ggml_kq.py builds it natively and for AArch64 (run under qemu-aarch64).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"
#include "ggml_kq.h"
using namespace jisu;

static uint16_t f2h(float f) {  // float -> half for normal values
  uint32_t b;
  memcpy(&b, &f, 4);
  const uint32_t s = (b >> 16) & 0x8000, m = (b >> 13) & 0x3ff;
  const int e = ((b >> 23) & 0xff) - 127 + 15;
  return (uint16_t)(s | (e << 10) | m);
}

struct Case {
  int gtype, bytes, nf, f[2];
};
static const Case CASES[] = {{GG_Q2_K, 84, 2, {80, 82}}, {GG_Q3_K, 110, 1, {108}}, {GG_Q4_K, 144, 2, {0, 2}},
                             {GG_Q5_K, 176, 2, {0, 2}}, {GG_Q6_K, 210, 1, {208}}, {GG_IQ4_XS, 136, 1, {0}}};

static int check(const KernelTable* S, const KernelTable* V) {
  printf("testing %s vs scalar\n", V->name);
  int fails = 0;
  srand(7);
  for (const Case& c : CASES)
    for (int64_t K : {256, 768})
      for (int64_t N : {1, 9, 13}) {
        PackedDesc W;
        W.kind = KIND_GGML, W.gtype = c.gtype, W.N = N, W.K = K, W.row_bytes = K / 256 * c.bytes;
        std::vector<uint8_t> data(N * W.row_bytes);
        for (auto& b : data) b = (uint8_t)rand();
        for (int64_t sb = 0; sb < N * K / 256; sb++)
          for (int j = 0; j < c.nf; j++) {
            const uint16_t h = f2h((rand() / (float)RAND_MAX + 0.1f) * 0.01f);
            memcpy(&data[sb * c.bytes + c.f[j]], &h, 2);
          }
        W.data = data.data();
        for (int mode = 0; mode < 4; mode++)  // refine off, some blocks, every block, extreme codes
          for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 19}) {
            const float refine = mode == 0 ? 0.f : mode == 1 ? 1.5f : 1e-6f;
            std::vector<float> x(M * K);
            for (auto& v : x) v = rand() / (float)RAND_MAX - 0.5f;
            for (int64_t i = 0; i < M * K; i += 97) x[i] *= 40.f;
            std::vector<int8_t> q(M * K), q2(M * K);
            std::vector<float> d(M * K / 32), sd(M * K / 32), dr(M * K / 32), sdr(M * K / 32);
            std::vector<int32_t> s(M * K / 32), sr(M * K / 32);
            std::vector<int16_t> q16(M * K);
            std::vector<uint8_t> rf(M * K / 32);
            ActQ A;
            A.K = K, A.refine = refine, A.q = q.data(), A.d = d.data(), A.s = s.data(), A.sd = sd.data();
            A.q16 = q16.data(), A.q2 = q2.data(), A.rf = rf.data(), A.dr = dr.data(), A.sr = sr.data();
            A.sdr = sdr.data();
            S->quantize_act(x.data(), 0, M, A, false);
            if (mode == 3) {  // largest magnitudes the integer sums must carry (sr kept the blocks' sums)
              for (int64_t i = 0; i < M * K; i++)
                q[i] = (i / 64) % 2 ? 127 : -127, q2[i] = rf[i / 32] ? ((i / 32) % 2 ? 64 : -64) : 0;
              for (int64_t i = 0; i < M * K / 32; i++) {
                int32_t a = 0, a2 = 0;
                for (int j = 0; j < 32; j++) a += q[32 * i + j], a2 += q2[32 * i + j];
                sr[i] = rf[i] ? 128 * a + a2 : a;
              }
            }
            std::vector<float> bias(N), o1(M * N), o2(M * N, -1.f);
            for (auto& v : bias) v = rand() / (float)RAND_MAX;
            const float* bp = M == 2 ? nullptr : bias.data();
            S->gg_gemm(W, x.data(), A, M, 0, N, o1.data(), N, bp);
            const int64_t cut = N / 2;  // two calls, as a thread split does
            V->gg_gemm(W, x.data(), A, M, 0, cut, o2.data(), N, bp);
            V->gg_gemm(W, x.data(), A, M, cut, N, o2.data(), N, bp);
            for (int64_t i = 0; i < M * N; i++)
              if (memcmp(&o1[i], &o2[i], 4)) {
                if (fails < 10)
                  printf("MISMATCH gtype=%d K=%ld N=%ld M=%ld mode=%d i=%ld %.9g %.9g\n", c.gtype, (long)K, (long)N,
                         (long)M, mode, (long)i, o1[i], o2[i]);
                fails++;
                break;
              }
          }
      }
  return fails;
}

int main() {
  const KernelTable* S = scalar_table();
  int fails = 0;
  for (const Case& c : CASES)
    if (!kq_has(c.gtype)) printf("type %d has no kernel\n", c.gtype), fails++;
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
