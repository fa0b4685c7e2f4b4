"""The command lines: generate prints only the completion; bad settings are refused before anything runs."""

import os
import subprocess
import sys

import pytest

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


def test_generate_cli_refuses_a_bad_sampling_setting_by_name():
  result = subprocess.run(
      [sys.executable, "-m", "ttsi_jax.generate", "--config=configs/default.py",
       "--config.sampling.max_batch=0", "--prompt", "hi"],  # fmt: skip
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0 and "sampling.max_batch=0 (valid: an integer >= 1)" in result.stderr


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--num_processes=2", "--process_id=1"], "--num_processes, --process_id"),
        (["--coordinator_address=localhost:1"], "--coordinator_address"),
    ],
)
def test_main_refuses_multi_host_settings_without_distributed(tmp_path, flags, named):
  result = subprocess.run(
      [sys.executable, "-m", "ttsi_jax.main", "--config=configs/default.py", f"--workdir={tmp_path}", *flags],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0
  assert f"{named} set up a multi-host run: add --distributed." in result.stderr
  assert not os.listdir(tmp_path)  # refused before anything ran
