"""BFCL v4 (Berkeley Function Calling Leaderboard) as a `Task`, judged by our own AST checker.

The data ships inside the `bfcl-eval` PyPI package as JSON Lines: questions in
`bfcl_eval/data/BFCL_v4_<category>.json`, ground truth in
`bfcl_eval/data/possible_answer/BFCL_v4_<category>.json`, joined on `id`. We only *find* the package
(`importlib.util.find_spec`) and never import it: its modules import API clients we do not install.

Everything BFCL does to judge a prompting (non function-calling) model is reimplemented here and
kept verdict-for-verdict identical to `bfcl_eval` (tests/tasks/bfcl_test.py checks every item):

* the default system prompt (`formulate_system_prompt` with the default format string);
* decoding (`default_decode_ast_prompting` + `ast_parse`): the answer is a Python call list
  `[f(a=1), g(b="x")]`, a bare call `f(a=1)` is wrapped in brackets, surrounding backticks, spaces
  and newlines are stripped. Like BFCL, positional arguments are silently dropped, any unary operator
  negates a constant (`+5` decodes to -5), bare names decode to their own text, calls without
  keywords and subscripts decode to their source text, and a fence with a language tag
  (```` ```python ````) does not decode. BFCL `eval`s arithmetic (`BinOp`) arguments; we evaluate
  only arithmetic over literals, so an expression naming a builtin (`len("ab") + 1`) is unparseable
  here where BFCL would compute it;
* the AST checker (`eval_checker/ast_eval/ast_checker.py`, Python path): exact function name,
  required parameters present, no unexpected parameter, type checks (int accepted for float, a
  value of the ground truth's own type accepted as a "variable"), one level of nested list type
  checks, strings compared after removing spaces and `,./-_*^` and lower-casing, dict and
  list-of-dict checks, `""` meaning "may be omitted", parallel categories matched greedily without
  order, multiple categories = exactly one call checked against the one gold function;
* irrelevance: correct iff the answer does not decode to at least one call (text, `[]` and the empty
  string are all correct).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import operator
import os
import re
from typing import Any, Optional, Sequence

from ttsi_jax.tasks.base import Example, Messages, Verdict

DEFAULT_CATEGORY = "multiple"
CATEGORIES = (
    "multiple",
    "live_multiple",
    "simple_python",
    "live_simple",
    "parallel",
    "parallel_multiple",
    "irrelevance",
)
VERSION_PREFIX = "BFCL_v4"
IRRELEVANCE = "irrelevance"

# ----------------------------------------------------------------------------------------------
# Prompt: BFCL's default system prompt for prompting models
# ("ret_fmt=python&tool_call_tag=False&func_doc_fmt=json&prompt_fmt=plaintext&style=classic").
# The persona and task sentences are joined without a space and the empty `{param_types}` slot
# leaves a double space: both are in BFCL's own prompt, so we keep them.
# ----------------------------------------------------------------------------------------------

_PERSONA = "You are an expert in composing functions."
_TASK = (
    "You are given a question and a set of possible functions. Based on the question, you "
    "will need to make one or more function/tool calls to achieve the purpose. If none of the "
    "functions can be used, point it out. If the given question lacks the parameters "
    "required by the function, also point it out."
)
_OUTPUT_FORMAT = (
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), " "func_name2(params)]"
)
_TOOL_CALL_FORMAT = (
    "You should only return the function calls in your response.\n\nIf you decide to invoke any "
    f"of the function(s), you MUST put it in the format of {_OUTPUT_FORMAT}.  You SHOULD NOT "
    "include any other text in the response."
)
_MULTITURN_BEHAVIOR = (
    "At each turn, you should try your best to complete the tasks requested by the user within the "
    "current turn. Continue to output functions to call until you have fulfilled the user's "
    "request to the best of your ability. Once you have no more functions to call, the system will "
    "consider the current turn complete and proceed to the next turn or task."
)
_AVAILABLE_TOOLS = "Here is a list of functions in json format that you can invoke.\n{functions}\n"
# BFCL appends this to every function description when it builds prompts for Python categories.
PYTHON_SYNTAX_HINT = " Note that the provided function is in Python 3 syntax."


def with_python_hint(functions: Sequence[dict]) -> list[dict]:
  """Copies of `functions` with BFCL's language hint appended to each description."""
  hinted = copy.deepcopy(list(functions))
  for function in hinted:
    function["description"] = function.get("description", "") + PYTHON_SYNTAX_HINT
  return hinted


