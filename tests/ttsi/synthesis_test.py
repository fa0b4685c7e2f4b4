"""Pair parsing and validation; the endpoint teacher's request, its retries on timeouts and garbage,
and its stop on a refused request."""

import dataclasses
import http.server
import json
import socket
import threading
import time

import jax
import numpy as np
import pytest

from ttsi_jax import checkpoints
from ttsi_jax.tasks.bfcl import BfclTask
from ttsi_jax.text import constrained, scoring
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib
from ttsi_jax.ttsi import synthesis


@pytest.fixture(scope="module")
def example():
  return BfclTask("multiple", 1).examples()[0]  # triangle_properties.get / circle_properties.get


def test_parse_pairs_reads_request_call_blocks():
  text = (
      "Sure! Here you go.\nRequest: What is the area of a circle of radius 2?\n"
      "Call: [circle_properties.get(radius=2)]\n\nRequest: And radius 3?\nCall: nothing here"
  )
  assert synthesis.parse_pairs(text) == [
      ("What is the area of a circle of radius 2?", "[circle_properties.get(radius=2)]"),
      ("And radius 3?", "nothing here"),
  ]
  assert synthesis.parse_pairs("I cannot help with that.") == []


def test_validation_keeps_good_pairs_and_names_the_problem(example):
  task = BfclTask("multiple", 1)
  request = "What is the area of a circle of radius 2?"
  pairs = [
      (request, "[circle_properties.get(radius=2)]"),
      (request, "[circle_properties.get()]"),
      (request, "[no_such_function(x=1)]"),
      (request, "the answer is 4"),
      ("```python", "[circle_properties.get(radius=2)]"),
  ]
  judged = synthesis.judge_all(task, example, pairs, 6, validate=True)
  assert [p.kept for p in judged] == [True, False, False, False, False, False]
  assert "radius" in judged[1].rejected and "no_such_function" in judged[2].rejected
  assert "unparseable" in judged[3].rejected and judged[4].rejected == "request is a code fence"
  assert judged[5].rejected == "no parseable pair"
  unvalidated = synthesis.judge_all(task, example, pairs, 5, validate=False)
  assert all(p.kept for p in unvalidated)  # the paper's setting: no filter


@pytest.mark.parametrize(
    "request_text, problem",
    [
        ("What is the area of a circle of radius 2?", ""),
        ("find flights from Paris to Rome on 3 May", ""),
        ("Berechne die Fläche eines Kreises mit Radius 2", ""),
        ("请计算半径为2的圆的面积", ""),  # no spaces between words: counted by script
        ("", "empty request"),
        ("```python", "request is a code fence"),
        ("```", "request is a code fence"),
        ("[circle_properties.get(radius=2)]", "request is a function call"),
        ("circle_properties.get(radius=2) please", "request is a function call"),
        ("import math", "request is code"),
        ('{"radius": 2}', "request is code"),
        ("def area(r):", "request is code"),
        ("Hello", "request has fewer than 3 words"),
        ("2 + 2 = 4", "request has fewer than 3 words"),
        ("https://api.example.com/v1/list_top_favorites", "request has fewer than 3 words"),
        ("kinetic_energy_of_a_10_kg_mass", "request has fewer than 3 words"),
    ],
)
def test_requests_must_be_natural_language(request_text, problem):
  assert synthesis.request_problem(request_text) == problem


@pytest.mark.parametrize(
    "request_text, problem",
    [
        ("Please calculate_area(base=10, height=5)", "request is a function call"),
        ("Please [calculate_area(base=10)]", "request is a function call"),
        ("Please import math", "request is code"),
        ("Please ```python", "request is a code fence"),
        ("Please", "empty request"),
        ("Please find the area of a circle", ""),
    ],
)
def test_what_follows_the_opening_is_what_must_be_natural_language(request_text, problem):
  assert synthesis.request_problem(request_text, "Please") == problem


def _sampler_that_writes(tiny_chat_model, texts, tokenizer=None):
  """A real sampler whose continuations are these texts' tokens (row by row), and a prefill."""
  task = BfclTask("multiple", len(texts))
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer or tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  pre = sampler.prefill([tokenizer.encode_chat(synthesis.messages(ex, 1)) for ex in task.examples()], 64)
  sampler.continue_ = lambda *a, **k: [tokenizer.encode(t) for t in texts]
  return task, constrained.CallDecoder(sampler, tokenizer), pre


