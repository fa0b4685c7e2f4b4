"""The Task protocol: what the TT-SI loop needs to know about a benchmark.

A task turns its rows into `Example`s, writes the chat prompt for an input, lists the candidate
actions scored by the uncertainty stage, and parses / checks / canonicalises answers. The loop never
looks inside `Example.gold`: only `check` and `gold_answer` (the oracle variant) do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

from ttsi_jax.text.tokenizer import Messages


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  question: str  # the user request (last user turn)
  functions: tuple  # the function schemas offered with the request (JSON-like dicts)
  gold: Any = None  # task-specific ground truth; None for synthesized examples


@dataclasses.dataclass(frozen=True)
class Verdict:
  correct: bool
  error: str = ""  # why not, in the checker's words ("" when correct)


class Task(Protocol):
  name: str
  # What the examples and the checker come from, beyond their ids (a package or dataset version):
  # a workdir resumes only on the same (its config.json keeps it).
  data_version: str

  def examples(self) -> list[Example]:
    """All usable examples; malformed rows are reported (by id) in `skipped`, never raised."""

  @property
  def skipped(self) -> list[tuple[str, str]]:
    """(row id, reason) for every malformed row left out by `examples`."""

  def prompt(self, example: Example) -> Messages:
    """Chat messages (system + user) asking for the answer to `example`."""

  def demonstration(self, example: Example, answer: str) -> Messages:
    """A worked example to show in another input's prompt (ordinary ICL): a user turn with
    `example`'s own functions and request, then `answer` as the assistant's turn."""

  def candidates(self, example: Example) -> list[str]:
    """Candidate action prefixes scored by the uncertainty stage (e.g. "[get_weather(")."""

  def check(self, example: Example, answer: str) -> Verdict:
    """Whether a raw model answer is correct for `example` (unparseable answers are wrong)."""

  def canonical(self, answer: str) -> Optional[str]:
    """A canonical form for voting (equal answers map to equal strings); None if unparseable."""

  def gold_answer(self, example: Example) -> str:
    """One correct answer in the model's answer format (used by the oracle variant)."""

  def validate(self, example: Example, answer: str) -> Optional[str]:
    """None if `answer` is a well-formed answer for `example`'s functions (parseable, offered
    function, required arguments present, argument names in the schema), else the reason."""
