"""The run config's schema: each numeric or named field's valid values, checked in one pass at
start, and the stage configs built from their config sections by field name.

A bad value is refused with its name and what is valid, all bad fields at once, before any model
loads (a negative temperature would invert the sampling distribution, a negative
`task.num_examples` would silently drop inputs, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from ttsi_jax.ttsi import variants as variants_lib

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("auto", "xla", "cudnn")  # `ttsi_jax.model.transformer.ModelConfig.attention`


def _range(
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    note: str = "",
):
  """(check, what is valid) for a number in [low, high] (or open at either end)."""

  def check(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and v != int(v)):
      return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

  kind = "an integer" if integer else "a number"
  num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
  if high == math.inf:
    bound = f"{'>' if low_open else '>='} {num(low)}"
  else:
    bound = f"in {'(' if low_open else '['}{num(low)}, {num(high)}{')' if high_open else ']'}"
  return check, f"{kind} {bound}" + (f" ({note})" if note else "")


def _one_of(*values):
  return (lambda v: v in values), f"one of {list(values)}"


_COUNT = _range(1, integer=True)
_BUCKETS_PER_OCTAVE = (1, 2, 4)  # sampler.BUCKETS_PER_OCTAVE (this module loads without jax)
_PROBABILITY_MASS = _range(0, 1, low_open=True)
_TEMPERATURE = _range(0, note="0 = greedy")

FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _range(0, 2**31 - 1, integer=True, note="jax.random.key wraps larger seeds"),
    "model.dtype": _one_of(*DTYPES),
    "model.attention": _one_of(*ATTENTION),
    "task.num_examples": _range(0, integer=True, note="0 = all"),
    "wave_size": _COUNT,
    "reserve": _COUNT,
    "buckets_per_octave": _one_of(*_BUCKETS_PER_OCTAVE),
    "uncertainty.measure": _one_of("margin", "entropy"),
    "uncertainty.tau": _range(0, note="margin < tau is uncertain; above 1 flags every input"),
    "uncertainty.entropy_threshold": _range(0),
    "uncertainty.sampled_candidates": _range(0, integer=True, note="0 = off"),
    "decoding.num_samples": _COUNT,
    "decoding.temperature": _TEMPERATURE,
    "decoding.top_p": _PROBABILITY_MASS,
    "decoding.max_new_tokens": _COUNT,
    "decoding.max_value_tokens": _COUNT,
    "decoding.max_args": _COUNT,
    "synthesis.k": _COUNT,
    "synthesis.temperature": _TEMPERATURE,
    "synthesis.top_p": _PROBABILITY_MASS,
    "synthesis.max_request_tokens": _COUNT,
    "synthesis.max_free_tokens": _COUNT,
    "synthesis.request_retries": _range(0, integer=True, note="new draws of a rejected request"),
    "adaptation.rank": _COUNT,
    "adaptation.alpha": _range(0, low_open=True),
    "adaptation.dropout": _range(0, 1, high_open=True),
    "adaptation.learning_rate": _range(0, low_open=True),
    "adaptation.epochs": _COUNT,
    "adaptation.batch_size": _COUNT,
    "adaptation.warmup_ratio": _range(0, 1),
    "adaptation.weight_decay": _range(0),
    "adaptation.max_grad_norm": _range(0, low_open=True),
    "adaptation.adapters_per_call": _range(0, integer=True, note="0 = auto"),
    "adaptation.row_tokens": _range(0, integer=True, note="0 = auto"),
    "adaptation.remat": _one_of("auto", "on", "off"),
    "teacher.kind": _one_of("", "local", "endpoint"),
    "teacher.timeout_s": _range(0, low_open=True),
    "teacher.retries": _range(0, integer=True, note="retries after the first try"),
    "teacher.backoff_s": _range(0),
    "teacher.max_tokens": _COUNT,
    "sft.num_examples": _range(0, integer=True, note="0 = all"),
    "sft.epochs": _COUNT,
    "sft.batch_size": _COUNT,
    "sft.learning_rate": _range(0, low_open=True),
    "sampling.max_new_tokens": _COUNT,
    "sampling.temperature": _TEMPERATURE,
    "sampling.top_p": _PROBABILITY_MASS,
    "sampling.max_batch": _COUNT,
}


# Fields that do not change what a run computes: its speed (adapters_per_call, row_tokens, remat
# and mesh_shape only reorder float sums: results agree to ~1e-5), what it saves besides the
# results, or only `generate` (sampling.*). A run may resume under other values of them (e.g. on
# another machine), and a report may average runs that differ in them (LoRA dropout's masks
# follow each token, not the packed rows: see ttsi_jax.ttsi.adaptation).
RESULT_NEUTRAL = (
    "adaptation.adapters_per_call",
    "adaptation.row_tokens",
    "adaptation.remat",
    "mesh_shape",
    "keep_adapters",
    "teacher.api_key_env",
    "sampling.",
)


# What an unchanged config computes, versioned: raised when a code change gives other results
# under the same config (a workdir resumes, and a report averages runs, only within one version).
# 2: H scores "[name" then any token that begins with "(", sampled answers whole with the end of
# their turn; ICL shows at most synthesis.k examples that fit the context.
# 3: G picks a pair's function as H does, after "Call:" with " [name" then any "(" token (it scored
# "[name(" after a lone " "); sft trains on its split shuffled by the seed (it took it category by
# category) and without the examples that ask a test input's request (icl shows none of them); a
# synthesized call must not repeat a keyword nor make more calls than the task's answers, and "no
# call" is valid where some answer of the task makes none (it read the input's own label); a
# teacher reply cut off inside <think> holds no pair; a value with a comment is written without
# it (answers too); ICL examples go before a row's conversation; bfloat16 LoRA applies the exact
# alpha / rank; a Mistral config without sliding_window gets transformers' 4096.
# Since 3, each version's change with the runs it touches (their flat config -> bool): a run of an
# earlier version (3 on) that no later change touches computes what this version does, and counts
# as this version (it resumes, and reports beside this version's runs).
VERSION_CHANGES = {
    # Majority votes count the samples that make no call (prose) as one answer: they did not vote,
    # so a lone call beat them, and all-prose samples were judged wrong where no call is right.
    4: lambda fields: "majority" in str(fields.get("decoding.modes", "")),
    # G's function candidates are tokenized as they follow "Call:" (`scoring.continuation`): alone,
    # a SentencePiece "legacy" tokenizer put a word-start token before each. The embedded default's
    # byte-level BPE tokenizes them alike either way (tested), so only other models' runs change.
    5: lambda fields: fields.get("synthesis.well_formed", True)
    and any(
        writer == "teacher" or fields.get("model.path")
        for writer in _pair_writers(fields.get("variants", ""), fields.get("teacher.kind"))
    ),
    # LoRA dropout's masks follow each token (its adapter's key, the step, its place in the
    # adapter's data), where they were drawn over each packed call's rows.
    6: lambda fields: float(fields.get("adaptation.dropout", 0.0)) > 0
    and any(row.answers in ("adapter", "sft") for row in _rows(fields.get("variants", ""))),
    # Well-formed decoding reads a value's bare names as strings (JSON's true/false/null as their
    # Python values) and leaves out a unary "+" before a number (`constrained.leading_literal`): a
    # list or dict holding a name closed the call, a bare `true` was the string 'true', "+5" read
    # as -5; a value with a comment is written back as Python (`1e999 # big` as 1e309, not inf);
    # a string parameter's unquoted text that closes its brackets is a string (`3x^2 + 2x - 1`
    # was no value and closed the call).
    7: lambda fields: fields.get("decoding.well_formed", True)
    or (
        fields.get("synthesis.well_formed", True)
        and bool(_pair_writers(fields.get("variants", ""), fields.get("teacher.kind")))
    ),
}
METHOD_VERSION = max(VERSION_CHANGES)


def run_fields(config_json: dict) -> dict:
  """The flat fields of a run's config.json; a config written before `method_version` was kept
  ran under version 1, and one written before `held_out_of_train_split` held none out. A version
  whose later changes do not touch the run reads as this one (see VERSION_CHANGES)."""
  fields = {"method_version": 1, "held_out_of_train_split": [], **flat(config_json)}
  recorded = fields["method_version"]
  later = [touches for version, touches in VERSION_CHANGES.items() if version > recorded]
  # (A newer version than this code's stays what it is: this code does not compute it.)
  untouched = not any(touches(fields) for touches in later)
  if min(VERSION_CHANGES) - 1 <= recorded < METHOD_VERSION and untouched:
    fields["method_version"] = METHOD_VERSION
  return fields


def flat(tree: dict, prefix: str = "") -> dict:
  """{"adaptation.rank": 8, ...} from a nested config dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Fields (prefixes, the first that matches decides) that act only through some variants: neutral
