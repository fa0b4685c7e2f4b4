"""The paper's benchmarks as TFDS builders of the shared format (`ttsi_jax.tasks.datasets`), each
read from the files a user downloads (TFDS manual dir), with its own accuracy rule.

| dataset      | files in the manual dir                          | accuracy here (its published scorer)   |
|--------------|--------------------------------------------------|----------------------------------------|
| nexusraven   | standardized_queries, standardized_api_list      | name and the full argument dict with   |
|              | (.parquet as on the HF hub, or .jsonl / .json)   | defaults filled, the answer's floats   |
|              |                                                  | cast to int, the reference's not (the  |
|              |                                                  | same as raven/eval/evaluator.py)       |
| seal_tools   | tool.jsonl, test_in_domain.jsonl,                | every call: API name and every         |
|              | test_out_domain.jsonl, dev.jsonl                 | parameter equal as str(), no extra     |
|              |                                                  | call (its scorer: micro P/R/F1 over    |
|              |                                                  | APIs and parameters of the whole set)  |
| api_bank     | level-1-api.json, level-2-api.json               | API name, the same argument names, and |
|              | (test-data/ of API-Bank)                         | values equal after the declared type's |
|              |                                                  | cast (its scorer runs the call on the  |
|              |                                                  | simulated API and compares results     |
|              |                                                  | with per-API rules: not reproduced)    |
| toolalpaca   | eval_simulated.json, eval_real.json              | every gold step's call, name and JSON  |
|              |                                                  | arguments equal (its scorer: a GPT-4   |
|              |                                                  | judge of the process and the response) |

Rows a format allows but this task cannot pose (a Seal-Tools argument that is another call's
output, a ToolAlpaca step whose input is not JSON) are kept as skipped, with the reason.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from ttsi_jax.tasks import bfcl, datasets
from ttsi_jax.tasks.base import Example, Verdict

# The benchmarks' type names -> the checker's (JSON-schema-like) ones.
_TYPES = {
    "str": "string",
    "string": "string",
    "int": "integer",
    "integer": "integer",
    "float": "float",
    "number": "float",
    "bool": "boolean",
    "boolean": "boolean",
    "list": "array",
    "array": "array",
    "dict": "dict",
    "object": "dict",
}


def _schema_type(name: Any) -> dict:
  kind = _TYPES.get(str(name).lower(), "any")
  return {"type": kind, "items": {"type": "string"}} if kind == "array" else {"type": kind}


def _find(manual_dir: str, *patterns: str) -> Optional[str]:
  """The shallowest file in `manual_dir` (or a folder below it) matching one of `patterns`, the
  first by name among equals (Seal-Tools ships test files of an older format one folder down)."""
  for pattern in patterns:
    found = glob.glob(os.path.join(manual_dir, "**", pattern), recursive=True)
    if found:
      return min(found, key=lambda path: (path.count(os.sep), path))
  return None


def _need(manual_dir: str, what: str, where: str, *patterns: str) -> str:
  path = _find(manual_dir, *patterns)
  if path is None:
    raise FileNotFoundError(
        f"{manual_dir} holds no {what} (looked for {', '.join(patterns)}). {where} Pass the folder "
        "with --config.task.manual_dir."
    )
  return path


def _read_table(path: str, fields: tuple[str, ...]) -> list[dict]:
  """Rows of a .parquet, .jsonl or .json (a list) file, each an object with these fields (else a
  ValueError naming the file and row: another file than the benchmark's)."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # only for the HF hub's parquet files

    rows = pq.read_table(path).to_pylist()
  elif path.endswith(".jsonl"):
    rows = []
    for number, item, error in bfcl._read_json_lines(path):
      if error:
        raise ValueError(f"{path}, line {number}: {error}")
      rows.append(item)
  else:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
    if not isinstance(rows, list):
      raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows.")
  for number, row in enumerate(rows, 1):
    missing = [name for name in fields if name not in row] if isinstance(row, dict) else None
    if missing is None or missing:
      what = f"has no field {missing}" if missing else "is not an object"
      raise ValueError(f"{path}, row {number} {what}: is this the benchmark's file?")
  return rows


def _one_call(answer: str) -> tuple[Optional[bfcl.Call], str]:
  try:
    calls = bfcl.parse_calls(answer)
  except bfcl.ParseError as e:
    return None, f"Invalid syntax: {e}"
  if len(calls) != 1:
    return None, f"Expected one call, got {len(calls)}."
  return calls[0], ""


# ------------------------------------------------------------------------------------ NexusRaven


def _nexus_default(text: Any) -> Any:
  """A default as NexusRaven's generated signature reads it: "None", "JSON:<json>", or source."""
  if not isinstance(text, str):
    return text
  if text.startswith("JSON:"):
    return json.loads(text[len("JSON:") :])
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _nexus_function(api: dict) -> dict:
  properties, required = {}, []
  for arg in api["args_dicts"]:
    properties[arg["name"]] = {
        **_schema_type(arg.get("type")),
        "description": arg.get("description") or "",
        "default": _nexus_default(arg.get("default", "None")),
    }
    if arg.get("required"):
      required.append(arg["name"])
  return {
      "name": api["name"],
      "description": api.get("description") or "",
      "parameters": {"type": "dict", "properties": properties, "required": required},
  }


_NEXUS_QUERY_FIELDS = ("prompt", "python_function_name", "python_args_dict", "context_functions")


class Nexusraven(datasets.Builder):
  """NexusRaven_API_evaluation: `standardized_queries` and `standardized_api_list`; split "test"."""

  VERSION = tfds.core.Version("1.0.2")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "The `standardized_queries` and `standardized_api_list` subsets of the Hugging Face dataset "
      "Nexusflow/NexusRaven_API_evaluation, as parquet (as on the hub) or .jsonl / .json files."
  )

  def _split_generators(self, dl_manager):
    where = "Download them from the Hugging Face dataset Nexusflow/NexusRaven_API_evaluation."
    find = lambda subset: _need(
        dl_manager.manual_dir,
        subset,
        where,
        f"{subset}*.parquet",
        f"{subset}/*.parquet",
        f"{subset}.jsonl",
        f"{subset}.json",
    )
    return {"test": self._generate_examples(find("standardized_queries"), find("standardized_api_list"))}

  def _generate_examples(self, queries: str, apis: str) -> Iterator[tuple[str, dict]]:
    functions = {api["name"]: _nexus_function(api) for api in _read_table(apis, ("name", "args_dicts"))}
    for index, q in enumerate(_read_table(queries, _NEXUS_QUERY_FIELDS)):
      row_id = f"{q.get('dataset', 'nexusraven')}_{index}"
      missing = [name for name in q["context_functions"] if name not in functions]
      if q["python_function_name"] not in q["context_functions"]:
        missing.append(q["python_function_name"])
      if missing:
        yield datasets.skipped_row(index, row_id, f"functions {missing} are not in the API list")
        continue
      args = q["python_args_dict"]
      args = json.loads(args) if isinstance(args, str) else dict(args)
      cast, error = _nexus_args(functions[q["python_function_name"]], args)
      if error:  # the gold call itself would raise: no answer could be scored against it
        yield datasets.skipped_row(index, row_id, f"the gold call: {error}")
        continue
      if cast != _nexus_args(functions[q["python_function_name"]], args, cast=False)[0]:
        # The scorer casts an answer's floats to int, not the reference's: none can match it.
        yield datasets.skipped_row(
            index, row_id, "the gold call has a fractional float, which no answer can match"
        )
        continue
      yield datasets.row(
          index,
          row_id,
          [{"role": "user", "content": q["prompt"]}],
          [functions[name] for name in q["context_functions"]],
          datasets.whole_values_gold([(q["python_function_name"], args)]),
      )


