"""G, self-data augmentation: K new request/call pairs per uncertain input, written by the model
itself (TT-SI) or by a teacher (TT-D: a second local checkpoint or an OpenAI-compatible endpoint).

The synthesis prompt shows the input's functions and request, never its gold answer. Pairs are
parsed from "Request: ... / Call: ..." text; with `well_formed`, the request is sampled freely and
the call is written by the constrained `CallDecoder` (small models otherwise answer in prose).
Validation (on by default) keeps only pairs whose request is natural language (not code, a call
or a code fence; such requests are drawn again a few times) and whose call parses, names an
offered function, has the required arguments and no unknown ones; every rejection is counted with
its reason.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging

from ttsi_jax.tasks.base import Example, Task
from ttsi_jax.text import constrained, scoring
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib
from ttsi_jax.text.sampler import SamplingParams
from ttsi_jax.ttsi import uncertainty

_SYSTEM = "You write training data for an assistant that answers requests with function calls."
_USER = (
    "Functions available:\n{functions}\n\nExample request: {question}\n\n"
    "Write {k} new request(s) that a user could make which need the same kind of function call, "
    "with different wording and different argument values. After each request, give the function "
    "call that answers it in Python syntax. Use exactly this format:\n"
    "Request: <the request>\nCall: [function_name(param=value, ...)]"
)
_PAIR = re.compile(r"Request:\s*(?P<request>.+?)\s*\n+\s*Call:\s*(?P<call>.+)")


@dataclasses.dataclass(frozen=True)
class Pair:
  request: str
  call: str
  rejected: str = ""  # why validation rejected it ("" = kept)
  # The limit that closed its well-formed call before the model chose to (None: none did).
  closed: Optional[str] = None

  @property
  def kept(self) -> bool:
    return not self.rejected

  @property
  def rejection_kind(self) -> str:
    """Why it was rejected, without the names and values in it ("f: unknown argument 'x'" ->
    "unknown argument …"), so that reasons of one kind count together ("" = kept)."""
    if self.rejected.startswith("unparseable"):
      return "unparseable"
    return re.sub(r"^[\w.]+: ", "", re.sub(r"'[^']*'|\"[^\"]*\"", "…", self.rejected))


@dataclasses.dataclass(frozen=True)
class Written:
  """What G wrote for one input from one source (the model itself, or the teacher): its pairs,
  or `failed` when the source gave none (a teacher whose requests all failed)."""

  pairs: list[Pair]
  failed: bool = False

  @property
  def kept(self) -> list[Pair]:
    return [p for p in self.pairs if p.kept]


def messages(example: Example, k: int) -> list[dict]:
  functions = json.dumps(list(example.functions), ensure_ascii=False)
  return [
      {"role": "system", "content": _SYSTEM},
      {"role": "user", "content": _USER.format(functions=functions, question=example.question, k=k)},
  ]


def parse_pairs(text: str) -> list[tuple[str, str]]:
  """(request, call) pairs from "Request: ... / Call: ..." text, in order."""
  return [(m.group("request").strip(), m.group("call").strip()) for m in _PAIR.finditer(text)]


_CALL_TEXT = re.compile(r"^\[?\s*[A-Za-z_][\w.]*\(")  # f(...), [f(...)], mod.f(...)
_CODE_TEXT = re.compile(r"^(import\s|from\s+\S+\s+import\s|def\s|class\s|return\s|[{\[<#$>`])")
_WORD = re.compile(r"[^\W\d_]{2,}")  # 2+ letters in a row, any script
_UNSPACED_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")  # kana, CJK, Hangul


def request_problem(request: str, opening: str = "") -> str:
  """Why `request` is not a natural-language request ("" when it is): small models often write a
  code fence, a call or code where the request belongs, and training on those teaches nothing.
  `opening`: words the request was made to start with (`request_opening`); what the model wrote
  after them is what must not be a fence, a call or code."""
  text = request.strip()
  written = text[len(opening) :].strip() if opening and text.startswith(opening) else text
  if not written:
    return "empty request"
  if written.startswith(("```", "~~~")):
    return "request is a code fence"
  if _CALL_TEXT.match(written):
    return "request is a function call"
  if _CODE_TEXT.match(written):
    return "request is code"
  words = [w for w in text.split() if _WORD.search(w)]  # a URL or an_identifier is one word
  if len(words) < 3 and not _UNSPACED_SCRIPT.search(text):
    return "request has fewer than 3 words"
  return ""


def written_text(text: str) -> str:
  """What a model wrote after its reasoning (`strip_reasoning`); a `<think>` block never closed
  (the reply cut off while thinking) holds drafts, not pairs: nothing."""
  if "<think>" in text and "</think>" not in text:
    return ""
  return tokenizer_lib.strip_reasoning(text)


def judge(
    task: Task, example: Example, request: str, call: str, validate: bool, request_issue: str = ""
) -> Pair:
  """The pair with validation's verdict: the request must be natural language (`request_issue`:
  what its sampling already found wrong), the call valid."""
  reason = ""
  if not request.strip():
    reason = "empty request"
  elif validate:
    reason = request_issue or request_problem(request) or task.validate(example, call) or ""
  return Pair(request, call, reason)


def judge_all(
    task: Task, example: Example, pairs: Sequence[tuple[str, str]], k: int, validate: bool
) -> list[Pair]:
  judged = [judge(task, example, r, c, validate) for r, c in pairs[:k]]
  # A generation with fewer than K parseable pairs: the missing ones count as rejected.
  judged += [Pair("", "", "no parseable pair")] * (k - len(judged))
  return judged


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  k: int = 1
  well_formed: bool = True
  validate: bool = True
  temperature: float = 0.7
  top_p: float = 0.95
  max_request_tokens: int = 48
  max_free_tokens: int = 160
  # With validation, a sampled request that is not natural language (`request_problem`) is drawn
  # again up to this many times, on the same prefilled batch (well-formed decoding only).
  request_retries: int = 2
  # Words the sampled request starts with (well-formed decoding): after "Request:" alone the
  # embedded model wrote a code fence, a call or code for 9 of 16 BFCL inputs; after
  # "Request: Please", for none (4 of 16 calls then lacked a required argument). "" = its own start.
  request_opening: str = "Please"


class ModelSynthesizer:
  """Pairs from a local model (the model itself for TT-SI, a teacher checkpoint for TT-D)."""

  def __init__(self, task: Task, decoder: constrained.CallDecoder, cfg: SynthesisConfig, reserve: int = 384):
    """`decoder` writes the calls (and brings the model's sampler and tokenizer)."""
    self.task = task
    self.decoder = decoder
    self.sampler = decoder.sampler
    self.tokenizer = decoder.tokenizer
    self.cfg = cfg
    self.reserve = reserve

  def synthesize(self, examples: Sequence[Example], rng: jax.Array) -> list[list[Pair]]:
    """K pairs per example; `rng`: one key, or keys_E, one per example (an example's pairs then
    depend on its own key alone, not on which examples are synthesized beside it)."""
    if not examples:
      return []
    if self.cfg.well_formed:
      return self._well_formed(examples, rng)
    return self._free(examples, rng)

  def _free(self, examples, rng):
    sampling = SamplingParams(self.cfg.max_free_tokens * self.cfg.k, self.cfg.temperature, self.cfg.top_p)
    prompts = [self.tokenizer.encode_chat(messages(ex, self.cfg.k)) for ex in examples]
    outs = self.sampler.generate(prompts, sampling, rng)
    texts = [written_text(self.tokenizer.decode(out)) for out in outs]
    return [
        judge_all(self.task, ex, parse_pairs(text), self.cfg.k, self.cfg.validate)
        for ex, text in zip(examples, texts)
    ]

  def _well_formed(self, examples, rng):
    """K rows per input: sample a request, pick the function by likelihood, decode the call."""
    k = self.cfg.k
    rows = [ex for ex in examples for _ in range(k)]
    if rng.ndim:  # keys_E -> one key per row: the example's key split k ways
      rng = jax.vmap(lambda key: jax.random.split(key, k))(rng).reshape(-1)
    enc = self.tokenizer.encode
    pre = self.sampler.prefill([self.tokenizer.encode_chat(messages(ex, k)) for ex in rows], self.reserve)
    requests, issues = self._requests(pre, rng)
    leads = [f"Request: {r}\nCall: " for r in requests]
    # The function by likelihood, as H picks it (`Answerer.action_tokens`), after "Call:" and
    # with the space in the candidate: " [" is one token where the model writes it, so scoring
    # "[" after a lone " " would ask for a split it never saw. Each candidate is tokenized as it
    # follows its row's lead (`scoring.continuation`).
    contexts = [lead.rstrip(" ") for lead in leads]
    here = self.sampler.extend(pre, [enc(context) for context in contexts])
    candidates = [
        [scoring.action_tokens(functools.partial(scoring.continuation, enc, context), " " + c) for c in cands]
        for context, cands in zip(contexts, (self.task.candidates(ex) for ex in rows))
    ]
    loglik, counts = scoring.score_after(self.sampler, here, candidates, self.decoder.open_mask_V)
    best = np.asarray(uncertainty.rss_stats(loglik, counts)["best"])
    names = [ex.functions[int(b)]["name"] for ex, b in zip(rows, best)]
    calls, cuts = self.decoder.decode_noting(
        pre, [ex.functions for ex in rows], names, leads, rng=sampler_lib.fold_in(rng, 1)
    )
    judged = [
        judge(self.task, ex, r, c, self.cfg.validate, issue)
        for ex, r, c, issue in zip(rows, requests, calls, issues)
    ]
    # An argument missing from a call that a limit closed: the limit, not the model, left it out.
    judged = [
        dataclasses.replace(
            p,
            rejected=f"{p.rejected} (the call was closed by {cut})"
            if cut and "missing required argument" in p.rejected
            else p.rejected,
            closed=cut or None,
        )
        for p, cut in zip(judged, cuts)
    ]
    return [judged[i * k : (i + 1) * k] for i in range(len(examples))]

  def _requests(self, pre: sampler_lib.Prefilled, rng) -> tuple[list[str], list[str]]:
    """One sampled request per row (its first line, after `request_opening`) and what is wrong
    with it ("" where nothing is: `request_problem`, or a first line that `max_request_tokens`
    cut). With validation, the rows whose request has a problem sample again (fresh keys), up to
    `request_retries` times."""
    sampling = SamplingParams(self.cfg.max_request_tokens, self.cfg.temperature, self.cfg.top_p)
    start = self.cfg.request_opening.strip()
    opening = self.tokenizer.encode(f"Request: {start}" if start else "Request:")
    requests, issues, again = [""] * pre.rows, [""] * pre.rows, [True] * pre.rows
    for attempt in range(1 + (self.cfg.request_retries if self.cfg.validate else 0)):
      key = sampler_lib.fold_in(rng, 0 if attempt == 0 else 100 + attempt)
      outs = self.sampler.continue_(pre, [opening] * pre.rows, sampling, key, active=again)
      for i, out in enumerate(outs):
        if again[i]:
          # Decoded with the opening: SentencePiece tokenizers drop a continuation's first space.
          text = self.tokenizer.decode(opening + out).split(":", 1)[-1]
          requests[i] = text.strip().split("\n")[0].strip()
          cut = len(out) == self.cfg.max_request_tokens and "\n" not in text
          issues[i] = request_problem(requests[i], start) or (
              "request cut at synthesis.max_request_tokens" if cut else ""
          )
      again = [a and bool(issue) for a, issue in zip(again, issues)]
      if not any(again):
        break
    return requests, issues


class TeacherError(RuntimeError):
  """The teacher endpoint failed after all retries."""


class TeacherRequestError(ValueError):
  """The teacher endpoint refused the request itself (key, model, URL, or a request field, which a
  minimal request shows): every input would fail the same way, so the run stops and says so
  instead of falling back to base."""


# Refusals a retry cannot fix (other HTTP errors, 408 / 429 / 5xx, are retried): of the setup,
# which stop the run; and of one request, which stop the run where a minimal request with the same
# fields is refused too (a wrong request field), else only fail that input (e.g. a prompt too
# long, a content filter).
_REFUSED_SETUP = {401: "unauthorized", 403: "forbidden", 404: "not found", 405: "method not allowed"}
_REFUSED_REQUEST = {400: "bad request", 413: "request too large", 422: "unprocessable request"}


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
  base_url: str
  model: str
  api_key_env: str = "OPENAI_API_KEY"
  timeout_s: float = 60.0
  retries: int = 3
  backoff_s: float = 1.0
  max_tokens: int = 512
  # A JSON object merged into every request body; null drops a field. E.g. for OpenAI reasoning
  # models: {"max_tokens": null, "max_completion_tokens": 4096, "temperature": null}
  request_json: str = ""

  def __post_init__(self):
    self.overrides()  # bad JSON fails when the run starts, not at the first flagged input

  def overrides(self) -> dict:
    """request_json as a dict."""
    try:
      overrides = json.loads(self.request_json or "{}")
    except ValueError as e:
      raise ValueError(f"teacher.request_json is not valid JSON ({e}): " f"{self.request_json!r}") from None
    if not isinstance(overrides, dict):
      raise ValueError(f"teacher.request_json must be a JSON object, got {self.request_json!r}.")
    return overrides


def _not_connected(err: Exception) -> bool:
  """Whether a request failed before any server answered: refused, no such host, no route (not a
  timeout: a slow server is there)."""
  reason = err.reason if isinstance(err, urllib.error.URLError) else err
  return isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or (
      isinstance(reason, OSError) and reason.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
  )


class EndpointSynthesizer:
  """TT-D with an OpenAI-compatible chat-completions endpoint as the teacher.

  A request that times out, fails or returns an unusable body is retried with backoff; after the
  last retry that input gets no pairs (`None`), so the loop answers it with the base model and
  counts it. A refusal of the setup (401 / 403 / 404 / 405) raises TeacherRequestError at once; so
  does a refused request (400 / 413 / 422) before any has succeeded, unless the endpoint answers a
  minimal request with the same fields (then that input alone fails, as it does after a success:
  a fresh and a resumed run judge it alike).
  """

  PROBE = [{"role": "user", "content": "Reply with OK."}]

  def __init__(self, task: Task, endpoint: EndpointConfig, cfg: SynthesisConfig):
    self.task = task
    self.endpoint = endpoint
    self.cfg = cfg
    self.answered = False  # whether any request has succeeded yet

  def request_body(self, msgs: list[dict], seed: Optional[int] = None) -> dict:
    """The chat-completions body: model, messages, synthesis.temperature, max_tokens and the
    input's seed (OpenAI and vLLM sample reproducibly with it; top_p only through request_json:
    some endpoints refuse it beside temperature), then overrides."""
    e = self.endpoint
    body = {
        "model": e.model,
        "messages": msgs,
        "temperature": self.cfg.temperature,
        "max_tokens": e.max_tokens,
        "seed": seed,
        **e.overrides(),
    }
    return {k: v for k, v in body.items() if v is not None}

  def _complete(self, msgs: list[dict], seed: Optional[int] = None, probe: bool = True) -> str:
    e = self.endpoint
    body = json.dumps(self.request_body(msgs, seed)).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(e.api_key_env, "")
    if key:
      headers["Authorization"] = f"Bearer {key}"
    url = e.base_url.rstrip("/") + "/chat/completions"
    last_error, unreachable = "", True  # every attempt failed to connect (no server answered)
    for attempt in range(e.retries + 1):
      if attempt:
        time.sleep(e.backoff_s * 2 ** (attempt - 1))
      try:
        with urllib.request.urlopen(
            urllib.request.Request(url, body, headers), timeout=e.timeout_s
        ) as response:
          payload = json.loads(response.read())
        content = payload["choices"][0]["message"]["content"]
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
          content = "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
          raise TypeError("message content is not a string")
        self.answered = True
        return written_text(content)
      except urllib.error.HTTPError as err:
        unreachable = False
        refused = _REFUSED_SETUP.get(err.code) or _REFUSED_REQUEST.get(err.code)
        if refused is None:
          last_error = f"HTTP {err.code}: {err.reason}"
          continue
        try:
          detail = err.read().decode("utf-8", "replace")[:500]
        except OSError:
          detail = ""
        message = f"Teacher endpoint {url} refused the request: HTTP {err.code} ({refused}): " f"{detail}"
        if err.code in _REFUSED_SETUP or not (self.answered or (probe and self._fields_accepted(seed))):
          raise TeacherRequestError(
              f"{message}\nCheck teacher.base_url, teacher.model and ${e.api_key_env}; change "
              'request fields with teacher.request_json (e.g. {"seed": null} drops the seed).'
          ) from None
        raise TeacherError(message) from None
      except (
          urllib.error.URLError,
          http.client.HTTPException,
          OSError,
          ValueError,
          KeyError,
          IndexError,
          TypeError,
      ) as err:
        unreachable &= _not_connected(err)
        last_error = f"{type(err).__name__}: {err}"
    if unreachable and not self.answered:  # every input would fall back to base, silently
      raise TeacherRequestError(
          f"Teacher endpoint {url} cannot be reached ({last_error}): check teacher.base_url and "
          "that the server runs."
      )
    raise TeacherError(f"Teacher endpoint {url} failed {e.retries + 1} times; last error: " f"{last_error}")

  def _fields_accepted(self, seed: Optional[int]) -> bool:
    """Whether the endpoint answers `PROBE` with this run's request fields; a probe that fails
    otherwise (a timeout, HTTP 429 or 5xx) says nothing of them, and fails only this input
    (TeacherError)."""
    try:
      self._complete(self.PROBE, seed, probe=False)
    except TeacherRequestError:
      return False
    return True

  def synthesize(
      self, examples: Sequence[Example], rng: Optional[jax.Array] = None
  ) -> list[Optional[list[Pair]]]:
    """Per input, its judged pairs, or None where the endpoint failed it. `rng`: one key per
    input, each sent as the request's seed (none without)."""
    if rng is None:
      seeds = [None] * len(examples)
    else:
      seeds = [int(s) for s in jax.vmap(lambda k: jax.random.randint(k, (), 0, 2**31 - 1))(rng)]
    out: list[Optional[list[Pair]]] = []
    for ex, seed in zip(examples, seeds):
      try:
        text = self._complete(messages(ex, self.cfg.k), seed)
      except TeacherError as err:
        logging.warning("Input %s gets no teacher pairs: %s", ex.id, err)
        out.append(None)
        continue
      out.append(judge_all(self.task, ex, parse_pairs(text), self.cfg.k, self.cfg.validate))
    return out
