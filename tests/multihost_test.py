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

NUM_EXAMPLES = 4  # one-input waves

# The main job, with wave 1 raising (as running out of memory would) on whichever host runs it.
_FAIL_ON_WAVE_1 = """
import runpy, sys
from ttsi_jax import experiment
run_wave = experiment.Experiment.run_wave
def failing(self, wave, examples, timer):
  if wave == 1:
    raise RuntimeError("out of memory on wave 1")
  return run_wave(self, wave, examples, timer)
experiment.Experiment.run_wave = failing
sys.argv = ["ttsi_jax.main", *sys.argv[1:]]
runpy.run_module("ttsi_jax.main", run_name="__main__")
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(model, workdir, *extra, main=("-m", "ttsi_jax.main")):
  return [
      sys.executable,
      *main,
      "--config=configs/tiny.py",
      f"--config.model.path={model}",
      "--config.variants=base,oracle",  # oracle trains every input (on its gold call)
      "--config.decoding.modes=direct",
      f"--config.task.num_examples={NUM_EXAMPLES}",
      "--config.wave_size=1",
      "--config.uncertainty.tau=1.01",
      f"--workdir={workdir}",
      *extra,
  ]


def _start(command):
  # One device per host; LLVM at -O0 as in the other tests (the test's five runs mostly compile).
  flags = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
      command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(procs, ok=True):
  """The processes' outputs, once all ended (a host left waiting for another fails the test)."""
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert (p.returncode == 0) == ok, out[-3000:]
  return outputs


def _two_hosts(model, workdir, **kwargs):
  port = _free_port()
  return [
      _start(
          _command(
              model,
              workdir,
              "--distributed",
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
              **kwargs,
          )
      )
      for i in range(2)
  ]