def _nexus_args(function: dict, args: dict, cast: bool = True) -> tuple[Optional[dict], str]:
  """Every parameter's value as NexusRaven's evaluator sees it after calling the function:
  defaults filled in, with `cast` the answer's float values cast to int (its parser casts the
  model's arguments, not the reference's); (None, why) where the call would raise."""
  properties = function["parameters"]["properties"]
  unknown = sorted(set(args) - set(properties), key=str)  # `**kwargs` decodes to the name None
  if unknown:
    return None, f"Unexpected arguments {unknown}."
  missing = [p for p in function["parameters"]["required"] if p not in args]
  if missing:
    return None, f"Missing required arguments {missing}."
  full = {p: args.get(p, schema.get("default")) for p, schema in properties.items()}
  if not cast:
    return full, ""
  try:
    return {p: int(v) if isinstance(v, float) else v for p, v in full.items()}, ""
  except (OverflowError, ValueError) as e:  # int() of an infinite or NaN float
    return None, f"A value cannot be cast to int: {e}."


def check_nexusraven(example: Example, answer: str) -> Verdict:
  call, error = _one_call(answer)
  if call is None:
    return Verdict(False, error)
  ((gold_name, gold_args),) = datasets.whole_values_calls(example)
  if call.name != gold_name:
    return Verdict(False, f"Function {call.name!r} is not {gold_name!r}.")
  function = next(f for f in example.functions if f["name"] == gold_name)
  got, error = _nexus_args(function, call.args)
  if got is None:
    return Verdict(False, error)
  want, _ = _nexus_args(function, gold_args, cast=False)
  wrong = sorted(p for p in want if got[p] != want[p])  # Python's ==, as its evaluator compares
  return Verdict(True) if not wrong else Verdict(False, f"Wrong values for {wrong}.")


