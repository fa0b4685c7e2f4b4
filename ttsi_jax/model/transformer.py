"""Decoder-only LM (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3) as Flax Linen modules used functionally.

`forward(config, params, tokens_BT, positions_BT, cache, lora)` is the one entry point. Layers are stacked
with `nn.scan` (one compiled block, params with a leading layer axis L), the KV cache is an explicit
pytree passed in and returned, and attention is masked by *positions* (a key is visible when
0 <= key_pos <= query_pos), so left-padded prompts, right-padded training rows and incremental
decoding all share one code path. Padding tokens carry position -1.

Array names end in their shape, one letter per axis; each letter means one thing everywhere in
the package:
  A adapters                          N query heads
  B rows of a batch (prompts, packed  O new tokens decoded
    training rows)                    P prompt slots
  C candidates per row                Q G x T (queries, head-major)
  D embedding width                   R LoRA rank
  E extension tokens                  S cache slots (keys)
  G query heads per KV head (N / K)   T tokens of a forward pass (queries)
  H head dim (h: H / 2)               U sequences per packed row
  I selected positions (scored        V vocabulary
    candidate or answer tokens)       W blocks per sequence slot
  K KV heads                          X blocks per packed row
  L layers                            Z tokens per block
  M block slots of a row (U x W)      c trailing features of any width; 1 an axis of size one
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ttsi_jax.config_schema import ATTENTION
from ttsi_jax.model import cpu_attention, cpu_kernels, cpu_lora, cpu_matmul

Params = Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (rope_type == "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of one checkpoint, read from the checkpoint's own config (all but
  `attention`, an option of the run)."""

  architecture: str
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_embeddings: bool
  qkv_bias: bool = False  # Qwen2 / Qwen2.5, Llama and Qwen3 with attention_bias
  o_bias: bool = False  # Llama and Qwen3 with attention_bias
  qk_norm: bool = False  # Qwen3
  rope_scaling: Optional[RopeScaling] = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  sliding_window: Optional[int] = None  # Mistral: attention reaches this many tokens back
  # Packed training rows' attention (see `ATTENTION`): a run option, not the checkpoint's.
  attention: str = "auto"

  @property
  def context_length(self) -> int:
    """Longest sequence this (full-attention) implementation runs exactly: within a sliding
    window, full attention and sliding-window attention are the same."""
    return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