def system_prompt(functions: Sequence[dict]) -> str:
  """BFCL's default system prompt listing `functions` (already hinted) as indented JSON."""
  tools = _AVAILABLE_TOOLS.format(functions=json.dumps(list(functions), indent=4))
  return f"{_PERSONA}{_TASK}\n\n{_TOOL_CALL_FORMAT}\n\n{_MULTITURN_BEHAVIOR}\n\n{tools}"


# ----------------------------------------------------------------------------------------------
# Decoding answers in Python call-list syntax, mirroring bfcl_eval's ast_parse.
# ----------------------------------------------------------------------------------------------


class ParseError(ValueError):
  """The answer does not decode to a list of calls (BFCL: 'Failed to decode AST')."""


@dataclasses.dataclass(frozen=True)
class Call:
  """One decoded call. `args` holds keyword arguments only (a `**x` argument gets key None, as in
  BFCL); `positional` counts the positional arguments BFCL drops without a word."""

  name: str
  args: dict
  positional: int = 0
  repeated: tuple = ()  # keywords given more than once (BFCL's decoder keeps the last value)

  def as_bfcl(self) -> dict:
    """The `{name: {param: value}}` form BFCL's decoder returns."""
    return {self.name: dict(self.args)}


_BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
    ast.BitAnd: operator.and_,
    ast.MatMult: operator.matmul,
}
_UNARY_OPERATORS = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
    ast.Invert: operator.invert,
}
_MAX_RESULT_BITS = 1_000_000  # refuse `9**9**9`-like arguments instead of hanging on them
_MAX_REPEATED_LENGTH = 1_000_000  # refuse `"a" * 10**12`-like arguments


def _check_arithmetic_size(op: ast.operator, left: Any, right: Any) -> None:
  """Raises ParseError for operations whose result could exhaust memory or time."""
  numbers = (int, float)
  if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, numbers):
    if abs(right) * max(abs(left), 2).bit_length() > _MAX_RESULT_BITS:
      raise ParseError("arithmetic argument too large to evaluate")
  if isinstance(op, ast.LShift) and isinstance(right, int) and right > _MAX_RESULT_BITS:
    raise ParseError("arithmetic argument too large to evaluate")
  if isinstance(op, ast.Mult):
    for sequence, count in ((left, right), (right, left)):
      if (
          isinstance(sequence, (str, bytes, list, tuple))
          and isinstance(count, int)
          and len(sequence) * count > _MAX_REPEATED_LENGTH
      ):
        raise ParseError("arithmetic argument too large to evaluate")