# ------------------------------------------------------------------------------------ Seal-Tools

_SEAL_SPLITS = ("test_in_domain", "test_out_domain", "dev")
_SEAL_DISTRACTORS = 3  # tools of the same field offered beside the gold ones
_PLACEHOLDER = re.compile(r"^API_call_\d+$")


def _seal_function(tool: dict) -> dict:
  properties = {
      name: {**_schema_type(p.get("type")), "description": p.get("description") or ""}
      for name, p in (tool.get("parameters") or {}).items()
  }
  return {
      "name": tool["api_name"],
      "description": tool.get("api_description") or "",
      "parameters": {"type": "dict", "properties": properties, "required": list(tool.get("required") or [])},
  }


class SealTools(datasets.Builder):
  """Seal-Tools: `tool.jsonl` and the test / dev files; splits test_in_domain, test_out_domain,
  dev. Each input is offered its gold tools and 3 more of the same field, chosen by its id, in an
  order its id fixes."""

  VERSION = tfds.core.Version("1.0.1")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Seal-Tools_Dataset/ of github.com/fairyshine/Seal-Tools."

  def _split_generators(self, dl_manager):
    where = "They are in Seal-Tools_Dataset/ of github.com/fairyshine/Seal-Tools."
    tools = _need(dl_manager.manual_dir, "tool.jsonl", where, "tool.jsonl")
    splits = {}
    for split in _SEAL_SPLITS:
      path = _find(dl_manager.manual_dir, f"{split}.jsonl")
      if path:
        splits[split] = self._generate_examples(tools, path)
    if not splits:
      _need(dl_manager.manual_dir, "test or dev file", where, *(f"{s}.jsonl" for s in _SEAL_SPLITS))
    return splits

  def _generate_examples(self, tools_path: str, path: str) -> Iterator[tuple[str, dict]]:
    tools = {t["api_name"]: t for t in _read_table(tools_path, ("api_name",))}
    by_field: dict[str, list[str]] = {}
    for name in sorted(tools):
      by_field.setdefault(tools[name].get("field", ""), []).append(name)
    for index, r in enumerate(_read_table(path, ("calling", "query"))):
      row_id = str(r.get("id", f"{os.path.basename(path)}_{index}"))
      calls = [(c["api"], dict(c.get("parameters") or {})) for c in r["calling"]]
      missing = sorted({name for name, _ in calls if name not in tools})
      nested = any(isinstance(v, str) and _PLACEHOLDER.match(v) for _, args in calls for v in args.values())
      if missing or nested:
        reason = (
            f"tools {missing} are not in tool.jsonl"
            if missing
            else ("an argument is another call's output (nested calls are not posed here)")
        )
        yield datasets.skipped_row(index, row_id, reason)
        continue
      offered = list(dict.fromkeys(name for name, _ in calls))
      seed = int(hashlib.md5(row_id.encode()).hexdigest(), 16)
      for name in offered[:1]:
        others = [t for t in by_field[tools[name].get("field", "")] if t not in offered]
        for k in range(min(_SEAL_DISTRACTORS, len(others))):
          offered.append(others[(seed + k) % len(others)])
      # In an order fixed by the row, not gold first: a model that favours the first function
      # offered would otherwise name the right one for free.
      offered.sort(key=lambda name: hashlib.md5(f"{row_id}/{name}".encode()).hexdigest())
      yield datasets.row(
          index,
          row_id,
          [{"role": "user", "content": r["query"]}],
          [_seal_function(tools[name]) for name in offered],
          datasets.whole_values_gold(calls),
      )