@flax.struct.dataclass
class KVCache:
  """Per-layer keys/values for S slots; all rows write the same slot range (prompts are left-padded).
  Head-major ([L, B, K, S, H]): a decode step's attention reads a layer's slots as they lie, where
  [L, B, S, K, H] cost a transposed copy of the whole cache per step (a third of a decode step)."""

  k_LBKSH: jax.Array
  v_LBKSH: jax.Array
  positions_BS: jax.Array  # int32 position of the token held in each slot, -1 when empty or padding
  segments_BS: jax.Array  # int32 segment of each slot (0 = seen by every segment), see `forward`
  end_index: jax.Array  # int32 scalar: next slot to write

  @classmethod
  def init(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    return cls(
        k_LBKSH=jnp.zeros(shape, config.dtype),
        v_LBKSH=jnp.zeros(shape, config.dtype),
        positions_BS=jnp.full((batch, length), -1, jnp.int32),
        segments_BS=jnp.zeros((batch, length), jnp.int32),
        end_index=jnp.zeros((), jnp.int32),
    )


@jax.custom_vjp
def _regather(x_BXc: jax.Array, index_BM: jax.Array, inverse_BX: jax.Array) -> jax.Array:
  """out[b, m] = x[b, index[b, m]], where index X reads a zero block. When `index` maps slots to
  distinct blocks and `inverse` maps each block back to its slot (M: none), the gradient is the
  same gather the other way round, so neither direction needs a scatter (slow on CPU)."""
  zero_block = jnp.zeros((x_BXc.shape[0], 1) + x_BXc.shape[2:], x_BXc.dtype)
  padded = jnp.concatenate([x_BXc, zero_block], axis=1)
  return jax.vmap(lambda x, i: x.at[i].get(mode="promise_in_bounds"))(padded, index_BM)


def _regather_fwd(x_BXc, index_BM, inverse_BX):
  return _regather(x_BXc, index_BM, inverse_BX), (index_BM, inverse_BX)


def _regather_bwd(res, g_BMc):
  index_BM, inverse_BX = res
  return _regather(g_BMc, inverse_BX, index_BM), None, None


_regather.defvjp(_regather_fwd, _regather_bwd)


@flax.struct.dataclass
class Packing:
  """Block layout of packed training rows (`ttsi_jax.ttsi.adaptation.pack` builds it).

  Each row of T = X x Z tokens is X blocks of Z tokens; a sequence fills whole blocks (its last one
  padded) and every block belongs to one adapter. The linear layers run on the rows; attention runs
  on the sequences, each gathered into U slots of W blocks per row (`to_sequences`, M = U x W), so
  its cost is that of each sequence alone; the fused CPU kernel reads the rows as they are, each
  token masked to its sequence (`row_segments`). The LoRA branch of each block uses its own
  adapter: in the C++ kernels on CPU (`cpu_lora`), else picked by a one-hot matmul (a gather's
  gradient is a scatter, slow on CPU).
  """

  adapter_BXA: jax.Array  # one-hot adapter of each block (padding blocks: all zero)
  seq_blocks_BUW: jax.Array  # int32 block w of the row's sequence u (X: padding)
  block_slots_BX: jax.Array  # int32 slot u x W + w of each block (M = U x W: padding block)
  # LoRA dropout's key of each token (typed PRNG keys; None: no dropout). A token's masks derive
  # from its key, the layer and the module alone (`dropout_keep`), not from the rows it shares.
  dropout_keys_BT: Optional[jax.Array] = None

  def for_layer(self, layer: jax.Array) -> Packing:
    """The packing as `layer` sees it: its tokens' dropout keys folded with the layer index."""
    if self.dropout_keys_BT is None:
      return self
    fold = jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (0, None))
    return self.replace(dropout_keys_BT=fold(self.dropout_keys_BT, layer))

  def to_sequences(self, x_BT: jax.Array) -> jax.Array:
    """[B, T, ...] rows -> [B x U, W x Z, ...] sequences (padding slots: zeros)."""
    B, T = x_BT.shape[:2]
    X, (U, W) = self.adapter_BXA.shape[1], self.seq_blocks_BUW.shape[1:]
    Z = T // X
    x_BXc = x_BT.reshape((B, X, Z) + x_BT.shape[2:])
    x_BMc = _regather(x_BXc, self.seq_blocks_BUW.reshape(B, U * W), self.block_slots_BX)
    return x_BMc.reshape((B * U, W * Z) + x_BT.shape[2:])

  def row_segments(self, positions_BT: jax.Array) -> jax.Array:
    """Each token's sequence u in its row (-1: padding, position -1), as the fused CPU attention
    kernel takes them."""
    X, W = self.adapter_BXA.shape[1], self.seq_blocks_BUW.shape[2]
    sequence_BT = jnp.repeat(self.block_slots_BX // W, positions_BT.shape[1] // X, axis=1)
    return jnp.where(positions_BT >= 0, sequence_BT, -1).astype(jnp.int32)

  def to_rows(self, seqs: jax.Array) -> jax.Array:
    """The inverse of `to_sequences`: [B x U, W x Z, ...] -> [B, T, ...] (padding blocks: zeros)."""
    (B, X), (U, W) = self.adapter_BXA.shape[:2], self.seq_blocks_BUW.shape[1:]
    Z = seqs.shape[1] // W
    x_BMc = seqs.reshape((B, U * W, Z) + seqs.shape[2:])
    x_BXc = _regather(x_BMc, self.block_slots_BX, self.seq_blocks_BUW.reshape(B, U * W))
    return x_BXc.reshape((B, X * Z) + seqs.shape[2:])


@flax.struct.dataclass
class PackedPrompts:
  """Prompts packed back to back in one row for a prefill (`ttsi_jax.text.sampler.pack_prompts`
  builds it): the linear layers run on their real tokens only, attention keeps each prompt to
  itself (and to the tokens all prompts begin with, run once at the row's start), and each
  prompt's keys and values land left-padded in its own cache row, the layout every later call
  reads."""

  segments_1T: jax.Array  # int32 prompt of each token, -1 for padding, SHARED_PREFIX for a shared prefix
  to_cache_BP: jax.Array  # int32 token (T: none, the slot is padding) held by each cache slot
  # Prompts of per-row adapters: the one-hot adapter (cache row) of each block of the row, whose
  # tokens go through that adapter's LoRA branch as in packed training rows (`Packing`); None: one
  # adapter (or none) for every token.
  adapter_1XA: Optional[jax.Array] = None

  def to_cache(self, x_1Tc: jax.Array, fill) -> jax.Array:
    """[1, T, ...] -> [B, P, ...]: each cache slot's token, `fill` in padding slots."""
    pad = jnp.full((1,) + x_1Tc.shape[2:], fill, x_1Tc.dtype)
    return jnp.concatenate([x_1Tc[0], pad])[self.to_cache_BP]


def dropout_keys(packing: Optional[Packing]) -> Optional[jax.Array]:
  """The tokens' LoRA dropout keys, or None: no dropout."""
  return None if packing is None else packing.dropout_keys_BT


def dropout_keep(keys_BT: jax.Array, module: str, rate, features: int) -> jax.Array:
  """bool [B, T, features]: which of each token's inputs to `module`'s LoRA branch dropout keeps,
  drawn from the token's key (`Packing.dropout_keys_BT`, already folded with its layer) and the
  module's name, so that a token's masks do not depend on which tokens share its rows."""
  salt = zlib.crc32(module.encode())
  draw = lambda key: jax.random.bernoulli(jax.random.fold_in(key, salt), 1.0 - rate, (features,))
  return jax.vmap(jax.vmap(draw))(keys_BT)


def block_adapters(packing: Optional[Packing], prompts: Optional[PackedPrompts]) -> Optional[jax.Array]:
  """The one-hot adapter of each block of packed rows (training rows, or prompts of per-row
  adapters), or None: one adapter for every token."""
  if packing is not None:
    return packing.adapter_BXA
  return None if prompts is None else prompts.adapter_1XA


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2], with the Llama-3 scaling when the checkpoint asks for it."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  s = config.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, out).astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding in the HF "rotate half" layout (so HF q/k weights load unpermuted)."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BTH), jnp.sin(angles_BTH)
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BTNH.dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


