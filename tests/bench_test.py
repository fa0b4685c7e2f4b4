"""The bench's scaling stage (the GPU check of many adapters per call) runs end to end here, on a
tiny random model, and reports what it promises."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from ttsi_jax.model import cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scaling_stage_trains_each_adapter_count_and_reports_inputs_per_second_mfu_and_profile(tmp_path):
  out = tmp_path / "scaling.json"
  cmd = [sys.executable, "-m", "ttsi_jax.bench", "--config=configs/default.py", "--stage=scaling",
         "--shapes=tiny", "--adapter_counts=1,3", "--sequence_tokens=100,20", "--repeats=1",
         f"--json={out}", "--profile", f"--trace_dir={tmp_path / 'trace'}",
         "--attention_check=2"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["stage"] == "scaling" and report["model"] == "random, tiny shapes"
  assert report["steps_per_adapter"] == 5  # the default config's epochs, one pair per adapter
  assert report["repeats"] == 1 and report["adaptation"]["rank"] == 8 and report["adaptation"]["epochs"] == 5
  rows = report["rows"]
  assert [r["adapters"] for r in rows] == [1, 3]
  # FLOPs per sequence and step, by hand for the tiny shapes (2 layers, width 64, 4 heads of 16,
  # 2 KV heads, MLP 128, vocabulary 512) and the default config's rank-8 LoRA on every linear
  # layer: per layer the frozen weights 2 x 36864 per token over 120 tokens, doubled for the
  # activation gradients; causal attention 4 x 64 x 7260, tripled (dQ, dK, dV, dP); LoRA 2 x 8 x
  # 1024 (in + out of the 7 targets) per token, tripled (its weight gradients too); the head over
  # the 20 answer tokens, doubled.
  per_layer = 2 * 36864 * 120 * 2 + 4 * 64 * 7260 * 3 + 2 * 8 * 1024 * 120 * 3
  per_sequence_step = 2 * per_layer + 2 * 64 * 512 * 20 * 2
  for r in rows:
    counted = r["gflop_per_s"] * 1e9 * r["seconds"]
    assert counted == pytest.approx(per_sequence_step * 5 * r["adapters"], rel=1e-9)
    assert 0 < r["mfu"] < 1
    assert r["first_call_seconds"] > r["seconds"]  # the first call of a count compiles its step
    # The update steps alone (no host-side packing): the same FLOPs over their own seconds.
    counted = r["train_mfu"] * report["matmul_peak_gflop_per_s"] * 1e9 * r["train_seconds"]
    assert counted == pytest.approx(per_sequence_step * 5 * r["adapters"], rel=1e-9)
    assert 0 < r["train_mfu"] < 1
    # Each adapter learns its pair: the loss falls from the first step (learning rate 0 under
    # warmup) to the last.
    assert math.isfinite(r["final_loss"]) and r["final_loss"] < r["first_loss"]
  assert "inputs/s" in result.stdout and "MFU" in result.stdout and "first call s" in result.stdout
  # --profile: where the largest count's step spends its time, its trace kept in --trace_dir.
  profile = report["profile"]
  assert "all 3 adapters in one call" in result.stdout
  assert profile["kinds"]["matmul"] > 0 and profile["wall_s"] > 0
  assert sum(profile["kinds"].values()) <= profile["wall_s"] * 1.05
  assert list((tmp_path / "trace").glob("plugins/profile/*/*.trace.json.gz"))
  assert (tmp_path / "trace" / "compiled_hlo.txt").read_text().startswith("HloModule jit_step")
  attention = "fused" if cpu_kernels.available() else "xla"  # model.attention=auto on a CPU
  assert report["attention"] == attention and f"{attention} attention" in result.stdout
  # --attention_check: each attention that runs here trains what float32 XLA attention trains; XLA's
  # own is that reference here (float32 on CPU), the fused kernel differs by float32 rounding.
  check = report["attention_check"]
  assert check["adapters"] == 2 and check["dtype"] == "float32" and "attention check" in result.stdout
  errors = {r["attention"]: r for r in check["rows"]}
  assert list(errors) == (["xla", "fused"] if cpu_kernels.available() else ["xla"])
  assert errors["xla"]["a_relative_error"] == errors["xla"]["b_relative_error"] == 0.0
  for r in errors.values():
    assert r["a_relative_error"] < 1e-5 and r["b_relative_error"] < 1e-4 and r["loss_max_abs_diff"] < 1e-5


def test_scaling_gains_are_measured_against_one_adapter():
  cmd = [sys.executable, "-m", "ttsi_jax.bench", "--config=configs/default.py", "--stage=scaling",
         "--shapes=tiny", "--adapter_counts=2,4"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "--adapter_counts must start at 1" in result.stderr
  # Bad flag values stop at parsing, before any model is built.
  for flag, message in (
      ("--batch_sizes=1,x", "--batch_sizes takes positive integers"),
      ("--sequence_tokens=576,0", "--sequence_tokens takes positive integers"),
      ("--json=/nowhere/at/all/out.json", "--json's folder does not exist"),
  ):
    result = subprocess.run(cmd[:-1] + [flag], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_decode_stage_writes_its_table_to_json(tiny_chat_model, tmp_path):
  out = tmp_path / "decode.json"
  cmd = [sys.executable, "-m", "ttsi_jax.bench", "--config=configs/tiny.py",
         f"--config.model.path={tiny_chat_model}", "--batch_sizes=1,2", "--new_tokens=3",
         "--repeats=1", "--noreference", f"--json={out}"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["stage"] == "decode" and report["new_tokens"] == 3 and report["dtype"] == "float32"
  # The tests' XLA_FLAGS (inherited) give the CPU 8 host devices; configs/tiny.py's mesh uses one.
  assert (report["platform"], report["devices"], report["repeats"]) == ("cpu", 1, 1)
  assert jax.device_count() == 8
  rows = report["rows"]
  assert [(r["implementation"], r["batch"]) for r in rows] == [("ttsi_jax", 1), ("ttsi_jax", 2)]
  assert all(r["seconds"] > 0 for r in rows) and "greedy decode, 3 new tokens per row" in result.stdout


def test_t_stage_runs_beside_peft_on_the_same_tokens(tiny_chat_model, tmp_path):
  """adapt asserts that PEFT trains on the same token ids, and reports its row (H's log-likelihoods
  against a transformers forward: answering_test)."""
  stage = "adapt"
  out = tmp_path / f"{stage}.json"
  cmd = [sys.executable, "-m", "ttsi_jax.bench", "--config=configs/tiny.py",
         f"--config.model.path={tiny_chat_model}", f"--stage={stage}", "--adapters=2", "--repeats=1",
         "--config.adaptation.epochs=1", "--noxla_rows", f"--json={out}"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  names = [r["implementation"] for r in report["rows"]]
  assert "transformers + PEFT, one after another" in names and all(r["seconds"] > 0 for r in report["rows"])
  assert all(0 < r["fraction_of_peak"] for r in report["rows"])
