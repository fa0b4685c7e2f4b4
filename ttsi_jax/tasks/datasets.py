"""Function-calling benchmarks as TFDS datasets (array_record files; TensorFlow is not needed).

Every builder writes the same features, so one task (`DatasetTask`) prompts and scores them all:

  id         the row's id in its source file
  messages   JSON: the chat turn that asks (system / user messages; the last user one is the request)
  functions  JSON: the offered functions, `{"name", "description", "parameters": JSON schema}`
  gold       JSON: the acceptable calls in BFCL's possible-answer form, a list of
             `{function name: {parameter: [acceptable values]}}` ("" among the values: may be
             left out); `[]`: the right answer calls nothing
  skipped    why the row cannot be used ("" when it can): such rows are kept in the dataset and
             reported by the task, never dropped silently

Builders (the paper's four benchmarks are in `ttsi_jax.tasks.benchmarks`):
  bfcl        from the `bfcl-eval` package (the offline default), one config per category
  user_tools  your own tools: JSON Lines files in the manual dir (format: `USER_TOOLS_FORMAT`)

A benchmark whose own scorer differs from BFCL's checker registers it in `SCORERS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ttsi_jax.tasks import bfcl
from ttsi_jax.tasks.base import Example, Verdict

_FEATURES = dict(
    index=tfds.features.Scalar(np.int64),  # the row's place in its source (TFDS shuffles rows)
    id=tfds.features.Text(),
    messages=tfds.features.Text(),
    functions=tfds.features.Text(),
    gold=tfds.features.Text(),
    skipped=tfds.features.Text(),
)


def row(
    index: int, row_id: str, messages: list[dict], functions: list[dict], gold: list, skipped: str = ""
) -> tuple[str, dict]:
  """A dataset row (key, features) in the shared format."""
  return row_id, dict(
      index=index,
      id=row_id,
      messages=json.dumps(messages),
      functions=json.dumps(functions),
      gold=json.dumps(gold),
      skipped=skipped,
  )


def skipped_row(index: int, row_id: str, reason: str) -> tuple[str, dict]:
  """A row the task cannot pose, kept with its reason (its key apart from the kept rows' ids: a
  duplicate answer names a row that is kept)."""
  return f"skipped {index}", row(index, row_id, [], [], [], reason)[1]


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of the shared format."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_FEATURES))


class Bfcl(Builder):
  """BFCL v4, read from the installed `bfcl-eval` package (no download); split "test"."""

  VERSION = tfds.core.Version("4.0.1")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in bfcl.CATEGORIES]

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    task = bfcl.BfclTask(self.builder_config.name)
    examples = task.examples()
    for index, ex in enumerate(examples):
      yield row(index, ex.id, task._row_messages[ex.id][1], list(ex.functions), ex.gold)
    for index, (row_id, reason) in enumerate(task.skipped, len(examples)):  # reported, not dropped
      yield skipped_row(index, row_id, reason)


USER_TOOLS_FORMAT = """\
One JSON object per line, in `test.jsonl` (and optionally `train.jsonl`) of the manual dir:
  {"id": "weather_1",                                  # optional: the line number otherwise
   "query": "How warm is Paris?",                      # or chat messages [{"role", "content"}]
   "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                             "unit": {"type": "string"}}, "required": ["city"]}}}],
   "calls": [{"name": "get_weather",
              "arguments": {"city": "Paris", "unit": {"one_of": ["celsius", null]}}}]}