@jax.custom_vjp
def matmul_f32_accumulate(x, w):
  """x @ w accumulated and returned in float32, and in the backward pass the gradients' dots too
  (cast to x's and w's dtypes): XLA:CPU runs bfloat16 dots on AMX (5-6x float32) only in that form
  (bfloat16 in and out: 234-320 GFLOP/s here), and autodiff would feed the float32 product's
  cotangent into a float32 dot. The caller adds the LoRA branch to the float32 product, then casts."""
  return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _matmul_f32_accumulate_bwd(residuals, d_out):
  x, w = residuals
  d_out = d_out.astype(x.dtype)
  d_x = jnp.matmul(d_out, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  d_w = jnp.einsum("...k,...n->kn", x, d_out, preferred_element_type=jnp.float32).astype(w.dtype)
  return d_x, d_w


matmul_f32_accumulate.defvjp(lambda x, w: (matmul_f32_accumulate(x, w), (x, w)), _matmul_f32_accumulate_bwd)


def linear_product(x, w, transpose_w: bool = False, real=None):
  """x @ w (x @ w.T with transpose_w: a tied embedding) for a linear layer: float32 out for a
  16-bit w (`matmul_f32_accumulate`); for float32, OpenBLAS's sgemm on the CPU backend
  (`cpu_matmul`, where the kernels serve it and x has enough rows), else XLA's dot. `real` (bool,
  x's rows; None: all) marks the rows that hold tokens: the kernel leaves the others (padding) out
  and returns zeros there; elsewhere every row is computed."""
  if w.dtype == jnp.float32 and x.dtype == jnp.float32 and blas_linear(x.shape):
    return cpu_matmul.matmul(x, w, real, transpose_w)
  w = w.T if transpose_w else w
  return x @ w if w.dtype == jnp.float32 else matmul_f32_accumulate(x, w)


class Linear(nn.Module):
  """x @ kernel (+ bias), plus the low-rank update scale * (dropout(x) @ a) @ b when a LoRA slice is
  given. `lora_hp` = (scale, dropout rate); dropout is applied only where the tokens' dropout keys
  are given (`dropout_keep`).
  `xa` is the branch's rank-R input scale * (x @ a), when the caller computed it for several layers
  that read the same x (`shared_lora_inputs`). `real` marks the rows of x that hold tokens: the
  product may skip the others (`linear_product`), whose outputs are then not x @ kernel."""

  features: int
  use_bias: bool
  dtype: str
  param_dtype: str
  out_dtype: str | None = None  # None: the compute dtype

  @nn.compact
  def __call__(self, x, lora=None, lora_hp=None, adapter_BXA=None, xa=None, real=None, dropout_keys_BT=None):
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
    )
    y = linear_product(x, kernel.astype(self.dtype), real=real)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
    if lora is not None:
      if xa is None:
        scale, rate = lora_hp
        if dropout_keys_BT is not None:
          keep = dropout_keep(dropout_keys_BT, self.name, rate, x.shape[-1])
          x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        xa = _lora_input(x, lora["a"], scale, adapter_BXA, self.dtype)
      y = _lora_output(y, xa, lora["b"], adapter_BXA, self.dtype)
    return y.astype(self.out_dtype or self.dtype)


def _block_adapter_ids(adapter_BXA: jax.Array) -> jax.Array:
  """Each block's adapter index (-1: a padding block), as the CPU kernels take them."""
  return jnp.where(adapter_BXA.any(-1), jnp.argmax(adapter_BXA, -1), -1).astype(jnp.int32)


def _lora_input(x, a, scale, adapter_BXA, dtype):
  """scale * (x @ a): the LoRA branch's rank-R input. a is [in, R] for one adapter, [A, in, R] for
  packed rows (each block of Z tokens through its own adapter). The scale multiplies the rank-R
  product: in the backward pass too, a [T, R] array, not [T, out]. float32 from the CPU kernels
  (`packed_lora_kernel`; `_lora_output` adds it in float32), else `dtype`."""
  if adapter_BXA is not None and packed_lora_kernel(x.shape[-1]):
    return cpu_lora.narrow(x, jnp.swapaxes(a, 1, 2), _block_adapter_ids(adapter_BXA)) * scale
  a = a.astype(dtype)
  if adapter_BXA is None:  # one adapter for every token
    return ((x @ a) * scale).astype(dtype)
  B, X, _ = adapter_BXA.shape
  x_BXZc = x.reshape(B, X, -1, x.shape[-1])
  a_BXcR = _per_block(a, adapter_BXA)
  xa_BXZR = (jnp.einsum("bxzi,bxir->bxzr", x_BXZc, a_BXcR) * scale).astype(dtype)
  return xa_BXZR.reshape(x.shape[:-1] + a.shape[-1:])


def _per_block(w, adapter_BXA):
  """w [A, ...] per block of packed rows: its adapter's, zeros for a padding block. A one-hot
  product (its backward a deterministic product too, where a gather's is a scatter-add, atomic on
  GPU) over w with non-finite values zeroed, since 0 * NaN is NaN: one diverged adapter would make
  every adapter of the call NaN. Its own blocks get NaN back."""
  finite = jnp.isfinite(w)
  picked = jnp.einsum("bxa,a...->bx...", adapter_BXA.astype(w.dtype), jnp.where(finite, w, 0))
  broken_A = ~jnp.all(finite.reshape(w.shape[0], -1), axis=-1)
  broken_BX = jnp.any(adapter_BXA & broken_A, axis=-1)
  return jnp.where(broken_BX.reshape(broken_BX.shape + (1,) * (w.ndim - 1)), jnp.nan, picked)


def _lora_output(y, xa, b, adapter_BXA, dtype):
  """y + xa @ b (b [R, out], or [A, R, out] per block of packed rows); float32 from the CPU kernels
  (the caller casts once)."""
  if adapter_BXA is not None and packed_lora_kernel(b.shape[-1]):
    return cpu_lora.wide_add(y.astype(jnp.float32), xa, b, _block_adapter_ids(adapter_BXA))
  b = b.astype(dtype)
  xa = xa.astype(dtype)
  if adapter_BXA is None:
    return y + xa @ b
  B, X, _ = adapter_BXA.shape
  xa_BXZR = xa.reshape(B, X, -1, xa.shape[-1])
  b_BXRc = _per_block(b, adapter_BXA)
  return y + jnp.einsum("bxzr,bxro->bxzo", xa_BXZR, b_BXRc).reshape(y.shape)


