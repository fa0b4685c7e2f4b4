"""H, self-awareness: the uncertainty that candidate log-likelihoods imply.

The candidates' log-likelihoods come from `ttsi_jax.text.scoring` (scored after the prompt's
cached prefix, which answering and decoding share).

Relative Softmax Scoring (RSS): p = softmax(l) over the candidates' log-likelihoods l;
margin = p(1) - p(2) (uncertain when below tau); entropy = -sum p log p (uncertain when above its
threshold); perplexity = exp(-l / num_tokens) per candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