# where neither config runs one of them. The training split serves sft and icl alike.
_FIELDS_OF_VARIANTS = (
    ("sft.categories", ("sft", "icl")),
    ("sft.num_examples", ("sft", "icl")),
    ("sft.", ("sft",)),
    ("teacher.", ("ttd",)),
)


# Fields read by one task kind alone (task.name): neutral between runs of another kind; those
# with an empty default are refused where set for another kind (a forgotten task.name=tfds ran
# BFCL under a dataset's name).
_FIELDS_OF_TASKS = (
    ("task.dataset", "tfds"),
    ("task.manual_dir", "tfds"),
    ("task.split", "tfds"),
    ("task.category", "bfcl"),
)
_REFUSED_FOR_OTHER_TASKS = ("task.dataset", "task.manual_dir")


def result_changing_differences(before: dict, now: dict, also_neutral: tuple[str, ...] = ()) -> list[str]:
  """The fields of two flat configs (`flat`) whose values differ and may change results: fields in
  both, outside RESULT_NEUTRAL, `also_neutral` (prefixes) and the sections of variants that
  neither config runs (a teacher's settings without `ttd`)."""
  runs = {v for config in (before, now) for v in _listed(config.get("variants", ""))}
  kinds = {config.get("task.name") for config in (before, now)}

  def unused(field: str) -> bool:
    variants = next((v for prefix, v in _FIELDS_OF_VARIANTS if field.startswith(prefix)), None)
    kind = next((k for name, k in _FIELDS_OF_TASKS if field == name), None)
    return (variants is not None and not runs.intersection(variants)) or (
        kind is not None and kind not in kinds
    )

  neutral = RESULT_NEUTRAL + also_neutral
  return sorted(
      k
      for k in before.keys() & now.keys()
      if not k.startswith(neutral) and not unused(k) and before[k] != now[k]
  )


