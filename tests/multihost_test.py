"""Two hosts on localhost (jax.distributed, CPU): waves split between them, gathered once each."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.experiment_test import ROOT
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.tasks.bfcl import BfclTask

NUM_EXAMPLES = 3  # three one-input waves: a full round for both hosts, then one for host 0 alone


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(model, workdir, *extra):
  return [sys.executable, "-m", "ttsi_jax.main", "--config=configs/tiny.py",
          f"--config.model.path={model}", "--config.variants=base,oracle",
          "--config.decoding.modes=direct", f"--config.task.num_examples={NUM_EXAMPLES}",
          "--config.wave_size=1", "--config.uncertainty.tau=1.01", "--config.keep_adapters=all",
          f"--workdir={workdir}", *extra]


def _start(command):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(procs):
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _two_hosts(model, workdir):
  port = _free_port()
  return [_start(_command(model, workdir, "--distributed", f"--coordinator_address=localhost:{port}",
                          "--num_processes=2", f"--process_id={i}")) for i in range(2)]


def _records(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  for r in lines:
    r.pop("wave_seconds")
    r.pop("host")
  return lines


def _hosts(workdir):
  return [json.loads(l)["host"] for l in open(os.path.join(workdir, "results.jsonl"))]


def _metrics(workdir):
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  metrics.pop("timing")
  return metrics


def test_two_hosts_split_the_waves_and_write_each_once(tiny_chat_model, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  _finish([_start(_command(tiny_chat_model, single))] + _two_hosts(tiny_chat_model, multi))
  ids = [ex.id for ex in BfclTask("multiple", NUM_EXAMPLES).examples()]
  assert [r["id"] for r in _records(multi)] == ids  # every input once, in wave order
  assert _hosts(multi) == [0, 1, 0] and _hosts(single) == [0, 0, 0]  # each host ran its share
  # Which host ran a wave changes nothing: records and metrics equal the one-process run's.
  assert _records(multi) == _records(single)
  assert _metrics(multi) == _metrics(single)
  # Each host saved the adapters it trained (no barrier with the other host), equal to the
  # one-process run's.
  for i in ids:
    kept, _ = orbax_lib.load_adapter(os.path.join(multi, "adapters", "oracle", i))
    alone, _ = orbax_lib.load_adapter(os.path.join(single, "adapters", "oracle", i))
    for x, y in zip(jax.tree.leaves(kept.weights), jax.tree.leaves(alone.weights), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Cut after wave 0: the restarted hosts share the two pending waves and append each once.
  path = os.path.join(multi, "results.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  with open(path, "w") as f:
    f.writelines(lines[:1])
  outputs = _finish(_two_hosts(tiny_chat_model, multi))
  assert "Resuming after 1 finished wave" in outputs[0]
  assert _hosts(multi) == [0, 0, 1]  # the pending waves 1 and 2 form one round
  assert _records(multi) == _records(single)
  assert _metrics(multi) == _metrics(single)
  assert "variant/mode" in outputs[0] and "variant/mode" not in outputs[1]  # host 0 reports
