"""Well-formed call decoding: literal cutting, schema-only keywords, required arguments."""

import types

import numpy as np
import pytest

from configs import default
from ttsi_jax.checkpoints import hf
from ttsi_jax.tasks import bfcl
from ttsi_jax.text import constrained, scoring
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib


@pytest.mark.parametrize(
    "text,value",
    [
        ("5, b=2)]", "5"),
        ("'Paris, France')]", "'Paris, France'"),
        ("[3, 4], x=1)", "[3, 4]"),
        ("{'a': (1, 2)})", "{'a': (1, 2)}"),
        ("Paris)]", "'Paris'"),
        ("-2.5)", "-2.5"),
        ("", None),
        ("(oops", None),
        (",", None),
        ("print(1))", None),
        ("{'a', 'b'})", None),
        ("[{1}], x=2)", None),
        ("{'k': {1}})", None),
        ("5 # km, b=2)", "5"),  # a comment would swallow the ")]" written after the value
        ("'a#b' # note)", "'a#b'"),
        ("New York, b=2)", "'New York'"),
        ("{a, b})", None),  # a set of names
        ("+'abc')", None),  # a unary "+" is left out before a number only
        ("+[1])", None),
    ],
)
def test_leading_literal(text, value):
  assert constrained.leading_literal(text) == value
  if value is not None:  # what the decoder writes, BFCL decodes
    bfcl.parse_calls(f"[f(x={value})]")


@pytest.mark.parametrize(
    "text,written,decoded",
    [
        # JSON's constants are their Python values, at any depth (a list holding one closed the call)
        ("true)", "True", True),
        ("[true, false, null], b=1)", "[True, False, None]", [True, False, None]),
        ("{'on': true})", "{'on': True}", {"on": True}),
        # a bare name is a string, as BFCL reads one (a list holding one closed the call)
        ("[Paris, London])", "['Paris', 'London']", ["Paris", "London"]),
        ("{unit: 'km'})", "{'unit': 'km'}", {"unit": "km"}),
        ("Paris)]", "'Paris'", "Paris"),
        # a unary "+" is left out: BFCL's decoder negates any unary operand (+5 read as -5)
        ("+5)", "5", 5),
        ("[+1, -2])", "[1, -2]", [1, -2]),
        ("-+2.5)", "-2.5", -2.5),
        ("+true)", "True", True),
        # a name as written (Python reads identifiers NFKC-normalized: "ﬁle" as "file")
        ("ﬁle)", "'ﬁle'", "ﬁle"),
        # a comment is dropped, the value written back as Python
        ("1e999 # big)", "1e309", float("inf")),
        ("... # todo)", "...", "..."),
        # as the model wrote it where nothing is read otherwise
        ("'it\\'s', b=2)", "'it\\'s'", "it's"),
        ("[1,  2.50])", "[1,  2.50]", [1, 2.5]),
    ],
)
def test_leading_literal_writes_what_the_model_meant_in_terms_bfcl_decodes(text, written, decoded):
  assert constrained.leading_literal(text) == written
  assert bfcl.parse_calls(f"[f(x={written})]")[0].args == {"x": decoded}


