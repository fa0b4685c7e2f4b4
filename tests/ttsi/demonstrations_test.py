"""Ordinary ICL's demonstrations: the training split's examples nearest an input."""

import json

import pytest

from ttsi_jax.tasks import bfcl
from ttsi_jax.tasks.base import Example
from ttsi_jax.ttsi import demonstrations


def _example(id, question, *names):
  return Example(id, question, tuple({"name": n, "description": ""} for n in names))


POOL = [
    _example("weather", "What is the weather in Paris tomorrow?", "get_weather"),
    _example("flight", "Book a flight from Paris to Rome.", "book_flight"),
    _example("stock", "What is the stock price of ACME?", "get_stock_price"),
    _example("forecast", "Weather forecast for Rome", "get_forecast"),
]


def test_the_nearest_examples_share_the_rarest_words_with_the_input():
  retriever = demonstrations.Retriever(POOL)
  query = _example("q", "Will it rain in Rome? Check the weather.", "get_weather")
  ranked = [POOL[i].id for i in retriever.ranked(query)]
  # "weather" and get_weather's parts match the first most; "rome" and "weather" the fourth.
  assert ranked[:2] == ["weather", "forecast"] and sorted(ranked) == sorted(ex.id for ex in POOL)
  assert [POOL[i].id for i in retriever.ranked(_example("q", "ACME share price", "lookup"))][0] == "stock"
  # No word in common: every example scores 0, and the pool's order decides.
  assert retriever.ranked(_example("q", "zzz", "qqq")) == [0, 1, 2, 3]
  # Words the pool does not know change nothing.
  assert retriever.ranked(_example("q", "zzz " + query.question, "get_weather")) == retriever.ranked(query)


def test_an_empty_training_split_is_refused():
  with pytest.raises(ValueError, match="no examples to show"):
    demonstrations.Retriever([])


def test_a_demonstration_names_its_own_functions_then_answers():
  task = bfcl.BfclTask("live_simple", 1)
  (example,) = task.examples()
  user, assistant = task.demonstration(example, task.gold_answer(example))
  assert (user["role"], assistant) == ("user", {"role": "assistant", "content": task.gold_answer(example)})
  # The functions as the system prompt lists them (Python hint included), then the request.
  listed = json.dumps(bfcl.with_python_hint(example.functions), indent=4)
  assert user["content"].endswith(f"{listed}\n\n{example.question}")
  assert f"{listed}\n" in bfcl.system_prompt(bfcl.with_python_hint(example.functions))
