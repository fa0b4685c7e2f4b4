"""The main job: python -m ttsi_jax.main --config=configs/default.py --workdir=/tmp/ttsi

Overrides go on the command line (--config.task.num_examples=50). Re-running with the same workdir
resumes after the last finished wave. With --distributed, start one process per host (launch/
does this on Cloud TPU); host 0 writes the workdir.
"""

# Before the imports below: the re-run would otherwise import jax and the model code twice.
if __name__ == "__main__":
  from ttsi_jax import runtime

  runtime.set_xla_flags()
  runtime.reexec_with_malloc_tunables()

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ttsi_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where results.jsonl and metrics.json go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize(): one process per host, each host runs "
    "its share of the waves (ttsi_jax.multihost). On Cloud TPU the settings below are detected.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (where it is not detected)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/ttsi_jax/xla"),
    "Where compiled programs are kept between runs (JAX's persistent compilation cache): a rerun, "
    "a resumed run or another seed of the same model and config skips most compiling. '' = off.",
)


def use_compilation_cache(path: str) -> None:
  """Keeps compiled programs on disk (those that took JAX's
  `jax_persistent_cache_min_compile_time_secs`, 1 s by default, to compile); '' turns it off, also
  where $JAX_COMPILATION_CACHE_DIR set it when jax was imported."""
  jax.config.update("jax_compilation_cache_dir", path or None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  given = [f"--{f.name}" for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.present]
  if given and not _DISTRIBUTED.value:  # else each process would run every wave on its own
    raise app.UsageError(f"{', '.join(given)} set up a multi-host run: add --distributed.")
  use_compilation_cache(_COMPILATION_CACHE.value)
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX devices: %s", jax.devices())
  experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
