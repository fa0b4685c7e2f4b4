// The LoRA branch of packed training rows on XLA:CPU, called through jax.ffi
// (ttsi_jax/model/cpu_lora.py).
//
// Why: a packed row holds the tokens of several adapters in blocks of Z tokens, each block with its
// own adapter. XLA runs the per-block rank-R products as batched dots of [Z, in] x [in, R] matrices
// at 4-30 GFLOP/s, and jax.lax.ragged_dot as dense masked dots at about 4 GFLOP/s: the rank-8
// branch cost a CPU step a sixth of its time for 3% of its FLOPs. Here each block is a product
// with its adapter's weights at near matmul speed, and the weight gradients sum the blocks of each
// adapter in one product per run of its blocks.
//
// Three ops, each other's gradients (and wide's two in one pass: WideGrads, below) (g(t): the adapter of token t's block, -1: none, output 0):
//   narrow: out[t, r] = sum_k x[t, k] w[g(t), r, k]     x [..., T, K], w [A, R, K] -> [..., T, R]
//   wide:   out[t, n] = sum_r h[t, r] w[g(t), r, n]     h [..., T, R], w [A, R, N] -> [..., T, N]
//   outer:  out[a, r, n] = sum_{t: g(t) = a} h[t, r] y[t, n]   h [..., T, R], y [..., T, N]
// with block_adapter [..., X] int32 and T = X x Z. Float32 only; K and N multiples of the vector
// width (cpu_lora.supports checks); any rank R (tested down to 1 and odd).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace ttsi_kernels;

inline float Sum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// out[t, r0..r0+RB] = x[t, :] . w[r, :] for tokens t0, t0 + 1 (`pair`): each x vector loaded once
// for RB weight rows.
template <int RB>
inline void NarrowTokens(bool pair, int64_t K, const float* x, const float* w, float* out, int64_t R) {
  vf acc[2][RB];
  for (int r = 0; r < RB; ++r) acc[0][r] = acc[1][r] = vf{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const vf x0 = Load(x + k), x1 = pair ? Load(x + K + k) : vf{};
    for (int r = 0; r < RB; ++r) {
      const vf wv = Load(w + r * K + k);
      acc[0][r] += x0 * wv;
      acc[1][r] += x1 * wv;
    }
  }
  for (int r = 0; r < RB; ++r) {
    float s0 = Sum(acc[0][r]), s1 = Sum(acc[1][r]);
    for (int64_t kk = k; kk < K; ++kk) {
      s0 += x[kk] * w[r * K + kk];
      if (pair) s1 += x[K + kk] * w[r * K + kk];
    }
    out[r] = s0;
    if (pair) out[R + r] = s1;
  }
}

// out[t, r] = x[t, :] . w[r, :] for the Z tokens of one block (x [Z, K], w [R, K], out [Z, R]).
void NarrowBlock(int64_t Z, int64_t K, const float* x, const float* w, int64_t R, float* out) {
  for (int64_t t = 0; t < Z; t += 2) {
    const bool pair = t + 1 < Z;
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
      const float *xt = x + t * K, *wr = w + r0 * K;
      float* ot = out + t * R + r0;
      switch (std::min<int64_t>(8, R - r0)) {
        case 8: NarrowTokens<8>(pair, K, xt, wr, ot, R); break;
        case 7: NarrowTokens<7>(pair, K, xt, wr, ot, R); break;
        case 6: NarrowTokens<6>(pair, K, xt, wr, ot, R); break;
        case 5: NarrowTokens<5>(pair, K, xt, wr, ot, R); break;
        case 4: NarrowTokens<4>(pair, K, xt, wr, ot, R); break;
        case 3: NarrowTokens<3>(pair, K, xt, wr, ot, R); break;
        case 2: NarrowTokens<2>(pair, K, xt, wr, ot, R); break;
        default: NarrowTokens<1>(pair, K, xt, wr, ot, R); break;
      }
    }
  }
}

// Token and block counts of [..., T, C] activations with block adapters [..., X].
struct Blocks {
  int64_t blocks, Z;
};

ffi::Error BlocksOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S32>& block_adapter, Blocks& out) {
  auto xd = x.dimensions();
  auto gd = block_adapter.dimensions();
  if (xd.size() < 2 || gd.size() != xd.size() - 1)
    return ffi::Error::InvalidArgument("lora: x must be [..., T, C] and block_adapter [..., X]");
  for (size_t i = 0; i + 1 < gd.size(); ++i)
    if (gd[i] != xd[i]) return ffi::Error::InvalidArgument("lora: x and block_adapter disagree in shape");
  const int64_t T = xd[xd.size() - 2], X = gd[gd.size() - 1];
  if (X == 0 || T % X) return ffi::Error::InvalidArgument("lora: T must be a whole number of blocks");
  out = Blocks{static_cast<int64_t>(block_adapter.element_count()), T / X};
  return ffi::Error::Success();
}