def _every_gold_call_made(example: Example, answer: str, same_args) -> Verdict:
  """Each gold call matched by its own answer call (any order, none left over): same name and
  `same_args(answer args, gold args)`."""
  try:
    calls = bfcl.parse_calls(answer)
  except bfcl.ParseError as e:
    return Verdict(False, f"Invalid syntax: {e}")
  gold = datasets.whole_values_calls(example)
  if len(calls) != len(gold):
    return Verdict(False, f"{len(calls)} calls where the answer makes {len(gold)}.")
  unmatched = list(range(len(calls)))
  for name, params in gold:
    match = next((i for i in unmatched if calls[i].name == name and same_args(calls[i].args, params)), None)
    if match is None:
      return Verdict(False, f"No call matches {name}({params}).")
    unmatched.remove(match)
  return Verdict(True)


def check_seal_tools(example: Example, answer: str) -> Verdict:
  """All gold calls made, each API with exactly its parameters, values equal as str()."""
  same = lambda got, want: set(got) == set(want) and all(str(got[k]) == str(v) for k, v in want.items())
  return _every_gold_call_made(example, answer, same)


# -------------------------------------------------------------------------------------- API-Bank

_API_REQUEST = re.compile(r"API-Request:\s*(\[.*\])", re.S)
_CURRENT_TIME = re.compile(r"The current time is [^\n]*")


def _api_descriptions(text: str) -> list[dict]:
  """The API descriptions (JSON objects with a name and input_parameters) in a text."""
  found, decoder = [], json.JSONDecoder()
  for start in [m.start() for m in re.finditer(r"\{", text)]:
    try:
      value, _ = decoder.raw_decode(text[start:])
    except ValueError:
      continue
    if isinstance(value, dict) and isinstance(value.get("name"), str) and "input_parameters" in value:
      found.append(value)
  return found


def _api_bank_function(api: dict) -> dict:
  params = api.get("input_parameters") or {}
  properties = {
      name: {**_schema_type(p.get("type")), "description": p.get("description") or ""}
      for name, p in params.items()
  }
  return {
      "name": api["name"],
      "description": api.get("description") or "",
      # API-Bank's tools raise on a missing argument: every input parameter is required.
      "parameters": {"type": "dict", "properties": properties, "required": list(properties)},
  }


