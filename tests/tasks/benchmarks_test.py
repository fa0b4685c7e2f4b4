"""The paper's benchmarks: each builder builds its fixture (written by us in the published format),
loads, prompts, keeps the rows it cannot pose as skipped, and scores by the benchmark's rule."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ttsi_jax.tasks import benchmarks, datasets
from ttsi_jax.tasks.base import Example

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _task(tmp_path, dataset, manual, split="test"):
  return datasets.DatasetTask(dataset, split, data_dir=str(tmp_path / "data"), manual_dir=manual)


def _score(task, cases):
  examples = {ex.id: ex for ex in task.examples()}
  return [task.check(examples[row_id], answer).correct for row_id, answer in cases]


def test_nexusraven_from_the_hubs_parquet_files(tmp_path):
  manual = tmp_path / "manual"
  for subset in ("standardized_queries", "standardized_api_list"):
    rows = [json.loads(l) for l in open(os.path.join(FIXTURES, "nexusraven", f"{subset}.jsonl"))]
    if subset == "standardized_queries":  # a gold call that would raise: no answer could match it
      rows.append({**rows[0], "python_args_dict": '{"town": "Lyon"}'})
      rows.append(
          {**rows[0], "python_args_dict": '{"city": "Lyon", "max_results": 2.5}'}
      )  # no answer is 2.5 once cast
    os.makedirs(manual / subset)
    pq.write_table(pa.Table.from_pylist(rows), manual / subset / "train-00000-of-00001.parquet")
  task = _task(tmp_path, "nexusraven", str(manual))
  city, distance = task.examples()
  assert task.skipped == [
      ("geo_2", "functions ['translate'] are not in the API list"),
      ("geo_3", "the gold call: Unexpected arguments ['town']."),
      ("geo_4", "the gold call has a fractional float, which no answer can match"),
  ]
  assert city.question == "Where is Lyon? Give me 3 matches." and len(city.functions) == 2
  assert '"lookup_city"' in task.prompt(city)[0]["content"]
  defaults = city.functions[0]["parameters"]["properties"]
  assert defaults["max_results"]["default"] == 5 and defaults["country"]["default"] is None
  assert distance.functions[0]["parameters"]["properties"]["options"]["default"] == {"mode": "road"}
  assert _score(
      task,
      [
          ("geo_0", "[lookup_city(city='Lyon', max_results=3)]"),
          ("geo_0", "[lookup_city(city='Lyon', max_results=3.0, country=None)]"),  # default; float -> int
          ("geo_0", "[lookup_city(city='lyon', max_results=3)]"),  # no normalisation of strings
          ("geo_0", "[lookup_city(city='Lyon')]"),  # default 5, not 3
          ("geo_0", "[lookup_city(city='Lyon', max_results=3, zoom=2)]"),  # the call would raise
          ("geo_1", "[distance_between(origin='Oslo', destination='Bergen', options={'mode': 'road'})]"),
          ("geo_1", "[distance_between(origin='Oslo', destination='Bergen'), lookup_city(city='Oslo')]"),
          # Calls that would raise in the evaluator are wrong answers, not a crash of the run.
          ("geo_0", "[lookup_city(city='Lyon', max_results=1e999)]"),
          ("geo_0", "[lookup_city(city='Lyon', max_results=1e999-1e999)]"),
          ("geo_0", "[lookup_city(city='Lyon', zoom=2, **extra)]"),
      ],
  ) == [True, True, False, False, False, True, False, False, False, False]
  for ex in task.examples():
    assert task.check(ex, task.gold_answer(ex)).correct and task.validate(ex, task.gold_answer(ex)) is None


def test_seal_tools_splits_offer_same_field_tools_and_score_by_str(tmp_path):
  manual = os.path.join(FIXTURES, "seal_tools")
  task = _task(tmp_path, "seal_tools", manual, "test_in_domain")
  tide, both = task.examples()
  assert task.skipped == [
      ("test_in_domain-difficult-2", "an argument is another call's output (nested calls are not posed here)")
  ]
  # The gold tool and distractors of its field, in an order the row's id fixes (not gold first).
  assert [f["name"] for f in tide.functions] == ["getWaveHeight", "getTideLevel", "findPort"]
  assert [f["name"] for f in both.functions] == ["getTideLevel", "bookTable"]
  assert tide.functions[1]["parameters"]["properties"]["hour"]["type"] == "integer"
  assert _score(
      task,
      [
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest', hour=14)]"),
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest', hour='14')]"),  # str(14) == '14'
          ("test_in_domain-easy-0", "[getTideLevel(port='brest', hour=14)]"),  # case counts
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest')]"),  # a parameter missing
          (
              "test_in_domain-difficult-1",
              "[getTideLevel(port='Brest'), bookTable(restaurant='Chez Anna', people=4)]",
          ),
          ("test_in_domain-difficult-1", "[bookTable(restaurant='Chez Anna', people=4)]"),
          # Values its evaluator never sees are wrong answers, not a crash of the run.
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest', hour=1e999)]"),
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest', hour=1e999-1e999)]"),
          ("test_in_domain-easy-0", "[getTideLevel(port='Brest', hour=14, **extra)]"),
      ],
  ) == [True, True, False, False, True, False, False, False, False]
  assert [ex.id for ex in _task(tmp_path, "seal_tools", manual, "dev").examples()] == ["dev-easy-0"]
  for ex in task.examples():
    assert task.check(ex, task.gold_answer(ex)).correct


def test_nexusraven_casts_the_answers_floats_not_the_references():
  # raven/utils.py casts the model's parsed arguments to int; the reference's go through as JSON.
  at = {
      "name": "at",
      "parameters": {"type": "dict", "properties": {"lat": {"type": "float"}}, "required": ["lat"]},
  }
  example = lambda lat: Example("q", "Where?", (at,), datasets.whole_values_gold([("at", {"lat": lat})]))
  check = lambda lat, answer: benchmarks.check_nexusraven(example(lat), answer).correct
  assert not check(40.7128, "[at(lat=40.99)]")  # both 40 once cast: the reference is not
  assert not check(40.7128, "[at(lat=40.7128)]")  # a float reference matches no answer there
  assert check(40.0, "[at(lat=40.5)]") and check(40, "[at(lat=40)]")


def test_seal_tools_reads_the_current_files_beside_the_old_format_folder(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(FIXTURES, "seal_tools"), manual)
  old = manual / "Seal-Tools_Dataset" / "dataset_in_old_format"
  old.mkdir()
  (old / "test_in_domain.jsonl").write_text('[["an", "old", "row"]]\n')  # rows are arrays there
  task = _task(tmp_path, "seal_tools", str(manual), "test_in_domain")
  assert [ex.id for ex in task.examples()] == ["test_in_domain-easy-0", "test_in_domain-difficult-1"]


def test_api_bank_levels_read_the_apis_the_rows_describe(tmp_path):
  manual = os.path.join(FIXTURES, "api_bank")
  level1 = _task(tmp_path, "api_bank/level-1", manual)
  (taxi,) = level1.examples()
  # The instruction's clock goes with the dialogue (relative dates need it).
  assert level1.prompt(taxi)[0]["content"].endswith("The current time is 2023-03-31 14:00:00.")
  assert level1.skipped == [
      ("BookTaxi-level-1-2_1", "expected_output is not one API-Request of an API the row describes")
  ]
  assert [f["name"] for f in taxi.functions] == ["BookTaxi"]
  assert (
      taxi.question.startswith("User: I need a taxi in Oslo") and "Generate API Request" not in taxi.question
  )
  assert _score(
      level1,
      [
          ("BookTaxi-level-1-1_0", "API-Request: [BookTaxi(city='Oslo', passengers='2')]"),
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Oslo', passengers=2)]"),  # cast to int, as its tools do
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Oslo')]"),
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Bergen', passengers=2)]"),
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Oslo', passengers=1e999)]"),  # not an int
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Oslo', passengers='1e400')]"),
          ("BookTaxi-level-1-1_0", "[BookTaxi(city='Oslo', **extra)]"),
      ],
  ) == [True, True, False, False, False, False, False]
  level2 = _task(tmp_path, "api_bank/level-2", manual)
  (alarm,) = level2.examples()  # the retrieved API's description comes from the dialogue
  assert [f["name"] for f in alarm.functions] == ["ToolSearcher", "SetAlarm"]
  assert _score(
      level2,
      [
          ("SetAlarm-level-2-1_0", "[SetAlarm(time='07:00:00', loud=True)]"),
          ("SetAlarm-level-2-1_0", "[SetAlarm(time='07:00:00', loud=False)]"),
      ],
  ) == [True, False]
  for task in (level1, level2):
    for ex in task.examples():
      assert task.check(ex, task.gold_answer(ex)).correct


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("nexusraven", r"no standardized_queries .*Nexusflow/NexusRaven_API_evaluation"),
        ("seal_tools", r"no tool.jsonl .*fairyshine/Seal-Tools"),
        ("api_bank/level-1", r"no level-1-api.json .*api-bank"),
        ("toolalpaca", r"no ToolAlpaca evaluation file .*tangqiaoyu/ToolAlpaca"),
    ],
)
def test_a_missing_file_names_the_files_and_where_to_get_them(tmp_path, dataset, message):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "notes.txt").write_text("another benchmark's files")
  with pytest.raises(FileNotFoundError, match=message):
    _task(tmp_path, dataset, str(manual))
  # An empty or missing manual dir: said before TFDS looks (its error names no file).
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=rf"task.manual_dir {empty} is empty: {dataset} is built from"):
    _task(tmp_path, dataset, str(empty))
  with pytest.raises(FileNotFoundError, match=r"task.manual_dir .*nowhere does not exist"):
    _task(tmp_path, dataset, str(tmp_path / "nowhere"))


def test_a_bad_file_is_named(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(FIXTURES, "seal_tools"), manual)
  with open(manual / "Seal-Tools_Dataset" / "tool.jsonl", "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=r"tool.jsonl, line 5: invalid JSON"):
    _task(tmp_path, "seal_tools", str(manual), "dev")


def test_a_file_of_another_shape_is_named_with_what_it_lacks(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(FIXTURES, "seal_tools"), manual)
  (manual / "Seal-Tools_Dataset" / "dev.jsonl").write_text('{"query": "Tides?", "calls": []}\n')
  with pytest.raises(ValueError, match=r"dev.jsonl, row 1 has no field \['calling'\]"):
    _task(tmp_path, "seal_tools", str(manual), "dev")
  shutil.copytree(os.path.join(FIXTURES, "api_bank"), tmp_path / "api_bank")
  (tmp_path / "api_bank" / "level-1-api.json").write_text('{"rows": []}')
  with pytest.raises(ValueError, match=r"level-1-api.json holds a JSON dict, not a list of rows"):
    _task(tmp_path / "other", "api_bank/level-1", str(tmp_path / "api_bank"))


def test_toolalpaca_functions_come_from_the_openapi_documentation(tmp_path):
  manual = os.path.join(FIXTURES, "toolalpaca")
  task = _task(tmp_path, "toolalpaca", manual, "simulated")
  one_step, two_steps = task.examples()
  assert task.skipped == [("Tides_2", "a gold step's Action_Input is not a JSON object")]
  get_tide, add_alert = one_step.functions
  assert get_tide["parameters"] == {
      "type": "dict",
      "properties": {
          "port": {"type": "string", "description": "Port name"},
          "days": {"type": "integer", "description": "Days ahead"},
      },
      "required": ["port"],
  }
  assert add_alert["parameters"]["properties"]["threshold"]["type"] == "float"  # the request body's
  assert _score(
      task,
      [
          ("Tides_0", "[getTide(port='Bergen', days=2)]"),
          ("Tides_0", "[getTide(port='Bergen')]"),
          ("Tides_1", "[getTide(port='Bergen'), addAlert(port='Bergen', threshold=1.5)]"),
          ("Tides_1", "[addAlert(port='Bergen', threshold=1.5)]"),
          ("Tides_0", "[getTide(port='Bergen', days=1e999)]"),
          ("Tides_0", "[getTide(port='Bergen', days=1e999-1e999)]"),
          ("Tides_0", "[getTide(port='Bergen', days=2, **extra)]"),
      ],
  ) == [True, False, True, False, False, False, False]
  assert [ex.id for ex in _task(tmp_path, "toolalpaca", manual, "real").examples()] == ["Quotes_0"]
  for ex in task.examples():
    assert task.check(ex, task.gold_answer(ex)).correct


def test_gold_answers_of_a_benchmark_with_its_own_rule_keep_their_values_whole(tmp_path):
  """What the oracle trains on: an empty string and an object's lists are values, not BFCL's
  "may be left out" and per-key acceptable lists."""
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(FIXTURES, "toolalpaca"), manual)
  path = manual / "data" / "eval_simulated.json"
  (tool,) = json.loads(path.read_text())
  step = {"port": "", "threshold": 1.5, "options": {"tags": ["a", "b"], "note": ""}}
  tool["Instructions"] = ["Alert me at any port, tagged a and b."]
  tool["Golden_Answers"] = [[{"Action": "addAlert", "Action_Input": json.dumps(step)}]]
  path.write_text(json.dumps([tool]))
  task = _task(tmp_path, "toolalpaca", str(manual), "simulated")
  (alert,) = task.examples()
  gold = task.gold_answer(alert)
  assert gold == "[addAlert(port='', threshold=1.5, options={'tags': ['a', 'b'], 'note': ''})]"
  assert task.check(alert, gold).correct


def test_a_toolalpaca_tool_with_a_broken_projection_is_skipped_with_that_reason(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(FIXTURES, "toolalpaca"), manual)
  path = manual / "data" / "eval_simulated.json"
  (tool,) = json.loads(path.read_text())
  name = next(n for n in tool["Function_Projection"])
  tool["Function_Projection"][name] = "/tides"
  path.write_text(json.dumps([tool]))
  task = _task(tmp_path, "toolalpaca", str(manual), "simulated")
  assert not task.examples()
  assert {reason for _, reason in task.skipped} == {
      f"the Function_Projection of {name!r} is not a [path, method] pair: '/tides'"
  }
