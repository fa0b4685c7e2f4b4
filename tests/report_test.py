"""The report: accuracy over seeds, the tau sweep from one run, and every plot written."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from ttsi_jax import config_schema, experiment, report
from ttsi_jax.ttsi import records, uncertainty
from ttsi_jax.ttsi.synthesis import Pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(i, margin, base_right, adapted_right, wave=0):
  verdict = lambda right: {"direct": right, "majority": right}
  answer = lambda right: records.VariantAnswer(True, "[f()]", verdict(right), "", losses=[1.0, 0.5])
  return records.Record(
      wave=wave,
      id=f"multiple_{i}",
      margin=margin,
      entropy=0.5,
      candidates=["[f(", "[g("],
      probs=[0.6, 0.4],
      perplexity=[2.0, 3.0],
      uncertain=bool(margin < 0.6 or np.isnan(margin)),  # the flag of _workdir's tau
      base=records.BaseAnswer("[f()]", verdict(base_right), "" if base_right else "wrong"),
      pairs=[Pair("r", "[f()]"), Pair("r", "x", rejected="unparseable")],
      variants={"ttsi": answer(adapted_right), "all_inputs": answer(adapted_right)},
      wave_seconds={"H": 1.0, "T": 2.0},
  )


def _workdir(path, seed, rows, metrics=None, **settings):
  os.makedirs(path)
  if metrics is not None:  # a finished run
    with open(path / "metrics.json", "w") as f:
      json.dump(metrics, f)
  with open(path / "config.json", "w") as f:
    config = {"seed": seed, "task": {"name": "bfcl", "category": "multiple"}, "uncertainty": {"tau": 0.6}}
    json.dump({**config, **settings}, f)
  with open(path / "results.jsonl", "w") as f:
    for i, row in enumerate(rows):
      f.write(_record(i, *row, wave=i // 2).to_json() + "\n")
  return str(path)


def test_tau_sweep_answers_as_all_inputs_below_tau_and_as_base_above():
  recs = [_record(0, 0.1, False, True), _record(1, 0.5, True, True), _record(2, 0.9, False, False)]
  low, mid, every = report.tau_sweep(recs, taus=(0.0, 0.6, 1.01))
  # Nothing flagged: no precision to speak of (NaN, "n/a" in the report), not 0.
  counts = lambda caught, flagged: dict(caught=caught, wrong=2, num_flagged=flagged)
  assert {k: v for k, v in low.items() if k != "precision"} == dict(
      tau=0.0, flagged=0.0, ttsi=1 / 3, tpr=0.0, **counts(0, 0)
  )
  assert np.isnan(low["precision"])
  # tau 0.6 flags inputs 0 and 1: adapted answers there (right, right), base on input 2 (wrong).
  assert mid == dict(tau=0.6, flagged=2 / 3, ttsi=2 / 3, tpr=1 / 2, precision=1 / 2, **counts(1, 2))
  assert every == dict(tau=1.01, flagged=1.0, ttsi=2 / 3, tpr=1.0, precision=2 / 3, **counts(2, 3))


def test_tau_sweep_counts_the_inputs_the_base_model_gets_wrong_in_its_own_mode():
  rec = _record(0, 0.1, True, True)
  rec.base.correct["majority"] = False  # right directly, wrong by majority vote
  (point,) = report.tau_sweep([rec], taus=(1.01,), mode="majority")
  assert (point["wrong"], point["caught"], point["tpr"]) == (1, 1, 1.0)
  (point,) = report.tau_sweep([rec], taus=(1.01,))
  assert point["wrong"] == 0


def test_calls_a_limit_closed_are_counted_by_kind_and_older_records_say_not_recorded():
  cut = "decoding.max_args (3)"
  run = lambda recs, config={}: report.Run("w", config, recs, None)
  first, second = _record(0, 0.1, True, True), _record(1, 0.9, True, True)
  first.base.closed = first.variants["ttsi"].closed = cut
  first.pairs[0] = dataclasses.replace(first.pairs[0], closed=cut)
  second.variants["all_inputs"].adapted = False  # answered as base: not its own answer
  second.variants["all_inputs"].closed = cut
  closed = report.closures([run([first, second])])
  assert list(closed.items()) == [
      ("base answers", (2.0, 1.0)),
      ("ttsi's own answers", (2.0, 1.0)),
      ("all_inputs's own answers", (1.0, 0.0)),
      ("self-written pairs", (4.0, 1.0)),
  ]
  # Free-text answers are no well-formed calls: only the pairs are counted.
  free = run([first, second], {"decoding": {"well_formed": False}})
  assert report.closures([free]) == {"self-written pairs": (4.0, 1.0)}
  second.format = 2
  assert report.closures([run([first, second])]) is None


def test_tau_sweep_needs_an_adapted_answer_for_every_input():
  rec = _record(0, 0.1, False, True)
  del rec.variants["all_inputs"]
  with pytest.raises(ValueError, match="all_inputs"):
    report.tau_sweep([rec])


def test_report_averages_seeds_and_writes_every_plot(tmp_path):
  runs = report.load_runs(
      [
          _workdir(tmp_path / "s0", 0, [(0.1, False, True), (0.5, True, True), (0.9, False, False)]),
          _workdir(tmp_path / "s1", 1, [(0.2, False, False), (0.4, True, True), (0.8, True, True)]),
      ]
  )
  acc = report.accuracy(runs)
  assert acc["base"]["direct"] == pytest.approx((0.5, 0.2357), abs=1e-4)  # 1/3 and 2/3: std (ddof 1)
  assert acc["ttsi"]["majority"] == pytest.approx((2 / 3, 0.0))
  path = report.write_report(runs, str(tmp_path / "out"))
  text = open(path).read()
  assert "| base | 50.0 ± 23.6 | 50.0 ± 23.6 |" in text
  assert "| 0.60 | 66.7 |" in text  # flagged fraction at tau 0.6, mean of the two runs
  assert "| 0.00 | 0.0 | 50.0 | 0.0 | n/a |" in text  # nothing flagged: no precision
  assert "| self-written pairs | kept | 3.0 |" in text
  for png in ("accuracy.png", "tau.png", "margins.png", "stages.png"):
    assert f"]({png})" in text
    with open(tmp_path / "out" / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / "out" / png) > 5000


def test_report_names_the_flag_the_runs_used_and_a_tfds_dataset(tmp_path):
  rows = [(0.1, False, True), (0.5, True, True)]
  margin = report.load_runs([_workdir(tmp_path / "m", 0, rows)])
  text = open(report.write_report(margin, str(tmp_path / "m_out"))).read()
  assert "`multiple`; model" in text and "| base | 50.0 | 50.0 |" in text  # one run: no std
  assert "flag: margin < tau 0.6; method version 1" in text
  settings = {
      "uncertainty": {"measure": "entropy", "entropy_threshold": 0.15, "tau": 0.95},
      "task": {"name": "tfds", "dataset": "user_tools", "category": "multiple"},
  }
  entropy = report.load_runs([_workdir(tmp_path / "e", 0, rows, **settings)])
  text = open(report.write_report(entropy, str(tmp_path / "e_out"))).read()
  assert "tfds `user_tools`" in text and "flag: entropy > 0.15; method version 1" in text
  assert "flagged by entropy: the sweep shows what the margin would have done" in text


def test_paired_counts_fixed_and_broken_inputs_and_bounds_the_difference(tmp_path):
  # (margin, base right, adapted right) per input; input 0 fixed in both runs, input 1 broken in
  # run 0, input 2 fixed in run 1, input 3 unchanged.
  runs = report.load_runs(
      [
          _workdir(
              tmp_path / "s0",
              0,
              [(0.1, False, True), (0.2, True, False), (0.3, False, False), (0.4, True, True)],
          ),
          _workdir(
              tmp_path / "s1",
              1,
              [(0.1, False, True), (0.2, True, True), (0.3, False, True), (0.4, True, True)],
          ),
      ]
  )
  p = report.paired(runs, "ttsi")
  assert (p["fixed"], p["broken"]) == (1.5, 0.5)
  # Per input, averaged over runs: +1, -0.5, +0.5, 0 -> mean +0.25.
  assert p["difference"] == pytest.approx(0.25)
  assert -0.5 <= p["low"] < 0.25 < p["high"] <= 1.0
  same = report.paired(runs, "ttsi", reference="all_inputs")  # the same answers: no difference
  assert same == dict(fixed=0.0, broken=0.0, difference=0.0, low=0.0, high=0.0)
  text = open(report.write_report(runs, str(tmp_path / "out"))).read()
  assert "| ttsi | base | 1.5 | 0.5 | +25.0 [" in text and "TT-SI: uncertain inputs adapt" in text
  assert "| ttsi | all_inputs | 0.0 | 0.0 | +0.0 [+0.0, +0.0] | what does adapting" in text
  assert "| unparseable | 4.0 |" in text  # one rejected pair per input


def test_rejection_kinds_drop_the_names_and_values():
  assert Pair("r", "c", "unparseable: invalid syntax (<unknown>, line 1)").rejection_kind == "unparseable"
  assert Pair("r", "c", "get_weather: unknown argument 'city'").rejection_kind == "unknown argument …"
  assert Pair("r", "c", "function 'f' is not offered").rejection_kind == "function … is not offered"
  assert Pair("r", "c", "request is a code fence").rejection_kind == "request is a code fence"


def test_report_refuses_runs_of_other_inputs_and_names_a_missing_workdir(tmp_path):
  a = _workdir(tmp_path / "a", 0, [(0.1, False, True), (0.5, True, True)])
  b = _workdir(tmp_path / "b", 1, [(0.1, False, True)])
  with pytest.raises(ValueError, match="answered other inputs"):
    report.load_runs([a, b])
  with pytest.raises(FileNotFoundError, match=r"nowhere/results.jsonl does not exist"):
    report.load_runs([str(tmp_path / "nowhere")])
  with pytest.raises(ValueError, match=r"none empty .*\['a', ''\]"):
    report.load_runs(["a", ""])  # --workdir=a,, would read ./results.jsonl
  empty = _workdir(tmp_path / "empty", 0, [])  # stopped in its first wave
  with pytest.raises(ValueError, match=r"empty/results.jsonl holds no records yet"):
    report.load_runs([empty])
  with open(os.path.join(a, "metrics.json"), "w") as f:
    f.write('{"accuracy": ')  # cut while written
  with pytest.raises(ValueError, match=r"a/metrics.json is not the JSON a run writes"):
    report.load_runs([a])


def test_report_averages_only_runs_of_one_setting(tmp_path):
  rows = [(0.1, False, True), (0.5, True, True)]
  a = _workdir(tmp_path / "a", 0, rows, adaptation={"learning_rate": 1e-3, "remat": "auto"})
  # Another seed and a speed-only setting: the same setting.
  b = _workdir(tmp_path / "b", 1, rows, adaptation={"learning_rate": 1e-3, "remat": "on"})
  assert len(report.load_runs([a, b])) == 2
  c = _workdir(tmp_path / "c", 2, rows, adaptation={"learning_rate": 1e-4, "remat": "auto"})
  with pytest.raises(ValueError, match=r"differs in \['adaptation.learning_rate'\]"):
    report.load_runs([a, b, c])
  # A run of the current method beside one an earlier ttsi_jax made (no method_version: 1).
  d = _workdir(tmp_path / "d", 3, rows, adaptation={"learning_rate": 1e-3}, method_version=2)
  with pytest.raises(ValueError, match=r"differs in \['method_version'\]"):
    report.load_runs([a, d])


def test_the_tau_sweep_of_one_run_equals_a_run_at_that_tau(tiny_chat_model, tmp_path):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.task.num_examples, config.wave_size = 2, 2
  config.variants, config.decoding.modes = "base,ttsi,all_inputs", "direct"
  config.synthesis.validate = False  # a random model's pairs: keep them, so every input trains
  config.uncertainty.tau = 1.01  # every input flagged: all_inputs and ttsi adapt everywhere
  experiment.run(config, str(tmp_path / "every"))
  every = records.read(str(tmp_path / "every" / "results.jsonl"))
  margins = sorted(r.margin for r in every)
  config.uncertainty.tau = (margins[0] + margins[1]) / 2  # flags the least certain input only
  experiment.run(config, str(tmp_path / "one"))
  one = records.read(str(tmp_path / "one" / "results.jsonl"))
  assert [r.uncertain for r in one] == [r.margin < config.uncertainty.tau for r in every]
  assert sum(r.uncertain for r in one) == 1
  assert [r.variants["ttsi"].adapted for r in one] == [r.uncertain for r in one]
  # TT-SI at this tau, from the first run: all_inputs where flagged, base elsewhere.
  for r_every, r_one in zip(every, one):
    expected = r_every.variants["all_inputs"] if r_one.uncertain else r_every.base
    assert r_one.variants["ttsi"].answer == expected.answer
    if r_one.uncertain:  # the same adapter (a random model's adapted answer may equal its base one)
      assert r_one.variants["ttsi"].losses == pytest.approx(r_every.variants["all_inputs"].losses, rel=1e-5)
  (point,) = report.tau_sweep(every, taus=(config.uncertainty.tau,))
  assert point["ttsi"] == sum(r.variants["ttsi"].correct["direct"] for r in one) / len(one)
  assert point["flagged"] == 1 / 2


def test_the_report_command_writes_the_report(tmp_path):
  a = _workdir(tmp_path / "a", 0, [(0.1, False, True), (0.5, True, True)])
  b = _workdir(tmp_path / "b", 1, [(0.3, True, True), (0.7, False, False)])
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "ttsi_jax.report", f"--workdir={a},{b}", f"--out={out}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == str(out / "report.md") and "seeds [0, 1]" in (out / "report.md").read_text()


def test_report_refuses_a_run_given_twice_or_two_runs_of_one_seed(tmp_path):
  rows = [(0.1, False, True), (0.5, True, True)]
  a, b = _workdir(tmp_path / "a", 0, rows), _workdir(tmp_path / "b", 0, rows)
  with pytest.raises(ValueError, match="names the workdir .* more than once"):
    report.load_runs([a, str(tmp_path / "." / "a")])
  with pytest.raises(ValueError, match="names the seed 0 more than once"):
    report.load_runs([a, b])


def test_the_flags_rates_pool_the_runs_inputs(tmp_path):
  # At tau 0.6, run 0 flags 1 input (base wrong), run 1 flags 3 (one base wrong): precision over
  # the runs' inputs is 2 / 4, not the mean of 1/1 and 1/3.
  s0 = _workdir(
      tmp_path / "s0", 0, [(0.1, False, True), (0.7, True, True), (0.8, True, True), (0.9, False, True)]
  )
  s1 = _workdir(
      tmp_path / "s1", 1, [(0.1, False, True), (0.2, True, True), (0.3, True, True), (0.9, False, True)]
  )
  runs = report.load_runs([s0, s1])
  sweeps = [report.tau_sweep(run.records, taus=(0.6,)) for run in runs]
  assert [s[0]["precision"] for s in sweeps] == [1.0, 1 / 3]
  ((pooled),) = report.pooled_rates(sweeps)
  assert pooled == dict(tpr=2 / 4, precision=2 / 4)
  text = open(report.write_report(runs, str(tmp_path / "out"))).read()
  assert "| 0.60 | 50.0 | 75.0 | 50.0 | 50.0 |" in text


def test_a_nan_margin_is_flagged_at_every_tau_and_named_under_the_histogram(tmp_path):
  rows = [(float("nan"), False, True), (0.5, True, True), (0.9, False, False)]
  runs = report.load_runs([_workdir(tmp_path / "s0", 0, rows)])
  low, high = report.tau_sweep(runs[0].records, taus=(0.0, 0.6))
  assert (low["flagged"], low["ttsi"], low["tpr"]) == (1 / 3, 2 / 3, 1 / 2)  # the NaN input only
  assert high["flagged"] == 2 / 3
  assert report.flag_mismatches(runs[0]) == []
  report.write_report(runs, str(tmp_path / "out"))  # the histogram's label names the NaN margin
  texts = []
  original = report.Figure.savefig
  try:
    report.Figure.savefig = lambda fig, path, **kw: texts.append(fig.axes[0].get_xlabel())
    report._plot_margins(runs, str(tmp_path / "m.png"))
  finally:
    report.Figure.savefig = original
  assert texts == ["margin of the RSS probabilities (1 NaN margins, flagged, not drawn)"]


def test_report_says_what_its_numbers_leave_out(tmp_path):
  rows = [(0.1, False, True), (0.5, True, True)]
  finished = _workdir(
      tmp_path / "s0",
      0,
      rows,
      metrics={"skipped_rows": [["multiple_9", "the prompt does not fit"]]},
      method_version=config_schema.METHOD_VERSION,
  )
  unfinished = _workdir(tmp_path / "s1", 1, rows, method_version=config_schema.METHOD_VERSION)
  text = open(report.write_report(report.load_runs([finished, unfinished]), str(tmp_path / "out"))).read()
  assert f"**Unfinished (no metrics.json): {unfinished}: the numbers cover the 2 inputs" in text
  assert "**1 input(s) skipped and in no accuracy below" in text and "multiple_9" in text
  assert f"method version {config_schema.METHOD_VERSION}, data not recorded" in text
  assert "rerun them" not in text
  old = _workdir(tmp_path / "old", 0, rows, metrics={})  # no method_version: version 1
  text = open(report.write_report(report.load_runs([old]), str(tmp_path / "old_out"))).read()
  assert "**These runs computed method version 1; this code computes version" in text
  assert "Unfinished" not in text and "skipped" not in text


def test_report_warns_when_the_stored_flags_are_not_the_sweeps_rule(tmp_path):
  workdir = _workdir(tmp_path / "s0", 0, [(0.1, False, True), (0.5, True, True)])
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["uncertainty"]["tau"] = 0.3  # the records flagged at 0.6
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  (run,) = report.load_runs([workdir])
  assert report.flag_mismatches(run) == ["multiple_1"]
  text = open(report.write_report([run], str(tmp_path / "out"))).read()
  assert "1 input(s) flagged otherwise than margin < tau (multiple_1): the sweep does not replay" in text


def test_the_bootstrap_pairs_each_inputs_answers(tmp_path):
  # 20 inputs, the variant equal to base but for one fix: every paired resample differs by >= 0;
  # an unpaired bootstrap (base and variant resampled apart) would reach well below 0.
  rows = [(0.1, False, True)] + [(0.5, i % 2 == 0, i % 2 == 0) for i in range(19)]
  runs = report.load_runs([_workdir(tmp_path / "s0", 0, rows)])
  p = report.paired(runs, "ttsi")
  assert p["difference"] == pytest.approx(1 / 20) and p["low"] >= 0.0 and p["high"] > 0.0


def test_the_report_flags_a_margin_at_exactly_tau_as_the_run_did():
  """The run compares float32 margins; the report reads them back as float64 from JSON."""
  margin_B = np.array([0.95, 0.2, np.nan], np.float32)
  stats = uncertainty.CandidateStats([], [], [], margin_B, np.zeros(3), np.zeros(3, int))
  in_run = uncertainty.is_uncertain(stats, "margin", 0.95)
  stored = np.array(json.loads(json.dumps([float(m) for m in margin_B])))  # as results.jsonl keeps it
  assert in_run.tolist() == report._flagged(stored, 0.95).tolist() == [False, True, True]


def test_function_choice_groups_adapted_inputs_by_the_functions_their_pairs_call(tmp_path):
  """Base calls f on every input; H's candidates are f, then g (its runner-up). Input 0's kept
  pair calls g and its answer follows (fixed); input 1's calls h and its answer stays with f
  (unchanged, wrong); input 2's calls f and the answer's arguments change (broken); input 3 is
  not adapted; input 4's pair was rejected. Input 5 ranks h above g: its pair calls h, H's
  runner-up there, and the answer stays with f."""
  path = _workdir(tmp_path / "s0", 0, [(0.1, False, True), (0.2, False, False), (0.3, True, False)] * 2)
  runs = report.load_runs([path])
  recs = runs[0].records
  recs[0].pairs = [Pair("r", "[g(x=1)]"), Pair("r", "[h()]", rejected="wrong function")]
  recs[0].variants["ttsi"].answer = "[g(x=2)]"
  recs[1].pairs = [Pair("r", "[h()]")]
  recs[2].variants["ttsi"].answer = "[f(y=1)]"
  recs[3].variants["ttsi"].adapted = False
  recs[4].pairs = [Pair("r", "[g()]", rejected="unparseable")]
  recs[5].candidates, recs[5].probs, recs[5].pairs = (
      ["[g(", "[h(", "[f("],
      [0.2, 0.3, 0.5],
      [Pair("r", "[h()]")],
  )
  recs[5].variants["ttsi"].correct = recs[5].base.correct  # right as base is
  got = report.function_choice(runs, "ttsi")
  assert got == {
      "the base answer's": dict(inputs=1, follows=1, fixed=0, broken=1),
      "H's runner-up": dict(inputs=2, follows=1, fixed=1, broken=0),
      "other functions": dict(inputs=1, follows=0, fixed=0, broken=0),
  }
  text = open(report.write_report(runs, str(tmp_path / "out"))).read()
  assert "| ttsi | H's runner-up | 2.0 | 1.0 | 1.0 | 0.0 |" in text


def test_function_choice_names_no_runner_up_it_cannot_rank_and_keeps_mixed_and_unparsed_pairs_apart(tmp_path):
  """H's candidates are f (0.6), then g. Input 0: the base answer is prose, so g is no runner-up
  (nor f, H's favourite). Input 1: the base calls f and g; its pair calls g, one of the base's,
  and h. Input 2: two kept pairs, f's and g's; the answer calls g alone (only their functions).
  Input 3: a kept pair that does not parse. Input 4: NaN probabilities rank nothing."""
  runs = report.load_runs([_workdir(tmp_path / "s0", 0, [(0.1, False, False)] * 5)])
  recs = runs[0].records
  recs[0].base.answer, recs[0].pairs = "I cannot help with that.", [Pair("r", "[g()]")]
  recs[1].base.answer, recs[1].pairs = "[f(), g()]", [Pair("r", "[g(), h()]")]
  recs[2].pairs = [Pair("r", "[f()]"), Pair("r", "[g()]")]
  recs[2].variants["ttsi"].answer = "[g(x=1)]"
  recs[3].pairs = [Pair("r", "[f(")]
  recs[4].probs, recs[4].pairs = [float("nan"), float("nan")], [Pair("r", "[g()]")]
  got = report.function_choice(runs, "ttsi")
  assert got == {
      "the base answer's and others": dict(inputs=1, follows=1, fixed=0, broken=0),
      "other functions": dict(inputs=3, follows=0, fixed=0, broken=0),  # inputs 0, 1 and 4
      "pairs that do not parse": dict(inputs=1, follows=0, fixed=0, broken=0),
  }
