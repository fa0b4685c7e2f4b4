"""Well-formed tool-call decoding: `[name(arg=value, ...)]` with names taken from the schema.

Small models asked for a call often write prose, positional arguments or invented parameter names.
This decoder builds the call in stages, batched over rows: the function name is the given (or
best-scoring) candidate; then, repeatedly, the model's likelihood picks the next keyword among the
schema's unused parameter names or the closing `)]` (closing is allowed once every required
parameter is present); then the model writes the value, cut at the end of the first complete Python
literal. Rows may each use their own adapter (`lora_per_row`), so adapted models decode in one call.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Optional, Sequence

import jax
import numpy as np

from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text.sampler import SamplingParams
from ttsi_jax.ttsi import uncertainty

CLOSE = ")]"


def leading_literal(text: str) -> Optional[str]:
  """The first complete Python literal in `text` followed by ',' or ')'; an unquoted word there
  (`city=Paris)`) becomes a quoted string. None if neither is found."""
  for i, ch in enumerate(text):
    if ch not in ",)":
      continue
    candidate = text[:i].strip()
    if not candidate:
      return None
    try:
      ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      if re.fullmatch(r"[\w .:-]+", candidate):
        return repr(candidate)
      continue
    return candidate
  return None


@dataclasses.dataclass
class _Row:
  text: str  # the call so far, e.g. "[get_weather(city='Paris'"
  function: dict
  used: list  # keyword names already written
  pending: str = ""  # the option chosen at this stage: ", name=" or CLOSE
  done: bool = False


class CallDecoder:
  """Stage-wise constrained decoding over a prefilled batch (see module docstring).

  The prompt is prefilled once; each stage appends the call written so far to that cached prefix,
  scores the next options against it and writes the value from it, so a stage costs tens of
  tokens, not a new pass over the prompt.
  """

  def __init__(self, sampler: sampler_lib.Sampler, tokenizer, max_value_tokens: int = 24,
               max_args: int = 10):
    self.sampler = sampler
    self.tokenizer = tokenizer
    self.max_value_tokens = max_value_tokens
    self.max_args = max_args

  def decode(self, pre: sampler_lib.Prefilled, functions: Sequence[Sequence[dict]],
             names: Sequence[str], leads: Optional[Sequence[str]] = None,
             sampling: SamplingParams = SamplingParams(),
             rng: Optional[jax.Array] = None) -> list[str]:
    """One call per prefilled row: `names[i]` (one of `functions[i]`) with schema keywords.

    `leads[i]` is text between the prefilled prompt and the call (e.g. "Call: "), "" by default.
    """
    rng = jax.random.key(0) if rng is None else rng
    leads = leads or [""] * pre.rows
    enc = self.tokenizer.encode
    rows = []
    for name, funcs in zip(names, functions):
      function = next((f for f in funcs if f.get("name") == name), None)
      if function is None:
        raise ValueError(f"Function {name!r} is not among the offered functions.")
      rows.append(_Row(text=f"[{name}(", function=function, used=[]))
    value_sampling = dataclasses.replace(sampling, max_new_tokens=self.max_value_tokens)
    for step in range(self.max_args + 1):
      active = [not r.done for r in rows]
      if not any(active):
        break
      here = self.sampler.extend(pre, [enc(lead + r.text) if a else []
                                       for lead, r, a in zip(leads, rows, active)])
      options = [self._options(r) if a else [CLOSE] for r, a in zip(rows, active)]
      loglik, _ = uncertainty.score_after(self.sampler, here, [[enc(o) for o in opts]
                                                               for opts in options])
      writing = [False] * len(rows)
      for i, row in enumerate(rows):
        if not active[i]:
          continue
        row.pending = options[i][int(np.argmax(loglik[i, :len(options[i])]))]
        if row.pending == CLOSE or step == self.max_args or here.free() < 64:
          row.text += CLOSE
          row.done = True
        else:
          writing[i] = True
      if not any(writing):
        continue
      outs = self.sampler.continue_(here, [enc(r.pending) if w else []
                                           for r, w in zip(rows, writing)],
                                    value_sampling, jax.random.fold_in(rng, step), writing)
      for i, out in enumerate(outs):
        if not writing[i]:
          continue
        row = rows[i]
        value = leading_literal(self.tokenizer.decode(out))
        if value is None:  # no usable value: close the call without this argument
          row.text += CLOSE
          row.done = True
          continue
        row.text += row.pending + value
        row.used.append(row.pending.lstrip(", ").rstrip("="))
    return [r.text for r in rows]

  @staticmethod
  def _options(row: _Row) -> list[str]:
    params = row.function.get("parameters", {}) or {}
    properties = list((params.get("properties") or {}).keys())
    required = [p for p in params.get("required", []) or [] if p in properties]
    sep = ", " if row.used else ""
    unused = [p for p in properties if p not in row.used]
    options = [f"{sep}{p}=" for p in unused]
    if all(p in row.used for p in required):
      options.append(CLOSE)
    return options or [CLOSE]