def shared_lora_inputs(x, loras, lora_hp, adapter_BXA, dtype, dropout: bool):
  """The LoRA branches' rank-R inputs (`_lora_input`) of layers that read the same x (q/k/v;
  gate/up), as one product over their a's concatenated along the rank: x is read once, and in the
  backward pass its gradient and the a's gradients each come out of one product, not one per layer
  (2-3% of a layer's time in isolation). None for a layer without LoRA, and for every layer when
  dropout is on (each layer draws its own mask)."""
  present = [i for i, lora in enumerate(loras) if lora is not None]
  if dropout or len(present) < 2:
    return [None] * len(loras)
  ranks = [loras[i]["a"].shape[-1] for i in present]
  a = jnp.concatenate([loras[i]["a"] for i in present], axis=-1)
  xa = _lora_input(x, a, lora_hp[0], adapter_BXA, dtype)
  out = [None] * len(loras)
  for i, part in zip(present, jnp.split(xa, np.cumsum(ranks)[:-1], axis=-1)):
    out[i] = part
  return out


def _sub(lora, *names):
  for name in names:
    if lora is None:
      return None
    lora = lora.get(name)
  return lora


def _heads_major(x_BSKH: jax.Array) -> jax.Array:
  return x_BSKH.transpose(0, 2, 1, 3)


def _attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS) -> jax.Array:
  """Softmax attention with grouped KV heads, computed head-major ([B, K, G x T, S]), the layout
  whose gradient needs no transposed copies of the [T, S] probabilities (and the cache's)."""
  B, T, N, H = q_BTNH.shape
  K, S = k_BKSH.shape[1:3]
  G = N // K
  q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  # Scores in float32 also for 16-bit q and k (as cuDNN, the CPU kernels and transformers keep them).
  logits_BKQS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKQS.reshape(B, K, G, T, S) * H**-0.5
  # A finite fill keeps fully masked rows (padding queries) NaN-free; their outputs are never used.
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKQS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTNH.dtype).reshape(B, K, G * T, S)
  out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BKSH)
  return out_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N * H)


# Training keeps q, k, v and recomputes the [T, S] probabilities in the backward pass: cheaper on
# every backend than storing them for all layers (what flash attention does).
_attend = jax.checkpoint(_attend, prevent_cse=False)


# Causal query chunks: 8 measured 3-5% faster than 4 for a packed CPU step (SmolLM2-135M shapes).
MAX_QUERY_CHUNKS = 8
MIN_QUERY_CHUNK = 128  # queries per chunk at the least


