"""The report: accuracy over seeds, the tau sweep from one run, and every plot written."""

import json
import os

import pytest

from ttsi_jax import report
from ttsi_jax.ttsi import records
from ttsi_jax.ttsi.synthesis import Pair


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


def _workdir(path, seed, rows):
  os.makedirs(path)
  with open(path / "config.json", "w") as f:
    json.dump(
        {"seed": seed, "task": {"name": "bfcl", "category": "multiple"}, "uncertainty": {"tau": 0.6}}, f
    )
  with open(path / "results.jsonl", "w") as f:
    for i, row in enumerate(rows):
      f.write(_record(i, *row, wave=i // 2).to_json() + "\n")
  return str(path)


def test_tau_sweep_answers_as_all_inputs_below_tau_and_as_base_above():
  recs = [_record(0, 0.1, False, True), _record(1, 0.5, True, True), _record(2, 0.9, False, False)]
  low, mid, every = report.tau_sweep(recs, taus=(0.0, 0.6, 1.01))
  assert low == dict(tau=0.0, flagged=0.0, ttsi=1 / 3, tpr=0.0, precision=0.0)
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
  assert "| self-written pairs | kept | 3.0 |" in text
  for png in ("accuracy.png", "tau.png", "margins.png", "stages.png"):
    assert f"]({png})" in text
    with open(tmp_path / "out" / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / "out" / png) > 5000


def test_report_refuses_runs_of_other_inputs_and_names_a_missing_workdir(tmp_path):
  a = _workdir(tmp_path / "a", 0, [(0.1, False, True), (0.5, True, True)])
  b = _workdir(tmp_path / "b", 1, [(0.1, False, True)])
  with pytest.raises(ValueError, match="answered other inputs"):
    report.load_runs([a, b])
  with pytest.raises(FileNotFoundError, match=r"nowhere/results.jsonl does not exist"):
    report.load_runs([str(tmp_path / "nowhere")])
