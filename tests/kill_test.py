"""Nothing lost: the main job killed with SIGKILL inside H, inside T and while writing a wave, and
restarted in the same workdir, ends with the records of an uninterrupted run of another wave size."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import tiny
from ttsi_jax import experiment
from ttsi_jax.checkpoints import orbax as orbax_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the main job with one place patched to SIGKILL the process the n-th time it is reached
# ("H:2" = in the second wave this process runs): "H" on entering the uncertainty stage, "T" once
# the adapters are trained (before any answer is written), "write" after the wave's first record
# and half of its second reached the file.
_KILLED_RUN = r"""
import os, signal, sys
from absl import app
from ttsi_jax import experiment, main

def die():
  os.kill(os.getpid(), signal.SIGKILL)

where, n = sys.argv.pop(1).split(":")
calls = []

def kill_on_call(method, before):
  def patched(*a, **k):
    calls.append(1)
    if before and len(calls) == int(n):
      die()
    out = method(*a, **k)
    if len(calls) == int(n):
      die()
    return out
  return patched

if where == "H":
  experiment.Experiment.measure = kill_on_call(experiment.Experiment.measure, before=True)
elif where == "T":
  experiment.Experiment.train = kill_on_call(experiment.Experiment.train, before=False)
elif where == "write":
  class Cut:  # the results file of the n-th wave, cut in its second record
    def __init__(self, f, kill):
      self.f, self.kill, self.lines = f, kill, 0
    def write(self, text):
      self.lines += 1
      if not (self.kill and self.lines == 2):
        return self.f.write(text)
      self.f.write(text[: len(text) // 2])
      self.f.flush()
      os.fsync(self.f.fileno())
      die()
    def __getattr__(self, name):
      return getattr(self.f, name)
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      return self.f.__exit__(*exc)
  def cut_open(path, mode="r", *a, **k):
    if mode != "a":
      return open(path, mode, *a, **k)
    calls.append(1)
    return Cut(open(path, mode, *a, **k), kill=len(calls) == int(n))
  experiment.open = cut_open
app.run(main.main)
"""


def _config(model):
  config = tiny.get_config()
  config.model.path = model
  config.variants = "base,ttsi"
  config.task.num_examples = 4
  config.synthesis.validate = False  # a random model's pairs: keep them, so flagged inputs train
  config.keep_adapters = "multiple_3"  # written before its wave's records
  return config


def _untimed(path):
  """The records without what depends on when and how they were run (seconds, memory, host, wave)."""
  drop = {"wave_seconds", "peak_memory_bytes", "host", "wave"}
  return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(path)]


def test_kills_in_H_T_and_writing_lose_nothing_and_records_do_not_depend_on_wave_size(
    tiny_chat_model, tmp_path
):
  config = _config(tiny_chat_model)
  config.wave_size = 4
  reference = str(tmp_path / "reference")
  experiment.run(config, reference)
  records = _untimed(os.path.join(reference, "results.jsonl"))
  assert any(r["uncertain"] for r in records) and any(r["variants"]["ttsi"]["adapted"] for r in records)

  killed = str(tmp_path / "killed")
  args = [
      "--config=configs/tiny.py",
      f"--workdir={killed}",
      f"--config.model.path={tiny_chat_model}",
      f"--config.variants={config.variants}",
      f"--config.task.num_examples={config.task.num_examples}",
      f"--config.uncertainty.tau={config.uncertainty.tau}",
      "--config.synthesis.validate=False",
      f"--config.keep_adapters={config.keep_adapters}",
      "--config.wave_size=2",
  ]
  results = os.path.join(killed, "results.jsonl")
  lines_after = []
  for where in ("H:2", "T:1", "write:1"):
    command = [sys.executable, "-c", _KILLED_RUN, where] + args
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-3000:]
    lines_after.append(open(results).read().count("\n"))
  # Killed in wave 1's H (wave 0 written), in wave 1's T, and writing wave 1 (a line and a half of
  # it written, which the last start drops before it redoes the wave).
  assert lines_after == [2, 2, 3]
  config.wave_size = 2
  experiment.run(config, killed)  # here: the programs this process traced serve again
  assert _untimed(results) == records
  saved = os.listdir(os.path.join(killed, "adapters", "ttsi"))
  assert saved == ["multiple_3"]
  # The kept adapter is the one an uninterrupted run keeps (a wave of 4 packs it otherwise: the
  # float sums agree to ~1e-6).
  ours, _ = orbax_lib.load_adapter(os.path.join(killed, "adapters", "ttsi", "multiple_3"))
  theirs, _ = orbax_lib.load_adapter(os.path.join(reference, "adapters", "ttsi", "multiple_3"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ours.weights, theirs.weights)
