// Fused causal self-attention for XLA:CPU, forward and backward, called through jax.ffi
// (ttsi_jax/model/cpu_attention.py builds and registers it).
//
// Why: XLA:CPU has no fused attention. Its [T, S] softmax runs on one core and its batched score
// dots run far below matmul speed, so attention cost a training step more than all its linear
// layers. This kernel works in 64 x 64 tiles (flash attention: an online softmax, nothing [T, S]
// kept), skips the tiles that causality or the segments mask out, and spreads (sequence row,
// head, tile) tasks over XLA's intra-op thread pool. `CacheForward` (below) is the attention of a
// few new tokens over one layer of a KV cache (decoding).
//
// Layout: q [..., T, N, H], k and v [..., T, K, H] (N = G x K grouped query heads), segments
// [..., T] int32. Query i sees key j when j <= i, segments[j] >= 0 and segments[i] ==
// segments[j]: each segment is a contiguous sequence (else an error), -1 marks padding. Segment -2
// marks a shared prefix: a run that opens the row (else an error), seen by every later token of the
// row (prompts that begin alike prefill it once). Float32 only; H a multiple of 16.

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
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace ttsi_kernels;

constexpr int kTile = 64;  // a multiple of kLanes, as are H and the GEMM blocks
constexpr int kBlock = 32;  // queries whose keys are bounded together: two blocks per tile
static_assert(kTile == 2 * kBlock, "the backward pass takes a tile as one or two blocks");
constexpr int32_t kShared = -2;  // the segment of a shared prefix
constexpr int64_t kDqPartsBytes = int64_t{1} << 30;  // the backward pass's partial dq's, at most

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

struct Dims {
  int64_t rows, T, N, K, H, G, tiles;
};

// The keys each query sees, [0, shared) and [lo, hi] (lo > hi: none), per row, padded to whole
// tiles: a query sees the earlier keys of its own segment (segments are contiguous) and, outside
// the shared prefix, all of the row's shared prefix.
struct Bounds {
  std::vector<int32_t> shared, lo, hi;  // [rows, Tp]
};

ffi::Error BoundsOf(const int32_t* seg, const Dims& d, Bounds& out) {
  const int64_t Tp = d.tiles * kTile;
  out = Bounds{std::vector<int32_t>(d.rows * Tp, 0), std::vector<int32_t>(d.rows * Tp, 1),
               std::vector<int32_t>(d.rows * Tp, 0)};
  for (int64_t b = 0; b < d.rows; ++b) {
    const int32_t* row = seg + b * d.T;
    int32_t prefix = 0;
    while (prefix < d.T && row[prefix] == kShared) ++prefix;
    std::unordered_set<int32_t> seen;
    int32_t first = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      if (row[t] == kShared && t >= prefix)
        return ffi::Error::InvalidArgument("attention: the shared prefix (segment -2) must be one run "
                                           "that opens the row");
      if (t < prefix) {
        out.lo[b * Tp + t] = 0;
        out.hi[b * Tp + t] = static_cast<int32_t>(t);
        continue;
      }
      if (row[t] < -2)
        return ffi::Error::InvalidArgument("attention: segment ids are >= 0, -1 (padding) or -2 (the "
                                           "shared prefix); got " + std::to_string(row[t]));
      if (row[t] < 0) continue;
      if (t == 0 || row[t - 1] != row[t]) {
        if (!seen.insert(row[t]).second)
          return ffi::Error::InvalidArgument("attention: each segment must be one contiguous run of "
                                             "tokens; segment " + std::to_string(row[t]) +
                                             " appears in two places of a row");
        first = static_cast<int32_t>(t);
      }
      out.shared[b * Tp + t] = prefix;
      out.lo[b * Tp + t] = first;
      out.hi[b * Tp + t] = static_cast<int32_t>(t);
    }
  }
  return ffi::Error::Success();
}

