"""TFDS datasets: each builder builds, loads, prompts and scores through the shared task."""

import json
import os

import pytest

from configs import default
from ttsi_jax import experiment
from ttsi_jax.tasks import bfcl, datasets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def user_tools(tmp_path_factory):
  return datasets.DatasetTask(
      "user_tools",
      data_dir=str(tmp_path_factory.mktemp("tfds")),
      manual_dir=os.path.join(FIXTURES, "user_tools"),
  )


def test_user_tools_rows_load_with_their_messages_functions_and_calls(user_tools):
  weather, trip, haiku = user_tools.examples()
  assert [weather.id, trip.id, haiku.id] == ["weather_paris", "line_2", "no_tool_fits"]
  assert weather.question == "How warm is it in Paris right now?"
  # OpenAI tools become functions with the checker's type names (number -> float).
  assert [f["name"] for f in trip.functions] == ["get_weather", "convert_currency"]
  assert trip.functions[1]["parameters"]["properties"]["amount"]["type"] == "float"
  assert weather.gold == [{"get_weather": {"city": ["Paris"], "unit": ["celsius", ""]}}]
  prompt = user_tools.prompt(trip)  # the row's own system message follows the task's
  assert prompt[0]["role"] == "system" and prompt[0]["content"].endswith("You help travellers.")
  assert '"convert_currency"' in prompt[0]["content"] and prompt[-1]["content"] == trip.question
  assert user_tools.candidates(weather) == ["[get_weather(", "[convert_currency("]


@pytest.mark.parametrize(
    "row, answer, correct",
    [
        (0, "[get_weather(city='Paris')]", True),  # the optional unit may be left out
        (0, "[get_weather(city='paris', unit='celsius')]", True),  # strings as BFCL compares them
        (0, "[get_weather(city='Paris', unit='fahrenheit')]", False),
        (0, "[convert_currency(amount=1, source='EUR', target='USD')]", False),
        (1, "[get_weather(city='Kyoto'), convert_currency(amount=20, source='euro', target='JPY')]", True),
        (1, "[convert_currency(amount=20.0, source='EUR', target='yen')]", False),  # one call missing
        (2, "Autumn leaves drift down", True),  # no call is the right answer
        (2, "[get_weather(city='Kyoto')]", False),
    ],
)
def test_user_tools_answers_are_scored_by_the_shared_checker(user_tools, row, answer, correct):
  assert user_tools.check(user_tools.examples()[row], answer).correct == correct


def test_user_tools_gold_answers_are_right_and_well_formed(user_tools):
  for ex in user_tools.examples():
    gold = user_tools.gold_answer(ex)
    assert user_tools.check(ex, gold).correct, gold
    assert ex.gold == [] or user_tools.validate(ex, gold) is None


def _weather_call(**arguments):
  return [{"name": "get_weather", "arguments": arguments}]


def _city_schema(schema):
  return lambda row: row["tools"][0]["function"]["parameters"]["properties"].update(city=schema)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda row: row.update(calls=[{"name": "book_flight", "arguments": {}}]),
            r"'book_flight' is not among",
        ),
        # A misspelt argument, or a required one left out: no answer could be scored right.
        (
            lambda row: row.update(calls=_weather_call(City="Paris")),
            r"passes \['City'\], which are not among",
        ),
        (
            lambda row: row.update(calls=_weather_call(unit="celsius")),
            r"leave out its required parameter 'city'",
        ),
        (
            lambda row: row.update(calls=_weather_call(city={"one_of": ["Paris", None]})),
            r"required parameter 'city'",
        ),
        # Types the checker cannot read would fail every answer, or stop the run mid-wave.
        (
            _city_schema({"type": ["string", "null"]}),
            r"parameter 'city' of 'get_weather' has type \['string', 'null'\]",
        ),
        (_city_schema({"type": "array"}), r"'city' of 'get_weather' is an array without an 'items' type"),
        (lambda row: row.pop("query"), r"'query' is not a non-empty string or list of chat messages"),
        # A conversation that goes on past the request would show the model its answer.
        (
            lambda row: row.update(
                query=[
                    {"role": "user", "content": "Paris?"},
                    {"role": "assistant", "content": "[get_weather()]"},
                ]
            ),
            r"'query' does not end with the user's request",
        ),
        # A gold value of another type than its parameter's: the right answer would be judged wrong.
        (
            lambda row: row.update(calls=_weather_call(city=5)),
            r"gold value 5 is a int, but the parameter is a string",
        ),
        (
            lambda row: row.update(calls=_weather_call(city="")),
            r"may leave out its required parameter 'city' \(.*null or \"\"",
        ),
        (
            lambda row: _city_schema({"type": "object"})(row)
            or row.update(calls=_weather_call(city={"a": {"b": {"one_of": [1, 2]}}})),
            r"'one_of'.* inside 'city' deeper than an object parameter's keys",
        ),
    ],
)
def test_a_bad_user_tools_row_is_named_by_file_and_line(tmp_path, mutate, message):
  manual = tmp_path / "manual"
  manual.mkdir()
  good = open(os.path.join(FIXTURES, "user_tools", "test.jsonl")).readline()
  bad = json.loads(good)
  mutate(bad)
  (manual / "test.jsonl").write_text(good + json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match=r"test.jsonl, line 2: .*" + message):
    datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))


