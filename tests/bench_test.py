"""The bench's scaling stage (the GPU check of many adapters per call) runs end to end here, on a
tiny random model, and reports what it promises."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scaling_stage_trains_each_adapter_count_and_reports_inputs_per_second_and_mfu(tmp_path):
  out = tmp_path / "scaling.json"
  cmd = [sys.executable, "-m", "ttsi_jax.bench", "--config=configs/default.py", "--stage=scaling",
         "--shapes=tiny", "--adapter_counts=1,3", "--sequence_tokens=100,20", "--repeats=1",
         f"--json={out}"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["stage"] == "scaling" and report["model"] == "random, tiny shapes"
  rows = report["rows"]
  assert [r["adapters"] for r in rows] == [1, 3]
  assert rows[0]["vs_one"] == 1.0
  for r in rows:
    assert r["inputs_per_s"] == r["adapters"] / r["seconds"] > 0
    assert 0 < r["mfu"] == r["gflop_per_s"] / report["matmul_peak_gflop_per_s"]
    # Each adapter learns its pair: the loss falls from the first step (learning rate 0 under
    # warmup) to the last.
    assert math.isfinite(r["final_loss"]) and r["final_loss"] < r["first_loss"]
  assert "inputs/s" in result.stdout and "MFU" in result.stdout
