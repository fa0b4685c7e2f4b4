"""Log-likelihoods of candidate continuations after a prefilled prompt.

All C candidates of a row are packed back to back after the row's cached prefix, each in its own
segment: one forward pass scores them all, each seeing the prompt and itself, never the other
candidates, and logits are computed only where they predict a candidate token. H scores candidate
actions this way (`ttsi_jax.ttsi.uncertainty`), and well-formed decoding its options
(`ttsi_jax.text.constrained`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text.sampler import bucket

PAD_SEGMENT = 2**30


@dataclasses.dataclass(frozen=True)
class PackedCandidates:
  """Host arrays for B rows: each row's candidates packed back to back, I scored tokens per row."""

  tokens_BT: np.ndarray
  positions_BT: np.ndarray
  segments_BT: np.ndarray
  select_BI: np.ndarray  # the position in the row whose logits predict target i
  targets_BI: np.ndarray  # the candidate token being scored
  owner_BI: np.ndarray  # which candidate target i belongs to; -1 for padding
  num_candidates: int  # C (padded; rows with fewer candidates have empty slots)


# In a candidate continuing a cached prefix, a last entry TAIL stands for "any token of the tail
# set": its log-probability is that of the whole set (a healed boundary, see text/constrained.py).
TAIL = -1


def action_tokens(encode, action: str) -> list[int]:
  """A candidate action "[name(" as scored: its tokens up to the name, then any token that begins
  with "(" (TAIL, with the mask of such tokens): a call with no arguments is written "[name" "()]",
  not "[name" "(" ..., and would otherwise score as if the model never wrote it."""
  if action.endswith("("):
    return encode(action[:-1]) + [TAIL]
  return encode(action)


def continuation(encode, context: str, text: str) -> list[int]:
  """The ids `text` takes written after `context`: the tail of encoding both, or `text` alone where
  their boundary merges tokens. A SentencePiece "legacy" tokenizer (Llama 2, Mistral v0.1) starts
  a text it encodes alone with a word-start "▁" that mid-text it does not have (" [" alone is
  "▁" "▁["); byte-level BPE splits at the boundary either way."""
  ids, context_ids = encode(context + text), encode(context)
  if ids[: len(context_ids)] == context_ids:
    return ids[len(context_ids) :]
  return encode(text)


def pack_after(
    candidates: Sequence[Sequence[Sequence[int]]],
    batch: int,
    pad_id: int,
    shared: Optional[Sequence[Sequence[int]]] = None,
) -> PackedCandidates:
  """Packs each row's candidates back to back, each in its own segment (it sees the prefix and
  itself, never the other candidates), after the row's `shared` tokens (segment 0: seen by all its
  candidates, as if appended to the prefix).

  `positions_BT` holds offsets from each row's next position (-1 = padding); `select_BI` is -1
  where the prefix's last logits predict the target (each candidate's first token, when the row
  shares nothing). A trailing TAIL target is scored but never fed.
  """
  shared = shared or [[] for _ in candidates]
  for b, cands in enumerate(candidates):
    for k, cand in enumerate(cands):
      if not cand:
        raise ValueError(f"Row {b}: candidate {k} has no tokens.")
      if TAIL in cand[:-1]:
        raise ValueError(f"Row {b}: candidate {k} has TAIL before its end.")
  fed = [[[t for t in cand if t != TAIL] for cand in cands] for cands in candidates]
  T = bucket(max((len(s) + sum(map(len, c)) for s, c in zip(shared, fed)), default=1), 8)
  I = bucket(max((sum(map(len, c)) for c in candidates), default=1), 8)
  C = bucket(max((len(c) for c in candidates), default=1), 2)
  out = PackedCandidates(
      tokens_BT=np.full((batch, T), pad_id, np.int32),
      positions_BT=np.full((batch, T), -1, np.int32),
      segments_BT=np.full((batch, T), PAD_SEGMENT, np.int32),
      select_BI=np.full((batch, I), -1, np.int32),
      targets_BI=np.zeros((batch, I), np.int32),
      owner_BI=np.full((batch, I), -1, np.int32),
      num_candidates=C,
  )
  for b, (cands, fed_cands, shared_ids) in enumerate(zip(candidates, fed, shared)):
    h = len(shared_ids)
    out.tokens_BT[b, :h] = shared_ids
    out.positions_BT[b, :h] = np.arange(h)
    out.segments_BT[b, :h] = 0
    t, i = h, 0
    for k, (cand, tokens) in enumerate(zip(cands, fed_cands)):
      m, n = len(tokens), len(cand)
      out.tokens_BT[b, t : t + m] = tokens
      out.positions_BT[b, t : t + m] = h + np.arange(m)
      out.segments_BT[b, t : t + m] = k + 1
      # Target j is predicted by fed token j - 1, target 0 by the last shared token (the prefix's
      # last logits where none is shared).
      out.select_BI[b, i : i + n] = [h - 1] + list(range(t, t + n - 1))
      out.targets_BI[b, i : i + n] = cand
      out.owner_BI[b, i : i + n] = k
      t, i = t + m, i + n
  return out