def test_a_dataset_is_built_again_when_its_files_change(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rows = open(os.path.join(FIXTURES, "user_tools", "test.jsonl")).readlines()
  (manual / "test.jsonl").write_text(rows[0])
  load = lambda: datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  assert [ex.id for ex in load().examples()] == ["weather_paris"]
  (manual / "test.jsonl").write_text(rows[0] + rows[1])  # the same name, config and version
  assert [ex.id for ex in load().examples()] == ["weather_paris", "line_2"]
  assert [ex.id for ex in load().examples()] == ["weather_paris", "line_2"]  # reused as it is
  # Changed in place at the same size, its modification time put back (as cp -p or tar x do).
  before = load()
  path = manual / "test.jsonl"
  stat = os.stat(path)
  path.write_text((rows[0] + rows[1]).replace('"Paris"', '"Parma"'))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.stat(path).st_size == stat.st_size
  after = load()
  assert after.examples()[0].gold[0]["get_weather"]["city"] == ["Parma"]
  assert after.data_version != before.data_version  # a workdir on the old files is told apart
  assert after.data_version.startswith("user_tools 1.0.1, files ")


@pytest.mark.parametrize("leader", [True, False])
def test_host_0_prepares_a_dataset_before_the_other_hosts_open_it(tmp_path, monkeypatch, leader):
  """Hosts sharing task.data_dir would build (and remove) it at once: host 0 builds it, then every
  host starts (after a collective), finding it prepared (or building its own data_dir's)."""
  events = []
  prepared = datasets._prepared
  monkeypatch.setattr(datasets, "_prepared", lambda *a: events.append("prepare") or prepared(*a))
  monkeypatch.setattr(experiment.multihost, "is_leader", lambda: leader)
  gather = experiment.multihost.allgather_json
  monkeypatch.setattr(
      experiment.multihost, "allgather_json", lambda v: events.append("collective") or gather(v)
  )

  class Started(Exception):
    pass

  def start(config, workdir):
    events.append("start")
    raise Started

  monkeypatch.setattr(experiment, "Experiment", start)
  config = default.get_config()
  config.task.name, config.task.dataset = "tfds", "user_tools"
  config.task.data_dir, config.task.manual_dir = str(tmp_path), os.path.join(FIXTURES, "user_tools")
  with pytest.raises(Started):
    experiment.run(config, str(tmp_path / "run"))
  expected = ["prepare", "collective", "start"] if leader else ["collective", "start"]
  assert events[: len(expected)] == expected


def test_a_prepared_dataset_is_reused_without_its_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "test.jsonl").write_text(open(os.path.join(FIXTURES, "user_tools", "test.jsonl")).readline())
  built = datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  (manual / "test.jsonl").unlink()  # gone: building again would fail
  reused = datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"))
  assert [ex.id for ex in reused.examples()] == ["weather_paris"]
  assert reused.examples() == built.examples()


