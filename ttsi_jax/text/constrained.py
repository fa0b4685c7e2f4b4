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
from typing import Optional, Sequence

import jax
import numpy as np

from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text.sampler import SamplingParams
from ttsi_jax.ttsi import uncertainty

CLOSE = ")]"


def leading_literal(text: str) -> Optional[str]:
  """The first complete Python literal in `text` that is followed by ',' or ')' (None if none)."""
  for i, ch in enumerate(text):
    if ch not in ",)":
      continue
    candidate = text[:i].strip()
    if not candidate:
      return None
    try:
      ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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
  """Stage-wise constrained decoding over a batch of contexts (see module docstring)."""

  def __init__(self, sampler: sampler_lib.Sampler, tokenizer, max_value_tokens: int = 32,
               max_args: int = 12):
    self.sampler = sampler
    self.tokenizer = tokenizer
    self.max_value_tokens = max_value_tokens
    self.max_args = max_args

  def _score(self, contexts: Sequence[str], options: Sequence[Sequence[str]], lora, per_row):
    enc = self.tokenizer.encode
    packed = uncertainty.pack([enc(c) for c in contexts],
                              [[enc(o) for o in opts] for opts in options], self.sampler.pad_id)
    loglik, _ = uncertainty.score(self.sampler.config, self.sampler.params, packed, lora, per_row)
    return np.asarray(loglik)

  def decode(self, contexts: Sequence[str], functions: Sequence[Sequence[dict]],
             names: Sequence[str], sampling: SamplingParams = SamplingParams(),
             rng: Optional[jax.Array] = None, lora=None, lora_per_row: bool = False) -> list[str]:
    """One call per row: `contexts[i]` is the text right before the call (e.g. a chat prompt),
    `names[i]` the function to call (one of `functions[i]`). Returns the call strings."""
    rng = jax.random.key(0) if rng is None else rng
    rows = []
    for name, funcs in zip(names, functions):
      function = next((f for f in funcs if f.get("name") == name), None)
      if function is None:
        raise ValueError(f"Function {name!r} is not among the offered functions.")
      rows.append(_Row(text=f"[{name}(", function=function, used=[]))
    value_sampling = dataclasses.replace(sampling, max_new_tokens=self.max_value_tokens)
    for step in range(self.max_args + 1):
      active = [i for i, r in enumerate(rows) if not r.done]
      if not active:
        break
      # 1) next keyword (or close), by likelihood
      options = {i: self._options(rows[i]) for i in active}
      scored = [i for i in active if len(options[i]) > 1]
      for i in active:
        if len(options[i]) == 1:
          rows[i].pending = options[i][0]
      if scored:
        loglik = self._score([contexts[i] + rows[i].text for i in scored],
                             [options[i] for i in scored], _rows(lora, scored, lora_per_row),
                             lora_per_row)
        for j, i in enumerate(scored):
          rows[i].pending = options[i][int(np.argmax(loglik[j, :len(options[i])]))]
      # 2) its value, written by the model and cut at the end of the first complete literal
      writing = []
      for i in active:
        row = rows[i]
        if row.pending == CLOSE or step == self.max_args:
          row.text += CLOSE
          row.done = True
        else:
          writing.append(i)
      if not writing:
        continue
      prompts = [self.tokenizer.encode(contexts[i] + rows[i].text + rows[i].pending)
                 for i in writing]
      outs = self.sampler.generate(prompts, value_sampling, jax.random.fold_in(rng, step),
                                   _rows(lora, writing, lora_per_row), lora_per_row)
      for i, out in zip(writing, outs):
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


def _rows(lora, indices, per_row):
  """The adapters of the selected rows when each row has its own (else `lora` unchanged)."""
  if lora is None or not per_row:
    return lora
  idx = np.asarray(indices)
  return jax.tree.map(lambda x: x[idx], lora)
