// Cross-ISA check in C++: the NEON (on AArch64) or AVX2 / AVX-512 kernels against the scalar ones
// on random packed data, bitwise for the INT formats, RoPE and the half store, and every table
// entry filled. test_cross_isa.py builds it natively, and for AArch64 to run under qemu-aarch64
// when a cross compiler and qemu are installed.
#include "common.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
using namespace jisu;
static uint16_t f2h(float f){ // crude float->half for normal values
  uint32_t b; memcpy(&b,&f,4); uint32_t s=(b>>16)&0x8000; int e=((b>>23)&0xff)-127+15; uint32_t m=(b>>13)&0x3ff; return s|(e<<10)|m; }
static int check(const KernelTable* S, const KernelTable* V);
int main(){
  const KernelTable* S = scalar_table();
  int fails = 0;
  if (neon_table()) fails += check(S, neon_table());
  if (avx2_table()) fails += check(S, avx2_table());
#if defined(__x86_64__)
  if (avx512_table() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni")) fails += check(S, avx512_table());
#endif
  printf("%d failures in all\n", fails); return fails!=0;
}
static int check(const KernelTable* S, const KernelTable* V){
  printf("testing %s vs scalar\n", V->name);
  int fails=0; srand(1);
  int combos[][3]={{4,0,0},{4,1,0},{8,0,0},{8,0,1},{8,1,0},{3,0,0},{3,1,0},{2,0,0},{2,1,0}};
  for(auto& c: combos) for(int64_t G: {32,64,128}) for(int64_t N: {1,3,67}) {
    int bits=c[0], asym=c[1], pc=c[2]; int64_t K=256; if(pc) G=K;
    PackedDesc W; W.kind=KIND_INT; W.bits=bits; W.asym=asym; W.per_channel=pc; W.group=G; W.N=N; W.K=K; W.ntiles=(N+7)/8;
    W.group_bytes=(pc?0:16*(1+asym))+G/32*int_block_bytes(bits); W.tile_bytes=W.group_bytes*(K/G);
    std::vector<uint8_t> data(W.ntiles*W.tile_bytes); for(auto& b: data) b=rand();
    if(!pc) for(int64_t t=0;t<W.ntiles;t++) for(int64_t g=0;g<K/G;g++){ uint16_t* s=(uint16_t*)(data.data()+t*W.tile_bytes+g*W.group_bytes); for(int r=0;r<8*(1+asym);r++) s[r]=f2h((rand()/(float)RAND_MAX+0.1f)*0.01f*(r>=8?-1:1)); }
    std::vector<float> cs(W.ntiles*8); for(auto& v: cs) v=rand()/(float)RAND_MAX;
    W.data=data.data(); W.chan_scale=cs.data();
    for(float refine: {0.f, 1.5f}) for(int64_t M: {1,2,7,11,16}){
      std::vector<float> x(M*K); for(auto& v: x) v=rand()/(float)RAND_MAX-0.5f;
      for(int64_t i=0;i<M*K;i+=97) x[i]*=40.f;  // outlier channels: some blocks get refined
      std::vector<int8_t> q(M*K), q2(M*K); std::vector<float> d(M*K/32), sd(M*K/32), dr(M*K/32), sdr(M*K/32);
      std::vector<int32_t> s(M*K/32), sr(M*K/32); std::vector<int16_t> q16(M*K); std::vector<uint8_t> rf(M*K/32);
      ActQ A; A.K=K; A.refine=refine; A.q=q.data(); A.d=d.data(); A.s=s.data(); A.sd=sd.data(); A.q16=q16.data();
      A.q2=q2.data(); A.rf=rf.data(); A.dr=dr.data(); A.sr=sr.data(); A.sdr=sdr.data();
      std::vector<float> bias(N); for(auto& v: bias) v=rand()/(float)RAND_MAX;
      std::vector<float> o1(M*N), o2(M*N);
      uint8_t* scrp=(uint8_t*)aligned_alloc(64,(gemm_scratch_bytes(W)+64+63)/64*64); struct Fr{uint8_t* p; ~Fr(){free(p);}} fr{scrp};
      S->quantize_act(x.data(),0,M,A,true); S->int_gemm(W,A,M,0,W.ntiles,o1.data(),N,bias.data(),scrp);
      std::vector<int8_t> qs=q, q2s=q2; std::vector<uint8_t> rfs=rf; std::vector<float> drs=dr;
      V->quantize_act(x.data(),0,M,A,true); V->int_gemm(W,A,M,0,W.ntiles,o2.data(),N,bias.data(),scrp);
      int nrf=0; for(auto v: rf) nrf+=v;
      if(refine>0 && nrf==0){ printf("NO REFINED BLOCKS\n"); fails++; }
      if(qs!=q || rfs!=rf || drs!=dr || (refine>0 && q2s!=q2)){ printf("ACT MISMATCH refine=%g M=%ld\n",refine,M); fails++; }
      for(int64_t i=0;i<M*N;i++) if(memcmp(&o1[i],&o2[i],4)){ if(fails<10) printf("MISMATCH bits=%d asym=%d pc=%d G=%ld N=%ld M=%ld refine=%g i=%ld %g %g\n",bits,asym,pc,G,N,M,refine,i,o1[i],o2[i]); fails++; break; }
    }
  }
  // fp32
  for(int64_t K: {5,64,259}) for(int64_t N: {1,7}) for(int64_t M: {1,3}){
    std::vector<float> w(N*K), x(M*K), o1(M*N), o2(M*N); for(auto& v: w) v=rand()/(float)RAND_MAX-0.5f; for(auto& v: x) v=rand()/(float)RAND_MAX-0.5f;
    S->f32_gemm(w.data(),N,K,x.data(),M,0,N,o1.data(),N,nullptr); V->f32_gemm(w.data(),N,K,x.data(),M,0,N,o2.data(),N,nullptr);
    for(int64_t i=0;i<M*N;i++) if(fabsf(o1[i]-o2[i])>1e-5f*K){ printf("F32 MISMATCH K=%ld %g %g\n",K,o1[i],o2[i]); fails++; break; }
  }
  // rope bitwise, rms tolerance
  { int64_t T=3,H=2,D=18; std::vector<float> x(T*H*D), c(T*D/2), s(T*D/2), o1(T*H*D), o2(T*H*D);
    for(auto& v: x) v=rand()/(float)RAND_MAX; for(auto& v: c) v=rand()/(float)RAND_MAX; for(auto& v: s) v=rand()/(float)RAND_MAX;
    S->rope(x.data(),o1.data(),c.data(),s.data(),0,T,H,D); V->rope(x.data(),o2.data(),c.data(),s.data(),0,T,H,D);
    if(memcmp(o1.data(),o2.data(),o1.size()*4)){ printf("ROPE MISMATCH\n"); fails++; }
    std::vector<float> w(D); for(auto& v: w) v=rand()/(float)RAND_MAX;
    S->rms_norm(x.data(),w.data(),o1.data(),0,T*H,D,1e-5f); V->rms_norm(x.data(),w.data(),o2.data(),0,T*H,D,1e-5f);
    for(size_t i=0;i<T*H*D;i++) if(fabsf(o1[i]-o2[i])>1e-5f){ printf("RMS MISMATCH %g %g\n",o1[i],o2[i]); fails++; break; } }
  // every entry of the table is filled (an ISA without its own kernel takes the scalar one)
  if(!V->quantize_act||!V->int_gemm||!V->cb_gemm||!V->f32_gemm||!V->rms_norm||!V->rope||!V->attn_decode||
     !V->attn_paged||!V->silu_mul||!V->gelu_mul||!V->to_half){ printf("TABLE ENTRY MISSING\n"); fails++; }
  // half store bitwise, SiLU tolerance
  { std::vector<float> x(1003); for(auto& v: x) v=(rand()/(float)RAND_MAX-0.5f)*expf((rand()/(float)RAND_MAX-0.5f)*30.f);
    x[0]=70000.f; x[1]=-1e-7f; x[2]=INFINITY; x[3]=NAN;
    std::vector<uint16_t> h1(x.size()), h2(x.size()); S->to_half(x.data(),h1.data(),x.size()); V->to_half(x.data(),h2.data(),x.size());
    if(h1!=h2){ printf("TO_HALF MISMATCH\n"); fails++; }
    std::vector<float> u(x.size()), o1(x.size()), o2(x.size()); for(size_t i=0;i<x.size();i++){ x[i]=fmaxf(-80.f,fminf(80.f,x[i])); u[i]=rand()/(float)RAND_MAX; }
    S->silu_mul(x.data(),u.data(),o1.data(),x.size()); V->silu_mul(x.data(),u.data(),o2.data(),x.size());
    for(size_t i=0;i<x.size();i++) if(fabsf(o1[i]-o2[i])>1e-6f*(1.f+fabsf(o1[i]))){ printf("SILU MISMATCH %g %g\n",o1[i],o2[i]); fails++; break; }
    S->gelu_mul(x.data(),u.data(),o1.data(),x.size()); V->gelu_mul(x.data(),u.data(),o2.data(),x.size());
    for(size_t i=0;i<x.size();i++) if(fabsf(o1[i]-o2[i])>1e-6f*(1.f+fabsf(o1[i]))){ printf("GELU MISMATCH %g %g\n",o1[i],o2[i]); fails++; break; } }
  // paged attention (block size 3, a shuffled block table, fp32 and half caches, a window, soft-capping), tolerance
  for(int64_t D: {16,20,24,64}) for(int half: {0,1}) for(int64_t lo: {0,5}) for(float cap: {0.f,0.2f}) {
    const int64_t bs=3, Hkv=2, nblk=8, G=3, hi=17, n=hi-lo+1; std::vector<int32_t> table={5,2,7,0,3,6,1,4};
    std::vector<float> kf(nblk*Hkv*bs*D), vf(kf.size()); for(auto& v: kf) v=rand()/(float)RAND_MAX-0.5f; for(auto& v: vf) v=rand()/(float)RAND_MAX-0.5f;
    std::vector<uint16_t> kh(kf.size()), vh(kf.size()); S->to_half(kf.data(),kh.data(),kf.size()); S->to_half(vf.data(),vh.data(),vf.size());
    std::vector<float> q(G*D), o1(G*D), o2(G*D), sc(G*n+2*n+32); for(auto& v: q) v=rand()/(float)RAND_MAX-0.5f;
    PagedAttn a; a.kc=half?(const void*)kh.data():kf.data(); a.vc=half?(const void*)vh.data():vf.data(); a.table=table.data();
    a.bs=bs; a.Hkv=Hkv; a.D=D; a.hk=1; a.lo=lo; a.hi=hi; a.scale=0.3f; a.half=half; a.softcap=cap;
    S->attn_paged(a,q.data(),o1.data(),G,sc.data()); V->attn_paged(a,q.data(),o2.data(),G,sc.data());
    for(int64_t i=0;i<G*D;i++) if(fabsf(o1[i]-o2[i])>1e-5f){ printf("ATTN_PAGED MISMATCH D=%ld half=%d cap=%g %g %g\n",D,half,cap,o1[i],o2[i]); fails++; break; } }
  printf("%d failures\n", fails); return fails;
}
