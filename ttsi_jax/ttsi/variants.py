"""What each variant means, in one table, and the pure planning of a wave's adapters.

A variant is one row of `TABLE`: which inputs it targets (by the uncertainty flag), where its
training data comes from, and how it answers. A new variant is one entry here (plus its data
source, if new); `plan_adapters` and the records follow from the table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Optional, Sequence

import numpy as np

# Which inputs a variant targets, from the flags (True: uncertain).
_TARGETS = {
    "none": lambda flags: np.zeros_like(flags),
    "flagged": lambda flags: flags,
    "certain": lambda flags: ~flags,
    "all": lambda flags: np.ones_like(flags),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  targets: str  # "none", "flagged", "certain" or "all" (see _TARGETS)
  # Training data (or shown examples) per targeted input: "self" / "teacher" (pairs written by G),
  # "self_label" (the input's own request with the base model's answer), "gold" (its gold call),
  # "train" (the training split's most similar gold calls, ttsi_jax.ttsi.demonstrations) or None.
  source: Optional[str]
  answers: str  # "base", "adapter" (its own per-input adapter), "icl" or "sft"
  doc: str


TABLE = {
    "base": Variant("none", None, "base", "the model as it is"),
    "ttsi": Variant(
        "flagged", "self", "adapter", "TT-SI: uncertain inputs adapt on pairs the model writes itself"
    ),
    "self_label": Variant(
        "flagged",
        "self_label",
        "adapter",
        "uncertain inputs adapt on their own request answered by the base model (self-training, no "
        "synthesis: the ablation that tells what the synthesized pairs add)",
    ),
    "ttd": Variant("flagged", "teacher", "adapter", "TT-D: uncertain inputs adapt on pairs a teacher writes"),
    "ttsi_icl": Variant(
        "flagged", "self", "icl", "uncertain inputs get the self-written pairs as in-context examples"
    ),
    "icl": Variant(
        "flagged",
        "train",
        "icl",
        "uncertain inputs get the training split's most similar gold calls as in-context examples "
        "(ordinary ICL, ttsi_icl's baseline)",
    ),
    "all_inputs": Variant("all", "self", "adapter", "TT-SI on every input (no flag)"),
    "certain_only": Variant(
        "certain", "self", "adapter", "TT-SI on the inputs the flag calls certain (the flag's control)"
    ),
    "oracle": Variant("all", "gold", "adapter", "every input adapts on its own gold call"),
    "sft": Variant(
        "all", None, "sft", "one adapter trained on the gold calls of other categories (inductive)"
    ),
}
NAMES = tuple(TABLE)
SOURCES = ("self", "teacher", "self_label", "gold", "train")


def targets(variant: str, flags_B: np.ndarray) -> np.ndarray:
  """bool per input: does `variant` adapt on (or, for ICL, demonstrate on) it."""
  return _TARGETS[TABLE[variant].targets](np.asarray(flags_B, bool))


def inputs_needing(source: str, variants: Sequence[str], flags_B: np.ndarray) -> list[int]:
  """The inputs some variant targets with training data from `source` (what G must write)."""
  needed = np.zeros(len(flags_B), bool)
  for v in variants:
    if TABLE[v].source == source:
      needed |= targets(v, flags_B)
  return [int(i) for i in np.flatnonzero(needed)]


@dataclasses.dataclass(frozen=True)
class Job:
  """One adapter to train: its data source, its input, and its training examples."""

  source: str
  input: int
  data: list


@dataclasses.dataclass(frozen=True)
class Plan:
  """A wave's adapters, one per distinct (source, input); variants that train on the same data
  share one (`job_of[(variant, input)]` = its index in `jobs`)."""

  jobs: list[Job]
  job_of: dict[tuple[str, int], int]


def plan_adapters(variants: Sequence[str], flags_B: np.ndarray, data_for: Callable[[str, int], list]) -> Plan:
  """The adapter jobs of a wave. `data_for(source, input)` gives the training examples (empty:
  nothing to train on, the variant answers as base on that input). No model needed."""
  jobs, job_of, by_source = [], {}, {}
  for v in variants:
    if TABLE[v].answers != "adapter":
      continue
    source = TABLE[v].source
    for i in np.flatnonzero(targets(v, flags_B)).tolist():
      if (source, i) not in by_source:
        data = data_for(source, i)
        by_source[(source, i)] = len(jobs) if data else None
        if data:
          jobs.append(Job(source, i, data))
      if by_source[(source, i)] is not None:
        job_of[(v, i)] = by_source[(source, i)]
  return Plan(jobs, job_of)


def not_adapted_reason(
    variant: str, targeted: bool, failed_sources: Collection[str], had_pairs: bool = False
) -> str:
  """Why a variant answered an input as the base model did; `failed_sources`: the data sources
  that failed to write pairs for the input; `had_pairs`: it kept pairs (an ICL variant that
  answered as base had no room to show them)."""
  if not targeted:
    return "not targeted"
  if TABLE[variant].source in failed_sources:
    return f"{TABLE[variant].source} failed"
  if TABLE[variant].answers == "icl" and (had_pairs or TABLE[variant].source == "train"):
    return "none fits the context"
  if TABLE[variant].source == "self_label":
    return "empty base answer"
  return "no kept pairs"
