"""Answering a prefilled prompt: pick the function by likelihood, then write the call; the
uncertainty of inputs that offer a single function; verdicts per decoding mode."""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ttsi_jax.tasks.base import Example, Task
from ttsi_jax.text import constrained, scoring
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib
from ttsi_jax.text.sampler import SamplingParams
from ttsi_jax.ttsi import uncertainty


@dataclasses.dataclass
class Answerer:
  """Answers prefilled prompts: picks the function by likelihood, then writes the call."""

  task: Task
  sampler: sampler_lib.Sampler
  tokenizer: tokenizer_lib.Tokenizer
  decoder: constrained.CallDecoder
  well_formed: bool
  max_new_tokens: int
  num_samples: int
  temperature: float
  top_p: float

  def score(self, pre, examples: Sequence[Example], answers=None) -> uncertainty.CandidateStats:
    """RSS statistics over the task's candidate actions, or over the given whole answers (each
    scored with the end of its turn: an answer cut short, or one that is the start of another,
    does not take the longer one's likelihood)."""
    if answers is None:
      candidates, tokens, tail_mask_V = (
          [self.task.candidates(ex) for ex in examples],
          self.action_tokens,
          self.decoder.open_mask_V,
      )
    else:
      candidates, tokens, tail_mask_V = answers, self.answer_tokens, None
    loglik, counts = scoring.score_after(
        self.sampler, pre, [[tokens(c) for c in cands] for cands in candidates], tail_mask_V
    )
    return uncertainty.CandidateStats.of(candidates, loglik, counts)

  def action_tokens(self, action: str) -> list[int]:
    return scoring.action_tokens(self.tokenizer.encode, action)

  def answer_tokens(self, answer: str) -> list[int]:
    """A whole answer as scored: its tokens, then the end of its turn."""
    return self.tokenizer.encode(answer) + [self.tokenizer.end_of_turn_id]

  def sampled_call_stats(
      self, pre, examples, stats: uncertainty.CandidateStats, rng, num_samples: int
  ) -> uncertainty.CandidateStats:
    """Uncertainty for inputs offering a single function (where the name margin is always 1):
    sample answers, keep the distinct ones (calls by canonical form, unparseable text as written:
    a model that cannot write the call is not certain of it), score each as a candidate.
    Returns `stats` with those inputs' margin / entropy / probs / candidates replaced. An input
    whose samples are all empty keeps its function's name as its one candidate (margin 1: not
    flagged), and is logged."""
    single = [i for i, ex in enumerate(examples) if len(self.task.candidates(ex)) == 1]
    if not single or num_samples <= 0:
      return stats
    active = [i in single for i in range(len(examples))]  # the other rows are not decoded
    runs = [
        self.answer(pre, examples, stats.best_B, sampler_lib.fold_in(rng, s), sample=True, active=active)[0]
        for s in range(num_samples)
    ]
    candidates = [[] for _ in examples]  # only the sampled rows are scored again
    for i in list(single):
      ex = examples[i]
      calls = distinct_answers(self.task, [run[i] for run in runs])
      if not calls:
        logging.warning(
            "Input %s: all %d sampled answers are empty; scoring its function alone.", ex.id, len(runs)
        )
        single.remove(i)  # its function's score stands
        continue
      fit = scoring.candidates_that_fit([self.answer_tokens(c) for c in calls], pre.free())
      if not fit:
        raise ValueError(
            f"Input {ex.id}: a sampled answer does not fit the {pre.free()} free "
            "cache slots to be scored; raise config.reserve."
        )
      if fit < len(calls):
        logging.warning(
            "Input %s: scoring %d of its %d distinct sampled answers (the rest do not "
            "fit the %d free cache slots; raise config.reserve).",
            ex.id,
            fit,
            len(calls),
            pre.free(),
        )
      candidates[i] = calls[:fit]
    if not single:
      return stats
    return stats.with_rows(single, self.score(pre, examples, answers=candidates))

  def answer(
      self, pre, examples: Sequence[Example], best: np.ndarray, rng, sample: bool, active=None
  ) -> tuple[list[str], list[str]]:
    """An answer per input, calling its function `best` (inputs not `active` get ""), and per input
    the limit that closed its well-formed call before the model chose to ("" where none did, and
    for free text)."""
    names = [ex.functions[int(b)]["name"] for ex, b in zip(examples, best)]
    sampling = SamplingParams(
        self.max_new_tokens, self.temperature if sample else 0.0, self.top_p if sample else 1.0
    )
    if self.well_formed:
      functions = [ex.functions for ex in examples]
      calls, cuts = self.decoder.decode_noting(
          pre, functions, names, sampling=sampling, rng=rng, active=active
      )
      closed = [(ex.id, cut) for ex, cut in zip(examples, cuts) if cut]
      if closed:  # an argument the model may have meant to write is missing for a limit
        logging.warning(
            "%d of %d answers were closed before the model chose to (first: input %s, by %s).",
            len(closed),
            len(calls) if active is None else sum(map(bool, active)),
            *closed[0],
        )
      return calls, cuts
    outs = self.sampler.continue_(pre, [[] for _ in examples], sampling, rng, active)
    return [tokenizer_lib.strip_reasoning(self.tokenizer.decode(o)) for o in outs], [""] * len(examples)

  def answers(self, pre, examples, stats: uncertainty.CandidateStats, rng, modes) -> dict:
    """{"direct": [answer per input], "closed": [what closed each direct answer's call, `answer`],
    "samples": [[n answers] per input] when voting}. The direct answer calls the most likely
    function; under well-formed decoding each sample first draws its function from the RSS
    probabilities (at the sampling temperature), so voting and pass@k can also change the
    function, as free sampling can."""
    direct, closed = self.answer(pre, examples, stats.best_B, rng, sample=False)
    out = {"direct": direct, "closed": closed}
    if set(modes) - {"direct"}:
      runs = []
      for s in range(self.num_samples):
        keys = sampler_lib.fold_in(rng, s + 1)
        functions = (
            self.draw_functions(examples, stats, sampler_lib.fold_in(keys, 1))
            if self.well_formed
            else stats.best_B
        )
        runs.append(self.answer(pre, examples, functions, sampler_lib.fold_in(keys, 0), sample=True)[0])
      out["samples"] = [list(r) for r in zip(*runs)]
    return out

  def draw_functions(self, examples, stats: uncertainty.CandidateStats, keys_B) -> np.ndarray:
    """A function index per input, drawn with its own key from softmax(log RSS prob / T)."""
    if self.temperature <= 0:  # greedy "samples": the most likely function
      return stats.best_B[: len(examples)]
    logits_BC = np.full((len(examples), max(len(ex.functions) for ex in examples)), -np.inf, np.float32)
    for i, ex in enumerate(examples):
      n = len(ex.functions)  # a single function's "probs" are over sampled calls: keep it
      probs = np.asarray(stats.probs[i][:n], np.float64) if n > 1 else np.ones(1)
      logits_BC[i, :n] = np.log(probs, where=probs > 0, out=np.full(n, -np.inf)) / self.temperature
    return np.asarray(jax.vmap(jax.random.categorical)(keys_B, jnp.asarray(logits_BC)))


def distinct_answers(task: Task, answers: Sequence[str]) -> list[str]:
  """The non-empty answers, one per canonical call form (unparseable ones by their text), in
  first-seen order."""
  seen, out = set(), []
  for a in answers:
    key = task.canonical(a) or ("text", a.strip())
    if a.strip() and key not in seen:
      seen.add(key)
      out.append(a)
  return out


def verdicts(task: Task, ex: Example, answers: dict, modes) -> dict:
  """Correctness per mode: direct (always: the flag metrics need it); majority vote over the
  samples' canonical forms, those that make no call (unparseable: prose) voting as one answer, the
  right one where the input's answer is no call; pass@k."""
  out = {"direct": task.check(ex, answers["direct"]).correct}
  samples = answers.get("samples", [])
  if "majority" in modes:
    keys = [task.canonical(s) for s in samples]
    votes = collections.Counter(keys)  # ties: the first sample's answer
    chosen = samples[keys.index(votes.most_common(1)[0][0])] if samples else None
    out["majority"] = chosen is not None and task.check(ex, chosen).correct
  if "pass@k" in modes:
    out["pass@k"] = any(task.check(ex, s).correct for s in samples)
  return out
