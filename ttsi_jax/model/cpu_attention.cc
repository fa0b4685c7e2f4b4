// Fused causal self-attention for XLA:CPU, forward and backward, called through jax.ffi
// (ttsi_jax/model/cpu_attention.py builds and registers it).
//
// Why: XLA:CPU has no fused attention. Its [T, S] softmax runs on one core and its batched score
// dots run far below matmul speed, so attention cost a training step more than all its linear
// layers. This kernel works in 64 x 64 tiles (flash attention: an online softmax, nothing [T, S]
// kept), skips the tiles that causality or the segments mask out, and spreads (sequence row,
// head, tile) tasks over XLA's intra-op thread pool.
//
// Layout: q [..., T, N, H], k and v [..., T, K, H] (N = G x K grouped query heads), segments
// [..., T] int32. Query i sees key j when j <= i, segments[j] >= 0 and segments[i] ==
// segments[j]: each segment is a contiguous sequence, -1 marks padding. Float32 only; H a multiple
// of 16.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
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

constexpr int kTile = 64;  // a multiple of kLanes, as are H and the GEMM blocks

// exp(x) to about 2 ulp (Cephes' polynomial), a vector at a time.
inline vf ExpV(vf x) {
  const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f, magic = vf{} + 12582912.0f;  // 1.5 x 2^23
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf n = (x * 1.44269504088896341f + magic) - magic;  // round to nearest
  vf g = x - n * 0.693359375f;
  g -= n * -2.12194440e-4f;
  vf y = vf{} + 1.9875691500e-4f;
  y = y * g + 1.3981999507e-3f;
  y = y * g + 8.3334519073e-3f;
  y = y * g + 4.1665795894e-2f;
  y = y * g + 1.6666665459e-1f;
  y = y * g + 5.0000001201e-1f;
  y = y * g * g + g + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// row[j] = exp(row[j] - shift) (x mask[j] unless mask is null), for j < kTile; returns the sum.
inline float ExpRow(float* row, float shift, const float* mask) {
  vf sum = vf{};
  for (int j = 0; j < kTile; j += kLanes) {
    vf p = ExpV(Load(row + j) - shift);
    if (mask) p *= Load(mask + j);
    Store(row + j, p);
    sum += p;
  }
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  return total;
}

// The largest row[j] (where mask[j] > 0, unless mask is null), at least `floor`.
inline float RowMax(const float* row, const float* mask, float floor) {
  vf top = vf{} + floor;
  for (int j = 0; j < kTile; j += kLanes) {
    vf x = Load(row + j);
    if (mask) x = Load(mask + j) > 0 ? x : vf{} - 1e30f;
    top = x > top ? x : top;
  }
  float out = floor;
  for (int i = 0; i < kLanes; ++i) out = std::max(out, top[i]);
  return out;
}

inline float Exp(float x) { return ExpV(vf{} + x)[0]; }

struct Dims {
  int64_t rows, T, N, K, H, G, tiles;
};

// The segments a tile holds (lo > hi: none) and whether all its tokens are real.
struct TileSegments {
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  bool full = true;
};

std::vector<TileSegments> Summarize(const int32_t* seg, const Dims& d) {
  std::vector<TileSegments> out(d.rows * d.tiles);
  for (int64_t b = 0; b < d.rows; ++b)
    for (int64_t t = 0; t < d.tiles; ++t) {
      TileSegments& s = out[b * d.tiles + t];
      for (int64_t i = t * kTile; i < (t + 1) * kTile; ++i) {
        const int32_t v = i < d.T ? seg[b * d.T + i] : -1;
        if (v < 0) {
          s.full = false;
        } else {
          s.lo = std::min(s.lo, v);
          s.hi = std::max(s.hi, v);
        }
      }
    }
  return out;
}

enum class Pair { kSkip, kDense, kMasked };

Pair Classify(const TileSegments& q, const TileSegments& k, int64_t qt, int64_t kt) {
  if (kt > qt || q.lo > q.hi || k.lo > k.hi || q.hi < k.lo || k.hi < q.lo) return Pair::kSkip;
  if (kt < qt && q.full && k.full && q.lo == q.hi && k.lo == k.hi) return Pair::kDense;
  return Pair::kMasked;
}

// mask[i, j] = 1 where query t0 + i sees key s0 + j.
void Mask(const int32_t* seg, const Dims& d, int64_t t0, int64_t s0, float* mask) {
  for (int i = 0; i < kTile; ++i) {
    const int64_t t = t0 + i;
    const int32_t qs = t < d.T ? seg[t] : -1;
    for (int j = 0; j < kTile; ++j) {
      const int64_t s = s0 + j;
      mask[i * kTile + j] = (qs >= 0 && s <= t && s < d.T && seg[s] == qs) ? 1.0f : 0.0f;
    }
  }
}

// out [rows, heads, Tp, H] = x [rows, T, heads, H] x scale, zero-padded to Tp = tiles x kTile;
// `transpose`: [rows, heads, tiles, H, kTile], each tile transposed on its own (a [H, Tp] layout
// would put a tile's rows Tp floats apart, where they evict each other from the cache).
void HeadMajor(ffi::ThreadPool& pool, const float* x, const Dims& d, int64_t heads, float scale,
               bool transpose, float* out) {
  const int64_t H = d.H, Tp = d.tiles * kTile;
  ParallelFor(pool, d.rows * heads, [&](int64_t task) {
    const int64_t b = task / heads, n = task % heads;
    float* o = out + task * Tp * H;
    for (int64_t t = 0; t < Tp; ++t) {
      const float* in = x + ((b * d.T + t) * heads + n) * H;
      for (int64_t h = 0; h < H; ++h) {
        const float value = t < d.T ? in[h] * scale : 0.0f;
        (transpose ? o[((t / kTile) * H + h) * kTile + t % kTile] : o[t * H + h]) = value;
      }
    }
  });
}

Dims DimsOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t r = qd.size();
  Dims d;
  d.T = qd[r - 3];
  d.N = qd[r - 2];
  d.H = qd[r - 1];
  d.K = kd[r - 2];
  d.G = d.N / d.K;
  d.rows = 1;
  for (int64_t i = 0; i + 3 < r; ++i) d.rows *= qd[i];
  d.tiles = (d.T + kTile - 1) / kTile;
  return d;
}

