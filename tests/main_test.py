"""The main job's command line."""

import os
import subprocess
import sys


def test_an_empty_compilation_cache_dir_turns_the_cache_off_also_where_the_environment_set_it(tmp_path):
  code = (
      "import jax; from ttsi_jax import main; before = jax.config.jax_compilation_cache_dir; "
      "main.use_compilation_cache(''); print(before, jax.config.jax_compilation_cache_dir); "
      "main.use_compilation_cache('/tmp/elsewhere'); print(jax.config.jax_compilation_cache_dir)"
  )
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split() == [str(tmp_path), "None", "/tmp/elsewhere"]