def _attend_causal(q_BTNH, k_BTKH, v_BTKH, mask_BTT, skip_padding: bool = False) -> jax.Array:
  """Causal self-attention in up to 8 query chunks, chunk c attending only to keys up to its end:
  the keys after it are masked anyway, so this skips up to 7/16 of the work.

  `skip_padding` goes through the sequences one at a time and skips the chunks that hold only
  padding (no query of the chunk sees itself). On CPU a branch skips real work, and a packed step's
  slots are all as long as its longest sequence, a batch of prompts as long as its longest prompt;
  on accelerators the sequences' attention is better batched.
  """
  T = q_BTNH.shape[1]
  chunks = max(1, min(MAX_QUERY_CHUNKS, T // MIN_QUERY_CHUNK))
  n = T // chunks
  if chunks == 1 or T % chunks:
    return _attend(q_BTNH, _heads_major(k_BTKH), _heads_major(v_BTKH), mask_BTT)

  def chunk(q_BTNH, k_BTKH, v_BTKH, mask_BTT, c):
    return _attend(
        q_BTNH[:, c * n : (c + 1) * n],
        _heads_major(k_BTKH[:, : (c + 1) * n]),
        _heads_major(v_BTKH[:, : (c + 1) * n]),
        mask_BTT[:, c * n : (c + 1) * n, : (c + 1) * n],
    )

  if not skip_padding:
    return jnp.concatenate([chunk(q_BTNH, k_BTKH, v_BTKH, mask_BTT, c) for c in range(chunks)], axis=1)

  def one_sequence(qkvm):
    q_1TNH, k_1TKH, v_1TKH, mask_1TT = (x[None] for x in qkvm)
    empty = jnp.zeros((1, n, q_1TNH.shape[2] * q_1TNH.shape[3]), q_1TNH.dtype)
    outs = []
    for c in range(chunks):
      real_n = jnp.diagonal(mask_1TT[0])[c * n : (c + 1) * n]
      outs.append(
          jax.lax.cond(
              jnp.any(real_n),
              lambda *a, c=c: chunk(*a, c),
              lambda *a: empty,
              q_1TNH,
              k_1TKH,
              v_1TKH,
              mask_1TT,
          )
      )
    return jnp.concatenate(outs, axis=1)[0]

  return jax.lax.map(one_sequence, (q_BTNH, k_BTKH, v_BTKH, mask_BTT))


def blas_linear(x_shape: tuple[int, ...]) -> bool:
  """Whether a float32 linear layer's product runs in OpenBLAS (`cpu_matmul`): on the CPU backend,
  for inputs with enough rows, when the kernels are available."""
  return jax.default_backend() == "cpu" and cpu_matmul.supports(x_shape) and cpu_kernels.available()


def fused_cpu_attention(config: ModelConfig) -> bool:
  """Whether attention runs in the fused CPU kernel (`cpu_attention`): on the CPU backend, for
  head sizes it supports, when the kernels built on this machine."""
  return (
      jax.default_backend() == "cpu" and cpu_attention.supports(config.head_dim) and cpu_kernels.available()
  )


def packed_lora_kernel(width: int) -> bool:
  """Whether the side of a LoRA branch of packed rows that meets a layer's input or output of this
  width runs in the CPU kernels (`cpu_lora`): on the CPU backend, for widths they take, when they
  built on this machine."""
  return jax.default_backend() == "cpu" and cpu_lora.supports(width) and cpu_kernels.available()


# Implementations of the packed training rows' attention, `ModelConfig.attention` (`ATTENTION`):
#   xla: query chunks of einsum attention (`_attend_causal`), its probabilities recomputed in the
#     backward pass; every backend.
#   cudnn: `jax.nn.dot_product_attention`'s cuDNN flash attention over each sequence's real tokens;
#     NVIDIA GPUs from Ampere on, bfloat16 / float16, head dims up to 128 (256 from Hopper on). On
#     an H200 (1.5B shapes) it ran the packed step 10-16% faster than xla and compiled it in 15-17
#     s instead of 22-41 s (docs/measured.md, "On an H200"). Its residuals are the kernel's own, unnamed, so
#     under the SAVED_ONLY remat policy its forward runs again in the backward pass: about 1% of
#     the step in the H200's profile.
#   auto: the fused kernel on CPU (`fused_cpu_attention`), cudnn where it runs, else xla.


def _cudnn_attention_problem(config: ModelConfig) -> Optional[str]:
  """Why cuDNN flash attention cannot run this model here, or None when it can."""
  device = jax.devices()[0]
  try:
    capability = tuple(int(x) for x in str(getattr(device, "compute_capability", "")).split("."))
  except ValueError:
    capability = ()
  if device.platform != "gpu" or capability < (8, 0):
    have = ".".join(map(str, capability)) or "none"
    return (
        f"it needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer, not {device.device_kind} "
        f"(compute capability: {have})"
    )
  if config.dtype not in ("bfloat16", "float16"):
    return f"it takes bfloat16 or float16, not {config.dtype} (model.dtype)"
  largest = 256 if capability >= (9, 0) else 128
  if config.head_dim > largest or config.head_dim % 8:
    return f"it takes head dims up to {largest} in multiples of 8 on this GPU, not {config.head_dim}"
  return None


def packed_attention(config: ModelConfig) -> str:
  """The attention packed training rows run here: "fused" (the CPU kernel), "cudnn" or "xla"."""
  if config.attention not in ATTENTION:
    raise ValueError(f"model.attention={config.attention!r}: use one of {list(ATTENTION)}.")
  if config.attention == "auto":
    if fused_cpu_attention(config):
      return "fused"
    return "xla" if _cudnn_attention_problem(config) else "cudnn"
  return config.attention


def runnable_attentions(config: ModelConfig) -> dict[str, str]:
  """The packed-row attentions that run for this model here, {name: its `attention` value}: xla
  everywhere, the fused kernel on CPU ("auto"), cudnn where it runs."""
  found = {"xla": "xla"} if _cudnn_attention_problem(config) else {"xla": "xla", "cudnn": "cudnn"}
  found.setdefault(packed_attention(dataclasses.replace(config, attention="auto")), "auto")
  return found


def check_attention(config: ModelConfig) -> None:
  """Raises a ValueError naming what to change when `config.attention` cannot run here."""
  packed_attention(config)  # a known name
  problem = _cudnn_attention_problem(config) if config.attention == "cudnn" else None
  if problem:
    raise ValueError(
        f"model.attention='cudnn' cannot run here: {problem}. Set model.attention='auto' or 'xla'."
    )


def _flash_attend(q_BTNH, k_BTKH, v_BTKH, real_BT) -> jax.Array:
  """Causal cuDNN flash attention over each row's real tokens (real_BT: a prefix of the row);
  [B, T, N x H], zeros at padding. q, k and v are zeroed at padding too: so is their gradient
  there, whatever the kernel leaves in its padded positions, which would otherwise reach the
  projections' LoRA gradients through the padding tokens' rows."""
  lengths_B = jnp.sum(real_BT, axis=1, dtype=jnp.int32)
  real_BT11 = real_BT[:, :, None, None]
  q_BTNH, k_BTKH, v_BTKH = (jnp.where(real_BT11, x, 0) for x in (q_BTNH, k_BTKH, v_BTKH))
  out_BTNH = jax.nn.dot_product_attention(
      q_BTNH,
      k_BTKH,
      v_BTKH,
      is_causal=True,
      query_seq_lengths=lengths_B,
      key_value_seq_lengths=lengths_B,
      implementation="cudnn",
  )
  return jnp.where(real_BT11, out_BTNH, 0).reshape(q_BTNH.shape[:2] + (-1,))


def _fused_attend(q_BTNH, k_BTKH, v_BTKH, segments_BT) -> jax.Array:
  """The fused CPU kernel (float32) on rows of segments; [B, T, N x H] in q's dtype."""
  out_BTNH = cpu_attention.causal_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT)
  return out_BTNH.reshape(q_BTNH.shape[:2] + (-1,)).astype(q_BTNH.dtype)


class Attention(nn.Module):
  config: ModelConfig
  prefill: bool = False  # see `forward`

  @nn.compact
  def __call__(
      self, x_BTD, positions_BT, mask_BTS, kv, lora, lora_hp, packing=None, prompts=None, wanted_BT=None
  ):
    """`wanted_BT`: the rows whose output is needed (None: every token's); keys and values are
    computed for every token."""
    c = self.config
    real_BT = positions_BT >= 0
    wanted_BT = real_BT if wanted_BT is None else wanted_BT
    dense = lambda n, f, b: functools.partial(
        Linear(f, b, c.dtype, c.param_dtype, name=n),
        adapter_BXA=block_adapters(packing, prompts),
        real=wanted_BT if n in ("q_proj", "o_proj") else real_BT,
        dropout_keys_BT=dropout_keys(packing),
    )
    B, T, _ = x_BTD.shape
    loras = [_sub(lora, name) for name in ("q_proj", "k_proj", "v_proj")]
    xa_q, xa_k, xa_v = shared_lora_inputs(
        x_BTD, loras, lora_hp, block_adapters(packing, prompts), c.dtype, dropout_keys(packing) is not None
    )
    q = dense("q_proj", c.num_heads * c.head_dim, c.qkv_bias)(x_BTD, loras[0], lora_hp, xa=xa_q)
    k = dense("k_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x_BTD, loras[1], lora_hp, xa=xa_k)
    v = dense("v_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x_BTD, loras[2], lora_hp, xa=xa_v)
    q_BTNH = q.reshape(B, T, c.num_heads, c.head_dim)
    k_BTKH = k.reshape(B, T, c.num_kv_heads, c.head_dim)
    v_BTKH = v.reshape(B, T, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q_BTNH = RMSNorm(c.rms_norm_eps, c.param_dtype, name="q_norm")(q_BTNH)
      k_BTKH = RMSNorm(c.rms_norm_eps, c.param_dtype, name="k_norm")(k_BTKH)
    inv_freq = rope_inv_freq(c)
    q_BTNH = saved(apply_rope(q_BTNH, positions_BT, inv_freq))
    k_BTKH = saved(apply_rope(k_BTKH, positions_BT, inv_freq))
    v_BTKH = saved(v_BTKH)
    skip_padding = jax.default_backend() == "cpu"
    attention = packed_attention(c) if packing is not None else None
    if attention == "cudnn":  # each sequence's real tokens: its slot's start
      seq = packing.to_sequences
      out_BTD = packing.to_rows(_flash_attend(seq(q_BTNH), seq(k_BTKH), seq(v_BTKH), seq(real_BT)))
      out_BTD = saved(out_BTD)
      return dense("o_proj", c.embed_dim, c.o_bias)(out_BTD, _sub(lora, "o_proj"), lora_hp), None
    if attention == "fused":  # the CPU kernel reads the rows as they are, each sequence to itself
      out_BTD = _fused_attend(q_BTNH, k_BTKH, v_BTKH, packing.row_segments(positions_BT))
      return dense("o_proj", c.embed_dim, c.o_bias)(out_BTD, _sub(lora, "o_proj"), lora_hp), None
    if attention == "xla":  # attention within each sequence (mask_BTS: in sequence layout)
      seq = packing.to_sequences
      # A row of one sequence pads only its slot's bucket: skipping measured no faster there, and
      # the branches cost ~3.6 s more to compile a training step.
      several = packing.seq_blocks_BUW.shape[1] > 1
      out_BTD = packing.to_rows(
          _attend_causal(
              seq(q_BTNH), seq(k_BTKH), seq(v_BTKH), mask_BTS, skip_padding=skip_padding and several
          )
      )
      out_BTD = saved(out_BTD)  # the fused kernel saves its own
      return dense("o_proj", c.embed_dim, c.o_bias)(out_BTD, _sub(lora, "o_proj"), lora_hp), None

    new_kv = None  # no cache: attend within the given tokens
    if kv is not None:  # write this step's keys/values into the layer's slots, attend over them
      k_cache_LBKSH, v_cache_LBKSH, layer, start = kv
      zero = jnp.zeros((), jnp.int32)
      idx = (layer, zero, zero, start, zero)
      k_new, v_new = k_BTKH, v_BTKH
      if prompts is not None:  # packed prompts: each to its own cache row
        k_new, v_new = prompts.to_cache(k_BTKH, 0), prompts.to_cache(v_BTKH, 0)
      k_cache_LBKSH = jax.lax.dynamic_update_slice(
          k_cache_LBKSH, _heads_major(k_new)[None].astype(k_cache_LBKSH.dtype), idx
      )
      v_cache_LBKSH = jax.lax.dynamic_update_slice(
          v_cache_LBKSH, _heads_major(v_new)[None].astype(v_cache_LBKSH.dtype), idx
      )
      new_kv = (k_cache_LBKSH, v_cache_LBKSH)

    if prompts is not None:  # packed prompts (CPU kernel only): each to itself and the shared prefix
      out_BTD = _fused_attend(q_BTNH, k_BTKH, v_BTKH, prompts.segments_1T)
    elif self.prefill and fused_cpu_attention(c):  # left-padded prompts: one segment per row
      out_BTD = _fused_attend(q_BTNH, k_BTKH, v_BTKH, jnp.where(positions_BT >= 0, 0, -1).astype(jnp.int32))
    elif self.prefill:  # the cache held nothing before these tokens: they attend to each other only
      out_BTD = _attend_causal(q_BTNH, k_BTKH, v_BTKH, mask_BTS[:, :, :T], skip_padding=skip_padding)
    elif kv is None:
      out_BTD = _attend(q_BTNH, _heads_major(k_BTKH), _heads_major(v_BTKH), mask_BTS)
    elif fused_cpu_attention(c) and k_cache_LBKSH.dtype == jnp.float32:  # the layer where it lies
      out_BTNH = cpu_attention.cache_attention(q_BTNH, k_cache_LBKSH, v_cache_LBKSH, layer, mask_BTS)
      out_BTD = out_BTNH.reshape(B, T, -1).astype(q_BTNH.dtype)
    else:
      k_BKSH, v_BKSH = (x[layer].astype(c.dtype) for x in (k_cache_LBKSH, v_cache_LBKSH))
      out_BTD = _attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS)
    out_BTD = dense("o_proj", c.embed_dim, c.o_bias)(out_BTD, _sub(lora, "o_proj"), lora_hp)
    return out_BTD, new_kv


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, lora, lora_hp, adapter_BXA=None, wanted_BT=None, dropout_keys_BT=None):
    """`wanted_BT`: the rows whose output is needed (None: all)."""
    c = self.config
    dense = lambda n, f: functools.partial(
        Linear(f, False, c.dtype, c.param_dtype, name=n),
        adapter_BXA=adapter_BXA,
        real=wanted_BT,
        dropout_keys_BT=dropout_keys_BT,
    )
    loras = [_sub(lora, "gate_proj"), _sub(lora, "up_proj")]
    dropout = dropout_keys_BT is not None
    xa_gate, xa_up = shared_lora_inputs(x_BTD, loras, lora_hp, adapter_BXA, c.dtype, dropout)
    gate = saved(dense("gate_proj", c.mlp_dim)(x_BTD, loras[0], lora_hp, xa=xa_gate))
    up = saved(dense("up_proj", c.mlp_dim)(x_BTD, loras[1], lora_hp, xa=xa_up))
    return dense("down_proj", c.embed_dim)(nn.silu(gate) * up, _sub(lora, "down_proj"), lora_hp)


class Block(nn.Module):
  """One pre-norm decoder layer; scanned over the layer axis by `Transformer`."""

  config: ModelConfig
  prefill: bool = False  # see `forward`

  @nn.compact
  def __call__(
      self, carry, layer, lora, positions_BT, mask_BTS, start, lora_hp, packing, prompts, last_rows_BT
  ):
    """`last_rows_BT`: the rows of the last layer's output that are read (the selected logits'),
    None: all; the last layer's other rows need only their keys and values, and the linear
    layers' kernel skips their other products (`linear_product`): their output is not the layer's."""
    c = self.config
    x_BTD, k_cache, v_cache = carry
    kv = None if k_cache is None else (k_cache, v_cache, layer, start)
    wanted_BT = positions_BT >= 0
    if last_rows_BT is not None:
      wanted_BT &= (layer < c.num_layers - 1) | last_rows_BT
    if packing is not None:
      packing = packing.for_layer(layer)
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name="input_norm")(x_BTD)
    h, new_kv = Attention(c, self.prefill, name="attn")(
        h, positions_BT, mask_BTS, kv, _sub(lora, "attn"), lora_hp, packing, prompts, wanted_BT
    )
    x_BTD = saved(x_BTD + h)
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name="post_attn_norm")(x_BTD)
    x_BTD = x_BTD + MLP(c, name="mlp")(
        h, _sub(lora, "mlp"), lora_hp, block_adapters(packing, prompts), wanted_BT, dropout_keys(packing)
    )
    if new_kv is not None:
      k_cache, v_cache = new_kv
    return (x_BTD, k_cache, v_cache), None


