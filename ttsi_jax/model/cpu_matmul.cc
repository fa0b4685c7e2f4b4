// The frozen linear layers' float32 products on XLA:CPU, called through jax.ffi
// (ttsi_jax/model/cpu_matmul.py): OpenBLAS's sgemm (the `scipy-openblas32` wheel), one call per
// chunk of rows on each of XLA's intra-op threads.
//
// Why: on a training step's shapes ([3072, 576] x [576, 1536] and the like) XLA:CPU's float32 dot
// runs at 300-360 GFLOP/s on the 2-core AVX-512 machine this was measured on, and OpenBLAS's
// sgemm, single-threaded on half the rows from each of the two threads, at 390-420: the linear
// layers are half of a LoRA step's time. OpenBLAS runs with one thread of its own, so it never
// competes with XLA's pool.
//
//   out[m, n] = sum_k x[m, k] w[k, n]         x [..., K], w [K, N] (or [N, K] with trans_w) -> [..., N]
//
// w may carry leading dimensions of size 1 (a vmapped call with w unbatched). `ttsi_matmul_real_rows`
// computes only the rows whose flag in `real` is set (the others, padding, come out as zeros): a
// packed step's rows pad each sequence's last block and the row's bucket.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cblas.h"
#include "cpu_kernels.h"

extern "C" void scipy_openblas_set_num_threads(int);

namespace {

using namespace ttsi_kernels;

// Rows per chunk at least this many: fewer rows repack all of w for little work.
constexpr int64_t kMinChunkRows = 256;

struct OneBlasThread {
  OneBlasThread() { scipy_openblas_set_num_threads(1); }
} one_blas_thread;

// The rows of x to compute, as runs [begin, end): all of them, or those whose `real` flag is set
// (`real` repeats over x's leading axes when it has fewer rows: a vmapped call with it unbatched).
// Gaps shorter than kMinGap rows are computed anyway: each run is one sgemm call that packs all of w.
constexpr int64_t kMinGap = 16;

std::vector<std::pair<int64_t, int64_t>> Runs(int64_t M, const bool* real, int64_t real_rows) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  if (real == nullptr) {
    runs.emplace_back(0, M);
    return runs;
  }
  for (int64_t i = 0; i < M;) {
    while (i < M && !real[i % real_rows]) ++i;
    if (i == M) break;
    int64_t end = i;
    while (end < M && real[end % real_rows]) ++end;
    if (!runs.empty() && i - runs.back().second < kMinGap) {
      runs.back().second = end;
    } else {
      runs.emplace_back(i, end);
    }
    i = end;
  }
  return runs;
}

ffi::Error Matmul(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, const bool* real,
                  int64_t real_rows, ffi::ResultBuffer<ffi::F32>& out, bool trans_w) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 2) return ffi::Error::InvalidArgument("matmul: x needs a last axis and w two");
  const int64_t K = xd.back();
  int64_t M = 1;  // from the dimensions: x.element_count() / K is 0 for K = 0
  for (size_t i = 0; i + 1 < xd.size(); ++i) M *= xd[i];
  const int64_t w_rows = wd[wd.size() - 2], w_cols = wd.back();
  if (w.element_count() != w_rows * w_cols)
    return ffi::Error::InvalidArgument("matmul: w's leading dimensions must all be 1 (one w for every row)");
  const int64_t N = trans_w ? w_rows : w_cols;
  if ((trans_w ? w_cols : w_rows) != K) return ffi::Error::InvalidArgument("matmul: x's and w's K differ");
  if (real != nullptr && (real_rows <= 0 || M % real_rows))
    return ffi::Error::InvalidArgument("matmul: real's rows must be x's rows (or repeat over its leading axes)");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* op = out->typed_data();
  const auto runs = Runs(M, real, real_rows);
  int64_t total = 0;
  for (const auto& [begin, end] : runs) total += end - begin;
  // Each chunk takes an equal share of the runs' rows.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), total / kMinChunkRows));
  const int64_t share = (total + chunks - 1) / chunks;
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    int64_t skip = chunk * share, left = std::min(share, total - skip);
    for (const auto& [begin, end] : runs) {
      if (left <= 0) break;
      if (skip >= end - begin) {
        skip -= end - begin;
        continue;
      }
      const int64_t i0 = begin + skip, m = std::min(left, end - i0);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_w ? CblasTrans : CblasNoTrans, m, N, K, 1.0f,
                        xp + i0 * K, K, wp, w_cols, 0.0f, op + i0 * N, N);
      skip = 0;
      left -= m;
    }
  });
  if (real != nullptr) {  // padding rows, inside the runs' short gaps too, come out as zeros
    for (int64_t i = 0; i < M; ++i)
      if (!real[i % real_rows]) std::fill(op + i * N, op + (i + 1) * N, 0.0f);
  }
  return ffi::Error::Success();
}

ffi::Error AllRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> out, bool trans_w) {
  return Matmul(pool, x, w, nullptr, 0, out, trans_w);
}

ffi::Error RealRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::PRED> real, ffi::ResultBuffer<ffi::F32> out, bool trans_w) {
  return Matmul(pool, x, w, real.typed_data(), real.element_count(), out, trans_w);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiMatmul, AllRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiMatmulRealRows, RealRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_w"));