def _evaluate_literal_arithmetic(node: ast.AST) -> Any:
  """What Python's eval gives for an expression made of literals and operators (BFCL evals BinOp
  arguments; we never eval model text)."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
    return _UNARY_OPERATORS[type(node.op)](_evaluate_literal_arithmetic(node.operand))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
    left = _evaluate_literal_arithmetic(node.left)
    right = _evaluate_literal_arithmetic(node.right)
    _check_arithmetic_size(node.op, left, right)
    return _BINARY_OPERATORS[type(node.op)](left, right)
  if isinstance(node, ast.List):
    return [_evaluate_literal_arithmetic(e) for e in node.elts]
  if isinstance(node, ast.Tuple):
    return tuple(_evaluate_literal_arithmetic(e) for e in node.elts)
  if isinstance(node, ast.Set):
    return {_evaluate_literal_arithmetic(e) for e in node.elts}
  if isinstance(node, ast.Dict) and None not in node.keys:
    return {
        _evaluate_literal_arithmetic(k): _evaluate_literal_arithmetic(v)
        for k, v in zip(node.keys, node.values)
    }
  raise ParseError(f"cannot evaluate {ast.unparse(node)!r} (only literal arithmetic)")


def _decode_value(node: ast.AST) -> Any:
  """An argument's value, decoded exactly as BFCL's resolve_ast_by_type does."""
  if isinstance(node, ast.Constant):
    return "..." if node.value is Ellipsis else node.value
  if isinstance(node, ast.UnaryOp):
    # BFCL negates the operand's constant whatever the operator is.
    if not isinstance(node.operand, ast.Constant):
      raise ParseError(f"unsupported unary operand in {ast.unparse(node)!r}")
    try:
      return -node.operand.value
    except TypeError as e:
      raise ParseError(f"cannot negate {ast.unparse(node.operand)!r}") from e
  if isinstance(node, ast.List):
    return [_decode_value(e) for e in node.elts]
  if isinstance(node, ast.Dict):
    if None in node.keys:
      raise ParseError("dict unpacking (**) is not supported")
    decoded = {}
    for key_node, value_node in zip(node.keys, node.values):
      key = _decode_value(key_node)
      try:
        hash(key)
      except TypeError as e:
        raise ParseError(f"unhashable dict key {key!r}") from e
      decoded[key] = _decode_value(value_node)
    return decoded
  if isinstance(node, ast.BinOp):
    try:
      return _evaluate_literal_arithmetic(node)
    except ParseError:
      raise
    except Exception as e:  # ZeroDivisionError, TypeError, ... (BFCL's eval raises the same)
      raise ParseError(f"cannot evaluate {ast.unparse(node)!r}: {e}") from e
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Call):
    return ast.unparse(node) if not node.keywords else _decode_call(node).as_bfcl()
  if isinstance(node, ast.Tuple):
    return tuple(_decode_value(e) for e in node.elts)
  if isinstance(node, ast.Subscript):
    return ast.unparse(node.value) + "[" + ast.unparse(node.slice) + "]"
  raise ParseError(f"unsupported argument syntax {type(node).__name__}")


def _decode_call(node: ast.Call) -> Call:
  """Dotted name (attribute chain, plus the base when it is a plain name) and keyword args."""
  parts = []
  func = node.func
  while isinstance(func, ast.Attribute):
    parts.append(func.attr)
    func = func.value
  if isinstance(func, ast.Name):
    parts.append(func.id)
  args = {keyword.arg: _decode_value(keyword.value) for keyword in node.keywords}
  names = [keyword.arg for keyword in node.keywords if keyword.arg is not None]
  repeated = tuple(sorted({n for n in names if names.count(n) > 1}))
  return Call(".".join(reversed(parts)), args, positional=len(node.args), repeated=repeated)


def parse_calls(text: str) -> list[Call]:
  """The calls in a model answer, decoded like BFCL's default_decode_ast_prompting; raises
  ParseError when BFCL's decoder would fail."""
  if not isinstance(text, str):
    raise ParseError(f"answer is not a string: {type(text).__name__}")
  body = text.strip("`\n ")
  if not body.startswith("["):
    body = "[" + body
  if not body.endswith("]"):
    body = body + "]"
  body = body.strip().strip("'")
  try:
    tree = ast.parse(body, mode="eval").body
    if isinstance(tree, ast.Call):
      return [_decode_call(tree)]
    if not isinstance(tree, (ast.List, ast.Tuple, ast.Set)):
      raise ParseError(f"expected a list of calls, got {type(tree).__name__}")
    calls = []
    for element in tree.elts:
      if not isinstance(element, ast.Call):
        raise ParseError(f"list element {ast.unparse(element)!r} is not a call")
      calls.append(_decode_call(element))
    return calls
  except ParseError:
    raise
  except SyntaxError as e:
    raise ParseError(f"invalid Python syntax: {e}") from e
  except Exception as e:  # too deep, integer literal too long, ...: never out of the parser
    raise ParseError(f"{type(e).__name__}: {e}") from e


def _canonical_value(value: Any) -> str:
  if isinstance(value, dict):
    items = sorted((_canonical_value(k), _canonical_value(v)) for k, v in value.items())
    return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
  if isinstance(value, list):
    return "[" + ", ".join(_canonical_value(v) for v in value) + "]"
  if isinstance(value, tuple):
    return "(" + "".join(_canonical_value(v) + ", " for v in value) + ")"
  return repr(value)


def _canonical_call(call: Call) -> str:
  args = sorted(
      ("**" if name is None else name, _canonical_value(value)) for name, value in call.args.items()
  )
  return call.name + "(" + ", ".join(f"{name}={value}" for name, value in args) + ")"


def format_calls(calls: Sequence[tuple[str, dict]]) -> str:
  """`[name(param=repr(value), ...), ...]` in the given order: a string our parser (and BFCL's)
  decodes back to the same calls when values are literals."""
  rendered = []
  for name, args in calls:
    rendered.append(name + "(" + ", ".join(f"{param}={value!r}" for param, value in args.items()) + ")")
  return "[" + ", ".join(rendered) + "]"