def _through_bits(x):
  bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), "saved")
  return jax.lax.bitcast_convert_type(bits, x.dtype)


@jax.custom_jvp
def _saved_as_bits(x):
  return _through_bits(x)


@_saved_as_bits.defjvp
def _saved_as_bits_jvp(primals, tangents):
  # The primal inline, not a nested custom_jvp call: the remat policy sees only top-level names.
  return _through_bits(primals[0]), tangents[0]


def saved(x):
  """x, named for the remat policy SAVED_ONLY to keep for the backward pass. A 16-bit float is kept
  as its bits: XLA:CPU writes a bfloat16 array into the layer scan's stack of saved values by
  converting the whole stack to float32 and back (its float normalization; 0.9 s of a 6 s
  bfloat16 step), an integer one in place."""
  if x.dtype in (jnp.bfloat16, jnp.float16):
    return _saved_as_bits(x)
  return checkpoint_name(x, "saved")


# Without remat, the backward pass keeps only the values named "saved" (the matmul outputs it needs:
# q, k, v, attention output, gate, up; and the residual stream) and recomputes the cheap rest (norms,
# SiLU, the LoRA branches' rank-R products): each kept value is a copy into the scan's stacked
# residuals and a copy back, which cost a CPU step more than the recomputation.
SAVED_ONLY = jax.checkpoint_policies.save_only_these_names("saved")