@pytest.mark.parametrize(
    "text,value",
    [
        ("3x^2 + 2x - 1)", "'3x^2 + 2x - 1'"),  # no literal: the call closed without it
        ("x^2, interval=[1, 3])", "'x^2'"),
        ("sin(x) + 1)", "'sin(x) + 1'"),  # its brackets closed: the first ")" does not cut it
        ("lambda x: x**2)", "'lambda x: x**2'"),
        ("x**2)", "'x**2'"),
        ("5)", "5"),  # a literal stays one
        ("'abc)", None),  # an unclosed quote: no text
        ("(a]b)", None),  # brackets that do not close in order
        ("x**2 # square, cube)", "'x**2'"),  # a comment is no part of the text
        ("# the cubic, x**3\n'x**3')", "'x**3'"),  # nor is a comment alone a value
        ("# a, b\n5)", "5"),
    ],
)
def test_a_string_parameter_takes_unquoted_text_that_closes_its_brackets(text, value):
  assert constrained.leading_literal(text, as_text=True) == value
  function = {"name": "f", "parameters": {"properties": {"s": {"type": "string"}, "n": {"type": "integer"}}}}
  decoder = types.SimpleNamespace(_after_equals=lambda out, forced: out)
  row = lambda keyword: constrained._Row(text="[f(", function=function, used=[], pending=keyword)
  assert constrained.CallDecoder._value(decoder, text, "", row(", s")) == value
  assert constrained.CallDecoder._value(decoder, text, "", row("s")) == value  # the first keyword
  # Another type takes literals and words only: the unquoted text above is no value there.
  assert constrained.CallDecoder._value(decoder, text, "", row(", n")) == constrained.leading_literal(text)
  assert constrained.leading_literal("3x^2 + 2x - 1)") is None


@pytest.mark.parametrize(
    "text,end",
    [
        ("5, b=2)]", 1),
        ("'Paris, France')]", 15),
        ("[3, 4], x=1)", 6),
        ("{'a': (1, 2)})", 13),
        ("Paris)]", 5),
        ('"it\'s, ok" , 2)', 11),
        ("'a\\', b', c)", 8),  # an escaped quote does not close the string
        ("'''x, y''', 1)", 10),
        ("print(1))", 8),
        ("(oops", None),
        ("[" * 9 + "1" + "]" * 7 + ", 2]])", 17),  # nested deeper than LITERAL_DEPTH: ends early
    ],
)
def test_literal_end_states_end_a_value_where_leading_literal_can_first_cut_it(text, end):
  """Fed one character per token, the rule ends at the first ',' or ')' outside quotes and
  brackets; before it `leading_literal` finds nothing, and there it finds what it finds in the
  whole text (or nothing: the decoder then decodes in full). Multi-character tokens too."""
  pieces = sorted(set(text)) + ["='", "',", "')]", "), ", "x"]
  table_VS = constrained.literal_end_states(pieces)
  assert table_VS.shape == (len(pieces), 6 * constrained.LITERAL_DEPTH + 1)

  def run(tokens):  # the index of the token that ended it, or None
    state = 0
    for i, token in enumerate(tokens):
      state = table_VS[pieces.index(token), state]
      if state == table_VS.shape[1] - 1:
        return i
    return None

  assert run(list(text)) == end
  if end is not None:
    assert all(constrained.leading_literal(text[:i]) is None for i in range(end + 1))
    assert constrained.leading_literal(text[: end + 1]) in (constrained.leading_literal(text), None)
  assert run(["='", "x", "',"]) == 2 and run(["='", "')]"]) == 1 and run(["='", "x", "), "]) is None


class _CharTokenizer:
  """Bytes as tokens (ids 1..256), so the tiny test model can write any text."""

  def encode(self, text):
    return [b + 1 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 1 for i in ids if 0 < i <= 256).decode(errors="replace")


FUNCTIONS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "dict",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string"},
                "days": {"type": "integer"},
            },
            "required": ["city", "days"],
        },
    }
]


