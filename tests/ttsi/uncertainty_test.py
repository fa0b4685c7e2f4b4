"""RSS / margin / entropy against numpy; packed candidate scores against a plain forward pass."""

import jax
import numpy as np
import pytest

from tests.conftest import VOCAB
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import transformer
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


def test_candidate_scores_equal_token_logprobs_from_a_plain_forward(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["qwen3"][0])
  rs = np.random.RandomState(0)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (9, 4)]
  candidates = [[rs.randint(1, VOCAB, m).tolist() for m in (3, 1, 5)],
                [rs.randint(1, VOCAB, m).tolist() for m in (2, 2)]]
  packed = uncertainty.pack(prompts, candidates, pad_id=0)
  loglik, counts = uncertainty.score(config, params, packed)
  assert loglik.shape == (2, 3) and np.isneginf(np.asarray(loglik[1, 2:])).all()  # N bucket 3
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    for n, cand in enumerate(cands):
      seq = np.asarray([prompt + cand], np.int32)
      logits, _ = transformer.forward(config, params, seq, np.arange(seq.shape[1])[None])
      logp = jax.nn.log_softmax(logits[0], -1)
      want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand))
      np.testing.assert_allclose(float(loglik[b, n]), want, atol=1e-4)
      assert int(counts[b, n]) == len(cand)


def test_scores_after_a_cached_prefix_equal_packed_scores(hf_checkpoints):
  from ttsi_jax.text import sampler as sampler_lib
  config, params = hf.load(hf_checkpoints["llama"][0])
  rs = np.random.RandomState(1)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (7, 15, 3)]
  candidates = [[rs.randint(1, VOCAB, m).tolist() for m in (2, 4)],
                [rs.randint(1, VOCAB, m).tolist() for m in (1, 3, 2)],
                [rs.randint(1, VOCAB, m).tolist() for m in (5,)]]
  packed, _ = uncertainty.score(config, params, uncertainty.pack(prompts, candidates, 0))
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  pre = sampler.prefill(prompts, reserve=64)
  cached, counts = uncertainty.score_after(sampler, pre, candidates)
  np.testing.assert_allclose(cached, np.asarray(packed)[:, :cached.shape[1]], atol=1e-4)
  assert counts.tolist()[1][:3] == [1, 3, 2]


def test_a_tail_target_scores_the_total_probability_of_its_token_set(hf_checkpoints):
  from ttsi_jax.text import sampler as sampler_lib
  config, params = hf.load(hf_checkpoints["llama"][0])
  rs = np.random.RandomState(2)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (6, 11)]
  tail_mask_V = np.zeros(VOCAB, bool)
  tail_mask_V[rs.choice(VOCAB, 20, replace=False)] = True
  candidates = [[[5, 9, uncertainty.TAIL], [7]], [[uncertainty.TAIL], [3, 4]]]
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  loglik, counts = uncertainty.score_after(sampler, sampler.prefill(prompts, reserve=64),
                                           candidates, tail_mask_V)
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    for n, cand in enumerate(cands):
      fed = [t for t in cand if t != uncertainty.TAIL]
      seq = np.asarray([prompt + fed], np.int32)
      logits, _ = transformer.forward(config, params, seq, np.arange(seq.shape[1])[None])
      logp = np.asarray(jax.nn.log_softmax(logits[0], -1), np.float64)
      want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(fed))
      if cand[-1] == uncertainty.TAIL:
        want += np.log(np.exp(logp[len(prompt) - 1 + len(fed), tail_mask_V]).sum())
      np.testing.assert_allclose(float(loglik[b, n]), want, atol=1e-4)
      assert int(counts[b, n]) == len(cand)
  with pytest.raises(ValueError, match="need tail_mask_V"):
    uncertainty.score_after(sampler, sampler.prefill(prompts, reserve=64), candidates)


def test_candidates_that_fit_are_exactly_those_score_after_can_pack(hf_checkpoints):
  from ttsi_jax.text import sampler as sampler_lib
  config, params = hf.load(hf_checkpoints["llama"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  pre = sampler.prefill([[1, 2, 3]], reserve=32)
  candidates = [[5] * 10, [6] * 20, [7] * 3 + [uncertainty.TAIL], [8] * 30]
  assert uncertainty.candidates_that_fit(candidates, pre.free()) == 2  # 30 tokens; 33 pad to 48
  loglik, _ = uncertainty.score_after(sampler, pre, [candidates[:2]])
  assert np.isfinite(loglik[0, :2]).all()
  with pytest.raises(ValueError, match="cache slots"):
    uncertainty.score_after(sampler, pre, [candidates[:3]], np.ones(VOCAB, bool))
  assert uncertainty.candidates_that_fit(candidates, 1024) == 4