class Transformer(nn.Module):
  config: ModelConfig
  remat: bool = True  # training keeps each layer's input (else SAVED_ONLY) for the backward pass
  prefill: bool = False  # see `forward`

  @nn.compact
  def __call__(
      self,
      tokens_BT,
      positions_BT,
      cache: Optional[KVCache] = None,
      lora=None,
      lora_hp=(1.0, 0.0),
      segments_BT=None,
      select_BI=None,
      packing: Optional[Packing] = None,
      prompts: Optional[PackedPrompts] = None,
  ):
    c = self.config
    embedding_VD = self.param(
        "embedding", nn.initializers.normal(0.02), (c.vocab_size, c.embed_dim), c.param_dtype
    )
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(c.dtype)
    T = tokens_BT.shape[1]

    query_segments_BT = jnp.zeros_like(tokens_BT) if segments_BT is None else segments_BT
    if cache is None:
      key_positions_BS, key_segments_BS = positions_BT, query_segments_BT
      start = jnp.zeros((), jnp.int32)
      carry = (x_BTD, None, None)
    else:
      start = cache.end_index
      at = (jnp.zeros((), jnp.int32), start)
      new_positions = positions_BT if prompts is None else prompts.to_cache(positions_BT, -1)
      key_positions_BS = jax.lax.dynamic_update_slice(cache.positions_BS, new_positions.astype(jnp.int32), at)
      key_segments_BS = cache.segments_BS  # packed prompts: each cache row holds one
      if prompts is None:
        key_segments_BS = jax.lax.dynamic_update_slice(
            cache.segments_BS, query_segments_BT.astype(jnp.int32), at
        )
      carry = (x_BTD, cache.k_LBKSH, cache.v_LBKSH)
    if prompts is not None:  # the fused kernel masks by segments
      mask_BTS = None
    elif packing is not None:  # packed rows: attention runs on their sequences (Packing)
      key_positions_BS = packing.to_sequences(positions_BT + 1) - 1  # padding slots: -1
      index_S = jnp.arange(key_positions_BS.shape[1])
      mask_BTS = (key_positions_BS[:, None, :] >= 0) & (index_S[None, :, None] >= index_S)
    else:
      mask_BTS = (key_positions_BS[:, None, :] >= 0) & (
          key_positions_BS[:, None, :] <= positions_BT[:, :, None]
      )
    if segments_BT is not None:  # packed rows: segment 0 (a shared prefix) is visible to all
      mask_BTS &= (key_segments_BS[:, None, :] == 0) | (
          key_segments_BS[:, None, :] == query_segments_BT[:, :, None]
      )

    last_rows_BT = None
    if select_BI is not None:
      rows_B1 = jnp.arange(tokens_BT.shape[0])[:, None]
      last_rows_BT = jnp.zeros(tokens_BT.shape, bool).at[rows_B1, select_BI].set(True)
    layers = nn.scan(
        nn.remat(Block, prevent_cse=False, policy=None if self.remat else SAVED_ONLY),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, 0) + (nn.broadcast,) * 7,
        length=c.num_layers,
    )(c, self.prefill, name="layers")
    carry, _ = layers(
        carry,
        jnp.arange(c.num_layers),
        lora,
        positions_BT,
        mask_BTS,
        start,
        # float32 whatever the compute dtype: a bfloat16 alpha / rank of 16 / 12 is 1.336, not
        # the 1.333 that the exported (merged or PEFT) model applies.
        tuple(jnp.asarray(v, jnp.float32) for v in lora_hp),
        packing,
        prompts,
        last_rows_BT,
    )
    x_BTD, k_cache, v_cache = carry

    if select_BI is not None:  # only the positions whose logits are needed (saves the V-sized head)
      x_BTD = jnp.take_along_axis(x_BTD, select_BI[..., None], axis=1)
    x_BTD = RMSNorm(c.rms_norm_eps, c.param_dtype, name="norm")(x_BTD)
    # Logits in float32 whatever the compute dtype: bfloat16 logits (3 significant digits) would
    # shift candidate log-likelihoods, and so the margins, by tenths.
    if c.tie_embeddings:
      logits_BTV = linear_product(x_BTD, embedding_VD.astype(c.dtype), transpose_w=True)
    else:
      logits_BTV = Linear(c.vocab_size, False, c.dtype, c.param_dtype, "float32", name="lm_head")(x_BTD)
    new_cache = None
    if cache is not None:
      filled = T if prompts is None else prompts.to_cache_BP.shape[1]
      new_cache = KVCache(k_cache, v_cache, key_positions_BS, key_segments_BS, start + filled)
    return logits_BTV.astype(jnp.float32), new_cache


