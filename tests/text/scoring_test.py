"""Candidate log-likelihoods after a cached prefix against a plain forward pass per candidate."""

import jax
import numpy as np
import pytest

from tests.conftest import VOCAB
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import transformer
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import scoring


def test_scores_after_a_cached_prefix_equal_token_logprobs_from_a_plain_forward(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["qwen3"][0])
  rs = np.random.RandomState(0)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (9, 4, 15)]
  candidates = [
      [rs.randint(1, VOCAB, m).tolist() for m in (3, 1, 5)],
      [rs.randint(1, VOCAB, m).tolist() for m in (2, 2)],
      [rs.randint(1, VOCAB, m).tolist() for m in (4,)],
  ]
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  loglik, counts = scoring.score_after(sampler, sampler.prefill(prompts, reserve=64), candidates)
  assert loglik.shape == (3, 3) and np.isneginf(loglik[1, 2:]).all()  # N bucket 3; empty slots
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    for n, cand in enumerate(cands):
      seq = np.asarray([prompt + cand], np.int32)
      logits, _ = transformer.forward(config, params, seq, np.arange(seq.shape[1])[None])
      logp = jax.nn.log_softmax(logits[0], -1)
      want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand))
      np.testing.assert_allclose(float(loglik[b, n]), want, atol=1e-4)
      assert int(counts[b, n]) == len(cand)


def test_a_tail_target_scores_the_total_probability_of_its_token_set(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["llama"][0])
  rs = np.random.RandomState(2)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (6, 11)]
  tail_mask_V = np.zeros(VOCAB, bool)
  tail_mask_V[rs.choice(VOCAB, 20, replace=False)] = True
  candidates = [[[5, 9, scoring.TAIL], [7]], [[scoring.TAIL], [3, 4]]]
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  loglik, counts = scoring.score_after(sampler, sampler.prefill(prompts, reserve=64), candidates, tail_mask_V)
  for b, (prompt, cands) in enumerate(zip(prompts, candidates)):
    for n, cand in enumerate(cands):
      fed = [t for t in cand if t != scoring.TAIL]
      seq = np.asarray([prompt + fed], np.int32)
      logits, _ = transformer.forward(config, params, seq, np.arange(seq.shape[1])[None])
      logp = np.asarray(jax.nn.log_softmax(logits[0], -1), np.float64)
      want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(fed))
      if cand[-1] == scoring.TAIL:
        want += np.log(np.exp(logp[len(prompt) - 1 + len(fed), tail_mask_V]).sum())
      np.testing.assert_allclose(float(loglik[b, n]), want, atol=1e-4)
      assert int(counts[b, n]) == len(cand)
  with pytest.raises(ValueError, match="need tail_mask_V"):
    scoring.score_after(sampler, sampler.prefill(prompts, reserve=64), candidates)


def test_candidates_that_fit_are_exactly_those_score_after_can_pack(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["llama"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  pre = sampler.prefill([[1, 2, 3]], reserve=32)
  candidates = [[5] * 10, [6] * 20, [7] * 3 + [scoring.TAIL], [8] * 30]
  assert scoring.candidates_that_fit(candidates, pre.free()) == 2  # 30 tokens; 33 pad to 48
  loglik, _ = scoring.score_after(sampler, pre, [candidates[:2]])
  assert np.isfinite(loglik[0, :2]).all()
  with pytest.raises(ValueError, match="cache slots"):
    scoring.score_after(sampler, pre, [candidates[:3]], np.ones(VOCAB, bool))
  assert scoring.candidates_that_fit(candidates, 1024) == 4


@pytest.mark.parametrize("per_row", [False, True])
def test_shared_tokens_score_as_an_extension_of_the_prefix(hf_checkpoints, per_row):
  """Candidates after each row's `shared` tokens, fed in the scoring pass, score what they score
  after the prefix extended by those tokens (per-row adapters too)."""
  from ttsi_jax.model import lora as lora_lib

  config, params = hf.load(hf_checkpoints["qwen2"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)
  rs = np.random.RandomState(4)
  prompts = [rs.randint(1, VOCAB, n).tolist() for n in (9, 4, 15)]
  shared = [rs.randint(1, VOCAB, n).tolist() for n in (3, 0, 6)]
  candidates = [[rs.randint(1, VOCAB, m).tolist() for m in (2, 4)] for _ in prompts]
  prefill = {}
  if per_row:
    keys = jax.random.split(jax.random.key(2), 3)
    adapters = [
        jax.tree.map(lambda w, k=k: w + 0.1 * jax.random.normal(k, w.shape), lora_lib.init(config, k, 4, 8.0))
        for k in keys
    ]
    prefill = dict(lora=jax.tree.map(lambda *xs: jax.numpy.stack(xs), *adapters), lora_per_row=True)
  pre = sampler.prefill(prompts, reserve=64, **prefill)
  fed, _ = scoring.score_after(sampler, pre, candidates, shared=shared)
  extended, _ = scoring.score_after(sampler, sampler.extend(pre, shared), candidates)
  np.testing.assert_allclose(fed, extended, atol=1e-4)
  assert not np.allclose(fed, scoring.score_after(sampler, pre, candidates)[0], atol=1e-2)


def _legacy_sentencepiece():
  """A tokenizer built as transformers builds a SentencePiece "legacy" one (Llama 2, Mistral
  v0.1): "▁" before the text, spaces as "▁", no pre-tokenizer; "▁[" is one token."""
  from tokenizers import Tokenizer, models, normalizers

  chars = sorted(set("▁[]()=:.,Calqueftr"))
  vocab = {c: i for i, c in enumerate(chars)} | {"▁[": len(chars)}
  tokenizer = Tokenizer(models.BPE(vocab, [("▁", "[")]))
  tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  return lambda text: tokenizer.encode(text).ids, vocab


def test_a_continuation_is_tokenized_as_it_follows_its_context():
  encode, vocab = _legacy_sentencepiece()
  # Alone, " [f" starts with the word start the tokenizer puts before any text; after "Call:" the
  # model writes "▁[" straight away.
  assert encode(" [f") == [vocab["▁"], vocab["▁["], vocab["f"]]
  assert scoring.continuation(encode, "Call:", " [f") == [vocab["▁["], vocab["f"]]
  # Where the boundary merges tokens, there is no clean tail: the text alone.
  assert scoring.continuation(encode, "Call:▁", "[f") == encode("[f")