_MISSING = object()


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


def _listed(value) -> list[str]:
  """The names of a comma-separated string or a sequence, as the run reads them (stripped, none
  empty)."""
  names = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else ()
  return [str(n).strip() for n in names if str(n).strip()]


def _rows(variants) -> list:
  """The variant table's rows (`variants.TABLE`) of the variants named."""
  return [variants_lib.TABLE[v] for v in _listed(variants) if v in variants_lib.TABLE]


def _pair_writers(variants, teacher_kind) -> set:
  """Which models of a run write pairs (G): "model" for the self-pair variants, "teacher" for ttd
  with a local teacher."""
  sources = {row.source for row in _rows(variants)}
  writers = {"model"} if "self" in sources else set()
  if "teacher" in sources and teacher_kind == "local":
    writers.add("teacher")
  return writers


def _bucketed(n: int, limit: int | None) -> int:
  """`n` in its bucket of at least 8 as the run pads it (`buckets_per_octave` at most `limit`)."""
  from ttsi_jax.text import sampler  # pylint: disable=import-outside-toplevel (jax, only here)

  with sampler.buckets_per_octave(limit):
    return sampler.bucket(n, 8)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one ValueError naming every field whose value is out of its range."""
  bad = []
  for field, (check, valid) in FIELDS.items():
    value = _get(config, field)
    if value is not _MISSING and not check(value):
      bad.append(f"{field}={value!r} (valid: {valid})")
  samples, temperature = _get(config, "uncertainty.sampled_candidates"), _get(config, "decoding.temperature")
  voting = [m for m in _listed(_get(config, "decoding.modes")) if m != "direct"]
  if voting and temperature == 0:  # every sample would be the greedy answer: direct, reported twice
    bad.append(
        f"decoding.modes={_get(config, 'decoding.modes')!r} with decoding.temperature=0 (valid: a "
        "decoding.temperature > 0, at which the samples differ, or decoding.modes=direct)"
    )
  if samples not in (_MISSING, 0) and temperature == 0:
    # Its samples would all be the greedy call: one candidate, margin 1, never flagged.
    bad.append(
        f"uncertainty.sampled_candidates={samples!r} with decoding.temperature=0 (valid: a "
        "decoding.temperature > 0, at which the calls of an input offering one function are "
        "sampled, or uncertainty.sampled_candidates=0 to score that function alone)"
    )
  # What the stages decode after a prompt, in its reserved cache slots: free answers; where a
  # model writes pairs (self, or a local teacher), the request extends the prompt ("Request: ...
  # Call:", in a bucket of 8 tokens), then room to score the functions' names after it.
  reserve = _get(config, "reserve")
  limit = _get(config, "buckets_per_octave")
  limit = limit if limit in _BUCKETS_PER_OCTAVE else None  # a bad one is reported as such
  writes_pairs = bool(_pair_writers(_get(config, "variants"), _get(config, "teacher.kind")))
  request, new_tokens = _get(config, "synthesis.max_request_tokens"), _get(config, "decoding.max_new_tokens")
  needs = []
  if _get(config, "decoding.well_formed") is False and isinstance(new_tokens, int):
    needs.append(("decoding.max_new_tokens", new_tokens))
  if (
      writes_pairs
      and _get(config, "synthesis.well_formed") is True
      and isinstance(request, int)
      and request > 0
  ):
    needs.append(
        (
            "the request of synthesis.max_request_tokens in its lead, bucketed, + 32",
            _bucketed(request + 8, limit) + 32,
        )
    )
  for what, tokens in needs:
    if isinstance(reserve, int) and reserve < tokens:
      bad.append(f"reserve={reserve!r} (valid: at least {tokens}, {what}: what is decoded after a prompt)")
  kind = _get(config, "task.name")
  for field, reader in _FIELDS_OF_TASKS:
    value = _get(config, field)
    if field in _REFUSED_FOR_OTHER_TASKS and kind != reader and value not in (_MISSING, "", None):
      bad.append(
          f"{field}={value!r} with task.name={kind!r} (valid: only with task.name={reader!r}: "
          f"add --config.task.name={reader}, or leave {field} empty)"
      )
  if bad:
    raise ValueError("Bad config values: " + "; ".join(bad) + ". Set them with --config.<field>=...")


def build(cls, section: ml_collections.ConfigDict, **overrides):
  """A stage config dataclass from its config section, field by field name (a section's other
  fields belong to the run, not the stage); `overrides` replace or convert values. Every field
  comes from the section: one left to a dataclass default would act unrecorded in config.json, so
  a resume could not tell it changed."""
  names = [f.name for f in dataclasses.fields(cls)]
  missing = [n for n in names if n not in section and n not in overrides]
  if missing:
    raise ValueError(
        f"The config has no {missing} for {cls.__name__}: start from configs/default.py's "
        "get_config() and change fields, rather than writing a config from scratch."
    )
  return cls(**{**{n: section[n] for n in names}, **overrides})
