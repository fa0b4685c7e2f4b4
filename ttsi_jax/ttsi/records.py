"""The format of results.jsonl, in one place: one `Record` per input, one JSON line each.

Written by the run's check stage, read back by resume and by `compute_metrics`; any other
reader (the notebook, a report) can rely on the fields below. Optional fields are left out of a
line when they do not apply (a variant's `reason` when it adapted, `losses` when it trained no
adapter, `demonstrations` but for icl, the base answer's `samples` without voting modes,
`teacher_pairs` without a teacher, an answer's or pair's `closed` where no limit closed its call).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

from ttsi_jax.ttsi.synthesis import Pair

TEACHER_FAILED = "failed"  # `teacher_pairs` of an input whose teacher requests all failed
# The version of this format, in every line: raise it when a field is added, changes meaning or
# goes away (readers refuse newer lines, naming the cause; lines without it are version 1).
# 2: a variant's `demonstrations`. 3: `closed` on answers and pairs.
FORMAT = 3


@dataclasses.dataclass
class BaseAnswer:
  answer: str  # the direct (greedy) answer
  correct: dict[str, bool]  # verdict per decoding mode ("direct" always)
  error: str  # the checker's reason the direct answer is wrong ("" when right)
  samples: Optional[list[str]] = None  # the sampled answers, with voting modes
  # The limit that closed the direct answer's well-formed call before the model chose to: an
  # argument it may have meant to write is missing (`CallDecoder.decode_noting`); absent if none.
  closed: Optional[str] = None


@dataclasses.dataclass
class VariantAnswer:
  adapted: bool  # False: the variant answered as base on this input (see `reason`)
  answer: str
  correct: dict[str, bool]
  error: str
  # Why not adapted (`variants.not_adapted_reason`): "not targeted", "no kept pairs",
  # "<source> failed", "empty base answer", "none fits the context" (ICL).
  reason: Optional[str] = None
  losses: Optional[list[float]] = None  # the adapter's training loss per step
  demonstrations: Optional[list[str]] = None  # the training split's examples shown (icl), by id
  closed: Optional[str] = None  # as BaseAnswer's, for the variant's own answer


@dataclasses.dataclass
class Record:
  wave: int
  id: str
  margin: float
  entropy: float
  candidates: list[str]  # the candidate actions scored by H
  probs: list[float]  # their RSS probabilities
  perplexity: list[float]
  uncertain: bool  # H's flag
  base: BaseAnswer
  pairs: list[Pair]  # the self-written pairs (empty where no variant needed them)
  variants: dict[str, VariantAnswer]  # every variant but base
  teacher_pairs: Union[list[Pair], str, None] = None  # TEACHER_FAILED when the teacher failed
  wave_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # the wave's stages
  host: int = 0  # the host that ran the wave
  peak_memory_bytes: Optional[int] = None  # the host process's peak resident memory after the wave
  format: int = FORMAT

  def to_dict(self) -> dict:
    return dataclasses.asdict(self, dict_factory=_without_none)

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, d: dict) -> "Record":
    if not isinstance(d, dict):
      raise ValueError(f"a results record is a JSON object, not {type(d).__name__}")
    if d.get("format", 1) > FORMAT:
      raise ValueError(
          f"a results record of format {d['format']}, newer than this ttsi_jax reads "
          f"({FORMAT}); update ttsi_jax to read it"
      )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
      raise ValueError(f"a results record needs the fields {missing}")
    if type(d["wave"]) is not int or not isinstance(d["id"], str):
      raise ValueError(
          f"a results record's wave is an integer and its id a string, not {d['wave']!r}, {d['id']!r}"
      )
    teacher = d.get("teacher_pairs")
    if not (teacher is None or teacher == TEACHER_FAILED or isinstance(teacher, list)):
      raise ValueError(
          f"a results record's teacher_pairs is a list, {TEACHER_FAILED!r} or absent, not {teacher!r}"
      )
    try:
      return cls(
          **{
              **d,
              "base": BaseAnswer(**d["base"]),
              "pairs": [Pair(**p) for p in d["pairs"]],
              "variants": {v: VariantAnswer(**a) for v, a in d["variants"].items()},
              "teacher_pairs": [Pair(**p) for p in teacher] if isinstance(teacher, list) else teacher,
              "format": d.get("format", 1),
          }
      )
    except (TypeError, AttributeError) as e:  # a field of another shape, or one this format lacks
      raise ValueError(f"a results record's fields do not fit its format: {e}") from None

  @classmethod
  def from_json(cls, line: str) -> "Record":
    return cls.from_dict(json.loads(line))


def read(path: str) -> list[Record]:
  """Every record of a results.jsonl file; a bad line raises naming the file and line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      try:
        out.append(Record.from_json(line))
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}, line {number}: {e}") from None
  return out


def _without_none(items) -> dict:
  return {k: v for k, v in items if v is not None}