@functools.partial(jax.jit, static_argnames=("config", "num_candidates"))
def candidate_logliks_after(
    params,
    prefix,
    tokens_BT,
    offsets_BT,
    segments_BT,
    select_BI,
    targets_BI,
    owner_BI,
    lora=None,
    tail_mask_V=None,
    *,
    config: ModelConfig,
    num_candidates: int,
):
  """(loglik_BC, num_tokens_BC): sum and count of the log-probs of candidates continuing a cached
  `sampler.Prefix` (empty slots -inf, 0); TAIL targets score the log of the total probability of
  the tokens in `tail_mask_V`."""
  positions_BT = jnp.where(offsets_BT >= 0, prefix.next_position_B[:, None] + offsets_BT, -1)
  logits_BIV, _ = transformer.forward(
      config,
      params,
      tokens_BT,
      positions_BT,
      prefix.cache,
      lora,
      segments_BT=segments_BT,
      select_BI=jnp.maximum(select_BI, 0),
  )
  # Each target's logit less the log-partition, from the prefix's last logits where select_BI < 0:
  # no [B, I, V] log-softmax is written (its passes over the vocabulary cost more than the
  # candidates' linear layers).
  from_prefix_BI = select_BI < 0
  targets_BI1 = jnp.maximum(targets_BI, 0)[..., None]
  prefix_logits_B1V = prefix.last_logits_BV[:, None]

  def per_target(fn):
    return jnp.where(from_prefix_BI, fn(prefix_logits_B1V), fn(logits_BIV))

  log_partition_BI = per_target(lambda logits: jax.nn.logsumexp(logits, -1))
  token_logp_BI = per_target(lambda logits: jnp.take_along_axis(logits, targets_BI1, -1)[..., 0])
  token_logp_BI -= log_partition_BI
  if tail_mask_V is not None:
    tail_logp_BI = per_target(lambda logits: jax.nn.logsumexp(jnp.where(tail_mask_V, logits, -jnp.inf), -1))
    token_logp_BI = jnp.where(targets_BI == TAIL, tail_logp_BI - log_partition_BI, token_logp_BI)
  return _sum_by_candidate(token_logp_BI, owner_BI, num_candidates)


def candidates_that_fit(candidates: Sequence[Sequence[int]], free: int) -> int:
  """How many leading candidates `score_after` can pack into one row of `free` cache slots."""
  total = 0
  for k, cand in enumerate(candidates):
    total += len([t for t in cand if t != TAIL])
    if bucket(total, 8) > free:
      return k
  return len(candidates)


def score_after(
    sampler,
    pre,
    candidates: Sequence[Sequence[Sequence[int]]],
    tail_mask_V=None,
    shared: Optional[Sequence[Sequence[int]]] = None,
):
  """(loglik_BC, num_tokens_BC) of candidates continuing a `sampler.Prefilled` (after each row's
  `shared` tokens, if given: the same as scoring after the prefix extended by them, without
  writing that extension into a new cache first); `tail_mask_V` [vocab] bool is the token set a
  trailing TAIL target stands for."""
  if tail_mask_V is None and any(TAIL in c for cands in candidates for c in cands):
    raise ValueError("Candidates ending in TAIL need tail_mask_V.")
  packed = pack_after(candidates, pre.batch, sampler.pad_id, shared)
  if packed.tokens_BT.shape[1] > pre.free():
    raise ValueError(
        f"Candidates need {packed.tokens_BT.shape[1]} cache slots but only "
        f"{pre.free()} are free; prefill with a larger reserve (a run's --config.reserve)."
    )
  fn = functools.partial(
      candidate_logliks_after,
      tail_mask_V=tail_mask_V,
      config=sampler.config,
      num_candidates=packed.num_candidates,
  )
  arrays = (
      packed.tokens_BT,
      packed.positions_BT,
      packed.segments_BT,
      packed.select_BI,
      packed.targets_BI,
      packed.owner_BI,
  )
  if pre.per_row:
    arrays = tuple(a[:, None] for a in arrays)
  loglik, counts = sampler.call_rows(fn, pre.per_row, pre.lora, pre.prefix, *arrays)
  if pre.per_row:
    loglik, counts = loglik[:, 0], counts[:, 0]
  return np.asarray(loglik)[: pre.rows], np.asarray(counts)[: pre.rows]


def _sum_by_candidate(token_logp_BI, owner_BI, num_candidates: int):
  """(loglik_BC, num_tokens_BC) from per-token log-probs; empty candidate slots get -inf, 0."""
  owned_BIC = owner_BI[..., None] == jnp.arange(num_candidates)
  num_tokens_BC = jnp.sum(owned_BIC, axis=1)
  loglik_BC = jnp.sum(jnp.where(owned_BIC, token_logp_BI[..., None], 0.0), axis=1)
  return jnp.where(num_tokens_BC > 0, loglik_BC, -jnp.inf), num_tokens_BC