# ----------------------------------------------------------------------------------------------
# The AST checker (BFCL's ast_checker, Python language path).
# ----------------------------------------------------------------------------------------------

PYTHON_TYPES = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
NESTED_TYPES = ("array", "tuple")  # types whose items are type-checked one level deep
_NORMALISED_AWAY = re.compile(r"[ ,./\-_*^]")


def normalise_string(text: str) -> str:
  """BFCL's string comparison key: drop spaces and ,./-_*^, lower-case, ' -> "."""
  return _NORMALISED_AWAY.sub("", text).lower().replace("'", '"')


def _normalise_if_string(value: Any) -> Any:
  return normalise_string(value) if type(value) is str else value


def _first_answer_type(acceptable: Sequence) -> Optional[type]:
  """The type of the first acceptable value that is not the "may be omitted" marker."""
  for value in acceptable:
    if value != "":
      return type(value)
  return None


def _type_check(
    param: str,
    value: Any,
    acceptable: Sequence,
    expected_name: str,
    expected_type: type,
    item_type: Optional[type],
) -> tuple[bool, bool, str]:
  """(valid, is_variable, error). A value whose type is the ground truth's own type (e.g. a string
  for an integer parameter whose gold value is a string) is a "variable" and compared verbatim."""
  answer_type = _first_answer_type(acceptable)
  is_variable = answer_type is not None and answer_type is not expected_type
  nested_failed = False
  if type(value) is expected_type:
    if item_type is None:
      return True, is_variable, ""
    for candidate in acceptable:
      if type(candidate) is not list or all(
          _type_check(param, item, candidate, item_type.__name__, item_type, None)[0] for item in value
      ):
        return True, is_variable, ""
    nested_failed = True
  error = (
      f"Nested type checking failed for parameter {param!r}. Expected outer type "
      f"{expected_name} with inner type {item_type}. Parameter value: {value!r}."
      if nested_failed
      else f"Incorrect type for parameter {param!r}. Expected type {expected_name}, got "
      f"{type(value).__name__}. Parameter value: {value!r}."
  )
  if answer_type is not None and type(value) is answer_type:
    return not nested_failed, True, "" if not nested_failed else error
  return False, is_variable, error


def _string_matches(value: str, acceptable: Sequence) -> bool:
  return normalise_string(value) in [normalise_string(a) for a in acceptable if type(a) is str]


def _list_matches(value: list, acceptable: Sequence) -> bool:
  """Top-level string elements normalised; "" (may be omitted) only matches the empty list."""
  normalised = [_normalise_if_string(v) for v in value]
  candidates = [[_normalise_if_string(e) for e in a] for a in acceptable if isinstance(a, (list, str))]
  return normalised in candidates


def _as_sequence(acceptable: Any) -> Sequence:
  """Acceptable values as BFCL indexes them (lists, or strings char by char); anything else
  would crash BFCL and matches nothing here."""
  return acceptable if isinstance(acceptable, (list, str)) else []


def _dict_matches(value: Any, acceptable: Sequence) -> bool:
  """Some acceptable dict (each key -> list of acceptable values) has every key of `value` with an
  acceptable value, and `value` has every key whose values do not include ""."""
  if not isinstance(value, dict):
    return False
  for candidate in acceptable:
    if candidate == "" or not isinstance(candidate, dict):
      continue
    if all(
        key in candidate
        and _normalise_if_string(item) in [_normalise_if_string(a) for a in _as_sequence(candidate[key])]
        for key, item in value.items()
    ) and all(key in value or "" in _as_sequence(allowed) for key, allowed in candidate.items()):
      return True
  return False


def _list_of_dicts_matches(value: list, acceptable: Sequence) -> bool:
  """Some acceptable list has the same length and matches dict by dict, in order."""
  for candidate in acceptable:
    if not isinstance(candidate, (list, str)) or len(value) != len(candidate):
      continue
    if all(_dict_matches(item, [expected]) for item, expected in zip(value, candidate)):
      return True
  return False