def test_decoded_calls_parse_and_use_only_schema_keywords(hf_checkpoints):
  # Required arguments come before the call may close (test_options_close_only_after_required_
  # arguments); one whose value the model does not finish in max_value_tokens ends the call
  # without it, as a random model's values here do.
  config, params = hf.load(hf_checkpoints["qwen2"][0])  # vocab 256 + 1 covers every byte
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  tok = _CharTokenizer()
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=8, max_args=4)
  pre = sampler.prefill([tok.encode("Weather in Paris for 3 days?"), tok.encode("Hi")], reserve=256)
  calls, cuts = decoder.decode_noting(pre, [FUNCTIONS, FUNCTIONS], ["get_weather", "get_weather"])
  for call, cut in zip(calls, cuts):
    assert call.startswith("[get_weather(") and call.endswith(")]")
    parsed = bfcl.parse_calls(call)  # always syntactically a call list
    assert len(parsed) == 1 and set(parsed[0].args) <= {"city", "unit", "days"}
    assert not parsed[0].positional
    # A call without its required arguments was closed by a limit, which says so.
    if not {"city", "days"} <= set(parsed[0].args):
      assert "decoding.max_value_tokens, 8," in cut or "decoding.max_args (4)" in cut, (call, cut)
  assert any(cuts)  # a random model's values: some do not end within 8 tokens
  with pytest.raises(ValueError, match="'send_email' is not among the offered functions"):
    decoder.decode(pre, [FUNCTIONS, FUNCTIONS], ["send_email", "get_weather"])


