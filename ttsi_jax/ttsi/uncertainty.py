"""H, self-awareness: candidate log-likelihoods and the uncertainty they imply.

All N candidates of an input are scored in one forward pass, each seeing the prompt and itself,
never the other candidates. The main loop prefills the prompt once (it is shared with answering and
decoding) and packs `[cand_1 | ... | cand_N]` after that cached prefix (`score_after`); `score`
packs `[prompt | cand_1 | ... | cand_N]` into one row from scratch, for scoring without a sampler.
Logits are computed only at the positions that predict candidate tokens.

Relative Softmax Scoring (RSS): p = softmax(l) over the candidates' log-likelihoods l;
margin = p(1) - p(2) (uncertain when below tau); entropy = -sum p log p (uncertain when above its
threshold); perplexity = exp(-l / num_tokens) per candidate.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text.sampler import bucket

MIN_ROW_BUCKET = 64
PAD_SEGMENT = 2**30


@dataclasses.dataclass(frozen=True)
class PackedCandidates:
  """Host arrays for B inputs: one packed row each, I scored tokens per row."""

  tokens_BT: np.ndarray
  positions_BT: np.ndarray
  segments_BT: np.ndarray
  select_BI: np.ndarray  # the position in the row whose logits predict target i
  targets_BI: np.ndarray  # the candidate token being scored
  owner_BI: np.ndarray  # which candidate target i belongs to; -1 for padding
  num_candidates: int  # N (padded; rows with fewer candidates have empty slots)


def pack(prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]],
         pad_id: int) -> PackedCandidates:
  """Packs prompt + candidates per input, padded to length buckets (one compile per bucket)."""
  if len(prompts) != len(candidates):
    raise ValueError("One candidate list per prompt is needed.")
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    if not prompt or not cands or any(not c for c in cands):
      raise ValueError(f"Input {b}: the prompt, the candidate list and every candidate need tokens.")
  rows = len(prompts)
  T = bucket(max(len(p) + sum(map(len, c)) for p, c in zip(prompts, candidates)), MIN_ROW_BUCKET)
  I = bucket(max(sum(map(len, c)) for c in candidates), 8)
  N = bucket(max(len(c) for c in candidates), 2)
  out = PackedCandidates(
      tokens_BT=np.full((rows, T), pad_id, np.int32), positions_BT=np.full((rows, T), -1, np.int32),
      segments_BT=np.full((rows, T), PAD_SEGMENT, np.int32), select_BI=np.zeros((rows, I), np.int32),
      targets_BI=np.zeros((rows, I), np.int32), owner_BI=np.full((rows, I), -1, np.int32),
      num_candidates=N)
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    n = len(prompt)
    out.tokens_BT[b, :n] = prompt
    out.positions_BT[b, :n] = np.arange(n)
    out.segments_BT[b, :n] = 0
    t, i = n, 0
    for k, cand in enumerate(cands):
      m = len(cand)
      out.tokens_BT[b, t:t + m] = cand
      out.positions_BT[b, t:t + m] = np.arange(n, n + m)
      out.segments_BT[b, t:t + m] = k + 1
      # Token j of the candidate is predicted by the last prompt token (j = 0) or by token j - 1.
      out.select_BI[b, i:i + m] = [n - 1] + list(range(t, t + m - 1))
      out.targets_BI[b, i:i + m] = cand
      out.owner_BI[b, i:i + m] = k
      t, i = t + m, i + m
  return out


@functools.partial(jax.jit, static_argnames=("config", "num_candidates"))
def candidate_logliks(params, tokens_BT, positions_BT, segments_BT, select_BI, targets_BI, owner_BI,
                      lora=None, *, config: ModelConfig, num_candidates: int):
  """(loglik_BN, num_tokens_BN): sum and count of candidate token log-probs; empty slots -inf, 0."""
  logits_BIV, _ = transformer.forward(config, params, tokens_BT, positions_BT, lora=lora,
                                      segments_BT=segments_BT, select_BI=select_BI)
  logp_BIV = jax.nn.log_softmax(logits_BIV, axis=-1)
  token_logp_BI = jnp.take_along_axis(logp_BIV, targets_BI[..., None], axis=-1)[..., 0]
  return _sum_by_candidate(token_logp_BI, owner_BI, num_candidates)


def _sum_by_candidate(token_logp_BI, owner_BI, num_candidates: int):
  """(loglik_BN, num_tokens_BN) from per-token log-probs; empty candidate slots get -inf, 0."""
  owned_BIN = owner_BI[..., None] == jnp.arange(num_candidates)
  num_tokens_BN = jnp.sum(owned_BIN, axis=1)
  loglik_BN = jnp.sum(jnp.where(owned_BIN, token_logp_BI[..., None], 0.0), axis=1)
  return jnp.where(num_tokens_BN > 0, loglik_BN, -jnp.inf), num_tokens_BN


def score(config: ModelConfig, params, packed: PackedCandidates, lora=None):
  """(loglik_BN, num_tokens_BN) of packed prompt + candidates rows, without a cache."""
  return candidate_logliks(params, packed.tokens_BT, packed.positions_BT, packed.segments_BT,
                           packed.select_BI, packed.targets_BI, packed.owner_BI, lora,
                           config=config, num_candidates=packed.num_candidates)


# In a candidate continuing a cached prefix, a last entry TAIL stands for "any token of the tail
# set": its log-probability is that of the whole set (a healed boundary, see text/constrained.py).
TAIL = -1


def pack_after(candidates: Sequence[Sequence[Sequence[int]]], batch: int,
               pad_id: int) -> PackedCandidates:
  """Packs candidates that continue a cached prefix: like `pack` without the prompt part.

  `positions_BT` holds offsets from each row's next position (-1 = padding); `select_BI` is -1
  where the prefix's last logits predict the target (each candidate's first token). A trailing
  TAIL target is scored but never fed.
  """
  for b, cands in enumerate(candidates):
    for k, cand in enumerate(cands):
      if not cand:
        raise ValueError(f"Row {b}: candidate {k} has no tokens.")
      if TAIL in cand[:-1]:
        raise ValueError(f"Row {b}: candidate {k} has TAIL before its end.")
  fed = [[[t for t in cand if t != TAIL] for cand in cands] for cands in candidates]
  T = bucket(max((sum(map(len, c)) for c in fed), default=1), 8)
  I = bucket(max((sum(map(len, c)) for c in candidates), default=1), 8)
  N = bucket(max((len(c) for c in candidates), default=1), 2)
  out = PackedCandidates(
      tokens_BT=np.full((batch, T), pad_id, np.int32), positions_BT=np.full((batch, T), -1, np.int32),
      segments_BT=np.full((batch, T), PAD_SEGMENT, np.int32),
      select_BI=np.full((batch, I), -1, np.int32), targets_BI=np.zeros((batch, I), np.int32),
      owner_BI=np.full((batch, I), -1, np.int32), num_candidates=N)
  for b, (cands, fed_cands) in enumerate(zip(candidates, fed)):
    t = i = 0
    for k, (cand, tokens) in enumerate(zip(cands, fed_cands)):
      m, n = len(tokens), len(cand)
      out.tokens_BT[b, t:t + m] = tokens
      out.positions_BT[b, t:t + m] = np.arange(m)
      out.segments_BT[b, t:t + m] = k + 1
      # Target j is predicted by the prefix's last logits (j = 0) or by fed token j - 1.
      out.select_BI[b, i:i + n] = [-1] + list(range(t, t + n - 1))
      out.targets_BI[b, i:i + n] = cand
      out.owner_BI[b, i:i + n] = k
      t, i = t + m, i + n
  return out


@functools.partial(jax.jit, static_argnames=("config", "num_candidates"))
def candidate_logliks_after(params, prefix, tokens_BT, offsets_BT, segments_BT, select_BI,
                            targets_BI, owner_BI, lora=None, tail_mask_V=None, *,
                            config: ModelConfig, num_candidates: int):
  """Like `candidate_logliks`, for candidates continuing a cached `sampler.Prefix`; TAIL targets
  score the log of the total probability of the tokens in `tail_mask_V`."""
  positions_BT = jnp.where(offsets_BT >= 0, prefix.next_position_B[:, None] + offsets_BT, -1)
  logits_BIV, _ = transformer.forward(config, params, tokens_BT, positions_BT, prefix.cache, lora,
                                      segments_BT=segments_BT,
                                      select_BI=jnp.maximum(select_BI, 0))
  logp_BIV = jax.nn.log_softmax(logits_BIV, axis=-1)
  logp_BIV = jnp.where((select_BI < 0)[..., None],
                       jax.nn.log_softmax(prefix.last_logits_BV, axis=-1)[:, None], logp_BIV)
  token_logp_BI = jnp.take_along_axis(logp_BIV, jnp.maximum(targets_BI, 0)[..., None],
                                      axis=-1)[..., 0]
  if tail_mask_V is not None:
    tail_logp_BI = jax.nn.logsumexp(jnp.where(tail_mask_V, logp_BIV, -jnp.inf), axis=-1)
    token_logp_BI = jnp.where(targets_BI == TAIL, tail_logp_BI, token_logp_BI)
  return _sum_by_candidate(token_logp_BI, owner_BI, num_candidates)


def candidates_that_fit(candidates: Sequence[Sequence[int]], free: int) -> int:
  """How many leading candidates `score_after` can pack into one row of `free` cache slots."""
  total = 0
  for k, cand in enumerate(candidates):
    total += len([t for t in cand if t != TAIL])
    if bucket(total, 8) > free:
      return k
  return len(candidates)


def score_after(sampler, pre, candidates: Sequence[Sequence[Sequence[int]]], tail_mask_V=None):
  """(loglik [rows, N], num_tokens [rows, N]) of candidates continuing a `sampler.Prefilled`;
  `tail_mask_V` [vocab] bool is the token set a trailing TAIL target stands for."""
  if tail_mask_V is None and any(TAIL in c for cands in candidates for c in cands):
    raise ValueError("Candidates ending in TAIL need tail_mask_V.")
  packed = pack_after(candidates, pre.batch, sampler.pad_id)
  if packed.tokens_BT.shape[1] > pre.free():
    raise ValueError(f"Candidates need {packed.tokens_BT.shape[1]} cache slots but only "
                     f"{pre.free()} are free; prefill with a larger reserve.")
  fn = functools.partial(candidate_logliks_after, tail_mask_V=tail_mask_V, config=sampler.config,
                         num_candidates=packed.num_candidates)
  arrays = (packed.tokens_BT, packed.positions_BT, packed.segments_BT, packed.select_BI,
            packed.targets_BI, packed.owner_BI)
  if pre.per_row:
    arrays = tuple(a[:, None] for a in arrays)
  loglik, counts = sampler.call_rows(fn, pre.per_row, pre.lora, pre.prefix, *arrays)
  if pre.per_row:
    loglik, counts = loglik[:, 0], counts[:, 0]
  return np.asarray(loglik)[:pre.rows], np.asarray(counts)[:pre.rows]


@jax.jit
def rss_stats(loglik_BN, num_tokens_BN):
  """RSS probabilities, margin, entropy and per-candidate perplexity; -inf logliks are empty slots."""
  probs_BN = jax.nn.softmax(loglik_BN, axis=-1)  # exp(l - max l) / sum exp(l - max l)
  top2_B2 = jax.lax.top_k(probs_BN, 2)[0]
  margin_B = top2_B2[:, 0] - top2_B2[:, 1]
  entropy_B = -jnp.sum(jnp.where(probs_BN > 0, probs_BN * jnp.log(probs_BN), 0.0), axis=-1)
  perplexity_BN = jnp.where(num_tokens_BN > 0,
                            jnp.exp(-loglik_BN / jnp.maximum(num_tokens_BN, 1)), jnp.inf)
  return {"probs": probs_BN, "margin": margin_B, "entropy": entropy_B,
          "perplexity": perplexity_BN, "best": jnp.argmax(loglik_BN, axis=-1)}


def is_uncertain(stats: dict, measure: str, threshold: float) -> np.ndarray:
  """Margin below tau, or entropy above its threshold."""
  if measure == "margin":
    return np.asarray(stats["margin"]) < threshold
  if measure == "entropy":
    return np.asarray(stats["entropy"]) > threshold
  raise ValueError(f"Unknown uncertainty measure {measure!r}; valid: ['margin', 'entropy'].")