class ApiBank(datasets.Builder):
  """API-Bank level-1 (API given) and level-2 (API retrieved by ToolSearcher) API-call rows of
  `level-<n>-api.json`; split "test". 1.0.1: the instruction's current time as a system message."""

  VERSION = tfds.core.Version("1.0.1")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="level-1"), tfds.core.BuilderConfig(name="level-2")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "test-data/level-1-api.json and level-2-api.json of API-Bank."

  def _split_generators(self, dl_manager):
    name = f"{self.builder_config.name}-api.json"
    where = "They are API-Bank's test-data/ (github.com/AlibabaResearch/DAMO-ConvAI, api-bank)."
    return {"test": self._generate_examples(_need(dl_manager.manual_dir, name, where, name))}

  def _generate_examples(self, path: str) -> Iterator[tuple[str, dict]]:
    seen = set()
    for index, r in enumerate(_read_table(path, ("instruction", "input", "expected_output"))):
      row_id = f"{os.path.splitext(r.get('file', 'row'))[0]}_{r.get('id', index)}"
      if row_id in seen:
        row_id = f"{row_id}_{index}"
      seen.add(row_id)
      apis = {a["name"]: a for a in _api_descriptions(r["instruction"]) + _api_descriptions(r["input"])}
      expected = _API_REQUEST.search(r["expected_output"])
      try:
        calls = bfcl.parse_calls(expected.group(1)) if expected else []
      except bfcl.ParseError:
        calls = []
      if len(calls) != 1 or calls[0].name not in apis:
        yield datasets.skipped_row(
            index, row_id, "expected_output is not one API-Request of an API the row describes"
        )
        continue
      dialogue = r["input"].replace("Generate API Request:", "").strip()
      # The instruction's clock: "tomorrow" or "in two hours" needs it.
      now = _CURRENT_TIME.search(r["instruction"])
      yield datasets.row(
          index,
          row_id,
          [{"role": "system", "content": now.group(0)}] * bool(now) + [{"role": "user", "content": dialogue}],
          [_api_bank_function(a) for a in apis.values()],
          datasets.whole_values_gold([(calls[0].name, calls[0].args)]),
      )


def _api_bank_value(value: Any, kind: str) -> Any:
  """A value as API-Bank's tool manager passes it: strings cast to the declared type."""
  text = value if isinstance(value, str) else str(value)
  try:
    if kind == "integer":
      return int(float(text))
    if kind == "float":
      return float(text)
  except (ValueError, OverflowError):  # not a number, or int() of an infinite one
    return text
  if kind == "boolean":
    return text == "True"
  return text


def check_api_bank(example: Example, answer: str) -> Verdict:
  call, error = _one_call(answer.replace("API-Request:", "", 1))
  if call is None:
    return Verdict(False, error)
  ((gold_name, gold_args),) = datasets.whole_values_calls(example)
  if call.name != gold_name:
    return Verdict(False, f"API {call.name!r} is not {gold_name!r}.")
  if set(call.args) != set(gold_args):
    return Verdict(False, f"Arguments {sorted(call.args, key=str)} are not {sorted(gold_args)}.")
  properties = next(f for f in example.functions if f["name"] == gold_name)["parameters"]["properties"]
  kinds = {p: properties.get(p, {}).get("type", "string") for p in gold_args}
  wrong = sorted(
      p
      for p, v in gold_args.items()
      if _api_bank_value(call.args[p], kinds[p]) != _api_bank_value(v, kinds[p])
  )
  return Verdict(True) if not wrong else Verdict(False, f"Wrong values for {wrong}.")


# ------------------------------------------------------------------------------------ ToolAlpaca

_ALPACA_SPLITS = {"simulated": "eval_simulated.json", "real": "eval_real.json"}


def _openapi_parameters(spec: dict, path: str, method: str) -> dict:
  """A JSON schema of an OpenAPI operation's parameters and JSON request body."""
  operation = ((spec.get("paths") or {}).get(path) or {}).get(method) or {}
  properties, required = {}, []
  for p in operation.get("parameters") or []:
    if isinstance(p, dict) and isinstance(p.get("name"), str):
      properties[p["name"]] = {
          **_schema_type((p.get("schema") or {}).get("type")),
          "description": p.get("description") or "",
      }
      if p.get("required"):
        required.append(p["name"])
  body = ((operation.get("requestBody") or {}).get("content") or {}).get("application/json") or {}
  body_schema = body.get("schema") or {}
  for name, p in (body_schema.get("properties") or {}).items():
    properties[name] = {**_schema_type(p.get("type")), "description": p.get("description") or ""}
  required += [r for r in body_schema.get("required") or [] if r in properties]
  return {"type": "dict", "properties": properties, "required": required}


