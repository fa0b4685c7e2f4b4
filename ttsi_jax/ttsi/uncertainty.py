"""H, self-awareness: the uncertainty that candidate log-likelihoods imply.

The candidates' log-likelihoods come from `ttsi_jax.text.scoring` (scored after the prompt's
cached prefix, which answering and decoding share).

Relative Softmax Scoring (RSS): p = softmax(l) over the candidates' log-likelihoods l;
margin = p(1) - p(2) (uncertain when below tau); entropy = -sum p log p (uncertain when above its
threshold); perplexity = exp(-l / num_tokens) per candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def rss_stats(loglik_BC, num_tokens_BC):
  """RSS probabilities, margin, entropy and per-candidate perplexity; -inf logliks are empty slots."""
  probs_BC = jax.nn.softmax(loglik_BC, axis=-1)  # exp(l - max l) / sum exp(l - max l)
  padded_BC = jnp.pad(probs_BC, ((0, 0), (0, max(0, 2 - probs_BC.shape[-1]))))  # one candidate: margin 1
  top2_B2 = jax.lax.top_k(padded_BC, 2)[0]
  margin_B = top2_B2[:, 0] - top2_B2[:, 1]
  entropy_B = -jnp.sum(jnp.where(probs_BC > 0, probs_BC * jnp.log(probs_BC), 0.0), axis=-1)
  perplexity_BC = jnp.where(num_tokens_BC > 0, jnp.exp(-loglik_BC / jnp.maximum(num_tokens_BC, 1)), jnp.inf)
  return {
      "probs": probs_BC,
      "margin": margin_B,
      "entropy": entropy_B,
      "perplexity": perplexity_BC,
      "best": jnp.argmax(loglik_BC, axis=-1),
  }


@dataclasses.dataclass
class CandidateStats:
  """H's statistics of a batch of inputs, on the host (rows past the inputs are batch padding).
  Rows may hold different candidates: an input offering one function scores sampled calls."""

  candidates: list[list[str]]  # per input, the candidate strings scored
  probs: list[np.ndarray]  # per row, RSS probability of each candidate slot (empty slots 0)
  perplexity: list[np.ndarray]  # per row, per candidate slot (empty slots inf)
  margin_B: np.ndarray
  entropy_B: np.ndarray
  best_B: np.ndarray  # index of the most likely candidate

  @classmethod
  def of(cls, candidates: Sequence[Sequence[str]], loglik_BC, num_tokens_BC) -> "CandidateStats":
    stats = jax.tree.map(np.asarray, rss_stats(loglik_BC, num_tokens_BC))
    return cls(
        [list(c) for c in candidates],
        list(stats["probs"]),
        list(stats["perplexity"]),
        stats["margin"],
        stats["entropy"],
        stats["best"],
    )

  def with_rows(self, rows: Sequence[int], other: "CandidateStats") -> "CandidateStats":
    """These statistics with `rows` taken from `other` (the best candidate index stays)."""
    take = np.isin(np.arange(len(self.margin_B)), rows)
    out = dataclasses.replace(
        self,
        candidates=list(self.candidates),
        probs=list(self.probs),
        perplexity=list(self.perplexity),
        margin_B=np.where(take, other.margin_B, self.margin_B),
        entropy_B=np.where(take, other.entropy_B, self.entropy_B),
    )
    for i in rows:
      out.candidates[i], out.probs[i] = other.candidates[i], other.probs[i]
      out.perplexity[i] = other.perplexity[i]
    return out


def is_uncertain(stats: CandidateStats, measure: str, threshold: float) -> np.ndarray:
  """Margin below tau, or entropy above its threshold; a NaN log-likelihood (a model whose logits
  are NaN) makes an input uncertain, never silently certain."""
  unknown_B = np.isnan(stats.margin_B)  # NaN probabilities (the entropy's sum skips them)
  if measure == "margin":  # in float32, as the report reads the stored margins back (`_flagged`)
    return (np.asarray(stats.margin_B, np.float32) < np.float32(threshold)) | unknown_B
  if measure == "entropy":
    return (stats.entropy_B > threshold) | unknown_B
  raise ValueError(f"Unknown uncertainty measure {measure!r}; valid: ['margin', 'entropy'].")
