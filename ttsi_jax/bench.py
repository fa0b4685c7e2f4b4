"""Throughput benchmarks, side by side with the transformers reference in the same run.

  python -m ttsi_jax.bench --config=configs/default.py [--batch_sizes=1,16] [--new_tokens=64]

Greedy decode tokens/s (prefill included, every row forced to `new_tokens`) for our jitted sampler
and for transformers' `generate` on the same prompts. Compilation is excluded (one warm-up call).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ttsi_jax import checkpoints
from ttsi_jax.model import sharding
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to time.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best is reported).")
_REFERENCE = flags.DEFINE_bool("reference", True, "Also time transformers (needs torch).")

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain recursion to a child.", "List three prime numbers.", "What does a compiler do?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Name five animals that live in the "
    "ocean.", "Summarize the plot of Hamlet.", "How do I reverse a list in Python?",
    "What is the boiling point of water?", "Translate 'good morning' into Spanish.",
    "What is machine learning?", "Describe a sunset.", "How many legs does a spider have?",
    "Suggest a name for a cat.",
]


def _best_time(fn, repeats: int) -> float:
  fn()  # warm-up: compilation / first-call allocations
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  config = _CONFIG.value
  n = _NEW_TOKENS.value
  start = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh_shape or None)
  model_config, params = checkpoints.load(config.model.path, config.model.dtype, mesh)
  tokenizer = tokenizer_lib.load(config.model.path)
  load_s = time.perf_counter() - start
  prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
  # No stop tokens: every row decodes exactly n tokens in both implementations.
  sampler = sampler_lib.Sampler(model_config, params, stop_ids=(), pad_id=tokenizer.pad_id)
  sampling = sampler_lib.SamplingParams(max_new_tokens=n)

  rows = []
  for b in map(int, _BATCH_SIZES.value):
    batch = [prompts[i % len(prompts)] for i in range(b)]
    seconds = _best_time(lambda: sampler.generate(batch, sampling), _REPEATS.value)
    rows.append(("ttsi_jax", b, seconds, b * n / seconds))

  if _REFERENCE.value:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count() or 1)
    path = checkpoints.resolve(config.model.path)
    kwargs = dict(dtype=torch.float32)
    if path.endswith(".gguf"):
      kwargs["gguf_file"] = os.path.basename(path)
      path = os.path.dirname(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    for b in map(int, _BATCH_SIZES.value):
      batch = [prompts[i % len(prompts)] for i in range(b)]
      length = max(map(len, batch))
      ids = torch.tensor([[tokenizer.pad_id] * (length - len(p)) + p for p in batch])
      mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch])

      def run():
        with torch.no_grad():
          ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=tokenizer.pad_id)

      seconds = _best_time(run, _REPEATS.value)
      rows.append(("transformers", b, seconds, b * n / seconds))

  print(f"model: {checkpoints.resolve(config.model.path)}  dtype={config.model.dtype}  "
        f"devices={jax.device_count()} ({jax.devices()[0].platform})")
  print(f"load (params + tokenizer): {load_s:.1f} s")
  print(f"greedy decode, {n} new tokens per row, best of {_REPEATS.value}:")
  print(f"{'impl':<14}{'batch':>6}{'seconds':>10}{'tokens/s':>12}")
  for impl, b, seconds, tps in rows:
    print(f"{impl:<14}{b:>6}{seconds:>10.2f}{tps:>12.1f}")
  ref_b1 = [r[3] for r in rows if r[0] == "transformers" and r[1] == 1]
  if ref_b1:
    for impl, b, _, tps in rows:
      if impl == "ttsi_jax":
        print(f"ttsi_jax batch {b} / transformers batch 1: {tps / ref_b1[0]:.2f}x")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
