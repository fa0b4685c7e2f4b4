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
  logliks = [[-1.0, -2.5, -0.3, -7.0], [-3.0, -3.0, -np.inf, -np.inf], [-0.1, -np.inf, -np.inf, -np.inf]]
  counts = [[2, 3, 1, 4], [2, 2, 0, 0], [5, 0, 0, 0]]
  stats = uncertainty.rss_stats(np.asarray(logliks, np.float32), np.asarray(counts))
  for b, ll in enumerate(logliks):
    p, margin, entropy = _numpy_stats(ll)
    np.testing.assert_allclose(np.asarray(stats["probs"][b]), p, atol=1e-6)
    np.testing.assert_allclose(float(stats["margin"][b]), margin, atol=1e-6)
    np.testing.assert_allclose(float(stats["entropy"][b]), entropy, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(stats["perplexity"][0]), np.exp(-np.asarray(logliks[0]) / np.asarray(counts[0])), rtol=1e-5
  )
  assert float(stats["margin"][1]) == 0.0 and float(stats["margin"][2]) == 1.0  # tie; one candidate
  assert list(np.asarray(stats["best"])) == [2, 0, 0]


def test_one_candidate_is_certain():
  stats = uncertainty.rss_stats(np.array([[-1.0]], np.float32), np.array([[1]]))
  assert float(stats["margin"][0]) == 1.0 and float(stats["entropy"][0]) == 0.0


def test_flags_follow_the_chosen_measure():
  stats = uncertainty.CandidateStats(
      [["a", "b"], ["c", "d"]],
      [],
      [],
      margin_B=np.array([0.99, 0.5]),
      entropy_B=np.array([0.05, 0.6]),
      best_B=np.zeros(2, int),
  )
  assert list(uncertainty.is_uncertain(stats, "margin", 0.95)) == [False, True]
  assert list(uncertainty.is_uncertain(stats, "entropy", 0.5)) == [False, True]
  with pytest.raises(ValueError, match=r"Unknown uncertainty measure 'ppl'.*margin.*entropy"):
    uncertainty.is_uncertain(stats, "ppl", 0.5)


def test_a_nan_log_likelihood_makes_an_input_uncertain():
  stats = uncertainty.CandidateStats.of(
      [["f", "g"], ["f", "g"]], np.array([[np.nan, -1.0], [-0.1, -9.0]]), np.ones((2, 2))
  )
  for measure, threshold in (("margin", 0.95), ("entropy", 0.5)):
    assert list(uncertainty.is_uncertain(stats, measure, threshold)) == [True, False], measure


def test_rows_of_sampled_calls_replace_only_their_inputs_statistics():
  names = uncertainty.CandidateStats.of(
      [["f", "g"], ["h"]], np.array([[np.log(0.9), np.log(0.1)], [0.0, -np.inf]]), np.ones((2, 2))
  )
  calls = uncertainty.CandidateStats.of(
      [["f", "g"], ["h(a=1)", "h(a=2)"]], np.log([[0.5, 0.5], [0.6, 0.4]]), np.ones((2, 2))
  )
  merged = names.with_rows([1], calls)
  assert merged.candidates == [["f", "g"], ["h(a=1)", "h(a=2)"]]
  np.testing.assert_allclose(merged.margin_B, [0.8, 0.2], atol=1e-6)
  np.testing.assert_allclose(merged.probs[1], [0.6, 0.4], atol=1e-6)
  np.testing.assert_allclose(merged.probs[0], names.probs[0])
  assert list(merged.best_B) == [0, 0] and names.candidates[1] == ["h"]  # names left as they were
