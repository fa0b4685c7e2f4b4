"""RSS / margin / entropy against numpy; flags by the chosen measure."""

import numpy as np
import pytest

from ttsi_jax.ttsi import uncertainty


def _numpy_stats(loglik):
  ll = np.asarray(loglik, np.float64)
  p = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
  top = np.sort(p)[::-1]
  return p, top[0] - (top[1] if len(top) > 1 else 0.0), -np.sum(p[p > 0] * np.log(p[p > 0]))


def test_rss_margin_entropy_match_numpy():
  logliks = [[-1.0, -2.5, -0.3, -7.0], [-3.0, -3.0, -np.inf, -np.inf], [-0.1, -np.inf, -np.inf,
                                                                        -np.inf]]
  counts = [[2, 3, 1, 4], [2, 2, 0, 0], [5, 0, 0, 0]]
  stats = uncertainty.rss_stats(np.asarray(logliks, np.float32), np.asarray(counts))
  for b, ll in enumerate(logliks):
    p, margin, entropy = _numpy_stats(ll)
    np.testing.assert_allclose(np.asarray(stats["probs"][b]), p, atol=1e-6)
    np.testing.assert_allclose(float(stats["margin"][b]), margin, atol=1e-6)
    np.testing.assert_allclose(float(stats["entropy"][b]), entropy, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["perplexity"][0]),
                             np.exp(-np.asarray(logliks[0]) / np.asarray(counts[0])), rtol=1e-5)
  assert float(stats["margin"][1]) == 0.0 and float(stats["margin"][2]) == 1.0  # tie; one candidate
  assert list(np.asarray(stats["best"])) == [2, 0, 0]


def test_flags_follow_the_chosen_measure():
  stats = {"margin": np.array([0.99, 0.5]), "entropy": np.array([0.05, 0.6])}
  assert list(uncertainty.is_uncertain(stats, "margin", 0.95)) == [False, True]
  assert list(uncertainty.is_uncertain(stats, "entropy", 0.5)) == [False, True]
  with pytest.raises(ValueError, match=r"Unknown uncertainty measure 'ppl'.*margin.*entropy"):
    uncertainty.is_uncertain(stats, "ppl", 0.5)
