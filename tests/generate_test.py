"""The documented generate command prints only the completion."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_cli_prints_only_the_completion():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "ttsi_jax.generate",
          "--config=configs/default.py",
          "--prompt",
          "What is the capital of France?",
          "--max_new_tokens",
          "16",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == "The capital of France is Paris.\n"


def test_generate_cli_names_a_missing_model(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "ttsi_jax.generate",
          "--config=configs/default.py",
          f"--config.model.path={tmp_path}/missing",
          "--prompt",
          "hi",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0
  assert f"{tmp_path}/missing does not exist" in result.stderr