// Whether `x`'s last axis is `width` and it holds `rows` rows of it: operands of one op agree.
bool Rows(const ffi::Buffer<ffi::F32>& x, int64_t rows, int64_t width) {
  auto d = x.dimensions();
  return d.size() > 0 && d[d.size() - 1] == width && static_cast<int64_t>(x.element_count()) == rows * width;
}

ffi::Error Narrow(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Buffer<ffi::S32> block_adapter, ffi::ResultBuffer<ffi::F32> out) {
  Blocks blocks;
  if (auto error = BlocksOf(x, block_adapter, blocks); error.failure()) return error;
  const auto [num_blocks, Z] = blocks;
  auto wd = w.dimensions();
  if (wd.size() != 3) return ffi::Error::InvalidArgument("lora narrow: w must be [A, R, K]");
  const int64_t A = wd[0], R = wd[1], K = wd[2];
  if (!Rows(x, num_blocks * Z, K)) return ffi::Error::InvalidArgument("lora narrow: x's last axis is not w's K");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  const int32_t* gp = block_adapter.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, num_blocks, [&](int64_t blk) {
    float* o = op + blk * Z * R;
    const int32_t g = gp[blk];
    if (g < 0 || g >= A) {
      std::fill(o, o + Z * R, 0.0f);
      return;
    }
    NarrowBlock(Z, K, xp + blk * Z * K, wp + g * R * K, R, o);
  });
  return ffi::Error::Success();
}

