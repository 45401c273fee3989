// Persistent spin-then-sleep thread pool for the kernels. The caller is thread 0 and
// claims chunks like everyone else (see common.h). Idle workers spin on a generation
// counter for a while after each job (a decode step issues ~200 small GEMVs a few
// microseconds apart, and waking a sleeping thread costs tens of microseconds on a VM)
// and then sleep on a futex-backed atomic wait.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <thread>
#include <new>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JISU_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define JISU_PAUSE() __asm__ __volatile__("yield")
#else
#define JISU_PAUSE() ((void)0)
#endif
#ifdef __linux__
#include <sched.h>
#endif
#include <pthread.h>

#include "common.h"

namespace jisu {
namespace {

constexpr uint32_t CLOSED = 1u << 31;

struct alignas(64) Pool {
  std::atomic<uint32_t> gen{0};              // bumped once per job; idle workers wait on it
  alignas(64) std::atomic<uint32_t> state{CLOSED};  // CLOSED bit | workers inside the job
  alignas(64) std::atomic<int64_t> next{0};  // next unclaimed chunk
  alignas(64) std::atomic<int> sleepers{0};
  TaskFn fn = nullptr;
  void* ctx = nullptr;
  int64_t nchunks = 0;
  int nth = 1;                       // threads allowed to take part in the current job
  int target = 0;                    // threads wanted (0: not yet decided)
  int started = 1;                   // threads alive including the caller
  std::atomic<int> spin_us{200};  // bridges the gaps between the GEMVs of a decode step
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
};

Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: workers may outlive static dtors
  return *p;
}

int default_threads() {
  if (const char* e = std::getenv("JISU_NUM_THREADS")) {
    int n = std::atoi(e);
    if (n > 0) return n;
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n ? (int)n : 1;
}

// Claims and runs chunks of the current job until none are left.
inline void run_chunks(Pool& p, int tid) {
  const TaskFn fn = p.fn;
  void* const ctx = p.ctx;
  const int64_t n = p.nchunks;
  for (;;) {
    const int64_t c = p.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= n) return;
    fn(ctx, c, n, tid);
  }
}

void worker_main(int tid, uint32_t seen) {
  // `seen` is the generation at creation: read here it could already include the job
  // that caused this thread to be started.
  Pool& p = pool();
  for (;;) {
    // Spin for spin_us, checking the clock only every 256 pauses, then sleep.
    auto t0 = std::chrono::steady_clock::now();
    const auto spin = std::chrono::microseconds(p.spin_us.load(std::memory_order_relaxed));
    uint32_t g;
    for (int i = 0;; i++) {
      g = p.gen.load(std::memory_order_acquire);
      if (g != seen) break;
      JISU_PAUSE();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - t0 > spin) {
        p.sleepers.fetch_add(1, std::memory_order_seq_cst);
        p.gen.wait(seen, std::memory_order_acquire);
        p.sleepers.fetch_sub(1, std::memory_order_relaxed);
        t0 = std::chrono::steady_clock::now();
      }
    }
    seen = g;
    if (p.stop.load(std::memory_order_acquire)) return;
    // Enter the job only while it is open; the caller waits for everyone inside.
    uint32_t st = p.state.load(std::memory_order_acquire);
    while (!(st & CLOSED)) {
      if (p.state.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) {
        if (tid < p.nth) run_chunks(p, tid);
        p.state.fetch_sub(1, std::memory_order_acq_rel);
        break;
      }
    }
  }
}

void ensure_started(int n) {
  Pool& p = pool();
  while (p.started < n) {
    p.workers.emplace_back(worker_main, p.started, p.gen.load(std::memory_order_acquire));
    p.started++;
  }
}

// After fork() only the forking thread exists in the child: forget the workers.
void after_fork_child() {
  Pool& p = pool();
  // The std::thread objects of the parent's workers must not be destroyed (they are
  // "joinable" but the threads do not exist here): overwrite the vector without
  // running its destructor, leaking its small buffer.
  new (&p.workers) std::vector<std::thread>();
  p.started = 1;
  p.state.store(CLOSED);
  p.sleepers.store(0);
}

struct ForkHook {
  ForkHook() { pthread_atfork(nullptr, nullptr, after_fork_child); }
} fork_hook;

}  // namespace

std::mutex& native_mutex() {
  static std::mutex* m = new std::mutex();  // leaked on purpose, as the pool
  return *m;
}

int pool_max_threads() {
  Pool& p = pool();
  if (p.target == 0) p.target = default_threads();
  return p.target;
}

void pool_set_threads(int n) {
  Pool& p = pool();
  p.target = n > 0 ? n : default_threads();
}

void pool_set_spin_us(int us) { pool().spin_us.store(us < 0 ? 0 : us); }
int pool_get_spin_us() { return pool().spin_us.load(); }

void pool_run(TaskFn fn, void* ctx, int64_t nchunks, int nthreads) {
  if (nchunks <= 0) return;
  if (nthreads <= 1 || nchunks == 1) {
    for (int64_t c = 0; c < nchunks; c++) fn(ctx, c, nchunks, 0);
    return;
  }
  Pool& p = pool();
  ensure_started(nthreads);
  p.fn = fn;
  p.ctx = ctx;
  p.nchunks = nchunks;
  p.nth = nthreads;
  p.next.store(0, std::memory_order_relaxed);
  p.state.store(0, std::memory_order_release);  // open
  p.gen.fetch_add(1, std::memory_order_seq_cst);
  if (p.sleepers.load(std::memory_order_seq_cst) > 0) p.gen.notify_all();
  run_chunks(p, 0);
  // All chunks are claimed: close the job and wait for workers still inside.
  p.state.fetch_or(CLOSED, std::memory_order_acq_rel);
  while ((p.state.load(std::memory_order_acquire) & ~CLOSED) != 0) JISU_PAUSE();
}

}  // namespace jisu
