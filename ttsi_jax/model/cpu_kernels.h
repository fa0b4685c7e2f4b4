// What the C++ CPU kernels share (cpu_attention.cc, cpu_lora.cc, cpu_matmul.cc): vectors of floats, a
// register-blocked float32 GEMM and a parallel loop on XLA's intra-op thread pool.

#ifndef TTSI_JAX_MODEL_CPU_KERNELS_H_
#define TTSI_JAX_MODEL_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ttsi_kernels {

namespace ffi = xla::ffi;

// One vector register of floats: 16 lanes where the compiler may use AVX-512 (-march=native on
// such a CPU), else 8 (AVX2). GEMM blocks: 2 x kRows accumulators of AVX-512's 32 registers, or
// 12 accumulators, 2 B vectors and a broadcast in AVX2's 16.
#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kRows = 8;
#else
constexpr int kLanes = 8;
constexpr int kRows = 6;
#endif
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef float vf __attribute__((vector_size(4 * kLanes)));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// n floats that nobody zero-fills: for scratch a kernel writes in full before it reads.
inline std::unique_ptr<float[]> Scratch(size_t n) { return std::unique_ptr<float[]>(new float[n]); }
// Rows i..i+M of C[:, j..j+V x kLanes] (+)= A B over the whole K loop, in registers.
template <int M, int V, bool kTransA>
inline void GemmBlock(int64_t i, int64_t j, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  vf c[M][V];
  for (int r = 0; r < M; ++r)
    for (int u = 0; u < V; ++u) c[r][u] = accumulate ? Load(C + (i + r) * ldc + j + u * kLanes) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[V];
    for (int u = 0; u < V; ++u) b[u] = Load(B + k * ldb + j + u * kLanes);
    for (int r = 0; r < M; ++r) {
      const float a = kTransA ? A[k * lda + i + r] : A[(i + r) * lda + k];
      for (int u = 0; u < V; ++u) c[r][u] += a * b[u];
    }
  }
  for (int r = 0; r < M; ++r)
    for (int u = 0; u < V; ++u) Store(C + (i + r) * ldc + j + u * kLanes, c[r][u]);
}

template <int V, bool kTransA>
void GemmColumns(int64_t M, int64_t j, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) GemmBlock<kRows, V, kTransA>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
  for (; i + 2 <= M; i += 2) GemmBlock<2, V, kTransA>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
  for (; i < M; ++i) GemmBlock<1, V, kTransA>(i, j, K, A, lda, B, ldb, C, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] B[K, N] (A stored [K, M] when kTransA), row-major; N % kLanes == 0.
template <bool kTransA>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= N; j += 2 * kLanes) GemmColumns<2, kTransA>(M, j, K, A, lda, B, ldb, C, ldc, accumulate);
  for (; j + kLanes <= N; j += kLanes) GemmColumns<1, kTransA>(M, j, K, A, lda, B, ldb, C, ldc, accumulate);
}

// Runs fn(0..n-1) on the calling thread and the pool's threads. Helpers that start after the
// work is gone touch only the shared counters.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = n;
  state->fn = &fn;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.total;) {
      (*s.fn)(i);
      if (s.done.fetch_add(1) + 1 == s.total) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), n) - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work]() { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->total; });
}

}  // namespace ttsi_kernels

#endif  // TTSI_JAX_MODEL_CPU_KERNELS_H_