def test_a_request_cut_at_max_request_tokens_is_a_problem(tiny_chat_model):
  """All of max_request_tokens and no end of line: the request is cut mid-sentence."""
  cut = " find the area of a circle with"
  task, decoder, pre = _sampler_that_writes(tiny_chat_model, [cut, " go now\n"])
  limit = len(decoder.tokenizer.encode(cut))
  assert len(decoder.tokenizer.encode(" go now\n")) < limit
  cfg = synthesis.SynthesisConfig(max_request_tokens=limit, request_retries=0)
  requests, issues = synthesis.ModelSynthesizer(task, decoder, cfg)._requests(pre, jax.random.key(0))
  assert requests == ["Please" + cut, "Please go now"]
  assert issues == ["request cut at synthesis.max_request_tokens", ""]
  pair = synthesis.judge(task, task.examples()[0], requests[0], "[f()]", True, issues[0])
  assert pair.rejected == "request cut at synthesis.max_request_tokens"


class _DropsFirstSpace:
  """A tokenizer whose decoding drops the text's first space, as SentencePiece's (Llama 2,
  Mistral) does for a continuation decoded alone."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def decode(self, ids):
    return self.tokenizer.decode(ids).lstrip(" ")

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)


def test_the_opening_and_the_sampled_words_keep_their_space(tiny_chat_model):
  tokenizer = _DropsFirstSpace(tokenizer_lib.load(tiny_chat_model))
  task, decoder, pre = _sampler_that_writes(tiny_chat_model, [" find the area\n"], tokenizer)
  cfg = synthesis.SynthesisConfig(max_request_tokens=32, request_retries=0)
  requests, _ = synthesis.ModelSynthesizer(task, decoder, cfg)._requests(pre, jax.random.key(0))
  assert requests == ["Please find the area"]  # not "Pleasefind the area"


def test_a_rejected_request_is_drawn_again_and_a_kept_one_stays(tiny_chat_model, monkeypatch):
  task = BfclTask("multiple", 4)
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  prompts = [tokenizer.encode_chat(synthesis.messages(ex, 1)) for ex in task.examples()]
  pre = sampler.prefill(prompts, 64)
  keys_E = jax.random.split(jax.random.key(0), len(prompts))
  continue_ = sampler.continue_  # one token short of max_request_tokens: no request is cut
  sampler.continue_ = lambda *a, **k: [out[:-1] for out in continue_(*a, **k)]

  def requests(retries):
    cfg = synthesis.SynthesisConfig(temperature=1.0, max_request_tokens=8, request_retries=retries)
    return synthesis.ModelSynthesizer(task, constrained.CallDecoder(sampler, tokenizer), cfg)._requests(
        pre, keys_E
    )[0]

  first = requests(0)
  # A random model writes word salad: call the first draws of rows 0 and 2 code instead.
  judged_code = {first[0], first[2]}
  monkeypatch.setattr(
      synthesis, "request_problem", lambda r, opening="": "request is code" if r in judged_code else ""
  )
  retried = requests(2)
  assert [after != before for before, after in zip(first, retried)] == [True, False, True, False]


@pytest.mark.parametrize("opening", ["Please", ""])
def test_requests_continue_from_the_opening_and_start_with_it(tiny_chat_model, opening):
  task = BfclTask("multiple", 2)
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  pre = sampler.prefill([tokenizer.encode_chat(synthesis.messages(ex, 1)) for ex in task.examples()], 64)
  cfg = synthesis.SynthesisConfig(temperature=1.0, max_request_tokens=8, request_opening=opening)
  extensions = []
  continue_ = sampler.continue_
  sampler.continue_ = lambda pre, ext, *a, **k: extensions.append(ext) or continue_(pre, ext, *a, **k)
  synth = synthesis.ModelSynthesizer(task, constrained.CallDecoder(sampler, tokenizer), cfg)
  requests, _ = synth._requests(pre, jax.random.split(jax.random.key(0), 2))
  assert extensions[0] == [tokenizer.encode(f"Request: {opening}" if opening else "Request:")] * 2
  assert all(r.startswith(opening) for r in requests) and len(set(requests)) == 2


def test_per_example_keys_make_pairs_independent_of_the_examples_beside_them(tiny_chat_model):
  task = BfclTask("multiple", 2)
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  cfg = synthesis.SynthesisConfig(
      k=2, well_formed=True, temperature=1.0, max_request_tokens=8, max_free_tokens=8
  )
  synth = synthesis.ModelSynthesizer(task, constrained.CallDecoder(sampler, tokenizer), cfg)
  examples = task.examples()
  keys_E = jax.random.split(jax.random.key(0), 2)
  together = synth.synthesize(examples, keys_E)
  assert synth.synthesize(examples[1:], keys_E[1:]) == together[1:]  # another batch bucket too
  assert together[0][0] != together[0][1]  # the k rows of one example get distinct keys


def test_synthesis_prompt_never_shows_the_gold_answer(example):
  text = json.dumps(synthesis.messages(example, 2))
  assert example.question in text and "triangle_properties.get" in text
  assert "side1=5" not in text and "ground_truth" not in text


class _Handler(http.server.BaseHTTPRequestHandler):
  mode = "ok"
  hits = 0
  last_request: dict = {}

  def do_POST(self):
    type(self).hits += 1
    type(self).last_request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if self.mode == "slow":
      time.sleep(1.0)
    content = "Request: How big is a circle of radius 1?\nCall: [circle_properties.get(radius=1)]"
    if self.mode == "thinking":  # a reasoning model's draft pair must not be read as a pair
      content = "<think>\nRequest: draft\nCall: [triangle_properties.get(side1=1)]\n</think>\n" + content
    if self.mode == "cut_while_thinking":  # max_tokens reached inside the block: drafts only
      content = "<think>\n" + content
    mode = self.mode
    probe = type(self).last_request["messages"] == synthesis.EndpointSynthesizer.PROBE
    if mode == "input_too_long":  # this input's request only: a minimal one is answered
      mode = "ok" if probe else "too_long"
    if mode == "too_long_then_busy":  # the probe meets an overloaded endpoint
      mode = "busy" if probe else "too_long"
    status = {"refuse": 404, "too_long": 400, "busy": 503}.get(mode, 200)
    body = (
        b'{"choices": []}'
        if mode == "empty"
        else b'{"error": "model \'m\' does not exist"}'
        if mode == "refuse"
        else b'{"error": "prompt too long"}'
        if mode == "too_long"
        else json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        if mode != "parts"
        else json.dumps(
            {
                "choices": [
                    {
                        "message": {
                            "content": [{"type": "text", "text": t} for t in (content[:20], content[20:])]
                        }
                    }
                ]
            }
        ).encode()
    )
    try:
      self.send_response(status)
      self.end_headers()
      self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      pass

  def log_message(self, *args):
    pass


@pytest.fixture
def endpoint():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  _Handler.hits = 0
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()


def _teacher(endpoint, request_json="", timeout_s=5.0):
  """A teacher whose requests wait `timeout_s` (long: a slow test machine never retries by
  accident; the "slow" mode's server answers after 1 s)."""
  return synthesis.EndpointSynthesizer(
      BfclTask("multiple", 1),
      synthesis.EndpointConfig(
          endpoint, "m", timeout_s=timeout_s, retries=2, backoff_s=0.0, request_json=request_json
      ),
      synthesis.SynthesisConfig(k=1),
  )


@pytest.mark.parametrize(
    "mode,expect_pairs",
    [("ok", True), ("thinking", True), ("parts", True), ("slow", False), ("empty", False)],
)
def test_endpoint_teacher_retries_then_gives_up(endpoint, example, mode, expect_pairs):
  _Handler.mode = mode
  out = _teacher(endpoint, timeout_s=0.3 if mode == "slow" else 5.0).synthesize([example])
  if expect_pairs:
    assert [(p.request, p.call, p.kept) for p in out[0]] == [
        ("How big is a circle of radius 1?", "[circle_properties.get(radius=1)]", True)
    ]
    assert _Handler.hits == 1
  else:
    assert out == [None] and _Handler.hits == 3  # first try + 2 retries


def test_an_endpoint_no_server_answers_stops_the_run_until_one_has(endpoint, example):
  """Nothing listens at teacher.base_url: every input would fall back to base, silently."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
  with pytest.raises(synthesis.TeacherRequestError, match=r"cannot be reached .*check teacher.base_url"):
    _teacher(closed).synthesize([example])
  teacher = _teacher(endpoint)
  _Handler.mode = "ok"
  assert teacher.synthesize([example])[0][0].kept
  teacher.endpoint = dataclasses.replace(teacher.endpoint, base_url=closed)  # it went down later
  assert teacher.synthesize([example]) == [None]  # that input fails; the run goes on


def test_a_refused_request_stops_at_once_with_the_endpoints_reason(endpoint, example):
  _Handler.mode = "refuse"
  with pytest.raises(
      synthesis.TeacherRequestError,
      match=r"(?s)HTTP 404 \(not found\): .*model 'm' does not exist.*teacher.model",
  ):
    _teacher(endpoint).synthesize([example])
  assert _Handler.hits == 1  # a retry cannot fix it


def test_a_request_refused_after_others_succeeded_fails_only_its_input(endpoint, example):
  teacher = _teacher(endpoint)
  _Handler.mode = "too_long"
  with pytest.raises(synthesis.TeacherRequestError, match="HTTP 400.*prompt too long"):
    teacher.synthesize([example])  # refused, and so is a minimal request: the fields are wrong
  assert _Handler.hits == 2
  _Handler.mode = "ok"
  assert teacher.synthesize([example])[0][0].kept
  _Handler.mode, _Handler.hits = "too_long", 0
  assert teacher.synthesize([example]) == [None] and _Handler.hits == 1  # not retried


def test_an_input_refused_first_fails_alone_where_a_minimal_request_is_answered(endpoint, example):
  """The first request of a run (a resumed one's too) refused for its input, not its fields."""
  _Handler.mode = "input_too_long"
  teacher = _teacher(endpoint)
  assert teacher.synthesize([example]) == [None] and _Handler.hits == 2  # the request, the probe
  _Handler.hits = 0
  assert teacher.synthesize([example]) == [None] and _Handler.hits == 1  # no probe once answered


def test_a_probe_that_fails_for_the_endpoints_load_fails_only_its_input(endpoint, example):
  """A 503 to the probe says nothing of the request's fields: the run goes on."""
  _Handler.mode = "too_long_then_busy"
  assert _teacher(endpoint).synthesize([example]) == [None]
  assert _Handler.hits == 4  # the request, then the probe and its 2 retries


def test_a_reply_cut_off_while_thinking_has_no_pair(endpoint, example):
  _Handler.mode = "cut_while_thinking"
  (pairs,) = _teacher(endpoint).synthesize([example])
  assert [(p.call, p.kept, p.rejected) for p in pairs] == [("", False, "no parseable pair")]


def test_request_json_changes_the_request_fields(endpoint, example):
  _Handler.mode = "ok"
  _teacher(endpoint, '{"max_tokens": null, "max_completion_tokens": 9, "top_p": null}').synthesize([example])
  sent = _Handler.last_request
  assert sent["model"] == "m" and sent["max_completion_tokens"] == 9 and sent["temperature"] == 0.7
  assert "max_tokens" not in sent and "top_p" not in sent
  with pytest.raises(ValueError, match="teacher.request_json must be a JSON object"):
    _teacher(endpoint, "[1]")


def test_each_input_sends_its_own_seed_the_same_on_every_call(endpoint, example, monkeypatch):
  """TT-D's pairs reproducible where the endpoint samples by seed (OpenAI, vLLM): the seed comes
  from the input's key, so a resumed run asks for the same draws."""
  _Handler.mode = "ok"
  sent = []
  complete = synthesis.EndpointSynthesizer._complete
  monkeypatch.setattr(
      synthesis.EndpointSynthesizer,
      "_complete",
      lambda self, msgs, seed=None, probe=True: sent.append(seed) or complete(self, msgs, seed, probe),
  )
  keys = jax.random.split(jax.random.key(3), 2)
  _teacher(endpoint).synthesize([example] * 2, keys)
  _teacher(endpoint).synthesize([example] * 2, keys)
  assert sent[:2] == sent[2:] and sent[0] != sent[1] and all(isinstance(s, int) for s in sent)
  assert _Handler.last_request["seed"] == sent[1]
  _teacher(endpoint, '{"seed": null}').synthesize([example], keys[:1])
  assert "seed" not in _Handler.last_request
  _teacher(endpoint).synthesize([example])
  assert "seed" not in _Handler.last_request  # no key, no seed


def test_a_call_a_limit_closed_names_the_limit_in_its_rejection(tiny_chat_model, monkeypatch):
  task = BfclTask("multiple", 1)
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  decoder = constrained.CallDecoder(sampler, tokenizer, max_value_tokens=3)
  cfg = synthesis.SynthesisConfig(k=2, well_formed=True, temperature=1.0, max_request_tokens=8)
  synth = synthesis.ModelSynthesizer(task, decoder, cfg)
  cut = (
      "no complete value of 'side2' (within decoding.max_value_tokens, 3, "
      "the model wrote no literal it takes)"
  )
  monkeypatch.setattr(
      synth,
      "_requests",
      lambda pre, rng: (["Please find the area of a triangle."] * 2, ["", ""]),
  )
  monkeypatch.setattr(
      decoder,
      "decode_noting",
      lambda *a, **k: (["[triangle_properties.get(side1=5)]"] * 2, [cut, ""]),
  )
  (pairs,) = synth.synthesize(task.examples(), jax.random.key(0)[None])
  assert [p.rejected for p in pairs] == [
      f"triangle_properties.get: missing required argument 'side2' (the call was closed by {cut})",
      "triangle_properties.get: missing required argument 'side2'",  # the model closed it
  ]
  assert [p.closed for p in pairs] == [cut, None]  # kept in the record, rejected or not


def test_the_pairs_function_is_scored_on_the_tokens_the_model_writes():
  """After "Call:", " [name" then a "(" token: the joined text's own tokens, where scoring
  "[name" after a lone " " (the lead's trailing space) asks for a split the model never saw."""
  tokenizer = tokenizer_lib.load(None)
  enc = tokenizer.encode
  lead = "Request: Please find the area of a triangle.\nCall: "
  for ex in BfclTask("multiple", 5).examples():
    for candidate in BfclTask("multiple", 5).candidates(ex):
      scored = enc(lead.rstrip(" ")) + scoring.action_tokens(enc, " " + candidate)[:-1]
      assert scored == enc(lead + candidate[:-1])
      assert scoring.action_tokens(enc, " " + candidate)[-1] == scoring.TAIL
      assert enc(lead) + enc(candidate[:-1]) != enc(lead + candidate[:-1])  # the split before


def test_g_scores_the_candidates_after_call_colon_with_their_space(tiny_chat_model, monkeypatch):
  task = BfclTask("multiple", 1)
  config, params = checkpoints.load(tiny_chat_model)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id)
  decoder = constrained.CallDecoder(sampler, tokenizer)
  synth = synthesis.ModelSynthesizer(task, decoder, synthesis.SynthesisConfig(k=1, well_formed=True))
  monkeypatch.setattr(synth, "_requests", lambda pre, rng: (["Please find it."], [""]))
  extended, scored = [], []
  extend = sampler.extend
  monkeypatch.setattr(sampler, "extend", lambda pre, ids: extended.append(ids) or extend(pre, ids))

  def score_after(s, here, candidates, tail_mask_V=None):
    scored.append((candidates, tail_mask_V))
    return np.zeros((1, len(candidates[0])), np.float32), np.ones((1, len(candidates[0])), np.int32)

  monkeypatch.setattr(synthesis.scoring, "score_after", score_after)
  monkeypatch.setattr(decoder, "decode_noting", lambda *a, **k: (["[f()]"], [""]))
  (ex,) = task.examples()
  synth.synthesize([ex], jax.random.key(0)[None])
  enc = tokenizer.encode
  assert extended == [[enc("Request: Please find it.\nCall:")]]
  (candidates,), mask = scored[0]
  assert candidates == [enc(" " + c[:-1]) + [scoring.TAIL] for c in task.candidates(ex)]
  assert mask is decoder.open_mask_V


class _WordStartAlone:
  """A tokenizer that, as a SentencePiece "legacy" one (Llama 2, Mistral v0.1), starts every text
  it encodes alone with a word-start token (here the id of " "), which mid-text it does not."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.word_start = tokenizer.encode(" ")

  def encode(self, text):
    return self.word_start + self.tokenizer.encode(text)

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)


def test_function_names_are_scored_as_they_follow_call(tiny_chat_model, monkeypatch):
  """G picks the function by the likelihood of " [name" after "Call:", tokenized as it follows
  there: not with the word start that encoding it alone adds."""
  task = BfclTask("multiple", 1)
  config, params = checkpoints.load(tiny_chat_model)
  plain = tokenizer_lib.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, plain.stop_ids, plain.pad_id)
  cfg = synthesis.SynthesisConfig(k=1, well_formed=True, temperature=1.0, max_request_tokens=8)
  synth = synthesis.ModelSynthesizer(task, constrained.CallDecoder(sampler, _WordStartAlone(plain)), cfg)
  scored = []

  def score_after(sampler, pre, candidates, tail_mask_V):
    scored.append(candidates)
    raise InterruptedError  # what follows the scoring is not under test

  monkeypatch.setattr(scoring, "score_after", score_after)
  with pytest.raises(InterruptedError):
    synth.synthesize(task.examples(), jax.random.key(0))
  names = [f["name"] for f in task.examples()[0].functions]
  assert scored == [[[[*plain.encode(f" [{name}"), scoring.TAIL] for name in names]]]  # one call, one row