def _alpaca_functions(tool: dict) -> dict[str, dict]:
  """The tool's functions; ValueError saying what is broken (its Documentation, a projection)."""
  try:
    spec = json.loads(tool["Documentation"]) if isinstance(tool.get("Documentation"), str) else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"the tool's Documentation is not JSON: {e}") from None
  functions = {}
  for name, text in (tool.get("Function_Description") or {}).items():
    if name == "components":  # shared schema text, not a function
      continue
    projection = (tool.get("Function_Projection") or {}).get(name, ["", ""])
    if not isinstance(projection, (list, tuple)) or len(projection) != 2:
      raise ValueError(f"the Function_Projection of {name!r} is not a [path, method] pair: {projection!r}")
    path, method = projection
    functions[name] = {
        "name": name,
        "description": text if isinstance(text, str) else "",
        "parameters": _openapi_parameters(spec, path, str(method).lower()),
    }
  return functions


class Toolalpaca(datasets.Builder):
  """ToolAlpaca's evaluation tools: splits "simulated" and "real", one row per instruction, the
  tool's functions offered (parameters from its OpenAPI documentation)."""

  VERSION = tfds.core.Version("1.0.1")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "data/eval_simulated.json and data/eval_real.json of ToolAlpaca."

  def _split_generators(self, dl_manager):
    splits = {
        split: self._generate_examples(path)
        for split, name in _ALPACA_SPLITS.items()
        if (path := _find(dl_manager.manual_dir, name))
    }
    if not splits:
      where = "They are data/ of github.com/tangqiaoyu/ToolAlpaca."
      _need(dl_manager.manual_dir, "ToolAlpaca evaluation file", where, *_ALPACA_SPLITS.values())
    return splits

  def _generate_examples(self, path: str) -> Iterator[tuple[str, dict]]:
    index = 0
    for tool in _read_table(path, ("Name",)):
      try:
        functions = _alpaca_functions(tool)
      except ValueError as e:
        functions, broken = {}, str(e)
      else:
        broken = ""
      answers = tool.get("Golden_Answers") or []
      for k, instruction in enumerate(tool.get("Instructions") or []):
        row_id, index = f"{tool['Name']}_{k}", index + 1
        reason, calls = broken, []
        for step in answers[k] if k < len(answers) else []:
          try:
            args = json.loads(step["Action_Input"]) if step.get("Action_Input") else {}
          except ValueError:
            args = None
          if reason:
            break
          if step.get("Action") not in functions:
            reason = f"a gold step calls {step.get('Action')!r}, which the tool does not describe"
          elif not isinstance(args, dict):
            reason = "a gold step's Action_Input is not a JSON object"
          else:
            calls.append((step["Action"], args))
        if not reason and not calls:
          reason = "no gold steps"
        if reason:
          yield datasets.skipped_row(index, row_id, reason)
          continue
        yield datasets.row(
            index,
            row_id,
            [{"role": "user", "content": instruction}],
            list(functions.values()),
            datasets.whole_values_gold(calls),
        )


def check_toolalpaca(example: Example, answer: str) -> Verdict:
  """Every gold step made (in any order), each with exactly its JSON arguments."""
  return _every_gold_call_made(example, answer, lambda got, want: got == want)


datasets.BUILDERS.update(nexusraven=Nexusraven, seal_tools=SealTools, api_bank=ApiBank, toolalpaca=Toolalpaca)
datasets.SCORERS.update(
    nexusraven=check_nexusraven,
    seal_tools=check_seal_tools,
    api_bank=check_api_bank,
    toolalpaca=check_toolalpaca,
)