def check_call(function: dict, call: Call, gold_call: dict) -> Verdict:
  """One decoded call against one gold call `{name: {param: [acceptable values]}}`, judged with
  `function`'s schema (BFCL's simple_function_checker)."""
  gold_params = next(iter(gold_call.values()))
  name = function["name"]
  if call.name != name:
    return Verdict(False, f"Function name {name!r} not found in model output.")
  schema = function.get("parameters", {})
  properties = schema.get("properties", {})
  for param in schema.get("required", []):
    if param not in call.args:
      return Verdict(False, f"Missing required parameter: {param!r}.")
  for param, value in call.args.items():
    if param not in properties or param not in gold_params:
      return Verdict(False, f"Unexpected parameter: {param!r}.")
    acceptable = gold_params[param]
    expected_name = properties[param].get("type")
    expected_type = PYTHON_TYPES.get(expected_name)
    if expected_type is None:
      return Verdict(False, f"Unsupported type {expected_name!r} for parameter {param!r}.")
    item_type = None
    if expected_name in NESTED_TYPES:
      item_name = (properties[param].get("items") or {}).get("type")
      item_type = PYTHON_TYPES.get(item_name)
      if item_type is None:
        return Verdict(False, f"Unsupported item type {item_name!r} for parameter {param!r}.")
    if expected_name == "tuple" and type(value) is tuple:
      value = list(value)  # JSON ground truth has no tuples
    if expected_name == "float" and type(value) is int:
      value = float(value)  # Python's implicit int -> float
    valid, is_variable, error = _type_check(param, value, acceptable, expected_name, expected_type, item_type)
    if not valid:
      return Verdict(False, error)
    if not is_variable:
      if expected_type is dict:
        matched = _dict_matches(value, acceptable)
      elif expected_type is list and item_type is dict:
        matched = _list_of_dicts_matches(value, acceptable)
      elif expected_type is str:
        matched = _string_matches(value, acceptable)
      elif expected_type is list:
        matched = _list_matches(value, acceptable)
      else:
        matched = value in acceptable
    else:
      matched = value in acceptable
    if not matched:
      return Verdict(
          False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of " f"{acceptable}."
      )
  for param, acceptable in gold_params.items():
    if param not in call.args and "" not in acceptable:
      return Verdict(False, f"Optional parameter {param!r} not provided and not marked as " "optional.")
  return Verdict(True)


def _function_named(functions: Sequence[dict], name: str) -> Optional[dict]:
  return next((f for f in functions if f.get("name") == name), None)


def check_calls(
    category: str, functions: Sequence[dict], calls: Sequence[Call], gold: Sequence[dict]
) -> Verdict:
  """Decoded calls against the gold call list, routed like BFCL's ast_checker by category name."""
  if "parallel" in category:
    if len(calls) != len(gold):
      return Verdict(False, "Wrong number of functions.")
    matched: set[int] = set()
    for gold_index, gold_call in enumerate(gold):
      function = _function_named(functions, next(iter(gold_call)))
      if function is None:
        return Verdict(False, f"Gold function {next(iter(gold_call))!r} is not offered.")
      # Greedy, like BFCL: the first unmatched call that passes is taken.
      match = next(
          (
              i
              for i, call in enumerate(calls)
              if i not in matched and check_call(function, call, gold_call).correct
          ),
          None,
      )
      if match is None:
        return Verdict(
            False,
            "Could not find a matching function among index "
            f"{[i for i in range(len(calls)) if i not in matched]} of model output "
            f"for index {gold_index} of possible answers.",
        )
      matched.add(match)
    return Verdict(True)
  if "multiple" in category:
    if len(calls) != len(gold):
      return Verdict(False, "Wrong number of functions.")
    function = _function_named(functions, next(iter(gold[0])))
    if function is None:
      return Verdict(False, f"Gold function {next(iter(gold[0]))!r} is not offered.")
    return check_call(function, calls[0], gold[0])
  if len(calls) != 1:
    return Verdict(False, "Wrong number of functions.")
  return check_call(functions[0], calls[0], gold[0])


# ----------------------------------------------------------------------------------------------
# Loading rows.
# ----------------------------------------------------------------------------------------------


def package_version() -> Optional[str]:
  """The installed bfcl-eval's version (its data and the checker ours must equal), or None."""
  try:
    return importlib.metadata.version("bfcl-eval")
  except importlib.metadata.PackageNotFoundError:
    return None


