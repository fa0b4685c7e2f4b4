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
// w may carry leading dimensions of size 1 (a vmapped call with w unbatched).

#include <algorithm>
#include <cstdint>

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

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> out, bool trans_w) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 2) return ffi::Error::InvalidArgument("matmul: x needs a last axis and w two");
  const int64_t K = xd.back(), M = x.element_count() / std::max<int64_t>(K, 1);
  const int64_t w_rows = wd[wd.size() - 2], w_cols = wd.back();
  if (w.element_count() != w_rows * w_cols)
    return ffi::Error::InvalidArgument("matmul: w's leading dimensions must all be 1 (one w for every row)");
  const int64_t N = trans_w ? w_rows : w_cols;
  if ((trans_w ? w_cols : w_rows) != K) return ffi::Error::InvalidArgument("matmul: x's and w's K differ");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), M / kMinChunkRows));
  const int64_t rows = (M + chunks - 1) / chunks;
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t i0 = chunk * rows, m = std::min(rows, M - i0);
    if (m <= 0) return;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_w ? CblasTrans : CblasNoTrans, m, N, K, 1.0f,
                      xp + i0 * K, K, wp, w_cols, 0.0f, op + i0 * N, N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_w"));
