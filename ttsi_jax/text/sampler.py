"""Batched generation: one jitted prefill + `lax.while_loop` decode over an explicit KV cache.

Prompts are left-padded to a length bucket and the batch is padded to a size bucket, so a stage
compiles once per (batch bucket, prompt bucket, max_new_tokens), never once per prompt. On the fused
CPU attention kernel `Sampler.prefill` and `Sampler.generate` pack the prompts back to back in one
row instead (no linear work on padding) and fill the same left-padded cache; the row's length is a
bucket of the prompts' total, one more shape to compile for. Every row
has its own RNG key (`fold_in(row_key, step)`), so a row's sample does not depend on its batch
neighbours. `generate_tokens` is a pure function of (params, tokens, positions, keys, lora): it can be
`jax.vmap`-ed over a leading adapter axis to decode with A adapted models in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ttsi_jax.model import cpu_attention
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import KVCache, ModelConfig

MIN_PROMPT_BUCKET = 32
# Prompt lengths pad to 2^k x {1, 1.25, 1.5, 1.75} (at most 1/5 padding): every padded slot costs
# the prefill's linear layers a token. H on 8 BFCL prompts: 1.12 s per prompt against 1.20 s with
# 2 buckets per octave (docs/measured.md).
PROMPT_BUCKETS_PER_OCTAVE = 4
# Prompts of per-row adapters packed in one row start on blocks of this many tokens, each block
# through its prompt's adapter (the LoRA kernels of packed training rows); a prompt pads its last
# block, so smaller blocks pad less.
PER_ROW_BLOCK = 16


@flax.struct.dataclass
class SamplingParams:
  """Jitted functions take it as a pytree: `max_new_tokens` (a shape) is static, temperature and
  top_p are traced, so greedy and sampled decoding share one compiled program."""

  max_new_tokens: int = flax.struct.field(pytree_node=False, default=64)
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0


# The most sizes per doubling that `bucket` pads to, whatever its caller asks (`buckets_per_octave`):
# powers of two, so that every size is one of its callers' own (a bucket of a bucket is itself).
BUCKETS_PER_OCTAVE = (1, 2, 4)
_buckets_per_octave: int | None = None


def bucket(n: int, minimum: int = 1, per_octave: int = 2) -> int:
  """Smallest size >= max(n, minimum) among 2^k + j * 2^k / per_octave (j < per_octave): with the
  default 2, 2^k or 1.5 * 2^k (at most 1/3 padding waste); 4 wastes at most 1/5 for twice the
  shapes (so twice the compilations). At most `buckets_per_octave`'s sizes per doubling within it."""
  if _buckets_per_octave:
    per_octave = min(per_octave, _buckets_per_octave)
  n = max(n, minimum, 1)
  base = 1 << max(0, (n - 1).bit_length() - 1)  # n in (base, 2 * base]
  step = max(1, base // per_octave)
  return base + -(-(n - base) // step) * step


@contextlib.contextmanager
def buckets_per_octave(limit: int):
  """Within the block every length (prompts, packed training rows, decoded spans, batches) pads to
  at most `limit` sizes per doubling (1: powers of two), where callers ask up to 4: fewer shapes to
  compile, for more padding. A run meets new lengths wave after wave; where a compile costs more
  than the padding saves (a tiny model; a large one on an accelerator) fewer sizes are faster.
  One setting per process at a time (a module global, as `bucket` is called everywhere)."""
  global _buckets_per_octave
  if limit not in BUCKETS_PER_OCTAVE + (None,):
    raise ValueError(f"buckets_per_octave must be one of {BUCKETS_PER_OCTAVE}, not {limit!r}.")
  previous, _buckets_per_octave = _buckets_per_octave, limit
  try:
    yield
  finally:
    _buckets_per_octave = previous


def left_pad(
    prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """tokens_BP and positions_BP (position -1 marks padding); rows beyond len(prompts) are padding."""
  tokens_BP = np.full((batch, length), pad_id, np.int32)
  positions_BP = np.full((batch, length), -1, np.int32)
  for b, ids in enumerate(prompts):
    n = len(ids)
    if n > length:
      raise ValueError(f"Prompt {b} has {n} tokens, more than the {length} allowed.")
    if n:
      tokens_BP[b, length - n :] = ids
      positions_BP[b, length - n :] = np.arange(n)
  return tokens_BP, positions_BP


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
  """How many leading tokens all the prompts (two or more) share: `pack_prompts` runs them once."""
  if len(prompts) < 2:
    return 0
  first = np.asarray(prompts[0])
  shared = min(len(p) for p in prompts)
  for ids in prompts[1:]:
    differ = np.flatnonzero(np.asarray(ids[:shared]) != first[:shared])
    shared = int(differ[0]) if differ.size else shared
  return shared


def pack_prompts(
    prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int, per_row_adapters: bool = False
):
  """One row of the prompts back to back (tokens_1T, positions_1T; the row pads to a length bucket),
  the `transformer.PackedPrompts` that puts each into its cache row left-padded to `length` slots,
  and last_1B, the row index of each prompt's last token (padding rows: 0).

  The tokens all prompts begin with (a task's system prompt: a third of a BFCL prompt) open the row
  once, as a shared prefix that every prompt's own tokens see (`cpu_attention.SHARED_PREFIX`); each
  cache row still gets the whole prompt.
  `per_row_adapters`: prompt b runs through adapter b. Each prompt then starts a block of
  `PER_ROW_BLOCK` tokens, whose LoRA branch is its adapter's (`PackedPrompts.adapter_1XA`), and
  nothing is shared: the same tokens under two adapters have different keys and values."""
  block = PER_ROW_BLOCK if per_row_adapters else 1
  shared = 0 if per_row_adapters else shared_prefix_length(prompts)
  total = shared + sum(-(-(len(p) - shared) // block) * block for p in prompts)
  T = -(-bucket(total, MIN_PROMPT_BUCKET, PROMPT_BUCKETS_PER_OCTAVE) // block) * block
  tokens_1T = np.full((1, T), pad_id, np.int32)
  positions_1T = np.full((1, T), -1, np.int32)
  segments_1T = np.full((1, T), -1, np.int32)
  to_cache_BP = np.full((batch, length), T, np.int32)
  last_1B = np.zeros((1, batch), np.int32)
  adapter_1XA = np.zeros((1, T // block, batch), bool) if per_row_adapters else None
  if shared:
    tokens_1T[0, :shared] = prompts[0][:shared]
    positions_1T[0, :shared] = np.arange(shared)
    segments_1T[0, :shared] = cpu_attention.SHARED_PREFIX
  at = shared
  for b, ids in enumerate(prompts):
    n = len(ids)
    if n > length:
      raise ValueError(f"Prompt {b} has {n} tokens, more than the {length} allowed.")
    own = n - shared
    tokens_1T[0, at : at + own] = ids[shared:]
    positions_1T[0, at : at + own] = np.arange(shared, n)
    segments_1T[0, at : at + own] = b
    to_cache_BP[b, length - n :] = np.concatenate([np.arange(shared), np.arange(at, at + own)])
    last_1B[0, b] = at + own - 1 if own else max(n - 1, 0)
    if per_row_adapters:
      adapter_1XA[0, at // block : -(-(at + own) // block), b] = True
    at += -(-own // block) * block
  packed = transformer.PackedPrompts(segments_1T, to_cache_BP, adapter_1XA)
  return tokens_1T, positions_1T, packed, last_1B


def row_keys(rng: Optional[jax.Array], rows: int, batch: int) -> jax.Array:
  """keys_B for `rows` real rows padded to `batch`. `rng`: one key, split over the batch, or keys_B,
  one key per real row (a row then samples from its own key alone, whichever rows share its
  batch); padding rows reuse the last real row's key (they are inactive)."""
  rng = _typed(jax.random.key(0) if rng is None else rng)
  if rng.ndim == 0:
    return jax.random.split(rng, batch)
  if rng.shape[0] != rows or not 0 < rows <= batch:
    raise ValueError(f"Got {rng.shape[0]} row keys for {rows} rows (batch {batch}).")
  return rng[np.minimum(np.arange(batch), rows - 1)]


def _typed(rng: jax.Array) -> jax.Array:
  """A typed key array (`jax.random.key`); a raw uint32 one (`jax.random.PRNGKey`) is wrapped, so
  that its two words are not read as two keys."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
    raise ValueError(
        f"rng must be a jax.random.key (or a PRNGKey's uint32 [..., 2]), got {rng.dtype}{rng.shape}."
    )
  return jax.random.wrap_key_data(rng)


def fold_in(rng: Optional[jax.Array], data: int) -> jax.Array:
  """`jax.random.fold_in` of one key, or of each of keys_B."""
  rng = _typed(jax.random.key(0) if rng is None else rng)
  if rng.ndim == 0:
    return jax.random.fold_in(rng, data)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, data)


def sample_token(logits_BV: jax.Array, keys_B: jax.Array, temperature, top_p) -> jax.Array:
  """Greedy at temperature 0, else a draw at `temperature` from the top-p nucleus. Temperature and
  top_p may be traced: a branch (`lax.cond`) runs only what they ask for (no vocabulary sort for
  greedy or top_p = 1)."""

  def nucleus(logits_BV):
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
    keep_BV = keep_BV.at[:, 0].set(True)  # the top token always, even at top_p <= 0
    threshold_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)

  def draw(logits_BV):
    logits_BV = logits_BV / temperature
    logits_BV = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits_BV)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)

  greedy = lambda logits_BV: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0.0, draw, greedy, logits_BV)


@flax.struct.dataclass
class Prefix:
  """A prefilled prompt: its KV cache (with free slots after it), last logits and next positions.

  Immutable like every pytree here: continuing from a prefix never changes it, so one prefill serves
  candidate scoring, several answers and every stage of constrained decoding.
  """

  cache: KVCache
  last_logits_BV: jax.Array
  next_position_B: jax.Array


# vmap axes of one-row prefixes of per-row adapters: every row writes the same cache slots, so the
# end index is one scalar (a per-row one makes each cache write a scatter).
_ROW_CACHE_AXES = KVCache(0, 0, 0, 0, None)
_ROWS_SHARE_END = Prefix(_ROW_CACHE_AXES, 0, 0)


def _shared_end(prefix: Prefix) -> Prefix:
  """Per-row one-row prefixes (vmapped calls return the end index once per row) with the one end
  index they share."""
  end = prefix.cache.end_index
  return prefix.replace(cache=prefix.cache.replace(end_index=end.reshape(-1)[0]))


def _prefill(config, params, tokens_BP, positions_BP, lora, length) -> Prefix:
  B, P = tokens_BP.shape
  cache = KVCache.init(config, B, length)
  last_B1 = jnp.full((B, 1), P - 1, jnp.int32)
  logits_B1V, cache = transformer.forward(
      config, params, tokens_BP, positions_BP, cache, lora, select_BI=last_B1, prefill=True
  )
  return Prefix(cache, logits_B1V[:, 0], jnp.max(positions_BP, axis=1) + 1)


def _prefill_packed(config, params, tokens_1T, positions_1T, prompts, last_1B, lora, length) -> Prefix:
  """`_prefill` of prompts packed in one row (`pack_prompts`): the same `Prefix`, without the
  linear layers' work on left padding."""
  cache = KVCache.init(config, prompts.to_cache_BP.shape[0], length)
  logits_1BV, cache = transformer.forward(
      config, params, tokens_1T, positions_1T, cache, lora, select_BI=last_1B, prefill=True, prompts=prompts
  )
  return Prefix(cache, logits_1BV[0], jnp.max(cache.positions_BS, axis=1) + 1)


def _extend(config, params, prefix: Prefix, tokens_BE, lengths_B, lora) -> Prefix:
  """Appends left-padded tokens (row b: its last lengths_B[b]) to a prefix."""
  E = tokens_BE.shape[1]
  if E == 0:  # no row extends: no pass, no cache slots
    return prefix
  offsets_BE = jnp.arange(E) - (E - lengths_B[:, None])
  positions_BE = jnp.where(offsets_BE >= 0, prefix.next_position_B[:, None] + offsets_BE, -1)
  last_B1 = jnp.full((tokens_BE.shape[0], 1), E - 1, jnp.int32)
  logits_B1V, cache = transformer.forward(
      config, params, tokens_BE, positions_BE, prefix.cache, lora, select_BI=last_B1
  )
  last_BV = jnp.where(lengths_B[:, None] > 0, logits_B1V[:, 0], prefix.last_logits_BV)
  return Prefix(cache, last_BV, prefix.next_position_B + lengths_B)


def _decode(
    config,
    params,
    prefix: Prefix,
    keys_B,
    lora,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
    active_B=None,
    per_row: bool = False,
    end_states_VS=None,
):
  """New tokens_BO after a prefix (pad after a row's stop token; inactive rows stop at once).

  `end_states_VS` (int8 [V, S]): a row also ends when its tokens drive a state machine (state 0 at
  the start, state s to end_states_VS[token, s]) into its last state, S - 1, which is kept; its
  output then shows the end as a stop token after that token. It ends a value where the caller's
  text is complete (`constrained.literal_end_states`) rather than after all max_new_tokens.

  `per_row`: row b has its own adapter (`lora` leaves [B, ...]) and `prefix` holds B one-row
  prefixes ([B, 1, ...]; the end index shared): the loop runs over all rows and each step's
  forward pass is vmapped over them. (A loop vmapped over rows selects between its old and new
  state, the whole cache, on every step.)"""
  B = keys_B.shape[0]
  O = sampling.max_new_tokens
  if end_states_VS is not None and not stop_ids:
    raise ValueError("An end rule (end_states_VS) marks a row's end with a stop token: give stop_ids.")
  stop = jnp.asarray(stop_ids, jnp.int32)
  if per_row:
    forward_rows = jax.vmap(
        lambda lora, tokens, positions, cache: transformer.forward(
            config, params, tokens, positions, cache, lora
        ),
        in_axes=(0, 0, 0, _ROW_CACHE_AXES),
        out_axes=(0, _ROW_CACHE_AXES),
    )

    def forward(tokens_B1, positions_B1, cache):
      logits_B11V, cache = forward_rows(lora, tokens_B1[:, None], positions_B1[:, None], cache)
      return logits_B11V[:, 0], cache

    prefix = Prefix(prefix.cache, prefix.last_logits_BV[:, 0], prefix.next_position_B[:, 0])
  else:
    forward = lambda tokens_B1, positions_B1, cache: transformer.forward(
        config, params, tokens_B1, positions_B1, cache, lora
    )

  def sample(logits_BV, step):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    return sample_token(logits_BV, keys, sampling.temperature, sampling.top_p)

  def advance(end_state_B, new_B):  # the rows' end-rule states after new_B; all 0 without one
    if end_states_VS is None:
      return end_state_B
    return end_states_VS[new_B, end_state_B].astype(jnp.int32)

  def ended(end_state_B):
    if end_states_VS is None:
      return jnp.zeros_like(end_state_B, bool)
    return end_state_B == end_states_VS.shape[1] - 1

  first_B = sample(prefix.last_logits_BV, 0)
  end_state_B = advance(jnp.zeros((B,), jnp.int32), first_B)
  done_B = jnp.isin(first_B, stop) | ended(end_state_B)
  last_step_B = jnp.where(ended(end_state_B), 0, O)  # the step that ended a row by the rule
  if active_B is not None:
    done_B |= ~active_B
  out_BO = jnp.full((B, O), pad_id, jnp.int32).at[:, 0].set(first_B)

  def cond(state):
    step, _, _, done_B, _, _, _ = state
    return (step < O) & ~jnp.all(done_B)

  def body(state):
    step, last_B, cache, done_B, end_state_B, last_step_B, out_BO = state
    positions_B1 = (prefix.next_position_B + step - 1)[:, None]
    logits_B1V, cache = forward(last_B[:, None], positions_B1, cache)
    new_B = jnp.where(done_B, pad_id, sample(logits_B1V[:, -1], step))
    end_state_B = jnp.where(done_B, end_state_B, advance(end_state_B, new_B))
    last_step_B = jnp.where(~done_B & ended(end_state_B), step, last_step_B)
    done_B = done_B | jnp.isin(new_B, stop) | ended(end_state_B)
    out_BO = jax.lax.dynamic_update_slice(out_BO, new_B[:, None], (0, step))
    return step + 1, new_B, cache, done_B, end_state_B, last_step_B, out_BO

  state = (jnp.ones((), jnp.int32), first_B, prefix.cache, done_B, end_state_B, last_step_B, out_BO)
  last_step_B, out_BO = jax.lax.while_loop(cond, body, state)[-2:]
  if end_states_VS is None:
    return out_BO
  # A row ended by the rule: a stop token after its last one (callers trim at stop tokens).
  return jnp.where(jnp.arange(O) > last_step_B[:, None], stop[0], out_BO)


_STATIC = ("config", "stop_ids", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_tokens(
    params,
    tokens_BP,
    positions_BP,
    keys_B,
    lora=None,
    active_B=None,
    *,
    config: ModelConfig,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
):
  """New tokens_BO (pad after a row's stop token) for left-padded prompts; inactive rows (a
  batch's padding) stop at once instead of decoding until they happen to draw a stop token."""
  prefix = _prefill(
      config, params, tokens_BP, positions_BP, lora, tokens_BP.shape[1] + sampling.max_new_tokens
  )
  return _decode(config, params, prefix, keys_B, lora, sampling, stop_ids, pad_id, active_B)


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_tokens_packed(
    params,
    tokens_1T,
    positions_1T,
    prompts,
    last_1B,
    keys_B,
    lora=None,
    active_B=None,
    *,
    config: ModelConfig,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
):
  """`generate_tokens` for prompts packed in one row (`pack_prompts`)."""
  length = prompts.to_cache_BP.shape[1] + sampling.max_new_tokens
  prefix = _prefill_packed(config, params, tokens_1T, positions_1T, prompts, last_1B, lora, length)
  return _decode(config, params, prefix, keys_B, lora, sampling, stop_ids, pad_id, active_B)


@functools.partial(jax.jit, static_argnames=("config", "length"))
def prefill_packed(params, tokens_1T, positions_1T, prompts, last_1B, lora=None, *, config, length: int):
  """`prefill` of prompts packed in one row (`pack_prompts`)."""
  return _prefill_packed(config, params, tokens_1T, positions_1T, prompts, last_1B, lora, length)


@functools.partial(jax.jit, static_argnames=("count", "size", "mesh"))
def _adapters_of_rows(adapters, count: int, size: int, mesh):
  """The first `count` adapters of a stack as `size` rows' (padding rows: the last one's), split
  over the mesh's batch axes like the rows, whatever the stack's own split: no device gathers the
  stack (the rows' split first, then a slice and a concatenation, which XLA moves shard by shard
  for the 4-d LoRA leaves; a gather, or the cut before the re-split, it all-gathered)."""

  def like_rows(x):
    if sharding.on_one_device(mesh):
      return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.shape, 0))

  def rows(x):  # first split as rows are (over fewer axes, e.g. not over tensor), then cut
    x = like_rows(x)
    return like_rows(jnp.concatenate([x[:count], jnp.repeat(x[count - 1 : count], size - count, axis=0)]))

  return jax.tree.map(rows, adapters)


def _per_row(prefix: Prefix) -> Prefix:
  """A prefix of B rows as B one-row prefixes (leading axis B): the layout of per-row-adapter calls,
  which vmap over the rows (`_ROW_CACHE_AXES`)."""
  cache = prefix.cache
  rows = cache.positions_BS.shape[0]
  return Prefix(
      KVCache(
          k_LBKSH=jnp.moveaxis(cache.k_LBKSH, 1, 0)[:, :, None],
          v_LBKSH=jnp.moveaxis(cache.v_LBKSH, 1, 0)[:, :, None],
          positions_BS=cache.positions_BS[:, None],
          segments_BS=cache.segments_BS[:, None],
          end_index=jnp.broadcast_to(cache.end_index, (rows,)),
      ),
      prefix.last_logits_BV[:, None],
      prefix.next_position_B[:, None],
  )


@functools.partial(jax.jit, static_argnames=("config", "length"))
def prefill_packed_per_row(params, tokens_1T, positions_1T, prompts, last_1B, lora, *, config, length: int):
  """`prefill_packed` of prompts packed for per-row adapters (`pack_prompts(per_row_adapters=True)`;
  `lora` leaves [B, L, ...]), as B one-row prefixes (`_per_row`): one pass over all the prompts'
  tokens, each block through its row's adapter, where a vmapped prefill pads every prompt to the
  longest."""
  by_layer = jax.tree.map(lambda w: jnp.swapaxes(w, 0, 1), lora)  # [L, B, ...]: the scan slices L
  prefix = _prefill_packed(config, params, tokens_1T, positions_1T, prompts, last_1B, by_layer, length)
  return _per_row(prefix)


@functools.partial(jax.jit, static_argnames=("config", "length"))
def prefill(params, tokens_BP, positions_BP, lora=None, *, config: ModelConfig, length: int):
  """A `Prefix` whose cache holds `length` slots (the prompt's and room for what follows)."""
  return _prefill(config, params, tokens_BP, positions_BP, lora, length)


@functools.partial(jax.jit, static_argnames=("config",))
def extend(params, prefix: Prefix, tokens_BE, lengths_B, lora=None, *, config: ModelConfig):
  """prefix + the left-padded extension tokens_BE (row b: its last lengths_B[b] tokens)."""
  return _extend(config, params, prefix, tokens_BE, lengths_B, lora)


@functools.partial(jax.jit, static_argnames=_STATIC + ("per_row",))
def continue_tokens(
    params,
    prefix: Prefix,
    tokens_BE,
    lengths_B,
    keys_B,
    active_B,
    lora=None,
    end_states_VS=None,
    *,
    config: ModelConfig,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
    per_row: bool = False,
):
  """New tokens_BO after prefix + the (left-padded) extension tokens_BE; only active rows run.
  `per_row`: each row with its own adapter and one-row prefix; `end_states_VS`: see `_decode`."""
  decode = functools.partial(_decode, end_states_VS=end_states_VS)
  if not per_row:
    prefix = _extend(config, params, prefix, tokens_BE, lengths_B, lora)
    return decode(config, params, prefix, keys_B, lora, sampling, stop_ids, pad_id, active_B)
  prefix = jax.vmap(
      lambda prefix, tokens, lengths, lora: _extend(config, params, prefix, tokens, lengths, lora),
      in_axes=(_ROWS_SHARE_END, 0, 0, 0),
      out_axes=_ROWS_SHARE_END,
  )(prefix, tokens_BE, lengths_B, lora)
  return decode(config, params, prefix, keys_B[:, 0], lora, sampling, stop_ids, pad_id, active_B[:, 0], True)


@dataclasses.dataclass(frozen=True)
class Prefilled:
  """Host handle on a device `Prefix` for `rows` prompts (padded to `batch`).

  With `per_row`, row i belongs to adapter i: arrays carry a leading adapter axis and a batch of 1,
  and every call on it is vmapped over the adapters.
  """

  prefix: Prefix
  rows: int
  batch: int
  used: int  # cache slots already holding tokens (prompt bucket + extensions)
  capacity: int
  lora: Any = None
  per_row: bool = False

  def free(self) -> int:
    return self.capacity - self.used


def left_pad_extensions(
    extensions: Sequence[Sequence[int]], batch: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  longest = max((len(e) for e in extensions), default=0)
  length = bucket(longest, 8) if longest else 0  # all empty: no extension pass at all
  tokens_BE = np.full((batch, length), pad_id, np.int32)
  lengths_B = np.zeros((batch,), np.int32)
  for b, ext in enumerate(extensions):
    if ext:
      tokens_BE[b, length - len(ext) :] = ext
      lengths_B[b] = len(ext)
  return tokens_BE, lengths_B


class Sampler:
  """Host-side wrapper: bucketing, padding, chunking into batches and trimming at stop tokens."""

  def __init__(self, config: ModelConfig, params, stop_ids: Sequence[int], pad_id: int, max_batch: int = 64):
    self.config = config
    self.params = params
    self.stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
    self.pad_id = int(pad_id)
    beyond = [i for i in (self.pad_id, *self.stop_ids) if not 0 <= i < config.vocab_size]
    if beyond:  # their embedding would be NaN (jnp.take's fill), and so every logit near them
      raise ValueError(
          f"The tokenizer's pad / stop token ids {beyond} are not rows of the model's embedding "
          f"(vocab_size {config.vocab_size}): give the model a tokenizer of its own vocabulary."
      )
    self.max_batch = max_batch
    self.mesh = sharding.mesh_of(params)  # batches are split over its data / fsdp axes

  def _trim(self, row: np.ndarray) -> list[int]:
    ids = []
    for t in row.tolist():
      if t in self.stop_ids:
        break
      ids.append(t)
    return ids

  def call_rows(self, fn, per_row: bool, lora, *row_args):
    """fn(params, *row_args, lora) for the whole batch, or vmapped over per-row adapters; the
    host arrays among `row_args` (leading axis: rows) are split over the mesh's batch axes."""
    row_args = [
        sharding.shard_rows(self.mesh, a)[0] if isinstance(a, (np.ndarray, jax.Array)) else a
        for a in row_args
    ]
    if not per_row:
      return fn(self.params, *row_args, lora)
    return jax.vmap(lambda a, *args: fn(self.params, *args, a))(lora, *row_args)

  def _context(self) -> str:
    c = self.config
    window = " (its sliding window)" if c.context_length < c.max_position_embeddings else ""
    return f"{c.context_length} tokens{window}"

  def _prompt_slots(self, prompts: Sequence[Sequence[int]], room: int, what: str) -> int:
    """Cache slots for the left-padded prompts: their length bucket, cut down where the bucket
    and `room` more slots would pass the context but the prompts themselves fit."""
    longest = max(len(p) for p in prompts)
    if longest + room > self.config.context_length:
      raise ValueError(
          f"Prompt of {longest} tokens + {what} {room} exceeds the model's context of " f"{self._context()}."
      )
    return min(
        bucket(longest, MIN_PROMPT_BUCKET, PROMPT_BUCKETS_PER_OCTAVE), self.config.context_length - room
    )

  def packs_prompts(self) -> bool:
    """Whether `prefill` and `generate` pack their prompts in one row: on the fused CPU attention
    kernel, unsharded (a mesh splits a batch of left-padded rows instead)."""
    return sharding.fill_batch_shards(self.mesh, 1) == 1 and transformer.fused_cpu_attention(self.config)

  def prefill(
      self, prompts: Sequence[Sequence[int]], reserve: int, lora=None, lora_per_row: bool = False
  ) -> Prefilled:
    """Prefills all prompts once, leaving `reserve` free cache slots for what follows."""
    length = self._prompt_slots(prompts, reserve, "reserve")
    capacity = length + reserve
    batch = sharding.fill_batch_shards(self.mesh, bucket(len(prompts)))
    if lora_per_row:  # split like the rows: each device keeps its rows' adapters
      lora = _adapters_of_rows(lora, len(prompts), batch, self.mesh)
    if self.packs_prompts():
      tokens_1T, positions_1T, packed, last_1B = pack_prompts(
          prompts, length, batch, self.pad_id, lora_per_row
      )
      fn = prefill_packed_per_row if lora_per_row else prefill_packed
      prefix = fn(
          self.params, tokens_1T, positions_1T, packed, last_1B, lora, config=self.config, length=capacity
      )
      return Prefilled(prefix, len(prompts), batch, length, capacity, lora, lora_per_row)
    tokens_BP, positions_BP = left_pad(prompts, length, batch, self.pad_id)
    fn = functools.partial(prefill, config=self.config, length=capacity)
    if lora_per_row:
      tokens_BP, positions_BP = tokens_BP[:, None], positions_BP[:, None]
    prefix = self.call_rows(lambda p, t, q, a: fn(p, t, q, a), lora_per_row, lora, tokens_BP, positions_BP)
    return Prefilled(prefix, len(prompts), batch, length, capacity, lora, lora_per_row)

  def _row_arrays(self, pre: Prefilled, arrays):
    return [a[:, None] for a in arrays] if pre.per_row else list(arrays)

  def extend(self, pre: Prefilled, extensions: Sequence[Sequence[int]]) -> Prefilled:
    """A new handle with each row's extension tokens appended (the old one stays valid)."""
    tokens_BE, lengths_B = left_pad_extensions(extensions, pre.batch, self.pad_id)
    if tokens_BE.shape[1] > pre.free():
      raise ValueError(
          f"Extension of {tokens_BE.shape[1]} tokens exceeds the {pre.free()} free "
          "cache slots; prefill with a larger reserve (a run's --config.reserve)."
      )
    fn = functools.partial(extend, config=self.config)
    prefix = self.call_rows(
        fn, pre.per_row, pre.lora, pre.prefix, *self._row_arrays(pre, (tokens_BE, lengths_B))
    )
    return dataclasses.replace(pre, prefix=prefix, used=pre.used + tokens_BE.shape[1])

  def continue_(
      self,
      pre: Prefilled,
      extensions: Sequence[Sequence[int]],
      sampling: SamplingParams,
      rng: Optional[jax.Array] = None,
      active: Optional[Sequence[bool]] = None,
      end_states_VS: Optional[jax.Array] = None,
  ) -> list[list[int]]:
    """Completions after prefix + extension, per row (inactive rows return []); `rng`: one key or
    keys_B, one per row (see `row_keys`); `end_states_VS`: a rule that ends a row before a stop
    token (see `_decode`)."""
    tokens_BE, lengths_B = left_pad_extensions(extensions, pre.batch, self.pad_id)
    if tokens_BE.shape[1] + sampling.max_new_tokens > pre.free():
      raise ValueError(
          f"Extension of {tokens_BE.shape[1]} + {sampling.max_new_tokens} new tokens "
          f"exceeds the {pre.free()} free cache slots; prefill with a larger reserve (a run's "
          "--config.reserve)."
      )
    active_B = np.zeros((pre.batch,), bool)
    active_B[: pre.rows] = True if active is None else np.asarray(active, bool)
    keys_B = row_keys(rng, pre.rows, pre.batch)
    fn = functools.partial(
        continue_tokens,
        config=self.config,
        sampling=sampling,
        stop_ids=self.stop_ids,
        pad_id=self.pad_id,
        per_row=pre.per_row,
        end_states_VS=end_states_VS,
    )
    # Per-row adapters: one call that loops over every row's steps, not a vmapped call (see `_decode`).
    prefix = _shared_end(pre.prefix) if pre.per_row else pre.prefix
    rows = self._row_arrays(pre, (tokens_BE, lengths_B, keys_B, active_B))
    out_BO = np.asarray(self.call_rows(fn, False, pre.lora, prefix, *rows))
    return [self._trim(out_BO[b]) if active_B[b] else [] for b in range(pre.rows)]

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      sampling: SamplingParams = SamplingParams(),
      rng: Optional[jax.Array] = None,
      lora=None,
  ) -> list[list[int]]:
    """Completion token ids per prompt (stop token excluded), in prompt order; `rng`: one key or
    keys_B, one per prompt (see `row_keys`); `lora`: None (the base model) or one Adapter for every
    row (per-row adapters: `prefill(..., lora_per_row=True)`).
    """
    if not prompts:
      return []
    keys = row_keys(rng, len(prompts), len(prompts))
    length = self._prompt_slots(prompts, sampling.max_new_tokens, "max_new_tokens")
    static = dict(config=self.config, sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)
    fn = functools.partial(generate_tokens, **static)
    packed_fn = functools.partial(generate_tokens_packed, **static)
    results: list[list[int]] = []
    for start in range(0, len(prompts), self.max_batch):
      chunk = prompts[start : start + self.max_batch]
      batch = sharding.fill_batch_shards(self.mesh, bucket(len(chunk)))
      keys_B = row_keys(keys[start : start + len(chunk)], len(chunk), batch)
      active_B = np.arange(batch) < len(chunk)
      if self.packs_prompts():
        tokens_1T, positions_1T, packed, last_1B = pack_prompts(chunk, length, batch, self.pad_id)
        out_BO = np.asarray(
            packed_fn(self.params, tokens_1T, positions_1T, packed, last_1B, keys_B, lora, active_B)
        )
      else:
        tokens_BP, positions_BP = left_pad(chunk, length, batch, self.pad_id)
        rows = (tokens_BP, positions_BP, keys_B, active_B)
        out_BO = np.asarray(
            self.call_rows(lambda p, t, q, k, a, lora: fn(p, t, q, k, lora, a), False, lora, *rows)
        )
      results.extend(self._trim(out_BO[b]) for b in range(len(chunk)))
    return results


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  config: ModelConfig
  params: Any
  tokenizer: Any  # ttsi_jax.text.tokenizer.Tokenizer
  sampler: Sampler


def load_model(path: str, dtype: str, mesh, max_batch: int = 64, attention: str = "auto") -> LoadedModel:
  """A checkpoint's params (placed on `mesh`), its tokenizer and a sampler that stops at its end
  of turn: the one way the main job, the teacher, generate and bench set up a model. `attention`:
  the packed training rows' (`ModelConfig.attention`; only a model that trains adapters uses it)."""
  from ttsi_jax import checkpoints
  from ttsi_jax.text import tokenizer as tokenizer_lib

  if attention != "auto":  # checked before the weights load (auto always runs)
    transformer.check_attention(
        dataclasses.replace(checkpoints.read_config(path, dtype), attention=attention)
    )
  config, params = checkpoints.load(path, dtype, mesh)
  config = dataclasses.replace(config, attention=attention)
  tokenizer = tokenizer_lib.load(path)
  if len(tokenizer.hf) > config.vocab_size:  # such a token's embedding would be NaN
    logging.warning(
        "%s: the tokenizer has %d tokens, the model's embedding %d rows: text holding the tokens "
        "beyond them would make the logits NaN.",
        path,
        len(tokenizer.hf),
        config.vocab_size,
    )
  return LoadedModel(
      config, params, tokenizer, Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id, max_batch)
  )