def package_data_dir() -> str:
  """`bfcl_eval/data` of the installed bfcl-eval package, found without importing it."""
  spec = importlib.util.find_spec("bfcl_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "BFCL data not found: run `pip install --no-deps bfcl-eval`, or pass " "data_dir."
    )
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _read_json_lines(path: str) -> list[tuple[int, Any, Optional[str]]]:
  """(line number, parsed row or None, error or None) per non-blank line."""
  rows = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        rows.append((number, None, f"not UTF-8 text: {e}"))
        continue
      if not line.strip():
        continue
      try:
        rows.append((number, json.loads(line), None))
      except json.JSONDecodeError as e:
        rows.append((number, None, f"invalid JSON: {e}"))
  return rows


def _last_user_turn(question: Any) -> tuple[list[dict], str]:
  """(the last turn's messages, the content of its last user message); raises ValueError."""
  if not isinstance(question, list) or not question or not isinstance(question[-1], list):
    raise ValueError("'question' is not a non-empty list of turns")
  messages = question[-1]
  if not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages
  ):
    raise ValueError("a message lacks a string role or content")
  users = [m["content"] for m in messages if m["role"] == "user"]
  if not users:
    raise ValueError("the last turn has no user message")
  return messages, users[-1]


def _check_functions(functions: Any) -> None:
  if not isinstance(functions, list) or not functions:
    raise ValueError("'function' is not a non-empty list")
  for function in functions:
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
      raise ValueError("a function has no string name")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties"), dict):
      raise ValueError(f"function {function['name']!r} has no parameters.properties dict")
    if not all(isinstance(p, dict) for p in parameters["properties"].values()):
      raise ValueError(f"function {function['name']!r} has a non-dict parameter schema")
    if not isinstance(parameters.get("required", []), list):
      raise ValueError(f"function {function['name']!r} has a non-list 'required'")


def _check_ground_truth(gold: Any, functions: list[dict]) -> None:
  if not isinstance(gold, list) or not gold:
    raise ValueError("'ground_truth' is not a non-empty list")
  offered = {f["name"] for f in functions}
  for call in gold:
    if not isinstance(call, dict) or len(call) != 1:
      raise ValueError("a ground-truth call is not a one-key {name: params} dict")
    name, params = next(iter(call.items()))
    if name not in offered:
      raise ValueError(f"ground-truth function {name!r} is not among the offered functions")
    if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
      raise ValueError(f"ground truth of {name!r} is not a dict of acceptable-value lists")


def _preferred_value(acceptable: Any, required: bool = False) -> tuple[bool, Any]:
  """(include?, value): the first acceptable value, where a leading "" (may be omitted) means
  leave the parameter out unless it is required, in which case the first non-"" value is used."""
  values = acceptable if isinstance(acceptable, list) else [acceptable]
  if values and values[0] == "" and not required:
    return False, None
  for value in values:
    if value != "":
      return True, value
  return False, None


def _gold_value(value: Any, schema: dict) -> Any:
  """A concrete value from a gold value: dict-typed gold values map each key to a list of
  acceptable values, so pick from each (and recurse into lists of such dicts)."""
  expected = schema.get("type")
  item_schema = schema.get("items") or {}
  if expected == "dict" and isinstance(value, dict):
    return _gold_dict(value)
  if expected in NESTED_TYPES and item_schema.get("type") == "dict" and isinstance(value, list):
    return [_gold_dict(v) if isinstance(v, dict) else v for v in value]
  return value


def _gold_dict(acceptable_by_key: dict) -> dict:
  concrete = {}
  for key, acceptable in acceptable_by_key.items():
    include, value = _preferred_value(acceptable)
    if include:
      concrete[key] = value
  return concrete