def _records(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  for r in lines:
    r.pop("wave_seconds")
    r.pop("peak_memory_bytes")
    r.pop("host")
  return lines


def _hosts(workdir):
  return [json.loads(l)["host"] for l in open(os.path.join(workdir, "results.jsonl"))]


def _metrics(workdir):
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  metrics.pop("timing")
  return metrics


def test_two_hosts_split_the_waves_stop_together_and_resume(tiny_chat_model, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  # The one-process run first: the hosts then read its compiled programs from the tests' shared
  # compilation cache, where the three processes at once each compiled them all.
  _finish([_start(_command(tiny_chat_model, single))])
  # Round [0, 1]: host 1 fails on wave 1. Both hosts stop (none waits for the other) and host 0
  # still writes wave 0, which host 0 finished.
  failed = _finish(_two_hosts(tiny_chat_model, multi, main=("-c", _FAIL_ON_WAVE_1)), ok=False)
  assert "Host 1 failed on wave 1 (the waves before it are in" in failed[0]
  assert "RuntimeError: out of memory on wave 1" in failed[0] + failed[1]
  assert _hosts(multi) == [0]
  # The restarted hosts run the pending waves 1, 2, 3 in rounds [1, 2] and [3] (host 1 idle).
  outputs = _finish(_two_hosts(tiny_chat_model, multi))
  assert "Resuming after 1 finished wave" in outputs[0]
  ids = [ex.id for ex in BfclTask("multiple", NUM_EXAMPLES).examples()]
  assert [r["id"] for r in _records(multi)] == ids  # every input once, in wave order
  assert _hosts(multi) == [0, 0, 1, 0] and _hosts(single) == [0, 0, 0, 0]
  # Which host ran a wave changes nothing: records and metrics equal the one-process run's.
  assert _records(multi) == _records(single)
  assert all(r["variants"]["oracle"]["adapted"] for r in _records(multi))  # training split over hosts
  assert _metrics(multi) == _metrics(single)
  assert "variant/mode" in outputs[0] and "variant/mode" not in outputs[1]  # host 0 reports


# Each host keeps an adapter it trained (shared by two variants); host 0 alone saves them all
# (orbax, no barrier) and alone reads one back (as it loads the sft baseline's) while host 1 waits
# in the step's collective. Then host 1's step raises: every host learns it in that collective.
_KEEP = """
import sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from ttsi_jax import experiment, multihost
from ttsi_jax.checkpoints import orbax as orbax_lib
host = jax.process_index()
weights = {"attn": {"q_proj": {"a": np.full((2, 4, 1), host, np.float32),
                               "b": np.full((2, 1, 4), 10 + host, np.float32)}}}
kept = multihost.allgather_trees([{"variants": ["ttsi", "all_inputs"], "id": f"input_{host}",
                                   "weights": weights, "scale": 2.0, "dropout": 0.0}])
if multihost.is_leader():
  experiment.save_kept_adapters(sys.argv[3], [k for ks in kept for k in ks], "base")
print("host", host, "gathered", [[k["id"] for k in ks] for ks in kept])
read = lambda: orbax_lib.load_adapter(sys.argv[3] + "/adapters/ttsi/input_1")[0].scale
scale, failure = multihost.guarded(read if multihost.is_leader() else lambda: None)
print("host", host, "read", scale, failure)

def interrupted():
  if host == 1:
    raise KeyboardInterrupt  # Ctrl-C on one host: the other learns of it, not waits
  return "done"

value, failure = multihost.guarded(interrupted)
print("host", host, "interrupt from host", failure.host, type(failure.own).__name__)

def step():
  if host == 1:
    raise ValueError("no memory left on host 1")
  return "done"

value, failure = multihost.guarded(step)
print("host", host, "value", value, "first failed host", failure.host)
failure.throw("on wave 7")
"""


def test_kept_adapters_reach_host_0_and_a_failed_step_stops_every_host(tmp_path):
  address = f"localhost:{_free_port()}"
  outputs = _finish(
      [_start([sys.executable, "-c", _KEEP, address, str(i), str(tmp_path)]) for i in range(2)], ok=False
  )
  assert all("gathered [['input_0'], ['input_1']]" in out for out in outputs)
  for host in range(2):
    for variant in ("ttsi", "all_inputs"):
      adapter, meta = orbax_lib.load_adapter(str(tmp_path / "adapters" / variant / f"input_{host}"))
      q = adapter.weights["attn"]["q_proj"]
      np.testing.assert_array_equal(np.asarray(q["a"]), np.full((2, 4, 1), host, np.float32))
      np.testing.assert_array_equal(np.asarray(q["b"]), np.full((2, 1, 4), 10 + host, np.float32))
      assert adapter.scale == 2.0 and meta["base_model"] == "base"
  assert "host 0 read 2.0 None" in outputs[0] and "host 1 read None None" in outputs[1]
  assert "host 0 interrupt from host 1 NoneType" in outputs[0]
  assert "host 1 interrupt from host 1 KeyboardInterrupt" in outputs[1]
  assert "host 0 value done first failed host 1" in outputs[0]
  assert "HostFailure: Host 1 failed on wave 7: ValueError: no memory left on host 1" in outputs[0]
  assert "host 1 value None first failed host 1" in outputs[1]
  assert "ValueError: no memory left on host 1" in outputs[1]  # its own exception


# Host 1 was given another wave_size (and, second, other inputs): every host stops at once, each
# naming the difference, instead of pairing their rounds' collectives out of order.
_DISAGREE = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from configs import tiny
from ttsi_jax import experiment
host = jax.process_index()
config = tiny.get_config()
config.adaptation.adapters_per_call = 1 + host  # a field that changes no result may differ
experiment.check_hosts_agree(config, "bfcl-eval 1", ["a", "b"])
print("host", host, "agreed")
config.wave_size = 2 + host
try:
  experiment.check_hosts_agree(config, "bfcl-eval 1", ["a", "b"][: 2 - host])
except ValueError as e:
  print("host", host, "refused:", e)
config.wave_size = 2
config.keep_adapters = "a" if host else ""
try:
  experiment.check_hosts_agree(config, f"bfcl-eval {1 + host}", ["a", "b"])
except ValueError as e:
  print("host", host, "then refused:", e)
"""


def test_hosts_that_run_another_setting_or_other_inputs_stop_together(tmp_path):
  address = f"localhost:{_free_port()}"
  outputs = _finish([_start([sys.executable, "-c", _DISAGREE, address, str(i)]) for i in range(2)])
  for host, out in enumerate(outputs):
    assert f"host {host} agreed" in out
    assert (
        f"host {host} refused: The hosts do not run one setting on the same data (host 1 differs from "
        "host 0 in ['wave_size', 'inputs'])"
    ) in out
    # Which adapters host 0 saves, and the data's version (another bfcl-eval on a worker).
    assert f"host {host} then refused: The hosts do not run one setting on the same data (host 1 " in out
    assert "differs from host 0 in ['keep_adapters', 'data_version'])" in out


def test_the_main_job_stops_every_host_given_another_setting(tiny_chat_model, tmp_path):
  port = _free_port()
  hosts = [
      _command(
          tiny_chat_model,
          str(tmp_path / "run"),
          "--distributed",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
          *(["--config.wave_size=2"] if i else []),  # an override given to one worker only
      )
      for i in range(2)
  ]
  for out in _finish([_start(command) for command in hosts], ok=False):
    assert "(host 1 differs from host 0 in ['wave_size'])" in out
  assert not os.path.exists(tmp_path / "run" / "results.jsonl")
