"""Well-formed tool-call decoding: `[name(arg=value, ...)]` with names taken from the schema.

Small models asked for a call often write prose, positional arguments or invented parameter names.
This decoder builds the call in stages, batched over rows: the function name is the given (or
best-scoring) candidate; then, repeatedly, the model's likelihood picks the next keyword among the
schema's unused parameter names or the closing `)]` (closing is allowed once every required
parameter is present); then the model writes `=` and the value, cut at the end of the first complete
Python literal. Rows may each use their own adapter (`lora_per_row`), so adapted models decode in one
call.

Token healing: BPE merges punctuation runs (`='`, `=[`, `',`, `')]`), so text forced up to a `=` or a
closing quote would make the model continue from a tokenization it never saw. Each stage therefore
backs off to the longest token prefix shared by the call so far and every option appended to it
(options are scored on the joint tokenization), forced text ends at a keyword's last letter, and
the model writes the `=` together with the value's first characters itself.
"""

from __future__ import annotations

import ast
import io
import dataclasses
import re
import tokenize
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text.sampler import SamplingParams, bucket
from ttsi_jax.text import scoring

CLOSE = ")]"


def _has_set(value) -> bool:
  if isinstance(value, (set, frozenset)):
    return True
  if isinstance(value, dict):
    return any(map(_has_set, value.values()))
  return isinstance(value, (list, tuple)) and any(map(_has_set, value))


def leading_literal(text: str, as_text: bool = False) -> Optional[str]:
  """The first complete literal in `text` followed by ',' or ')', sets excluded (BFCL's decoder
  rejects them), as the decoder writes it; None if none is found.

  A value is read as a Python literal in which a bare name is a string, as BFCL's decoder reads
  one (`[Paris, London]`), but JSON's `true`, `false` and `null` are their Python values, and a
  unary `+` before a number is left out (BFCL's decoder negates a unary operand whatever its
  operator: `+5` would read as -5). An unquoted run of words (`city=New York)`) becomes a quoted
  string. Where the value had to be read so, or carries a comment (which would swallow the `)]`
  written after it), it is written back as Python (`ast.unparse`); otherwise as the model wrote
  it. With `as_text` (the parameter is a string), unquoted text that is no literal but closes
  its brackets (`function=3x^2 + 2x - 1)`) becomes a quoted string too, without its comment."""
  for i, ch in enumerate(text):
    if ch not in ",)":
      continue
    candidate = text[:i].strip()
    if not candidate:
      return None
    written = _as_python(candidate)
    if written is None:
      if re.fullmatch(r"[\w .:-]+", candidate):
        return repr(candidate)
      meant = _unquoted_text(candidate) if as_text else None
      if meant:
        return repr(meant)
      continue
    if written:
      return written
  return None


_JSON_CONSTANTS = {"true": True, "false": False, "null": None}


class _AsLiteral(ast.NodeTransformer):
  """Bare names to strings as written (JSON's constants to theirs), a unary `+` before a number
  left out."""

  def __init__(self, source: str):
    self.source, self.changed = source, False

  def visit_Name(self, node):
    self.changed = True
    name = ast.get_source_segment(self.source, node)  # node.id is NFKC-normalized
    return ast.copy_location(ast.Constant(_JSON_CONSTANTS.get(name, name)), node)

  def visit_UnaryOp(self, node):
    self.generic_visit(node)
    number = isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float, complex))
    if isinstance(node.op, ast.UAdd) and number:
      self.changed = True
      return node.operand
    return node


def _unquoted_text(candidate: str) -> Optional[str]:
  """The text the model meant, where it has no quotes and closes every bracket in order: up to a
  comment (outside quotes, "#" starts one); None otherwise, or where only a comment is left."""
  if any(q in candidate for q in _QUOTES):
    return None
  text = candidate.split("#", 1)[0].strip()
  open_brackets = []
  for ch in text:
    if ch in _OPEN:
      open_brackets.append(_CLOSE_BRACKETS[_OPEN.index(ch)])
    elif ch in _CLOSE_BRACKETS and (not open_brackets or open_brackets.pop() != ch):
      return None
  return None if open_brackets else text or None


def _as_python(candidate: str) -> Optional[str]:
  """`candidate` as the decoder writes it ("" for a literal holding a set), or None where it is
  no literal."""
  try:
    tree = ast.parse(candidate, mode="eval")
    reader = _AsLiteral(candidate)
    tree = reader.visit(tree)
    value = ast.literal_eval(tree.body)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return None
  if _has_set(value):
    return ""
  return ast.unparse(tree) if reader.changed or _has_comment(candidate) else candidate