class FunctionCallingTask:
  """The `Task` protocol for function calling, with BFCL's prompt, decoding and AST checker: the
  shared base of every function-calling benchmark. A subclass loads `Example`s whose `gold` is in
  BFCL's possible-answer form (a list of `{function name: {parameter: [acceptable values]}}`, ""
  among the values: may be omitted; an empty list: the answer is to call nothing)."""

  name: str
  _examples: list[Example]
  num_examples: Optional[int] = None
  data_version: str = ""

  def __init__(self):
    self._skipped: list[tuple[str, str]] = []
    self._row_messages: dict[str, tuple[str, list[dict]]] = {}

  def _category(self, example: Example) -> str:
    """The checker's routing: several gold calls in any order, exactly one, or none."""
    if not example.gold:
      return IRRELEVANCE
    return "parallel" if len(example.gold) > 1 else "multiple"

  # -- the Task protocol --

  def examples(self) -> list[Example]:
    return list(self._examples[: self.num_examples])

  @property
  def skipped(self) -> list[tuple[str, str]]:
    return list(self._skipped)

  def prompt(self, example: Example) -> Messages:
    """BFCL's system prompt (functions as JSON with its Python hint) then the user turn. For a
    dataset row whose turn has its own system message, BFCL puts its prompt in front of it."""
    system = system_prompt(with_python_hint(example.functions))
    question, messages = self._row_messages.get(example.id, (None, None))
    if messages is None:
      return [{"role": "system", "content": system}, {"role": "user", "content": example.question}]
    if question != example.question:  # another request for this row (a synthesized pair's): the
      # row's own system message (the agent's instructions) stays, its conversation does not
      messages = [m for m in messages[:1] if m["role"] == "system"]
      messages += [{"role": "user", "content": example.question}]
    messages = copy.deepcopy(messages)
    if messages[0]["role"] == "system":
      messages[0]["content"] = system + "\n\n" + messages[0]["content"]
    else:
      messages.insert(0, {"role": "system", "content": system})
    return messages

  def demonstration(self, example: Example, answer: str) -> Messages:
    """The functions as BFCL lists them (with its Python hint), the request, then the answer: a
    shown example's functions are not the input's, so its turn names them."""
    tools = _AVAILABLE_TOOLS.format(functions=json.dumps(with_python_hint(example.functions), indent=4))
    return [
        {"role": "user", "content": f"{tools}\n{example.question}"},
        {"role": "assistant", "content": answer},
    ]

  def candidates(self, example: Example) -> list[str]:
    return ["[" + function["name"] + "(" for function in example.functions]

  def check(self, example: Example, answer: str) -> Verdict:
    """BFCL's verdict, routed by `_category` (simple / multiple / parallel); an example whose gold
    is the empty call list is judged by the irrelevance rule."""
    if example.gold is None:
      return Verdict(False, "No ground truth for this example.")
    try:
      calls = parse_calls(answer)
    except ParseError as e:
      if not example.gold:
        return Verdict(True)  # irrelevance: an answer that is not a call list makes no call
      return Verdict(False, f"Invalid syntax. Failed to decode AST. {e}")
    if not example.gold:
      return (
          Verdict(True)
          if not calls
          else Verdict(False, "Valid syntax. Successfully decode AST when it should not.")
      )
    return check_calls(self._category(example), example.functions, calls, example.gold)

  def canonical(self, answer: str) -> Optional[str]:
    """Calls sorted, keyword arguments sorted, values as canonical reprs (dict keys sorted), so
    answers BFCL decodes to the same calls in any order vote together. Values are compared as
    written: 'Paris' / 'paris' and 1 / 1.0 vote apart, though BFCL may accept both."""
    try:
      calls = parse_calls(answer)
    except ParseError:
      return None
    return "[" + ", ".join(sorted(_canonical_call(call) for call in calls)) + "]"

  def gold_answer(self, example: Example) -> str:
    """The gold calls, each parameter with its first acceptable value, e.g.
    `[triangle_properties.get(side1=5, side2=4, side3=3)]`. A parameter whose first acceptable
    value is "" (may be omitted) is left out unless the schema requires it (then its first non-""
    value is used); so are gold parameters missing from the function's schema, which BFCL would
    reject as unexpected. Irrelevance (no gold call): "[]", which decodes to no call."""
    calls = []
    for gold_call in example.gold or []:
      name, params = next(iter(gold_call.items()))
      schema = (_function_named(example.functions, name) or {}).get("parameters") or {}
      properties = schema.get("properties") or {}
      required = schema.get("required") or []
      args = {}
      for param, acceptable in params.items():
        include, value = _preferred_value(acceptable, required=param in required)
        if include and param in properties:
          args[param] = _gold_value(value, properties[param])
      calls.append((name, args))
    return format_calls(calls)

  @functools.cached_property
  def _calls_per_answer(self) -> tuple[int, int]:
    """The fewest and the most calls a gold answer of this dataset makes (all its rows)."""
    counts = [len(ex.gold) for ex in self._examples if ex.gold is not None] or [1]
    return min(counts), max(counts)

  def validate(self, example: Example, answer: str) -> Optional[str]:
    """Why `answer` (a synthesized pair's call for `example`'s functions) cannot be an answer of
    this task, or None. What the dataset's answers look like (no call, several) is read from all
    its gold answers, never from `example`'s own: a pair written for a test input must not learn
    its label."""
    try:
      calls = parse_calls(answer)
    except ParseError as e:
      return f"unparseable: {e}"
    fewest, most = self._calls_per_answer
    if not calls and fewest > 0:
      return "no call (only irrelevance inputs are answered with none)"
    if len(calls) > max(most, 1):
      return f"{len(calls)} calls (this task's answers make at most {max(most, 1)})"
    for call in calls:
      if call.repeated:
        return f"{call.name}: argument {call.repeated[0]!r} given more than once"
      function = _function_named(example.functions, call.name)
      if function is None:
        return f"function {call.name!r} is not offered"
      if call.positional:
        return f"{call.name}: positional arguments are not allowed (use name=value)"
      schema = function.get("parameters") or {}
      properties = schema.get("properties") or {}
      for param in call.args:
        if param not in properties:
          return f"{call.name}: unknown argument {param!r}"
      for param in schema.get("required") or []:
        if param not in call.args:
          return f"{call.name}: missing required argument {param!r}"
    return None


