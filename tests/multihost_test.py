"""Two hosts on localhost (jax.distributed, CPU): waves split between them, gathered once each."""

import json
import os
import socket
import subprocess
import sys

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
          f"--config.model.path={model}", "--config.variants=base,ttsi",
          "--config.decoding.modes=direct", f"--config.task.num_examples={NUM_EXAMPLES}",
          "--config.wave_size=1", "--config.uncertainty.tau=1.01", f"--workdir={workdir}", *extra]


def _start(command):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
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


# Each host keeps an adapter it trained; host 0 alone saves them all (orbax, no barrier).
_KEEP = """
import sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from ttsi_jax import experiment, multihost
host = jax.process_index()
weights = {"attn": {"q_proj": {"a": np.full((2, 4, 1), host, np.float32),
                               "b": np.full((2, 1, 4), 10 + host, np.float32)}}}
kept = multihost.allgather_trees(
    [{"variant": "ttsi", "id": f"input_{host}", "weights": weights, "scale": 2.0, "dropout": 0.0}])
if multihost.is_leader():
  experiment.save_kept_adapters(sys.argv[3], kept, "base")
print("host", host, "gathered", [k["id"] for k in kept])
"""


def test_adapters_kept_on_every_host_are_saved_by_host_0(tmp_path):
  address = f"localhost:{_free_port()}"
  outputs = _finish([_start([sys.executable, "-c", _KEEP, address, str(i), str(tmp_path)])
                     for i in range(2)])
  assert all("gathered ['input_0', 'input_1']" in out for out in outputs)
  for host in range(2):
    adapter, meta = orbax_lib.load_adapter(str(tmp_path / "adapters" / "ttsi" / f"input_{host}"))
    q = adapter.weights["attn"]["q_proj"]
    np.testing.assert_array_equal(np.asarray(q["a"]), np.full((2, 4, 1), host, np.float32))
    np.testing.assert_array_equal(np.asarray(q["b"]), np.full((2, 1, 4), 10 + host, np.float32))
    assert adapter.scale == 2.0 and meta["base_model"] == "base"
