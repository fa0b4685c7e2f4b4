"""The report: accuracy over seeds, the tau sweep from one run, and every plot written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from ttsi_jax import experiment, report
from ttsi_jax.ttsi import records
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
      uncertain=margin < 0.95,
      base=records.BaseAnswer("[f()]", verdict(base_right), "" if base_right else "wrong"),
      pairs=[Pair("r", "[f()]"), Pair("r", "x", rejected="unparseable")],
      variants={"ttsi": answer(adapted_right), "all_inputs": answer(adapted_right)},
      wave_seconds={"H": 1.0, "T": 2.0},
  )


def _workdir(path, seed, rows, **settings):
  os.makedirs(path)
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
  assert {k: v for k, v in low.items() if k != "precision"} == dict(tau=0.0, flagged=0.0, ttsi=1 / 3, tpr=0.0)
  assert np.isnan(low["precision"])
  # tau 0.6 flags inputs 0 and 1: adapted answers there (right, right), base on input 2 (wrong).
  assert mid == dict(tau=0.6, flagged=2 / 3, ttsi=2 / 3, tpr=1 / 2, precision=1 / 2)
  assert every == dict(tau=1.01, flagged=1.0, ttsi=2 / 3, tpr=1.0, precision=2 / 3)


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
  assert "flag: margin < tau 0.6." in open(tmp_path / "m_out" / "report.md").read()
  settings = {
      "uncertainty": {"measure": "entropy", "entropy_threshold": 0.15, "tau": 0.95},
      "task": {"name": "tfds", "dataset": "user_tools", "category": "multiple"},
  }
  entropy = report.load_runs([_workdir(tmp_path / "e", 0, rows, **settings)])
  text = open(report.write_report(entropy, str(tmp_path / "e_out"))).read()
  assert "tfds `user_tools`" in text and "flag: entropy > 0.15." in text
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
