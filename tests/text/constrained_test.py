"""Well-formed call decoding: literal cutting, schema-only keywords, required arguments."""

import numpy as np
import pytest

from ttsi_jax.checkpoints import hf
from ttsi_jax.tasks import bfcl
from ttsi_jax.text import constrained
from ttsi_jax.text import sampler as sampler_lib


@pytest.mark.parametrize("text,value", [
    ("5, b=2)]", "5"), ("'Paris, France')]", "'Paris, France'"), ("[3, 4], x=1)", "[3, 4]"),
    ("{'a': (1, 2)})", "{'a': (1, 2)}"), ("Paris)]", "'Paris'"), ("-2.5)", "-2.5"),
    ("", None), ("(oops", None), (",", None), ("print(1))", None),
])
def test_leading_literal(text, value):
  assert constrained.leading_literal(text) == value


class _CharTokenizer:
  """Bytes as tokens (ids 1..256), so the tiny test model can write any text."""

  def encode(self, text):
    return [b + 1 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 1 for i in ids if 0 < i <= 256).decode(errors="replace")


FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "dict", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}]


def test_decoded_calls_use_only_schema_keywords_and_keep_required_ones(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["qwen2"][0])  # vocab 256 + 1 covers every byte
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  tok = _CharTokenizer()
  decoder = constrained.CallDecoder(sampler, tok, max_value_tokens=8, max_args=4)
  pre = sampler.prefill([tok.encode("Weather in Paris for 3 days?"), tok.encode("Hi")], reserve=256)
  calls = decoder.decode(pre, [FUNCTIONS, FUNCTIONS], ["get_weather", "get_weather"])
  for call in calls:
    assert call.startswith("[get_weather(") and call.endswith(")]")
    parsed = bfcl.parse_calls(call)  # always syntactically a call list
    assert len(parsed) == 1 and set(parsed[0].args) <= {"city", "unit", "days"}
    assert not parsed[0].positional
  with pytest.raises(ValueError, match="'send_email' is not among the offered functions"):
    decoder.decode(pre, [FUNCTIONS, FUNCTIONS], ["send_email", "get_weather"])


def test_options_close_only_after_required_arguments():
  row = constrained._Row(text="[get_weather(", function=FUNCTIONS[0], used=[])
  assert constrained.CallDecoder._options(row) == ["city=", "unit=", "days="]
  row.used = ["city"]
  assert constrained.CallDecoder._options(row) == [", unit=", ", days="]
  row.used = ["city", "days"]
  assert constrained.CallDecoder._options(row) == [", unit=", constrained.CLOSE]
