"""Throughput benchmarks, side by side with the transformers reference in the same run.

  python -m ttsi_jax.bench --config=configs/default.py [--batch_sizes=1,16] [--new_tokens=64]

Greedy decode tokens/s (prefill included, every row forced to `new_tokens`) for our jitted sampler
and for transformers' `generate` on the same prompts. Compilation is excluded (one warm-up call).
"""

from __future__ import annotations

import os
import time

import jax
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
_STAGE = flags.DEFINE_enum("stage", "decode", ["decode", "adapt"],
                           "decode: sampler vs transformers; adapt: A vmapped adapters vs the "
                           "same adapters trained one at a time.")
_ADAPTERS = flags.DEFINE_integer("adapters", 8, "Adapters per wave for --stage=adapt.")

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


def bench_adapt(config) -> None:
  """Wall time of one vmapped training call for A adapters vs A single-adapter calls (same code,
  same data: BFCL prompts with their gold calls, as the oracle variant trains)."""
  from ttsi_jax import experiment
  exp = experiment.Experiment(config, workdir="")
  examples = exp.examples[:_ADAPTERS.value]
  data = [[exp._training_example(ex, ex.question, exp.task.gold_answer(ex))] for ex in examples]
  keys = jax.random.split(jax.random.key(0), len(data))

  def trained(per_call):
    # per_call=1: each adapter alone in its own length bucket (<= the wave's): no padding handicap.
    return lambda: jax.block_until_ready(
        exp.trainer.train_all(exp.params, data, exp.tokenizer.pad_id, keys, per_call)[0])

  vmapped = _best_time(trained(0), _REPEATS.value)
  sequential = _best_time(trained(1), _REPEATS.value)
  steps = exp.adapt_cfg.epochs
  print(f"model: {checkpoints.resolve(config.model.path)}  devices={jax.device_count()} "
        f"({jax.devices()[0].platform})")
  print(f"adaptation of {len(data)} adapters x {steps} steps, best of {_REPEATS.value}:")
  print(f"{'mode':<24}{'seconds':>10}")
  print(f"{'vmapped (one call)':<24}{vmapped:>10.2f}")
  print(f"{'one at a time':<24}{sequential:>10.2f}")
  print(f"speedup: {sequential / vmapped:.2f}x")


def main(argv):
  del argv
  config = _CONFIG.value
  if _STAGE.value == "adapt":
    return bench_adapt(config)
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
    kwargs = dict(dtype=getattr(torch, config.model.dtype))  # the same precision as ours
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