def _has_comment(text: str) -> bool:
  try:
    return any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(text).readline))
  except (tokenize.TokenError, SyntaxError):
    return "#" in text


# Bracket depths the value rule tells apart; deeper nesting counts as this depth less one, so a
# closing bracket there may end a value early (`CallDecoder._values` then decodes it in full).
LITERAL_DEPTH = 8
_QUOTES = "'\""
_OPEN, _CLOSE_BRACKETS = "([{", ")]}"


def _literal_state(quote: int, escaped: int, depth: int) -> int:
  return (quote * 2 + escaped) * LITERAL_DEPTH + depth


def literal_end_states(pieces: Sequence[str]) -> np.ndarray:
  """The rule (`sampler._decode`'s end_states_VS, int8 [V, S]) that ends a value written after a
  keyword at its first ',' or ')' outside quotes and brackets: the first place where
  `leading_literal` can find a complete literal. States: (open quote: none, ' or "; after a
  backslash in a quote; bracket depth); the last, S - 1, is the end. Tokens with none of the
  characters the rule reads leave every state as it is."""
  end = 3 * 2 * LITERAL_DEPTH
  table_VS = np.tile(np.arange(end + 1, dtype=np.int8), (len(pieces), 1))
  special = set(_QUOTES + _OPEN + _CLOSE_BRACKETS + ",\\")
  for v, piece in enumerate(pieces):
    if special.intersection(piece):
      for quote in range(3):
        for escaped in range(2):
          for depth in range(LITERAL_DEPTH):
            table_VS[v, _literal_state(quote, escaped, depth)] = _read(piece, quote, escaped, depth, end)
  return table_VS


def _read(piece: str, quote: int, escaped: int, depth: int, end: int) -> int:
  """`literal_end_states`' state after `piece` from state (quote, escaped, depth)."""
  for ch in piece:
    if quote and escaped:
      escaped = 0
    elif quote:
      escaped = int(ch == "\\")
      quote = 0 if ch == _QUOTES[quote - 1] else quote
    elif ch in _QUOTES:
      quote = _QUOTES.index(ch) + 1
    elif ch in _OPEN:
      depth = min(depth + 1, LITERAL_DEPTH - 1)
    elif depth == 0 and ch in ",)":
      return end
    elif ch in _CLOSE_BRACKETS:
      depth = max(depth - 1, 0)
  return _literal_state(quote, escaped, depth)


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
  """Length of the longest prefix shared by all token sequences."""
  n = min(len(s) for s in sequences)
  for i in range(n):
    if any(s[i] != sequences[0][i] for s in sequences[1:]):
      return i
  return n


@dataclasses.dataclass
class _Row:
  text: str  # the call so far, e.g. "[get_weather(city='Paris'"
  function: dict
  used: list  # keyword names already written
  pending: str = ""  # the option chosen at this stage: ", name=" or CLOSE
  done: bool = False
  cut: str = ""  # the limit that closed the call before the model chose to (`decode_noting`)

  @property
  def parameters(self) -> tuple[dict, list]:
    """The function's parameter schemas by name, and the names it requires."""
    params = self.function.get("parameters", {}) or {}
    return params.get("properties") or {}, params.get("required", []) or []


