"""H's candidate scores against transformers on the same tokens."""

import logging
import types

import numpy as np
import torch
import transformers

from configs import tiny
from ttsi_jax import experiment
from ttsi_jax.tasks.base import Example
from ttsi_jax.ttsi import answering


def test_candidate_actions_score_the_name_then_any_token_that_opens_the_call(tiny_chat_model, tmp_path):
  config = tiny.get_config()
  config.model.path, config.task.num_examples = tiny_chat_model, 2
  run = experiment.Experiment(config, str(tmp_path))
  prompts = [run.tokenizer.encode_chat(run.task.prompt(ex)) for ex in run.examples]
  stats = run.answerer.score(run.sampler.prefill(prompts, config.reserve), run.examples)

  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, torch_dtype=torch.float32)
  pieces = [run.tokenizer.decode([i]) for i in range(model.config.vocab_size)]
  opens = torch.tensor([p.startswith("(") for p in pieces])
  assert {"(", "()]", "('", "(["} <= {p for p, o in zip(pieces, opens.tolist()) if o}
  for ex, prompt, probs, perplexity in zip(run.examples, prompts, stats.probs, stats.perplexity):
    logliks, counts = [], []
    for action in run.task.candidates(ex):  # "[name(": "[name", then a token that begins with "("
      name = run.tokenizer.encode(action[:-1])
      with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + name])).logits[0].double(), -1)
      targets = torch.tensor(name)
      loglik = logp[torch.arange(len(prompt) - 1, len(prompt) + len(name) - 1), targets].sum()
      logliks.append(float(loglik + torch.logsumexp(logp[-1][opens], -1)))
      counts.append(len(name) + 1)
    # The log-likelihoods themselves (perplexity = exp(-loglik / tokens)), and their RSS.
    np.testing.assert_allclose(-np.log(perplexity[: len(logliks)]) * counts, logliks, rtol=1e-4)
    expected = np.exp(logliks - np.max(logliks))
    np.testing.assert_allclose(probs[: len(logliks)], expected / expected.sum(), atol=2e-5)


def test_only_inputs_offering_one_function_are_scored_again_and_an_empty_one_keeps_its_score():
  from ttsi_jax.tasks.bfcl import BfclTask
  from ttsi_jax.ttsi import answering, uncertainty

  one, several = BfclTask("simple_python", 1).examples()[0], BfclTask("multiple", 1).examples()[0]
  examples = [one, several, one]  # rows 0 and 2 offer one function; row 2 samples only ""
  stats = uncertainty.CandidateStats.of(
      [["[f("], ["[g(", "[h("], ["[f("]], np.log([[1.0, 0.0], [0.6, 0.4], [1.0, 0.0]]), np.ones((3, 2))
  )
  scored = []

  def score(pre, exs, answers):
    scored.append(answers)
    return uncertainty.CandidateStats.of(
        answers, np.log([[0.7, 0.3], [1.0, 0.0], [1.0, 0.0]]), np.ones((3, 2))
    )

  answers = iter([["[f(a=1)]", "", ""], ["[f(a=2)]", "", ""]])
  fake = types.SimpleNamespace(
      task=BfclTask("simple_python", 1),
      answer=lambda *a, **k: (next(answers), [""] * 3),
      score=score,
      answer_tokens=lambda c: [1] * len(c),
  )
  pre = types.SimpleNamespace(free=lambda: 100)
  out = answering.Answerer.sampled_call_stats(fake, pre, examples, stats, None, 2)
  assert scored == [[["[f(a=1)]", "[f(a=2)]"], [], []]]  # the other rows: nothing to score
  np.testing.assert_allclose(out.margin_B, [0.4, 0.2, 1.0], atol=1e-6)  # row 2: its function's
  assert out.candidates == [["[f(a=1)]", "[f(a=2)]"], ["[g(", "[h("], ["[f("]]


def test_answers_a_limit_closed_are_counted_in_a_warning_and_named_per_answer(caplog):
  cut = "decoding.max_args (1)"
  decoder = types.SimpleNamespace(decode_noting=lambda *a, **k: (["[f(a=1)]", "[f(a=2)]"], ["", cut]))
  answerer = types.SimpleNamespace(
      well_formed=True, decoder=decoder, max_new_tokens=8, temperature=0.0, top_p=1.0
  )
  examples = [Example(f"q{i}", "?", ({"name": "f"},)) for i in range(2)]
  with caplog.at_level(logging.WARNING):
    calls, closed = answering.Answerer.answer(answerer, None, examples, np.zeros(2, int), None, sample=False)
  assert calls == ["[f(a=1)]", "[f(a=2)]"] and closed == ["", cut]
  assert f"1 of 2 answers were closed before the model chose to (first: input q1, by {cut})" in caplog.text