def test_values_end_early_and_equal_values_decoded_to_max_value_tokens(hf_checkpoints, monkeypatch):
  """Value decoding ends at `literal_end_states`' end (and decodes again in full where no literal
  is complete there): the calls equal those of values always decoded to max_value_tokens.
  Sampled values of a random byte-level model, most of them incomplete."""
  import jax

  config, params = hf.load(hf_checkpoints["qwen2"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  tok = _CharTokenizer()
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=12, max_args=4)
  prompts = [tok.encode(t) for t in ("Weather in Paris?", "city='Oslo', days=3)", "Hi", "x=1,")]
  pre = sampler.prefill(prompts, reserve=256)
  sampling = sampler_lib.SamplingParams(temperature=1.0)
  args = ([FUNCTIONS] * 4, ["get_weather"] * 4)
  calls = [decoder.decode(pre, *args, sampling=sampling, rng=jax.random.key(s)) for s in range(6)]
  continue_, ended = sampler.continue_, []
  monkeypatch.setattr(sampler, "continue_", lambda *a: ended.append(len(a) > 5) or continue_(*a[:5]))
  assert calls == [decoder.decode(pre, *args, sampling=sampling, rng=jax.random.key(s)) for s in range(6)]
  assert any(ended) and not all(ended)  # the rule's calls, and decodes again in full


def test_inactive_rows_are_not_decoded_and_leave_the_others_as_they_were(hf_checkpoints):
  import jax

  config, params = hf.load(hf_checkpoints["qwen2"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  tok = _CharTokenizer()
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=8, max_args=3)
  pre = sampler.prefill([tok.encode(t) for t in ("Weather in Paris?", "Hi", "x=1,")], reserve=256)
  args = ([FUNCTIONS] * 3, ["get_weather", "not_offered", "get_weather"])
  sampling = sampler_lib.SamplingParams(temperature=1.0)
  masked = decoder.decode(pre, *args, sampling=sampling, rng=jax.random.key(3), active=[True, False, True])
  assert masked[1] == ""  # its function is not even looked up
  whole = decoder.decode(pre, [FUNCTIONS] * 3, ["get_weather"] * 3, sampling=sampling, rng=jax.random.key(3))
  assert [masked[0], masked[2]] == [whole[0], whole[2]]


def test_calls_close_when_the_cache_has_no_room_for_another_argument(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["qwen2"][0])
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  tok = _CharTokenizer()
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=8, max_args=4)
  pre = sampler.prefill([tok.encode("Weather?")] * 2, reserve=64)
  # Row 0's lead leaves too few free slots for even one argument; row 1 has room for some.
  calls, cuts = decoder.decode_noting(pre, [FUNCTIONS, FUNCTIONS], ["get_weather"] * 2, leads=["x" * 40, ""])
  assert calls[0] == "[get_weather()]" and cuts[0] == "the context (no cache room for another argument)"
  roomy = sampler.prefill([tok.encode("Weather?")], reserve=256)
  assert calls[1] == decoder.decode(roomy, [FUNCTIONS], ["get_weather"])[0]


def test_options_close_only_after_required_arguments():
  row = constrained._Row(text="[get_weather(", function=FUNCTIONS[0], used=[])
  assert constrained.CallDecoder._options(row) == ["city", "unit", "days"]
  row.used = ["city"]
  assert constrained.CallDecoder._options(row) == [", unit", ", days"]
  row.used = ["city", "days"]
  assert constrained.CallDecoder._options(row) == [", unit", constrained.CLOSE]


def test_stages_score_and_continue_from_the_joint_tokenization(tiny_chat_model, monkeypatch):
  """With a real BPE tokenizer ("='", "',", "')]" are single tokens), every stage's call so far +
  scored option, and call + forced keyword, are the canonical tokens of that text: no stage
  makes the model continue from a split it never saw. The model's choices are scripted here."""
  from ttsi_jax import checkpoints

  tok = tokenizer_lib.load(None)
  config, params = checkpoints.load(tiny_chat_model)
  sampler = sampler_lib.Sampler(config, params, tok.stop_ids, tok.pad_id)
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=8, max_args=4)
  prompt = tok.encode_chat([{"role": "user", "content": "Weather in Paris for 3 days?"}])
  pre = sampler.prefill([prompt], reserve=256)
  picks = iter(["city", ", days", constrained.CLOSE])
  writes = iter(["='Paris', days", "=3)]"])
  cached, checked = [], []

  def score_after(s, p, candidates, tail_mask_V=None, shared=None):
    assert p is pre  # every stage continues the prompt's prefix: the call so far is fed again
    cached.append(shared[0])
    pick = next(picks)
    loglik = np.full((1, len(candidates[0])), -5.0)
    for k, cand in enumerate(candidates[0]):
      fed = [t for t in cand if t != scoring.TAIL]
      text = tok.hf.decode(prompt + cached[-1] + fed)
      assert tok.encode(text) == prompt + cached[-1] + fed  # canonical tokens of that text
      assert (cand[-1] == scoring.TAIL) == (not text.endswith(constrained.CLOSE))
      if text.endswith(pick):
        loglik[0, k] = -1.0
    checked.append(pick)
    return loglik, np.ones_like(loglik, int)

  def continue_(p, extensions, sampling, rng, active, end_states_VS=None):
    assert p is pre and extensions[0][: len(cached[-1])] == cached[-1]
    text = tok.hf.decode(prompt + extensions[0])
    assert tok.encode(text) == prompt + extensions[0]
    assert not text.endswith("=")  # the model writes "=" itself
    return [tok.encode(next(writes))]

  monkeypatch.setattr(sampler, "continue_", continue_)
  monkeypatch.setattr(scoring, "score_after", score_after)
  assert decoder.decode(pre, [FUNCTIONS], ["get_weather"]) == ["[get_weather(city='Paris', days=3)]"]
  assert checked == ["city", ", days", constrained.CLOSE]
  # The value "'Paris'" ends in a quote that merges with what follows ("',"): the stage after it
  # feeds the call without that quote and scores it together with each option.
  assert not tok.hf.decode(cached[1]).endswith("'")


def test_the_default_value_budget_holds_every_value_of_bfcls_gold_calls():
  """A value cut at decoding.max_value_tokens closes its call there (this argument and the rest
  lost): the default must not cut what BFCL's answers write."""
  tokenizer = tokenizer_lib.load(None)
  limit = default.get_config().decoding.max_value_tokens
  lengths = []
  for category in ("simple_python", "multiple", "live_simple", "live_multiple"):
    task = bfcl.BfclTask(category)
    for ex in task.examples():
      calls = bfcl.parse_calls(task.gold_answer(ex))
      if len(calls) == 1:
        lengths += [len(tokenizer.encode("=" + repr(v) + ")")) for v in calls[0].args.values()]
  assert len(lengths) > 4000 and max(lengths) <= limit