class CallDecoder:
  """Stage-wise constrained decoding over a prefilled batch (see module docstring).

  The prompt is prefilled once; each stage scores the next options after the call written so
  far and writes the value after it, both continuing that cached prefix (the call's tokens fed in
  the same pass as the options or the value), so a stage costs tens of tokens, not a new pass over
  the prompt, and no copy of the cache holding the call.
  """

  def __init__(self, sampler: sampler_lib.Sampler, tokenizer, max_value_tokens: int = 24, max_args: int = 10):
    self.sampler = sampler
    self.tokenizer = tokenizer
    self.max_value_tokens = max_value_tokens
    self.max_args = max_args
    # Tokens that begin with "=" but not "==": the healed boundary after a keyword.
    pieces = [tokenizer.decode([i]) for i in range(sampler.config.vocab_size)]
    self.equals_mask_V = jnp.asarray([p.startswith("=") and not p.startswith("==") for p in pieces])
    # Tokens that begin with "(": the healed end of a candidate action "[name(" (BPE writes "()]",
    # "('" or "([" as one token), scored by H.
    self.open_mask_V = jnp.asarray([p.startswith("(") for p in pieces])
    # A value's decoding ends where its literal can first be complete, not after max_value_tokens.
    self.value_end_VS = literal_end_states(pieces)
    self.value_end_device_VS = jnp.asarray(self.value_end_VS)

  def decode(self, *args, **kwargs) -> list[str]:
    """One call per prefilled row: `names[i]` (one of `functions[i]`) with schema keywords.

    `leads[i]` is text between the prefilled prompt and the call (e.g. "Call: "), "" by default;
    `rng`: one key or one per row (see `sampler.row_keys`); rows not `active` get "" and no work.
    """
    return self.decode_noting(*args, **kwargs)[0]

  def decode_noting(
      self,
      pre: sampler_lib.Prefilled,
      functions: Sequence[Sequence[dict]],
      names: Sequence[str],
      leads: Optional[Sequence[str]] = None,
      sampling: SamplingParams = SamplingParams(),
      rng: Optional[jax.Array] = None,
      active: Optional[Sequence[bool]] = None,
  ) -> tuple[list[str], list[str]]:
    """`decode`'s calls, and per row the limit that closed its call before the model chose to
    ("" where none did): decoding.max_args, a value unfinished within decoding.max_value_tokens,
    or the context. An argument left out for a limit is not the model's choice."""
    leads = leads or [""] * pre.rows
    enc = self.tokenizer.encode
    rows = []
    for i, (name, funcs) in enumerate(zip(names, functions)):
      if active is not None and not active[i]:
        rows.append(_Row(text="", function={}, used=[], done=True))
        continue
      function = next((f for f in funcs if f.get("name") == name), None)
      if function is None:
        raise ValueError(f"Function {name!r} is not among the offered functions.")
      rows.append(_Row(text=f"[{name}(", function=function, used=[]))
    value_sampling = dataclasses.replace(sampling, max_new_tokens=self.max_value_tokens)
    for step in range(self.max_args + 1):
      active = [not r.done for r in rows]
      if not any(active):
        break
      options = [self._options(r) if a else [CLOSE] for r, a in zip(rows, active)]
      texts = [lead + r.text for lead, r in zip(leads, rows)]
      text_ids = [enc(text) if a else [] for text, a in zip(texts, active)]
      option_ids = [[enc(text + o) for o in opts] for text, opts in zip(texts, options)]
      heal = [_common_prefix([ids] + opts) if a else 0 for ids, opts, a in zip(text_ids, option_ids, active)]
      if not self._close_rows_without_room(pre, rows, active, option_ids, heal):
        continue
      # The options are scored after the call so far (up to the healed boundary), fed as tokens
      # that all of a row's options see; the values continue from the prompt with it too.
      calls = [ids[:h] if a else [] for ids, h, a in zip(text_ids, heal, active)]
      # A keyword's score includes the probability that the next token starts with "=".
      scored = [
          [ids[h:] + ([] if o == CLOSE else [scoring.TAIL]) for o, ids in zip(opts, row)]
          if a
          else [enc(CLOSE)]
          for opts, row, h, a in zip(options, option_ids, heal, active)
      ]
      loglik, _ = scoring.score_after(self.sampler, pre, scored, self.equals_mask_V, calls)
      writing = [False] * len(rows)
      for i, row in enumerate(rows):
        if not active[i]:
          continue
        row.pending = options[i][int(np.argmax(loglik[i, : len(options[i])]))]
        if row.pending == CLOSE or step == self.max_args:
          row.cut = "" if row.pending == CLOSE else f"decoding.max_args ({self.max_args})"
          row.text += CLOSE
          row.done = True
        else:
          writing[i] = True
      if not any(writing):
        continue
      # The model writes "=" itself (healed); a row that does not is retried with "=" forced.
      values = self._values(
          pre, texts, calls, rows, writing, "", value_sampling, sampler_lib.fold_in(rng, 2 * step)
      )
      retry = [w and v is None for w, v in zip(writing, values)]
      if any(retry):
        forced = self._values(
            pre, texts, calls, rows, retry, "=", value_sampling, sampler_lib.fold_in(rng, 2 * step + 1)
        )
        values = [f if r else v for v, f, r in zip(values, forced, retry)]
      for i, row in enumerate(rows):
        if not writing[i]:
          continue
        if values[i] is None:  # no usable value: close the call without this argument
          row.cut = (
              f"no complete value of {row.pending.lstrip(', ')!r} (within decoding.max_value_tokens, "
              f"{self.max_value_tokens}, the model wrote no literal it takes)"
          )
          row.text += CLOSE
          row.done = True
          continue
        row.text += row.pending + "=" + values[i]
        row.used.append(row.pending.lstrip(", "))
    return [r.text for r in rows], [r.cut for r in rows]

  def _close_rows_without_room(self, pre, rows, active, option_ids, heal) -> bool:
    """Closes the calls that leave no free cache slots for this stage, the most demanding first;
    False when no row is left. A stage holds, after the prompt, the call text (up to the healed
    boundary) and either all options (scored in one packed row) or one keyword and its value."""

    def need(i):  # (call text and all options, call text and one keyword) in tokens, row i alone
      tails = [len(o) - heal[i] + 1 for o in option_ids[i]]  # + 1: the "=" (TAIL or forced)
      return heal[i] + sum(tails), heal[i] + max(tails)

    while any(active):
      needs = {i: need(i) for i in range(len(rows)) if active[i]}
      scored = bucket(max(n[0] for n in needs.values()), 8)
      valued = bucket(max(n[1] for n in needs.values()), 8) + self.max_value_tokens
      if max(scored, valued) <= pre.free():
        return True
      worst = max(needs, key=lambda i: needs[i][0] + needs[i][1])
      rows[worst].cut = "the context (no cache room for another argument)"
      rows[worst].text += CLOSE
      rows[worst].done = True
      active[worst] = False
    return False

  def _values(
      self,
      pre: sampler_lib.Prefilled,
      texts,
      calls,
      rows,
      writing,
      forced: str,
      sampling: SamplingParams,
      rng: jax.Array,
  ) -> list[Optional[str]]:
    """Each writing row's value after `text + keyword + forced` (fed as the row's call tokens up
    to the healed boundary, then the rest); None where the model wrote no `=` (when not forced) or
    no complete literal.

    Decoding ends a row at the first ',' or ')' outside quotes and brackets (`literal_end_states`);
    where no literal is complete there, the row is decoded again to max_new_tokens. Every value is
    the one a decode to max_new_tokens finds: `leading_literal` takes the first complete literal,
    and both decodes write the same tokens up to the end."""
    enc = self.tokenizer.encode
    extensions = [
        call + enc(text + row.pending + forced)[len(call) :] if w else []
        for text, call, row, w in zip(texts, calls, rows, writing)
    ]
    outs = self.sampler.continue_(pre, extensions, sampling, rng, writing, self.value_end_device_VS)
    values = [self._value(out, forced, row) if w else None for out, row, w in zip(outs, rows, writing)]
    again = [  # a row that wrote "=" and ended with no complete literal: decode it in full
        w and v is None and self._after_equals(out, forced) is not None and self._ended(out)
        for out, v, w in zip(outs, values, writing)
    ]
    if any(again):
      outs = self.sampler.continue_(pre, extensions, sampling, rng, again)
      values = [
          self._value(out, forced, row) if a else v for out, row, v, a in zip(outs, rows, values, again)
      ]
    return values

  def _after_equals(self, out: Sequence[int], forced: str) -> Optional[str]:
    """The text after "=" where the row's text begins with it (spaces aside), else None."""
    head, eq, rest = (forced + self.tokenizer.decode(out)).lstrip().partition("=")
    return rest if eq and not head else None

  def _value(self, out: Sequence[int], forced: str, row: _Row) -> Optional[str]:
    rest = self._after_equals(out, forced)
    schema = row.parameters[0].get(row.pending.lstrip(", "), {})
    return None if rest is None else leading_literal(rest, as_text=schema.get("type") == "string")

  def _ended(self, out: Sequence[int]) -> bool:
    """Whether `literal_end_states` ended these tokens (not a stop token or max_new_tokens)."""
    state = 0
    for token in out:
      state = int(self.value_end_VS[token, state])
    return state == self.value_end_VS.shape[1] - 1

  @staticmethod
  def _options(row: _Row) -> list[str]:
    schemas, required = row.parameters
    properties = list(schemas)
    required = [p for p in required if p in properties]
    sep = ", " if row.used else ""
    unused = [p for p in properties if p not in row.used]
    options = [f"{sep}{p}" for p in unused]
    if all(p in row.used for p in required):
      options.append(CLOSE)
    return options or [CLOSE]