// out = h @ w[g] per block; with `base` (aliased to out by the caller), out = base + h @ w[g].
ffi::Error WideInto(ffi::ThreadPool& pool, const float* base, ffi::Buffer<ffi::F32>& h, ffi::Buffer<ffi::F32>& w,
                    ffi::Buffer<ffi::S32>& block_adapter, float* op) {
  Blocks blocks;
  if (auto error = BlocksOf(h, block_adapter, blocks); error.failure()) return error;
  const auto [num_blocks, Z] = blocks;
  auto wd = w.dimensions();
  if (wd.size() != 3) return ffi::Error::InvalidArgument("lora wide: w must be [A, R, N]");
  const int64_t A = wd[0], R = wd[1], N = wd[2];
  if (N % kLanes) return ffi::Error::InvalidArgument("lora wide: N must be a multiple of the vector width");
  if (!Rows(h, num_blocks * Z, R)) return ffi::Error::InvalidArgument("lora wide: h's last axis is not w's R");
  const float *hp = h.typed_data(), *wp = w.typed_data();
  const int32_t* gp = block_adapter.typed_data();
  ParallelFor(pool, num_blocks, [&](int64_t blk) {
    float* o = op + blk * Z * N;
    if (base != nullptr && base != op) std::copy(base + blk * Z * N, base + (blk + 1) * Z * N, o);
    const int32_t g = gp[blk];
    if (g >= 0 && g < A) {
      Gemm<false>(Z, N, R, hp + blk * Z * R, R, wp + g * R * N, N, o, N, base != nullptr);
    } else if (base == nullptr) {
      std::fill(o, o + Z * N, 0.0f);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Wide(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> w,
                ffi::Buffer<ffi::S32> block_adapter, ffi::ResultBuffer<ffi::F32> out) {
  return WideInto(pool, nullptr, h, w, block_adapter, out->typed_data());
}

ffi::Error WideAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> base, ffi::Buffer<ffi::F32> h,
                   ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> block_adapter,
                   ffi::ResultBuffer<ffi::F32> out) {
  // out (base's shape) takes num_blocks * Z rows of w's N: base must be that size, or the blocks'
  // writes would pass its end.
  auto hd = h.dimensions(), wd = w.dimensions();
  if (hd.size() < 1 || wd.size() != 3 ||
      base.element_count() != h.element_count() / std::max<int64_t>(hd.back(), 1) * wd[2])
    return ffi::Error::InvalidArgument("lora wide: base must be h's rows by w's N");
  return WideInto(pool, base.typed_data(), h, w, block_adapter, out->typed_data());
}

ffi::Error Outer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> y,
                 ffi::Buffer<ffi::S32> block_adapter, ffi::ResultBuffer<ffi::F32> out) {
  Blocks blocks;
  if (auto error = BlocksOf(h, block_adapter, blocks); error.failure()) return error;
  const auto [num_blocks, Z] = blocks;
  auto od = out->dimensions();
  const int64_t A = od[0], R = od[1], N = od[2];
  if (N % kLanes) return ffi::Error::InvalidArgument("lora outer: N must be a multiple of the vector width");
  if (!Rows(h, num_blocks * Z, R) || !Rows(y, num_blocks * Z, N))
    return ffi::Error::InvalidArgument("lora outer: h and y must be [..., T, R] and [..., T, N] of out's R, N");
  const float *hp = h.typed_data(), *yp = y.typed_data();
  const int32_t* gp = block_adapter.typed_data();
  float* op = out->typed_data();
  // Runs of consecutive blocks with one adapter: one product over all their tokens each.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs(A);  // (first block, blocks)
  for (int64_t blk = 0; blk < num_blocks;) {
    int64_t end = blk + 1;
    while (end < num_blocks && gp[end] == gp[blk]) ++end;
    if (gp[blk] >= 0 && gp[blk] < A) runs[gp[blk]].push_back({blk, end - blk});
    blk = end;
  }
  // Tasks: (adapter, chunk of columns); each writes only its own part of out.
  const int64_t chunk = 8 * kLanes, chunks = (N + chunk - 1) / chunk;
  ParallelFor(pool, A * chunks, [&](int64_t task) {
    const int64_t a = task / chunks, j0 = (task % chunks) * chunk, width = std::min(chunk, N - j0);
    float* o = op + a * R * N + j0;
    for (int64_t r = 0; r < R; ++r) std::fill(o + r * N, o + r * N + width, 0.0f);
    for (auto [first, count] : runs[a])
      Gemm<true>(R, width, count * Z, hp + first * Z * R, R, yp + first * Z * N + j0, N, o, N, true);
  });
  return ffi::Error::Success();
}

// wide's gradients in one pass over dout, where narrow and outer would each read all of it:
//   dh[t, r] = sum_n dout[t, n] w[g(t), r, n]           (narrow of dout)
//   dw[a, r, n] = sum_{t: g(t) = a} h[t, r] dout[t, n]  (outer of h and dout)
// Each block's tokens of dout are read from memory once and again from the cache; each block
// adds its part of dw in scratch of its own, summed per adapter at the end.
ffi::Error WideGrads(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::S32> block_adapter,
                     ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dw) {
  Blocks blocks;
  if (auto error = BlocksOf(dout, block_adapter, blocks); error.failure()) return error;
  const auto [num_blocks, Z] = blocks;
  auto wd = w.dimensions();
  if (wd.size() != 3) return ffi::Error::InvalidArgument("lora wide grads: w must be [A, R, N]");
  const int64_t A = wd[0], R = wd[1], N = wd[2];
  if (N % kLanes) return ffi::Error::InvalidArgument("lora wide grads: N must be a multiple of the vector width");
  if (!Rows(h, num_blocks * Z, R) || !Rows(dout, num_blocks * Z, N))
    return ffi::Error::InvalidArgument("lora wide grads: h and dout must be [..., T, R] and [..., T, N] of w's R, N");
  const float *hp = h.typed_data(), *wp = w.typed_data(), *dp = dout.typed_data();
  const int32_t* gp = block_adapter.typed_data();
  float *dhp = dh->typed_data(), *dwp = dw->typed_data();
  const auto parts = Scratch(num_blocks * R * N);
  ParallelFor(pool, num_blocks, [&](int64_t blk) {
    float* o = dhp + blk * Z * R;
    const int32_t g = gp[blk];
    if (g < 0 || g >= A) {
      std::fill(o, o + Z * R, 0.0f);
      return;
    }
    const float* d = dp + blk * Z * N;
    NarrowBlock(Z, N, d, wp + g * R * N, R, o);
    Gemm<true>(R, N, Z, hp + blk * Z * R, R, d, N, parts.get() + blk * R * N, N, false);
  });
  // Tasks (adapter, chunk of columns): the sum of its blocks' parts.
  const int64_t chunk = 8 * kLanes, chunks = (N + chunk - 1) / chunk;
  ParallelFor(pool, A * chunks, [&](int64_t task) {
    const int64_t a = task / chunks, j0 = (task % chunks) * chunk, width = std::min(chunk, N - j0);
    float* out = dwp + a * R * N + j0;
    for (int64_t r = 0; r < R; ++r) std::fill(out + r * N, out + r * N + width, 0.0f);
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      if (gp[blk] != a) continue;
      const float* part = parts.get() + blk * R * N + j0;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < width; j += kLanes) Store(out + r * N + j, Load(out + r * N + j) + Load(part + r * N + j));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define LORA_HANDLER(symbol, fn)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,              \
                                ffi::Ffi::Bind()         \
                                    .Ctx<ffi::ThreadPool>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

LORA_HANDLER(TtsiLoraNarrow, Narrow)
LORA_HANDLER(TtsiLoraWide, Wide)
LORA_HANDLER(TtsiLoraOuter, Outer)

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiLoraWideGrads, WideGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiLoraWideAdd, WideAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// An output that XLA allocates and nobody fills: the stacked per-layer outputs of a layer scan,
// which the scan overwrites layer by layer (see `cpu_kernels.uninitialized_scan_outputs`). The
// index attribute keeps XLA from merging two of them into one buffer.
namespace {
ffi::Error Uninitialized(ffi::Result<ffi::AnyBuffer>, int64_t) { return ffi::Error::Success(); }
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiUninitialized, Uninitialized,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>().Attr<int64_t>("index"));