_BOOKING = {
    "id": "booking",
    "query": "Book a room in Paris for Ann and Bo.",
    "tools": [
        {
            "name": "book_room",
            "parameters": {
                "type": "object",
                "properties": {
                    "where": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "guests": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["where", "guests"],
            },
        }
    ],
    "calls": [
        {
            "name": "book_room",
            "arguments": {
                "where": {"city": "Paris", "unit": {"one_of": [None, "room"]}},
                "guests": [{"name": "Ann"}, {"name": {"one_of": ["Bo", "Bob"]}}],
            },
        }
    ],
}


@pytest.mark.parametrize(
    "answer, correct",
    [
        ("[book_room(where={'city': 'Paris'}, guests=[{'name': 'Ann'}, {'name': 'Bo'}])]", True),
        (
            "[book_room(where={'city': 'paris', 'unit': 'room'}, guests=[{'name': 'Ann'}, {'name': 'Bob'}])]",
            True,
        ),
        ("[book_room(where={'city': 'Rome'}, guests=[{'name': 'Ann'}, {'name': 'Bo'}])]", False),
        ("[book_room(where={'city': 'Paris'}, guests=[{'name': 'Bo'}, {'name': 'Ann'}])]", False),  # order
        ("[book_room(where={'city': 'Paris'}, guests=[{'name': 'Ann'}])]", False),
    ],
)
def test_user_tools_object_arguments_are_judged_key_by_key(tmp_path, answer, correct):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "test.jsonl").write_text(json.dumps(_BOOKING) + "\n")
  task = datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  (booking,) = task.examples()
  assert task.check(booking, answer).correct == correct
  assert task.check(booking, task.gold_answer(booking)).correct  # what the oracle trains on


def test_missing_user_tools_files_say_what_is_expected(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.jsonl").write_text("")
  with pytest.raises(FileNotFoundError, match=r"(?s)test.jsonl does not exist.*\"tools\".*\"calls\""):
    datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  (manual / "train.jsonl").unlink()
  with pytest.raises(
      FileNotFoundError, match=r"(?s)manual_dir .* is empty: user_tools is built from .*\"calls\""
  ):
    datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  with pytest.raises(
      FileNotFoundError, match=r"(?s)not built in .* yet.*--config.task.manual_dir.*\"calls\""
  ):
    datasets.DatasetTask("user_tools", data_dir=str(tmp_path / "data"))  # TFDS named its own folder


def test_a_damaged_source_stamp_builds_the_dataset_again(tmp_path):
  task = datasets.DatasetTask("bfcl/parallel", num_examples=2, data_dir=str(tmp_path))
  (stamp,) = tmp_path.rglob(datasets.SOURCE_STAMP)
  stamp.write_text('{"bfcl-')  # cut while written
  again = datasets.DatasetTask("bfcl/parallel", num_examples=2, data_dir=str(tmp_path))
  assert again.examples() == task.examples() and json.loads(stamp.read_text())["bfcl-eval"]
  assert task.data_version == f"bfcl 4.0.1, bfcl-eval {bfcl.package_version()}"  # kept in config.json


def test_bfcl_dataset_equals_the_bfcl_task_row_for_row(tmp_path):
  from_files = bfcl.BfclTask("parallel", 25)
  from_tfds = datasets.DatasetTask("bfcl/parallel", num_examples=25, data_dir=str(tmp_path))
  assert from_tfds.examples() == from_files.examples()  # in the files' order
  for ex in from_files.examples():
    assert from_tfds.prompt(ex) == from_files.prompt(ex)
    assert from_tfds.check(ex, from_files.gold_answer(ex)).correct


def test_bfcl_dataset_keeps_the_rows_the_task_skipped(tmp_path, monkeypatch):
  class WithABadRow(bfcl.BfclTask):

    @property
    def skipped(self):
      return [("parallel_1", "duplicate possible answer")]  # its id also names a kept row

  monkeypatch.setattr(bfcl, "BfclTask", WithABadRow)
  task = datasets.DatasetTask("bfcl/parallel", num_examples=2, data_dir=str(tmp_path))
  assert task.skipped == [("parallel_1", "duplicate possible answer")] and len(task.examples()) == 2


def test_the_run_config_reaches_a_dataset(tmp_path):
  config = default.get_config()
  config.task.name = "tfds"
  config.task.dataset = "user_tools"
  config.task.data_dir = str(tmp_path)
  config.task.manual_dir = os.path.join(FIXTURES, "user_tools")
  config.task.num_examples = 2
  task = experiment.make_task(config.task)
  assert task.name == "user_tools" and len(task.examples()) == 2
