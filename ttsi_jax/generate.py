"""Generate a chat completion: python -m ttsi_jax.generate --config=configs/default.py --prompt "..."

Prints only the completion on stdout (logs go to stderr), so the output can be piped.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ttsi_jax import checkpoints, config_schema
from ttsi_jax.model import sharding
from ttsi_jax.text import sampler as sampler_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt",
    None,
    "User message(s); several are generated as " "one batch, completions separated by blank lines.",
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Overrides config.sampling.max_new_tokens.", lower_bound=1
)


def main(argv):
  del argv
  config = _CONFIG.value
  if not _PROMPT.value:
    raise app.UsageError("--prompt is required.")
  config_schema.validate(config)
  mesh = sharding.make_mesh(config.mesh_shape or None)
  model = sampler_lib.load_model(config.model.path, config.model.dtype, mesh, config.sampling.max_batch)
  tokenizer = model.tokenizer
  logging.info("Loaded %s: %s", checkpoints.resolve(config.model.path), model.config)
  sampling = sampler_lib.SamplingParams(
      max_new_tokens=config.sampling.max_new_tokens
      if _MAX_NEW_TOKENS.value is None
      else _MAX_NEW_TOKENS.value,
      temperature=config.sampling.temperature,
      top_p=config.sampling.top_p,
  )
  prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in _PROMPT.value]
  with sampler_lib.buckets_per_octave(config.buckets_per_octave):
    completions = model.sampler.generate(prompts, sampling, jax.random.key(config.seed))
  sys.stdout.write("\n\n".join(tokenizer.decode(c) for c in completions) + "\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