ffi::Error Check(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                 ffi::Buffer<ffi::S32>& seg) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  const size_t r = qd.size();
  if (r < 3 || kd.size() != r || vd.size() != r || sd.size() != r - 2)
    return ffi::Error::InvalidArgument("attention: q, k, v must be [..., T, heads, H], segments [..., T]");
  for (size_t i = 0; i < r; ++i)
    if (kd[i] != vd[i] || (i != r - 2 && kd[i] != qd[i]) || (i < r - 2 && sd[i] != qd[i]))
      return ffi::Error::InvalidArgument("attention: q, k, v and segments disagree in shape");
  if (qd[r - 2] % kd[r - 2] != 0 || qd[r - 1] % 16 != 0)
    return ffi::Error::InvalidArgument("attention: heads must group evenly and H be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (auto error = Check(q, k, v, seg); error.failure()) return error;
  const Dims d = DimsOf(q, k);
  const int64_t H = d.H, Tp = d.tiles * kTile;
  const auto tiles = Summarize(seg.typed_data(), d);
  std::vector<float> qh(d.rows * d.N * Tp * H), kT(d.rows * d.K * H * Tp), vh(d.rows * d.K * Tp * H);
  HeadMajor(pool, q.typed_data(), d, d.N, 1.0f / std::sqrt(static_cast<float>(H)), false, qh.data());
  HeadMajor(pool, k.typed_data(), d, d.K, 1.0f, true, kT.data());
  HeadMajor(pool, v.typed_data(), d, d.K, 1.0f, false, vh.data());
  const int32_t* sp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  // Tasks (row, head, query tile), the longest (last tiles) first.
  ParallelFor(pool, d.rows * d.N * d.tiles, [&](int64_t task) {
    const int64_t qt = d.tiles - 1 - task % d.tiles, n = (task / d.tiles) % d.N,
                  b = task / (d.tiles * d.N), kh = b * d.K + n / d.G, t0 = qt * kTile;
    const float* qs = qh.data() + ((b * d.N + n) * Tp + t0) * H;
    std::vector<float> s(kTile * kTile), mask(kTile * kTile), acc(kTile * H, 0.0f), m(kTile, -1e30f),
        l(kTile, 0.0f);
    for (int64_t kt = 0; kt <= qt; ++kt) {
      const Pair pair = Classify(tiles[b * d.tiles + qt], tiles[b * d.tiles + kt], qt, kt);
      if (pair == Pair::kSkip) continue;
      const int64_t s0 = kt * kTile;
      Gemm<false>(kTile, kTile, H, qs, H, kT.data() + (kh * Tp + s0) * H, kTile, s.data(), kTile, false);
      const bool masked = pair == Pair::kMasked;
      if (masked) Mask(sp + b * d.T, d, t0, s0, mask.data());
      for (int i = 0; i < kTile; ++i) {
        float* row = s.data() + i * kTile;
        const float* mrow = masked ? mask.data() + i * kTile : nullptr;
        const float top = RowMax(row, mrow, m[i]);
        const float correction = Exp(m[i] - top);
        m[i] = top;
        l[i] = l[i] * correction + ExpRow(row, top, mrow);
        float* a = acc.data() + i * H;
        for (int64_t h = 0; h < H; ++h) a[h] *= correction;
      }
      Gemm<false>(kTile, H, kTile, s.data(), kTile, vh.data() + (kh * Tp + s0) * H, H, acc.data(), H, true);
    }
    for (int i = 0; i < kTile && t0 + i < d.T; ++i) {
      const int64_t t = t0 + i;
      float* o = op + ((b * d.T + t) * d.N + n) * H;
      const float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
      for (int64_t h = 0; h < H; ++h) o[h] = acc[i * H + h] * inv;
      // A query that sees no key (padding) gets a huge lse: its probabilities are all 0.
      lp[(b * d.N + n) * d.T + t] = l[i] > 0 ? m[i] + std::log(l[i]) : 1e30f;
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  if (auto error = Check(q, k, v, seg); error.failure()) return error;
  const Dims d = DimsOf(q, k);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const int64_t H = d.H, Tp = d.tiles * kTile, heads = d.rows * d.N;
  const auto tiles = Summarize(seg.typed_data(), d);
  std::vector<float> qh(heads * Tp * H), doh(heads * Tp * H), kh(d.rows * d.K * Tp * H),
      kT(d.rows * d.K * H * Tp), vT(d.rows * d.K * H * Tp), delta(heads * Tp), lse_p(heads * Tp);
  HeadMajor(pool, q.typed_data(), d, d.N, scale, false, qh.data());
  HeadMajor(pool, dout.typed_data(), d, d.N, 1.0f, false, doh.data());
  HeadMajor(pool, k.typed_data(), d, d.K, 1.0f, false, kh.data());
  HeadMajor(pool, k.typed_data(), d, d.K, 1.0f, true, kT.data());
  HeadMajor(pool, v.typed_data(), d, d.K, 1.0f, true, vT.data());
  // delta = rowsum(dout * out); the log-sum-exp padded like the tiles.
  const float *op = out.typed_data(), *dop = dout.typed_data(), *lp = lse.typed_data();
  ParallelFor(pool, heads, [&](int64_t bn) {
    const int64_t b = bn / d.N, n = bn % d.N;
    for (int64_t t = 0; t < Tp; ++t) {
      float sum = 0.0f;
      if (t < d.T) {
        const int64_t at = ((b * d.T + t) * d.N + n) * H;
        for (int64_t h = 0; h < H; ++h) sum += dop[at + h] * op[at + h];
      }
      delta[bn * Tp + t] = sum;
      lse_p[bn * Tp + t] = t < d.T ? lp[bn * d.T + t] : 1e30f;
    }
  });
  // Each (row, head) splits its key tiles over `parts` tasks; each part keeps its own dq.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(d.tiles, (4 * workers + heads - 1) / heads));
  std::vector<float> dq_parts(heads * parts * Tp * H, 0.0f), dk_heads(heads * Tp * H),
      dv_heads(heads * Tp * H);
  const int32_t* sp = seg.typed_data();
  ParallelFor(pool, heads * parts, [&](int64_t task) {
    const int64_t part = task % parts, bn = task / parts, b = bn / d.N, kv = b * d.K + (bn % d.N) / d.G;
    float* dqp = dq_parts.data() + task * Tp * H;
    std::vector<float> p(kTile * kTile), ds(kTile * kTile), mask(kTile * kTile);
    for (int64_t kt = part; kt < d.tiles; kt += parts) {
      const int64_t s0 = kt * kTile;
      float* dka = dk_heads.data() + (bn * Tp + s0) * H;
      float* dva = dv_heads.data() + (bn * Tp + s0) * H;
      std::fill(dka, dka + kTile * H, 0.0f);
      std::fill(dva, dva + kTile * H, 0.0f);
      const float *ks = kh.data() + (kv * Tp + s0) * H, *kTs = kT.data() + (kv * Tp + s0) * H,
                  *vTs = vT.data() + (kv * Tp + s0) * H;
      for (int64_t qt = kt; qt < d.tiles; ++qt) {
        const Pair pair = Classify(tiles[b * d.tiles + qt], tiles[b * d.tiles + kt], qt, kt);
        if (pair == Pair::kSkip) continue;
        const int64_t t0 = qt * kTile;
        const float *qs = qh.data() + (bn * Tp + t0) * H, *dos = doh.data() + (bn * Tp + t0) * H;
        // p = softmax probabilities, recomputed from the saved log-sum-exp.
        Gemm<false>(kTile, kTile, H, qs, H, kTs, kTile, p.data(), kTile, false);
        const bool masked = pair == Pair::kMasked;
        if (masked) Mask(sp + b * d.T, d, t0, s0, mask.data());
        for (int i = 0; i < kTile; ++i)
          ExpRow(p.data() + i * kTile, lse_p[bn * Tp + t0 + i], masked ? mask.data() + i * kTile : nullptr);
        Gemm<true>(kTile, H, kTile, p.data(), kTile, dos, H, dva, H, true);  // dv += p^T do
        Gemm<false>(kTile, kTile, H, dos, H, vTs, kTile, ds.data(), kTile, false);  // dp = do v^T
        for (int i = 0; i < kTile; ++i) {  // ds = p * (dp - delta)
          const float dl = delta[bn * Tp + t0 + i];
          for (int j = 0; j < kTile; ++j) ds[i * kTile + j] = p[i * kTile + j] * (ds[i * kTile + j] - dl);
        }
        Gemm<false>(kTile, H, kTile, ds.data(), kTile, ks, H, dqp + t0 * H, H, true);  // dq += ds k
        Gemm<true>(kTile, H, kTile, ds.data(), kTile, qs, H, dka, H, true);  // dk += ds^T (q scale)
      }
    }
  });
  // Sum the parts of dq (times the scale) and the G query heads of each key head's dk, dv.
  float *dqo = dq->typed_data(), *dko = dk->typed_data(), *dvo = dv->typed_data();
  ParallelFor(pool, d.rows * d.tiles, [&](int64_t task) {
    const int64_t b = task / d.tiles, t_end = std::min<int64_t>(d.T, (task % d.tiles + 1) * kTile);
    for (int64_t t = (task % d.tiles) * kTile; t < t_end; ++t) {
      for (int64_t n = 0; n < d.N; ++n) {
        float* o = dqo + ((b * d.T + t) * d.N + n) * H;
        std::fill(o, o + H, 0.0f);
        for (int64_t part = 0; part < parts; ++part) {
          const float* in = dq_parts.data() + (((b * d.N + n) * parts + part) * Tp + t) * H;
          for (int64_t h = 0; h < H; ++h) o[h] += in[h];
        }
        for (int64_t h = 0; h < H; ++h) o[h] *= scale;
      }
      for (int64_t kv = 0; kv < d.K; ++kv) {
        float* ko = dko + ((b * d.T + t) * d.K + kv) * H;
        float* vo = dvo + ((b * d.T + t) * d.K + kv) * H;
        std::fill(ko, ko + H, 0.0f);
        std::fill(vo, vo + H, 0.0f);
        for (int64_t g = 0; g < d.G; ++g) {
          const int64_t bn = b * d.N + kv * d.G + g;
          const float* ki = dk_heads.data() + (bn * Tp + t) * H;
          const float* vi = dv_heads.data() + (bn * Tp + t) * H;
          for (int64_t h = 0; h < H; ++h) ko[h] += ki[h], vo[h] += vi[h];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