// What the queries of one block of kBlock see, in aggregate: enough to bound the keys of a tile
// that some of them see, and to tell when every one of them sees all of those.
struct BlockStats {
  int32_t min_lo = INT32_MAX, max_lo = INT32_MIN, min_hi = INT32_MAX, max_hi = INT32_MIN;
  int32_t min_shared = INT32_MAX, max_shared = 0;
  bool all_valid = true;  // no padding query
};

std::vector<BlockStats> BlockStatsOf(const Bounds& bounds, const Dims& d) {
  const int64_t blocks = d.rows * d.tiles * (kTile / kBlock);
  std::vector<BlockStats> out(blocks);
  for (int64_t block = 0; block < blocks; ++block) {
    BlockStats& s = out[block];
    for (int64_t t = block * kBlock; t < (block + 1) * kBlock; ++t) {
      const int32_t shared = bounds.shared[t], lo = bounds.lo[t], hi = bounds.hi[t];
      s.min_shared = std::min(s.min_shared, shared);
      s.max_shared = std::max(s.max_shared, shared);
      if (lo > hi) {  // every real token sees its own earlier keys, at least itself
        s.all_valid = false;
        continue;
      }
      s.min_lo = std::min(s.min_lo, lo), s.max_lo = std::max(s.max_lo, lo);
      s.min_hi = std::min(s.min_hi, hi), s.max_hi = std::max(s.max_hi, hi);
    }
  }
  return out;
}

// The keys [j0, j1) of the tile at s0 (offsets in it) that some query of a block sees, none when
// j0 >= j1; dense when every query of the block sees every one of them (no mask to apply). The
// span of a block on the diagonal, or across the end of a sequence, is what it computes of a tile.
struct Span {
  int j0 = 0, j1 = 0;
  bool dense = false;
};

inline Span SpanOf(const BlockStats& s, int64_t s0) {
  const int64_t e0 = s0 + kTile;
  int64_t a = e0, z = s0;
  if (s.max_shared > s0) a = s0, z = std::min<int64_t>(s.max_shared, e0);  // the shared prefix
  if (s.min_lo <= s.max_hi) {  // the queries' own segments
    const int64_t own_a = std::max<int64_t>(s.min_lo, s0), own_z = std::min<int64_t>(s.max_hi + 1, e0);
    if (own_a < own_z) a = std::min(a, own_a), z = std::max(z, own_z);
  }
  if (a >= z) return Span{};
  const bool dense = s.all_valid && (z <= s.min_shared || (a >= s.max_lo && z <= s.min_hi + 1));
  return Span{static_cast<int>(a - s0), static_cast<int>(z - s0), dense};
}