class BfclTask(FunctionCallingTask):
  """One BFCL v4 category. Rows are read once at construction; malformed ones go to `skipped`."""

  def __init__(
      self,
      category: str = DEFAULT_CATEGORY,
      num_examples: Optional[int] = None,
      data_dir: Optional[str] = None,
  ):
    if category not in CATEGORIES:
      raise ValueError(f"Unknown BFCL category {category!r}; valid categories: " f"{', '.join(CATEGORIES)}.")
    super().__init__()
    self.category = category
    self.name = f"bfcl_{category}"
    self.data_dir = data_dir or package_data_dir()
    self.num_examples = num_examples
    self.data_version = f"bfcl-eval {package_version()}"  # its data (or task.data_dir's) and checker
    self._examples = self._load()

  def _category(self, example: Example) -> str:
    return self.category

  # -- loading --

  def _path(self, *parts: str) -> str:
    path = os.path.join(self.data_dir, *parts)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"BFCL data file {path} does not exist; install the data with "
          "`pip install --no-deps bfcl-eval`, or set --config.task.data_dir to "
          "a folder with BFCL's data files."
      )
    return path

  def _load_answers(self) -> dict[str, Any]:
    if self.category == IRRELEVANCE:
      return {}  # no possible_answer file: the correct answer is making no call
    answers: dict[str, Any] = {}
    path = self._path("possible_answer", f"{VERSION_PREFIX}_{self.category}.json")
    for number, row, error in _read_json_lines(path):
      if error is None and not (
          isinstance(row, dict) and isinstance(row.get("id"), str) and "ground_truth" in row
      ):
        error = "possible answer lacks a string 'id' or 'ground_truth'"
      if error is not None:
        self._skipped.append((f"possible_answer line {number}", error))
      elif row["id"] in answers:
        self._skipped.append((row["id"], "duplicate possible answer"))
      else:
        answers[row["id"]] = row["ground_truth"]
    return answers

  def _load(self) -> list[Example]:
    answers = self._load_answers()
    examples: list[Example] = []
    seen: set[str] = set()
    questions = self._path(f"{VERSION_PREFIX}_{self.category}.json")
    for number, row, error in _read_json_lines(questions):
      row_id = row.get("id") if isinstance(row, dict) else None
      label = row_id if isinstance(row_id, str) else f"line {number}"
      if error is not None:
        self._skipped.append((label, error))
        continue
      try:
        if not isinstance(row_id, str):
          raise ValueError("row has no string 'id'")
        if row_id in seen:
          raise ValueError("duplicate id")
        messages, question = _last_user_turn(row.get("question"))
        functions = row.get("function")
        _check_functions(functions)
        if self.category == IRRELEVANCE:
          gold: list = []
        elif row_id not in answers:
          raise ValueError("no possible answer for this id")
        else:
          gold = answers[row_id]
          _check_ground_truth(gold, functions)
      except ValueError as e:
        self._skipped.append((label, str(e)))
        continue
      seen.add(row_id)
      self._row_messages[row_id] = (question, messages)
      examples.append(Example(id=row_id, question=question, functions=tuple(functions), gold=gold))
    return examples