`tools` is the OpenAI tools list (a bare {"name", "parameters", ...} function works too; JSON
schema types, "number" checked as a float that may be written as an int). `calls`
are all the calls the answer must make, in any order (`[]`: make none); an argument value is the
one acceptable value, or {"one_of": [...]} for several (null among them: may be left out); an
object's keys (an "object" parameter, or the objects of an array whose items are objects) take
values the same way, e.g. {"where": {"city": "Paris", "unit": {"one_of": ["C", null]}}}. An
answer passing an argument that `calls` does not list is wrong, as in BFCL.
"""


def user_tools_row(item: Any, line: int, index: int) -> tuple[str, dict]:
  """A `USER_TOOLS_FORMAT` row as dataset features; raises ValueError naming what is wrong."""
  if not isinstance(item, dict):
    raise ValueError("the row is not a JSON object")
  row_id = item.get("id", f"line_{line}")
  query = item.get("query")
  if not isinstance(query, (str, list)) or not query:
    raise ValueError("'query' is not a non-empty string or list of chat messages")
  if isinstance(query, str):
    messages = [{"role": "user", "content": query}]
  else:
    messages = query
  bfcl._last_user_turn([messages])  # raises when there is no user message
  if not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
    raise ValueError(
        "'query' does not end with the user's request (its last message is not a user turn): the "
        "model would read what comes after it, e.g. the answer; end it there (the answer goes in 'calls')"
    )
  tools = item.get("tools")
  if not isinstance(tools, list) or not tools:
    raise ValueError("'tools' is not a non-empty list")
  functions = [t["function"] if isinstance(t, dict) and "function" in t else t for t in tools]
  bfcl._check_functions(functions)
  functions = [{**f, "parameters": _bfcl_types(f["parameters"])} for f in functions]
  for f in functions:
    _check_parameter_types(f)
  calls = item.get("calls")
  if not isinstance(calls, list):
    raise ValueError("'calls' is not a list (use [] when the right answer calls nothing)")
  by_name = {f["name"]: f for f in functions}
  gold = []
  for call in calls:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
      raise ValueError("a call has no string 'name'")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
      raise ValueError(f"the arguments of {call['name']!r} are not an object")
    properties = by_name.get(call["name"], {}).get("parameters", {}).get("properties", {})
    gold.append({call["name"]: {k: _acceptable(v, properties.get(k)) for k, v in arguments.items()}})
  if gold:
    bfcl._check_ground_truth(gold, functions)
    for call in gold:
      _check_arguments(*next(iter(call.items())), by_name)
      _check_gold_values(*next(iter(call.items())), by_name)
  return row(index, str(row_id), messages, functions, gold)


def _check_gold_values(name: str, acceptable: dict, functions: dict) -> None:
  """Every acceptable value has its parameter's type (an int may stand for a float), as an answer
  must: a gold "5" for an integer would judge the answer 5 wrong; and no {"one_of"} is left where
  it is not read (deeper than an object parameter's keys)."""
  properties = functions[name]["parameters"]["properties"]
  for param, values in acceptable.items():
    schema = properties[param]
    for value in values:
      if value == "":  # may be left out
        continue
      _check_type(f"{name}({param}=...)", value, schema)
      if _holds_one_of(value):
        raise ValueError(
            f"the call of {name!r} has a {{'one_of': ...}} inside {param!r} deeper than an object "
            "parameter's keys, where it is not read; give one value there"
        )


def _check_type(where: str, value: Any, schema: dict) -> None:
  kind = schema.get("type")
  if kind == "any" or kind not in bfcl.PYTHON_TYPES:
    return
  expected = bfcl.PYTHON_TYPES[kind]
  if not (type(value) is expected or (kind == "float" and type(value) is int)):
    raise ValueError(
        f"{where}: gold value {value!r} is a {type(value).__name__}, but the parameter is a {kind} "
        "(an answer of another type is judged wrong); write it as a JSON "
        f"{ {'string': 'string', 'integer': 'integer', 'float': 'number'}.get(kind, kind) }"
    )
  items = schema.get("items") or {}
  if kind in bfcl.NESTED_TYPES and items.get("type") not in (None, "dict"):
    for item in value:
      _check_type(where, item, items)


def _holds_one_of(value: Any) -> bool:
  if isinstance(value, dict):
    return set(value) == {"one_of"} or any(_holds_one_of(v) for v in value.values())
  if isinstance(value, list):
    return any(_holds_one_of(v) for v in value)
  return False


def _check_parameter_types(function: dict) -> None:
  """Every parameter has a type the checker reads (arrays: their items' too), so that no answer
  fails for the schema's sake."""
  valid = sorted(bfcl.PYTHON_TYPES)
  readable = lambda kind: isinstance(kind, str) and kind in bfcl.PYTHON_TYPES  # not a list of types
  for name, schema in function["parameters"]["properties"].items():
    kind = schema.get("type")
    if not readable(kind):
      raise ValueError(
          f"parameter {name!r} of {function['name']!r} has type {kind!r}; the checker reads one "
          f"of {valid} (a parameter that may be null: leave it out of 'required')"
      )
    items = schema.get("items")
    if kind in bfcl.NESTED_TYPES and not (isinstance(items, dict) and readable(items.get("type"))):
      raise ValueError(
          f"parameter {name!r} of {function['name']!r} is an {kind} without an 'items' type of {valid}"
      )


def _check_arguments(name: str, acceptable: dict, functions: dict) -> None:
  """A gold call names its function's parameters only, and gives every required one."""
  parameters = functions[name]["parameters"]
  unknown = sorted(set(acceptable) - set(parameters["properties"]))
  if unknown:
    raise ValueError(
        f"the call of {name!r} passes {unknown}, which are not among its parameters "
        f"{sorted(parameters['properties'])}"
    )
  for required in parameters.get("required", []):
    if required not in acceptable or "" in acceptable[required]:
      raise ValueError(
          f"the call of {name!r} may leave out its required parameter {required!r} (it is not "
          'in the call, or one of its values is null or "", which BFCL\'s checker reads as "may be '
          'left out")'
      )


_BFCL_TYPE = {"number": "float", "object": "dict"}  # JSON schema -> the checker's type names


def _bfcl_types(schema: Any) -> Any:
  """A JSON schema with the type names BFCL's checker reads (number: float, object: dict)."""
  if isinstance(schema, list):
    return [_bfcl_types(s) for s in schema]
  if not isinstance(schema, dict):
    return schema
  out = {k: _bfcl_types(v) for k, v in schema.items()}
  if isinstance(schema.get("type"), str):
    out["type"] = _BFCL_TYPE.get(schema["type"], schema["type"])
  return out


def _acceptable(value: Any, schema: Optional[dict] = None) -> list:
  """An argument's acceptable values in BFCL's form (None, may be left out, becomes ""). Given
  the parameter's schema, an object's keys (and those of an array's objects) each get their own
  list of acceptable values, as BFCL's dict checker reads them."""
  if isinstance(value, dict) and set(value) == {"one_of"}:
    if not isinstance(value["one_of"], list) or not value["one_of"]:
      raise ValueError("'one_of' needs a non-empty list of values")
    return ["" if v is None else _bfcl_value(v, schema) for v in value["one_of"]]
  return [_bfcl_value(value, schema)]


def _bfcl_value(value: Any, schema: Optional[dict]) -> Any:
  kind = (schema or {}).get("type")
  items = (schema or {}).get("items") or {}
  if kind == "dict" and isinstance(value, dict):
    return {k: _acceptable(v) for k, v in value.items()}
  if kind in bfcl.NESTED_TYPES and items.get("type") == "dict" and isinstance(value, list):
    return [_bfcl_value(v, items) for v in value]
  return value


class UserTools(Builder):
  """Your own tools and queries (see `USER_TOOLS_FORMAT`), from the manual dir. 1.0.1: an object
  argument's keys each with their acceptable values (it was one value)."""

  VERSION = tfds.core.Version("1.0.1")
  MANUAL_DOWNLOAD_INSTRUCTIONS = USER_TOOLS_FORMAT

  def _split_generators(self, dl_manager):
    splits = {}
    for split in ("test", "train"):
      path = os.path.join(dl_manager.manual_dir, f"{split}.jsonl")
      if os.path.exists(path):
        splits[split] = self._generate_examples(path)
    if "test" not in splits:
      raise FileNotFoundError(
          f"{os.path.join(dl_manager.manual_dir, 'test.jsonl')} does not exist. Put your rows there, "
          f"one per line:\n{USER_TOOLS_FORMAT}"
      )
    return splits

  def _generate_examples(self, path: str) -> Iterator[tuple[str, dict]]:
    seen = set()
    for number, item, error in bfcl._read_json_lines(path):
      try:
        if error:
          raise ValueError(error)
        key, features = user_tools_row(item, number, len(seen))
        if key in seen:
          raise ValueError(f"duplicate id {key!r}")
      except ValueError as e:
        raise ValueError(f"{path}, line {number}: {e}") from None
      seen.add(key)
      yield key, features


BUILDERS: dict[str, type] = {"bfcl": Bfcl, "user_tools": UserTools}
# dataset name -> check(example, answer) -> Verdict, where the benchmark's scorer is not BFCL's.
SCORERS: dict[str, Callable[[Example, str], Verdict]] = {}


def _prepared(dataset: str, data_dir: Optional[str], manual_dir: Optional[str]):
  """(the TFDS builder of `dataset`, its source stamp's path), prepared from its source files."""
  name, _, config = dataset.partition("/")
  builder = BUILDERS[name](config=config or None, data_dir=data_dir)
  # TFDS reuses a prepared dataset of the same name, config and version whatever it was built
  # from: one built from other files (or another bfcl-eval) is removed and built again.
  built_from = _source(name, manual_dir)
  stamp = pathlib.Path(builder.data_dir, SOURCE_STAMP)
  if builder.is_prepared() and _built_from_other(name, manual_dir, stamp, built_from):
    logging.info("%s in %s was built from other files: building it again.", dataset, builder.data_dir)
    shutil.rmtree(builder.data_dir)
    builder = BUILDERS[name](config=config or None, data_dir=data_dir)
  if not builder.is_prepared() and builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    if not manual_dir:  # TFDS would name its own downloads/manual folder, not our setting
      raise FileNotFoundError(
          f"{dataset} is not built in {builder.data_dir} yet, and is built from files you put in a "
          f"folder: give it with --config.task.manual_dir. {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise FileNotFoundError(
          f"task.manual_dir {manual_dir} {'is empty' if os.path.isdir(manual_dir) else 'does not exist'}: "
          f"{dataset} is built from files you put there: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None,
        file_format="array_record",
    )
    stamp.with_suffix(".tmp").write_text(built_from)  # swapped in whole
    stamp.with_suffix(".tmp").replace(stamp)
  return builder, stamp


class DatasetTask(bfcl.FunctionCallingTask):
  """A function-calling task over a prepared dataset of this module (any builder: one format)."""

  def __init__(
      self,
      dataset: str,
      split: str = "test",
      num_examples: Optional[int] = None,
      data_dir: Optional[str] = None,
      manual_dir: Optional[str] = None,
  ):
    super().__init__()
    from ttsi_jax.tasks import benchmarks  # noqa: F401  (registers its builders and scorers)

    name, _, config = dataset.partition("/")
    if name not in BUILDERS:
      raise ValueError(f"Unknown dataset {name!r}; valid datasets are {list(BUILDERS)}.")
    self.name = dataset.replace("/", "_")
    self._scorer = SCORERS.get(name)
    self.num_examples = num_examples
    # Several hosts: experiment.run has host 0 prepare it first.
    builder, stamp = _prepared(dataset, data_dir, manual_dir)
    if split not in builder.info.splits:
      raise ValueError(f"{dataset} has no split {split!r}; it has {list(builder.info.splits)}.")
    self.data_version = f"{builder.name} {builder.version}" + (
        f", bfcl-eval {bfcl.package_version()}" if name == "bfcl" else _files_version(stamp)
    )
    self._examples = []
    source = builder.as_data_source(split=split)
    for features in sorted((source[i] for i in range(len(source))), key=lambda f: int(f["index"])):
      row_id = _text(features["id"])
      if _text(features["skipped"]):
        self._skipped.append((row_id, _text(features["skipped"])))
        continue
      messages = json.loads(_text(features["messages"]))
      question = [m["content"] for m in messages if m["role"] == "user"][-1]
      self._row_messages[row_id] = (question, messages)
      self._examples.append(
          Example(
              row_id,
              question,
              tuple(json.loads(_text(features["functions"]))),
              json.loads(_text(features["gold"])),
          )
      )

  def check(self, example: Example, answer: str) -> Verdict:
    """The benchmark's own accuracy rule where it has one (`SCORERS`), else BFCL's checker."""
    if self._scorer is not None:
      return self._scorer(example, answer)
    return super().check(example, answer)

  def gold_answer(self, example: Example) -> str:
    """A benchmark with its own rule stored its gold values whole (`whole_values_gold`): the
    calls as they are; else BFCL's gold answer."""
    if self._scorer is not None:
      return bfcl.format_calls(whole_values_calls(example))
    return super().gold_answer(example)


def whole_values_gold(calls: Sequence[tuple[str, dict]]) -> list[dict]:
  """Gold calls in `Example.gold`'s form, each value whole as its one acceptable value (a
  benchmark scored by its own rule: "" is an empty string and an object is one value, not BFCL's
  "may be left out" and per-key lists)."""
  return [{name: {k: [v] for k, v in args.items()}} for name, args in calls]


def whole_values_calls(example: Example) -> list[tuple[str, dict]]:
  """The (name, arguments) calls that `whole_values_gold` stored."""
  return [
      (name, {k: v[0] for k, v in params.items()}) for call in example.gold for name, params in call.items()
  ]


SOURCE_STAMP = "ttsi_source.json"  # in a prepared dataset's folder: what it was built from


def _source(name: str, manual_dir: Optional[str]) -> str:
  """What a dataset is built from, as JSON: each file of the manual dir by path and the sha256 of
  its contents (a copy that keeps the size and modification time, as `cp -p` or `tar x` do, still
  counts as other files); for BFCL the bfcl-eval version it reads."""
  files = []
  for root, _, names in sorted(os.walk(manual_dir)) if manual_dir else []:
    for n in sorted(names):
      digest = hashlib.sha256()
      with open(os.path.join(root, n), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      files.append([os.path.relpath(os.path.join(root, n), manual_dir), digest.hexdigest()])
  return json.dumps({"files": files, "bfcl-eval": bfcl.package_version() if name == "bfcl" else None})


def _files_version(stamp: pathlib.Path) -> str:
  """A short hash of the files a prepared dataset was built from (its stamp), for
  `data_version`: a workdir or another host on other files is told apart."""
  try:
    files = json.loads(stamp.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return ", files not recorded"
  return f", files {hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]}" if files else ""


def _built_from_other(name: str, manual_dir: Optional[str], stamp: pathlib.Path, source: str) -> bool:
  """Whether a prepared dataset was built from other files than `source` says. Without a manual
  dir the files cannot be compared: the prepared dataset is reused (building it again would need
  them), unless it is BFCL's and read another bfcl-eval (or says nothing of what it read)."""
  if manual_dir:
    return not stamp.exists() or stamp.read_text() != source
  if name != "bfcl":
    return False
  try:
    return json.loads(stamp.read_text())["bfcl-eval"] != json.loads(source)["bfcl-eval"]
  except (OSError, ValueError, KeyError, TypeError):  # none, or cut while written: build it again
    return True


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