inline vi LoadI(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Softmax tiles hold keys in rows and queries in vector lanes (sT[j, i] = k_j . q_i): a query's
// statistics are then lane-wise vector operations, with no horizontal reductions or per-row masks.
// `Visible` masks lane i of key s's row: query i sees key s.
inline auto Visible(int32_t s, const int32_t* shared, const int32_t* lo, const int32_t* hi) {
  const vi key = vi{} + s;
  return (key < LoadI(shared)) | ((key >= LoadI(lo)) & (key <= LoadI(hi)));
}

// The rows of one head of x [rows, T, heads, H]: view.at(b, n, t) is token t's H values, token
// t + 1's `ld` floats further on.
struct Rows {
  const float* base;
  int64_t row, head, ld;
  const float* at(int64_t b, int64_t n, int64_t t) const { return base + b * row + n * head + t * ld; }
};

// x itself when T is whole tiles (a tile's rows are then all there); else a copy [rows, heads, Tp,
// H] zero-padded to Tp = tiles x kTile, in `storage`.
Rows RowsOf(ffi::ThreadPool& pool, const float* x, const Dims& d, int64_t heads, std::vector<float>& storage) {
  const int64_t H = d.H, Tp = d.tiles * kTile;
  if (d.T == Tp) return Rows{x, d.T * heads * H, H, heads * H};
  storage.assign(d.rows * heads * Tp * H, 0.0f);
  ParallelFor(pool, d.rows * heads, [&](int64_t task) {
    const int64_t b = task / heads, n = task % heads;
    for (int64_t t = 0; t < d.T; ++t) {
      const float* in = x + ((b * d.T + t) * heads + n) * H;
      std::copy(in, in + H, storage.data() + (task * Tp + t) * H);
    }
  });
  return Rows{storage.data(), heads * Tp * H, Tp * H, H};
}

// Two vectors' lanes picked by constant indices (2 x kLanes of them, b's after a's): GCC 12+ and
// Clang have __builtin_shufflevector, older GCC only its own __builtin_shuffle.
#if defined(__clang__) || __GNUC__ >= 12
#define TTSI_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TTSI_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

// One stage of the transpose below: the pair of rows (a, b), S apart, swap the off-diagonal halves
// of their S x S sub-blocks; then the stage of half the size.
template <int S, int... L>
inline void TransposeStage(vf (&r)[kLanes], std::integer_sequence<int, L...> lanes) {
  for (int i = 0; i < kLanes; ++i)
    if (!(i & S)) {
      const vf a = r[i], b = r[i + S];
      r[i] = TTSI_SHUFFLE(a, b, ((L & S) ? kLanes + L - S : L)...);
      r[i + S] = TTSI_SHUFFLE(a, b, ((L & S) ? kLanes + L : L + S)...);
    }
  if constexpr (S > 1) TransposeStage<S / 2>(r, lanes);
}

// Transposes kLanes rows of kLanes floats in registers, in log2(kLanes) stages.
inline void TransposeInRegisters(vf (&r)[kLanes]) {
  TransposeStage<kLanes / 2>(r, std::make_integer_sequence<int, kLanes>{});
}

// out [rows, heads, tiles, H, kTile] = x [rows, T, heads, H] x scale, each tile transposed on its
// own (a [H, Tp] layout would put a tile's rows Tp floats apart, where they evict each other from
// the cache) and zero-padded to whole tiles; kLanes x kLanes blocks at a time, in registers (a
// float at a time it took about 6% of the attention kernel's time).
void Transposed(ffi::ThreadPool& pool, const float* x, const Dims& d, int64_t heads, float scale, float* out) {
  const int64_t H = d.H;
  ParallelFor(pool, d.rows * heads * d.tiles, [&](int64_t task) {
    const int64_t tile = task % d.tiles, n = (task / d.tiles) % heads, b = task / (d.tiles * heads);
    float* o = out + task * H * kTile;
    for (int64_t i = 0; i < kTile; i += kLanes)
      for (int64_t h = 0; h < H; h += kLanes) {
        vf r[kLanes];
        for (int u = 0; u < kLanes; ++u) {
          const int64_t t = tile * kTile + i + u;
          r[u] = t < d.T ? Load(x + ((b * d.T + t) * heads + n) * H + h) * scale : vf{};
        }
        TransposeInRegisters(r);
        for (int u = 0; u < kLanes; ++u) Store(o + (h + u) * kTile + i, r[u]);
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
  if (kd[r - 2] == 0 || qd[r - 2] % kd[r - 2] != 0 || qd[r - 1] % 16 != 0)
    return ffi::Error::InvalidArgument("attention: heads must group evenly and H be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (auto error = Check(q, k, v, seg); error.failure()) return error;
  const Dims d = DimsOf(q, k);
  const int64_t H = d.H, Tp = d.tiles * kTile;
  Bounds bounds;
  if (auto error = BoundsOf(seg.typed_data(), d, bounds); error.failure()) return error;
  const auto stats = BlockStatsOf(bounds, d);
  const auto qT = Scratch(d.rows * d.N * H * Tp);
  std::vector<float> k_storage, v_storage;
  Transposed(pool, q.typed_data(), d, d.N, 1.0f / std::sqrt(static_cast<float>(H)), qT.get());
  const Rows ks = RowsOf(pool, k.typed_data(), d, d.K, k_storage), vs = RowsOf(pool, v.typed_data(), d, d.K, v_storage);
  float *op = out->typed_data(), *lp = lse->typed_data();
  // Tasks (row, head, query tile), the longest (last tiles) first.
  ParallelFor(pool, d.rows * d.N * d.tiles, [&](int64_t task) {
    const int64_t qt = d.tiles - 1 - task % d.tiles, n = (task / d.tiles) % d.N,
                  b = task / (d.tiles * d.N), kv = n / d.G, t0 = qt * kTile;
    const float* qs = qT.get() + ((b * d.N + n) * Tp + t0) * H;  // [H, kTile]
    const int32_t *shared = bounds.shared.data() + b * Tp + t0, *lo = bounds.lo.data() + b * Tp + t0,
                  *hi = bounds.hi.data() + b * Tp + t0;
    const BlockStats* block_stats = stats.data() + (b * Tp + t0) / kBlock;
    std::vector<float> sT(kTile * kTile), acc(kTile * H, 0.0f), m(kTile, -1e30f), l(kTile, 0.0f);
    for (int64_t kt = 0; kt <= qt; ++kt) {
      const int64_t s0 = kt * kTile;
      for (int c = 0; c < kTile; c += kBlock) {  // the queries c..c+kBlock over the keys they see
        const Span span = SpanOf(block_stats[c / kBlock], s0);
        const int j0 = span.j0, j1 = span.j1;
        if (j0 >= j1) continue;
        const bool masked = !span.dense;
        Gemm<false>(j1 - j0, kBlock, H, ks.at(b, kv, s0 + j0), ks.ld, qs + c, kTile, sT.data() + j0 * kTile + c,
                    kTile, false);
        for (int u = c; u < c + kBlock; u += kLanes) {  // kLanes queries at a time
          vf top = Load(m.data() + u);
          for (int j = j0; j < j1; ++j) {
            const vf x = Load(sT.data() + j * kTile + u);
            const vf y = masked ? (Visible(s0 + j, shared + u, lo + u, hi + u) ? x : vf{} - 1e30f) : x;
            top = y > top ? y : top;
          }
          const vf correction = ExpV(Load(m.data() + u) - top);
          vf sum = vf{};
          for (int j = j0; j < j1; ++j) {
            float* row = sT.data() + j * kTile + u;
            vf p = ExpV(Load(row) - top);
            if (masked) p = Visible(s0 + j, shared + u, lo + u, hi + u) ? p : vf{};
            Store(row, p);
            sum += p;
          }
          Store(m.data() + u, top);
          Store(l.data() + u, Load(l.data() + u) * correction + sum);
          for (int i = 0; i < kLanes; ++i)
            if (correction[i] != 1.0f)
              for (int64_t h = 0; h < H; h += kLanes) {
                float* a = acc.data() + (u + i) * H + h;
                Store(a, Load(a) * correction[i]);
              }
        }
        // acc[i] += sum_j sT[j, i] v[j]
        Gemm<true>(kBlock, H, j1 - j0, sT.data() + j0 * kTile + c, kTile, vs.at(b, kv, s0 + j0), vs.ld,
                   acc.data() + c * H, H, true);
      }
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
  Bounds bounds;
  if (auto error = BoundsOf(seg.typed_data(), d, bounds); error.failure()) return error;
  const auto stats = BlockStatsOf(bounds, d);
  // Scratch written in full before it is read: a vector's zero fill ran on the calling thread
  // alone while the other workers waited (dq's parts are zeroed in their own tasks instead).
  const auto qT = Scratch(heads * H * Tp), doT = Scratch(heads * H * Tp),
             delta = Scratch(heads * Tp), lse_p = Scratch(heads * Tp);
  std::vector<float> q_storage, do_storage, k_storage, v_storage;
  Transposed(pool, q.typed_data(), d, d.N, scale, qT.get());
  Transposed(pool, dout.typed_data(), d, d.N, 1.0f, doT.get());
  const Rows qs_all = RowsOf(pool, q.typed_data(), d, d.N, q_storage),
             dos_all = RowsOf(pool, dout.typed_data(), d, d.N, do_storage),
             ks_all = RowsOf(pool, k.typed_data(), d, d.K, k_storage),
             vs_all = RowsOf(pool, v.typed_data(), d, d.K, v_storage);
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
  // Each (row, head) splits its key tiles over `parts` tasks (interleaved, so that each part gets
  // long and short ones), enough for every worker to get the same number; each part keeps its own
  // dq: fewer parts where more would pass kDqPartsBytes in all (8 tasks a worker grew them with the
  // thread count: 4 GB at 64 threads and 32k tokens), one however large it is.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t part_bytes = std::max<int64_t>(1, heads * Tp * H * static_cast<int64_t>(sizeof(float)));
  const int64_t parts = std::max<int64_t>(
      1, std::min({d.tiles, (8 * workers + heads - 1) / heads, kDqPartsBytes / part_bytes}));
  const auto dq_parts = Scratch(heads * parts * Tp * H), dk_heads = Scratch(heads * Tp * H),
             dv_heads = Scratch(heads * Tp * H);
  ParallelFor(pool, heads * parts, [&](int64_t task) {
    const int64_t part = task % parts, bn = task / parts, b = bn / d.N, n = bn % d.N, kv = n / d.G;
    float* dqp = dq_parts.get() + task * Tp * H;
    std::fill(dqp, dqp + Tp * H, 0.0f);
    std::vector<float> pT(kTile * kTile), dsT(kTile * kTile);
    for (int64_t kt = part; kt < d.tiles; kt += parts) {
      const int64_t s0 = kt * kTile;
      float* dka = dk_heads.get() + (bn * Tp + s0) * H;
      float* dva = dv_heads.get() + (bn * Tp + s0) * H;
      std::fill(dka, dka + kTile * H, 0.0f);
      std::fill(dva, dva + kTile * H, 0.0f);
      const float *ks = ks_all.at(b, kv, s0), *vs = vs_all.at(b, kv, s0);
      for (int64_t qt = kt; qt < d.tiles; ++qt) {
        const int64_t t0 = qt * kTile;
        const float *qs = qs_all.at(b, n, t0), *qTs = qT.get() + (bn * Tp + t0) * H,
                    *dos = dos_all.at(b, n, t0), *doTs = doT.get() + (bn * Tp + t0) * H,
                    *lse_t = lse_p.get() + bn * Tp + t0, *delta_t = delta.get() + bn * Tp + t0;
        const int32_t *shared = bounds.shared.data() + b * Tp + t0,
                      *lo = bounds.lo.data() + b * Tp + t0, *hi = bounds.hi.data() + b * Tp + t0;
        // The queries c..c+width over the keys j0..j1 of the tile that they see.
        auto queries = [&](int c, int width, const Span& span) {
          const int j0 = span.j0, j1 = span.j1, rows = j1 - j0;
          const bool masked = !span.dense;
          float *p_at = pT.data() + j0 * kTile + c, *ds_at = dsT.data() + j0 * kTile + c;
          // pT = softmax probabilities, recomputed from the saved log-sum-exp; dpT = v do^T.
          Gemm<false>(rows, width, H, ks + j0 * ks_all.ld, ks_all.ld, qTs + c, kTile, p_at, kTile, false);
          Gemm<false>(rows, width, H, vs + j0 * vs_all.ld, vs_all.ld, doTs + c, kTile, ds_at, kTile, false);
          for (int j = j0; j < j1; ++j)
            for (int u = c; u < c + width; u += kLanes) {  // dsT = pT * (dpT - delta)
              float *p = pT.data() + j * kTile + u, *ds = dsT.data() + j * kTile + u;
              vf prob = ExpV(Load(p) - Load(lse_t + u));
              if (masked) prob = Visible(s0 + j, shared + u, lo + u, hi + u) ? prob : vf{};
              Store(p, prob);
              Store(ds, prob * (Load(ds) - Load(delta_t + u)));
            }
          Gemm<false>(rows, H, width, p_at, kTile, dos + c * dos_all.ld, dos_all.ld, dva + j0 * H, H, true);  // dv += pT do
          Gemm<false>(rows, H, width, ds_at, kTile, qs + c * qs_all.ld, qs_all.ld, dka + j0 * H, H, true);  // dk += dsT q
          Gemm<true>(width, H, rows, ds_at, kTile, ks + j0 * ks_all.ld, ks_all.ld, dqp + (t0 + c) * H, H,
                     true);  // dq += ds k
        };
        const BlockStats* block_stats = stats.data() + (b * Tp + t0) / kBlock;
        const Span first = SpanOf(block_stats[0], s0), second = SpanOf(block_stats[1], s0);
        if (first.j0 == second.j0 && first.j1 == second.j1 && first.dense == second.dense) {
          if (first.j0 < first.j1) queries(0, kTile, first);  // one span: the whole tile at once
        } else {
          if (first.j0 < first.j1) queries(0, kBlock, first);
          if (second.j0 < second.j1) queries(kBlock, kBlock, second);
        }
      }
    }
  });
  // Sum the parts of dq and the G query heads of each key head's dk, dv (dq and dk times the scale).
  float *dqo = dq->typed_data(), *dko = dk->typed_data(), *dvo = dv->typed_data();
  ParallelFor(pool, d.rows * d.tiles, [&](int64_t task) {
    const int64_t b = task / d.tiles, t_end = std::min<int64_t>(d.T, (task % d.tiles + 1) * kTile);
    for (int64_t t = (task % d.tiles) * kTile; t < t_end; ++t) {
      for (int64_t n = 0; n < d.N; ++n) {
        float* o = dqo + ((b * d.T + t) * d.N + n) * H;
        std::fill(o, o + H, 0.0f);
        for (int64_t part = 0; part < parts; ++part) {
          const float* in = dq_parts.get() + (((b * d.N + n) * parts + part) * Tp + t) * H;
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
          const float* ki = dk_heads.get() + (bn * Tp + t) * H;
          const float* vi = dv_heads.get() + (bn * Tp + t) * H;
          for (int64_t h = 0; h < H; ++h) ko[h] += ki[h], vo[h] += vi[h];
        }
        for (int64_t h = 0; h < H; ++h) ko[h] *= scale;
      }
    }
  });
  return ffi::Error::Success();
}

// Attention of a few new tokens over one layer of a KV cache (a decode step, an extension of a
// prefix, candidates scored after it). XLA copied the layer's keys and values out of the stacked
// cache on every call, and attended over all its slots; this reads them where they lie, and only
// the slots some query of the row sees (a row's left padding and free slots are skipped).
// q [..., B, T, N, H], caches [..., L, B, K, S, H], layer [...] (the layer to read), mask
// [..., B, T, S] (query t sees slot s) -> out [..., B, T, N, H]. Float32; H a multiple of 16.
ffi::Error CacheForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                        ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> mask,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = kc.dimensions(), vd = vc.dimensions(), md = mask.dimensions();
  const size_t r = qd.size();
  if (r < 4 || kd.size() != r + 1 || vd.size() != r + 1 || md.size() != r - 1)
    return ffi::Error::InvalidArgument(
        "cache attention: q must be [..., B, T, N, H], the caches [..., L, B, K, S, H], mask [..., B, T, S]");
  const int64_t B = qd[r - 4], T = qd[r - 3], N = qd[r - 2], H = qd[r - 1];
  const int64_t L = kd[r - 4], K = kd[r - 2], S = kd[r - 1];
  for (size_t i = 0; i + 4 < r; ++i)
    if (kd[i] != qd[i] || md[i] != qd[i])
      return ffi::Error::InvalidArgument("cache attention: q, caches and mask disagree in leading axes");
  for (size_t i = 0; i <= r; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("cache attention: k and v caches differ in shape");
  if (kd[r - 3] != B || kd[r] != H || md[r - 4] != B || md[r - 3] != T || md[r - 2] != S)
    return ffi::Error::InvalidArgument("cache attention: q, caches and mask disagree in shape");
  if (q.element_count() == 0) return ffi::Error::Success();
  if (K == 0 || N % K != 0 || H % 16 != 0)
    return ffi::Error::InvalidArgument("cache attention: heads must group evenly and H be a multiple of 16");
  const int64_t outer = static_cast<int64_t>(q.element_count()) / (B * T * N * H);
  if (layer.element_count() != 1 && static_cast<int64_t>(layer.element_count()) != outer)
    return ffi::Error::InvalidArgument("cache attention: one layer index per leading index");
  const int32_t* layers = layer.typed_data();
  for (size_t i = 0; i < layer.element_count(); ++i)
    if (layers[i] < 0 || layers[i] >= L) return ffi::Error::InvalidArgument("cache attention: layer out of range");
  const int64_t G = N / K, Q = T * G, Qp = (Q + kLanes - 1) / kLanes * kLanes;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float *qp = q.typed_data(), *kp = kc.typed_data(), *vp = vc.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  // Tasks (leading index, row, kv head); lane q of a tile is query token q / G, head q % G.
  ParallelFor(pool, outer * B * K, [&](int64_t task) {
    const int64_t kv = task % K, b = (task / K) % B, o = task / (K * B);
    const int64_t l = layers[layer.element_count() == 1 ? 0 : o];
    const bool* m = mp + (o * B + b) * T * S;  // [T, S]
    int64_t lo = S, hi = -1;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < S; ++s)
        if (m[t * S + s]) lo = std::min(lo, s), hi = std::max(hi, s);
    auto out_at = [&](int64_t t, int64_t g) { return op + (((o * B + b) * T + t) * N + kv * G + g) * H; };
    if (hi < lo) {  // no slot seen (padding rows)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) std::fill(out_at(t, g), out_at(t, g) + H, 0.0f);
      return;
    }
    const int64_t n = hi - lo + 1, at = ((((o * L + l) * B + b) * K + kv) * S + lo) * H;
    std::vector<float> qT(H * Qp, 0.0f), sT(n * Qp), acc(Qp * H);
    std::vector<int32_t> seen(n * Qp, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const float* src = qp + (((o * B + b) * T + t) * N + kv * G + g) * H;
        for (int64_t h = 0; h < H; ++h) qT[h * Qp + t * G + g] = src[h] * scale;
        for (int64_t j = 0; j < n; ++j) seen[j * Qp + t * G + g] = m[t * S + lo + j] ? -1 : 0;
      }
    Gemm<false>(n, Qp, H, kp + at, H, qT.data(), Qp, sT.data(), Qp, false);  // sT[j, q] = k_j . q
    std::vector<float> sum(Qp);
    for (int64_t u = 0; u < Qp; u += kLanes) {  // softmax over the slots, kLanes queries at a time
      vf top = vf{} - 1e30f;
      for (int64_t j = 0; j < n; ++j) {
        const vf x = Load(sT.data() + j * Qp + u);
        top = (LoadI(seen.data() + j * Qp + u) != 0) & (x > top) ? x : top;
      }
      vf total = vf{};
      for (int64_t j = 0; j < n; ++j) {
        float* row = sT.data() + j * Qp + u;
        const vf p = LoadI(seen.data() + j * Qp + u) != 0 ? ExpV(Load(row) - top) : vf{};
        Store(row, p);
        total += p;
      }
      Store(sum.data() + u, total);
    }
    Gemm<true>(Qp, H, n, sT.data(), Qp, vp + at, H, acc.data(), H, false);  // acc[q] = sum_j sT[j, q] v_j
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t lane = t * G + g;
        const float inv = sum[lane] > 0 ? 1.0f / sum[lane] : 0.0f;
        float* dst = out_at(t, g);
        for (int64_t h = 0; h < H; ++h) dst[h] = acc[lane * H + h] * inv;
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TtsiCacheAttention, CacheForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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