def forward(
    config: ModelConfig,
    params: Params,
    tokens_BT,
    positions_BT,
    cache=None,
    lora=None,
    *,
    segments_BT=None,
    select_BI=None,
    packing=None,
    remat=True,
    prefill=False,
    prompts=None,
):
  """Pure forward pass: (logits float32, updated cache or None).

  `lora` is a `ttsi_jax.model.lora.Adapter` (or None: the base model, at no extra cost).
  `segments_BT` packs several sequences in a row: a token sees keys of its own segment and of
  segment 0 (e.g. one prompt, or a cached prefix, shared by N candidate continuations).
  `select_BI` picks the time indices whose logits are returned (logits_BIV instead of logits_BTV).
  `packing` runs packed training rows: `lora` then holds A adapters (leaves [L, A, in, R] /
  [L, A, R, out]) and each block of tokens uses its own (see `Packing`); its dropout keys turn on
  LoRA dropout (training only).
  `remat` recomputes each layer in the backward pass (saves memory, costs a forward); without it
  the backward pass keeps the matmul outputs it needs and recomputes the cheap rest (`SAVED_ONLY`).
  `prefill` promises that `cache` is empty (fresh from `KVCache.init`) and that each row is one
  left-padded prompt (positions -1, then rising): the tokens then attend to each other
  causally (the fused kernel on CPU, query chunks elsewhere), not over all the cache's slots (the
  free slots after the prompt hold nothing to see).
  `prompts` (with `prefill`, on the fused CPU kernel): the tokens are one row of prompts packed back to
  back (`PackedPrompts`), written into the cache's rows left-padded as above; with per-row adapters
  (`PackedPrompts.adapter_1XA`) `lora` holds one adapter per cache row, laid out as for `packing`.
  """
  if prefill and segments_BT is not None:
    raise ValueError("forward(prefill=True) takes left-padded prompts, one per row, not segments_BT.")
  if prompts is not None and not (prefill and cache is not None and fused_cpu_attention(config)):
    raise ValueError("forward(prompts=...) is a prefill into a fresh cache on the fused CPU kernel.")
  if lora is None:
    weights, hp = None, (1.0, 0.0)
  else:
    weights, hp = lora.weights, (lora.scale, lora.dropout)
  return Transformer(config, remat, prefill).apply(
      {"params": params},
      tokens_BT,
      positions_BT,
      cache,
      weights,
      hp,
      segments_BT,
      select_BI,
      packing,
      prompts,
  )


def param_shapes(config: ModelConfig) -> Params:
  """Abstract param tree (ShapeDtypeStructs): the structure every loader and sharding rule targets."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens, tokens)
  return variables["params"]
