"""Throughput benchmarks, side by side with the transformers reference in the same run.

  python -m ttsi_jax.bench --config=configs/default.py [--stage=decode|adapt|score|answer|scaling] [--json=F]

- decode: greedy decode tokens/s (prefill included, every row forced to `new_tokens`) for our jitted
  sampler and for transformers' `generate` on the same prompts.
- adapt (T): the oracle's adapters (BFCL prompts with their gold calls) trained by our packed step,
  all adapters in one call and one adapter per call, beside transformers + PEFT training the same
  adapters one after another (same rank, alpha, targets, AdamW, clipping, schedule, steps, dtype,
  threads; the token ids are asserted equal).
- score (H): candidate log-likelihoods of BFCL prompts, ours (prompt prefilled once, candidates
  packed) beside a transformers forward pass per prompt + candidate.
- answer: the base and adapted answers of a wave (prefill, candidate scores, well-formed calls) for
  BFCL prompts, with the base model and an adapter per prompt, beside transformers' `generate`
  writing as many tokens greedily (a yardstick: it follows no schema and scores nothing).
- scaling: what training many adapters in one call buys on this machine. For each A in
  --adapter_counts, A fresh adapters of a random-weight model (--shapes; Qwen2.5-1.5B's by
  default) train on one synthetic pair each (--sequence_tokens) in one packed call, with the
  config's adaptation settings: adapted inputs/s, its gain over A = 1, and the FLOP/s of the whole
  call (adapter init, packing and every step) against the matmul peak measured in the same run, in
  the model's dtype (MFU); the same for the call less its host-side packing (adapter init and the
  update steps: the steps' MFU); and the first call's seconds, which compile its step.

On CPU, adapt and score also time our rows with XLA's ops in place of the C++ kernels (attention;
the LoRA branch of packed rows: `ttsi_jax.model.cpu_kernels`): their gain, measured in the same run.

Compilation is excluded (one warm-up call). FLOPs are counted from the model's shapes
(`model_flops`) for the work each implementation needs (for T the same useful work on both sides:
the reference's logits over every prompt token are not credited; for H the reference runs each
prompt again per candidate), and set beside the float32 matmul peak this run measures. The
transformers references run on the CPU, also where ours runs on an accelerator.
"""

from __future__ import annotations

# Before the imports below: the re-run would otherwise import jax and the model code twice.
if __name__ == "__main__":
  from ttsi_jax import runtime

  runtime.set_xla_flags()
  runtime.reexec_with_malloc_tunables()

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ttsi_jax import checkpoints, config_schema, profiling
from ttsi_jax.model import cpu_kernels, sharding, transformer
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import scoring

# Known models' shapes (from their config.json) for the scaling stage's random-weight models.
MODEL_SHAPES = {
    "qwen2.5-1.5b": dict(
        architecture="Qwen2ForCausalLM", vocab_size=151936, num_layers=28, embed_dim=1536,
        num_heads=12, num_kv_heads=2, head_dim=128, mlp_dim=8960, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=32768, tie_embeddings=True, qkv_bias=True,
    ),
    "smollm2-135m": dict(
        architecture="LlamaForCausalLM", vocab_size=49152, num_layers=30, embed_dim=576,
        num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536, rms_norm_eps=1e-5,
        rope_theta=1e5, max_position_embeddings=8192, tie_embeddings=True,
    ),
    "tiny": dict(
        architecture="LlamaForCausalLM", vocab_size=512, num_layers=2, embed_dim=64, num_heads=4,
        num_kv_heads=2, head_dim=16, mlp_dim=128, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=2048, tie_embeddings=True,
    ),
}  # fmt: skip


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to time.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "New tokens per row.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best is reported).", lower_bound=1)
_REFERENCE = flags.DEFINE_bool("reference", True, "Also time transformers (needs torch).")
_STAGE = flags.DEFINE_enum(
    "stage",
    "decode",
    ["decode", "adapt", "score", "answer", "scaling"],
    "decode: sampler vs transformers generate; adapt: packed LoRA training "
    "vs transformers + PEFT; score: candidate log-likelihoods vs a "
    "transformers forward pass; answer: well-formed calls, base and adapted, beside transformers "
    "generate of as many tokens; scaling: adapted inputs/s against adapters per call.",
)
_ADAPTERS = flags.DEFINE_integer(
    "adapters",
    4,
    "Adapters (BFCL inputs) for --stage=adapt, prompts for --stage=score / answer.",
    lower_bound=1,
)
_SHAPES = flags.DEFINE_enum(
    "shapes",
    "qwen2.5-1.5b",
    list(MODEL_SHAPES),
    "--stage=scaling: a random-weight model of these shapes (in --config.model.dtype).",
)
_ADAPTER_COUNTS = flags.DEFINE_list(
    "adapter_counts", ["1", "8", "32", "64"], "--stage=scaling: adapters per packed call."
)
_SEQUENCE_TOKENS = flags.DEFINE_list(
    "sequence_tokens", ["576", "64"], "--stage=scaling: prompt and answer tokens of each training pair."
)
for _name in (
    "batch_sizes",
    "adapter_counts",
    "sequence_tokens",
):  # checked at parsing, not after a model loads
  flags.register_validator(
      _name,
      lambda values: all(v.strip().isdigit() and int(v) > 0 for v in values),
      f"--{_name} takes positive integers, comma separated.",
  )
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
flags.register_validator(
    "json",
    lambda path: not path or os.path.isdir(os.path.dirname(os.path.abspath(path))),
    "--json's folder does not exist: create it first (the results are written after all the timings).",
)
_XLA_ROWS = flags.DEFINE_bool(
    "xla_rows", True, "On CPU, also time our paths on XLA's own ops instead of the C++ kernels."
)
_PROFILE = flags.DEFINE_bool(
    "profile",
    False,
    "--stage=adapt and scaling: also print where the packed call's time goes (ttsi_jax.profiling: a "
    "jax.profiler trace of its first step with all adapters in one call, the largest count's in "
    "scaling, by kind of op and op name).",
)
_ATTENTION_CHECK = flags.DEFINE_integer(
    "attention_check",
    0,
    "--stage=scaling: also train this many adapters (0: none) with each attention that runs here "
    "(model.attention: xla, cudnn, the fused CPU kernel), in --config.model.dtype, and once in "
    "float32 with XLA's attention at the highest matmul precision; prints each one's error against "
    "that reference, so that an attention kernel is seen to train what XLA's does.",
)
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir",
    "",
    "With --profile: keep the jax.profiler trace in this folder (open it in Perfetto), and the "
    "compiled HLO whose instructions its names refer to (compiled_hlo.txt).",
)

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "What does a compiler do?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Name five animals that live in the " "ocean.",
    "Summarize the plot of Hamlet.",
    "How do I reverse a list in Python?",
    "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "What is machine learning?",
    "Describe a sunset.",
    "How many legs does a spider have?",
    "Suggest a name for a cat.",
]


def _first_and_best_time(fn, repeats: int) -> tuple[float, float]:
  """Seconds of the first call (compilation and first-call allocations included) and the best
  of `repeats` calls after it."""
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times[0], min(times[1:])


def _best_time(fn, repeats: int) -> float:
  return _first_and_best_time(fn, repeats)[1]


def matmul_peak(dtype: str = "float32", torch_too: bool = True) -> dict:
  """GFLOP/s of a square matmul (2048 on CPU, 8192 on accelerators), JAX and torch, on this
  machine in this run."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  # Random values: a GPU multiplies all-ones matrices faster (less switching, less power).
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  # 16-bit: accumulated and returned in float32, the form of the model's dots (on XLA:CPU the
  # 16-bit-out form runs at a fraction of that speed).
  out_dtype = jnp.float32 if jnp.dtype(dtype).itemsize == 2 else None
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=out_dtype))
  out = {"jax": 2 * n**3 / _best_time(lambda: matmul(a).block_until_ready(), 3) / 1e9}
  if not torch_too:
    return out
  try:
    import torch

    t = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    out["torch"] = 2 * n**3 / _best_time(lambda: t @ t, 3) / 1e9
  except ImportError:
    pass
  return out


def _peak(exp, config) -> dict:
  """The matmul peak of what ours runs on, in the model's dtype: one device's times the devices of
  its mesh (torch's, one process on the CPU, as measured)."""
  peak = matmul_peak(config.model.dtype)
  devices = exp.mesh.size if exp.mesh is not None else 1
  return {name: gflops * (devices if name == "jax" else 1) for name, gflops in peak.items()}


def model_flops(c, sequences, train: bool, lora_rank: int = 0, lora_targets: Sequence[str] = ()) -> float:
  """FLOPs a pass needs, counted by matmul: per token 2 x the linear layers' weights, causal
  attention over its own prefix (QK^T and PV: 4 x heads x head size per query-key pair), a LoRA
  branch of rank R on each target (2 x R x (in + out)); the vocabulary head only where logits are
  used (answer tokens in training, candidate tokens in scoring). Training adds the backward pass:
  the activation gradients of the frozen weights (as much again; they need no weight gradients),
  of attention (dQ, dK, dV and dP: twice its forward) and of LoRA with its weight gradients (twice
  its forward). A recomputed forward (remat) is not counted. `sequences` = (length, number of
  tokens that need logits)."""
  qkv = c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  linear = qkv + c.num_heads * c.head_dim * c.embed_dim + 3 * c.embed_dim * c.mlp_dim
  kernels = transformer.param_shapes(c)["layers"]
  lora = sum(
      lora_rank * sum(kernels[module][name]["kernel"].shape[1:])
      for module, names in kernels.items()
      for name in names
      if name in lora_targets
  )
  passes = lambda backward: 1 + (backward if train else 0)  # the forward, and the backward's share
  total = 0.0
  for length, with_logits in sequences:
    causal_keys = length * (length + 1) / 2
    per_layer = (
        2 * linear * length * passes(1)
        + 4 * c.num_heads * c.head_dim * causal_keys * passes(2)
        + 2 * lora * length * passes(2)
    )
    total += c.num_layers * per_layer + 2 * c.embed_dim * c.vocab_size * with_logits * passes(1)
  return total


def model_shapes(name: str, dtype: str, attention: str = "auto") -> transformer.ModelConfig:
  """A known model's shapes (random weights: speed does not depend on them)."""
  config = transformer.ModelConfig(**MODEL_SHAPES[name], param_dtype=dtype, dtype=dtype, attention=attention)
  transformer.check_attention(config)
  return config


def _profile_step(trainer, params, step, keys_A, num_adapters: int) -> dict:
  """Where one packed update step of `num_adapters` adapters (keys_A: one per slot) spends its time
  (`profiling.op_table`), printed; its trace kept in --trace_dir if given. A trace that cannot be
  read into a table is reported as {"error": ...}, so that the run keeps its timings."""
  mesh = sharding.mesh_of(params)
  adapters, opt_states = trainer.init(keys_A, mesh=mesh)
  try:
    with cpu_kernels.uninitialized_scan_outputs(single_device=sharding.on_one_device(mesh)):
      profile = profiling.op_table(
          type(trainer).step,  # the jitted function (op_table lowers it), the trainer its static argument
          trainer,
          params,
          adapters,
          opt_states,
          *step.step_args(sharding.shard_rows(mesh, *step.rows(), row_axis=1)),
          keys_A,
          remat=trainer.remat_for(step, mesh),
          mesh=mesh,
          trace_dir=_TRACE_DIR.value or None,
      )
  except profiling.TraceError as e:
    print(f"--profile: {e}", file=sys.stderr)
    return {"error": str(e)}
  print(f"Where the first step of all {num_adapters} adapters in one call spends its time:")
  profiling.print_table(profile)
  return profile


def _relative_error(got, want) -> float:
  """|got - want| / |want| over all of an adapter part's leaves (Frobenius norms, float64)."""
  diff = sum(float(np.sum((np.float64(g) - np.float64(w)) ** 2)) for g, w in zip(got, want))
  norm = sum(float(np.sum(np.float64(w) ** 2)) for w in want)
  return math.sqrt(diff / norm) if norm else math.sqrt(diff)


def attention_errors(c, cfg, params, data, keys) -> dict:
  """Trains the adapters of `data` with each attention that runs here (`runnable_attentions`), in the
  model's dtype, and once in float32 with XLA's attention at the highest matmul precision: each
  one's relative error against that reference, its a's and b's apart (b starts at 0, so its
  relative error is the larger), and its losses' largest difference. Implementations that train
  alike show errors of one size: the dtype's rounding."""
  from ttsi_jax.ttsi import adaptation

  def parts(adapters):
    leaves = jax.tree_util.tree_leaves_with_path(adapters.weights)
    part = lambda name: [np.asarray(x, np.float32) for path, x in leaves if path[-1].key == name]
    return part("a"), part("b")

  reference_config = dataclasses.replace(c, dtype="float32", param_dtype="float32", attention="xla")
  with jax.default_matmul_precision("highest"):
    reference, reference_losses = adaptation.Trainer(reference_config, cfg).train_all(
        jax.tree.map(lambda x: x.astype(jnp.float32), params), data, 0, keys
    )
  want_a, want_b = parts(reference)
  rows = []
  print(
      f"attention check: {len(data)} adapters, {c.dtype}, against float32 xla attention at the "
      "highest matmul precision"
  )
  print(f"{'attention':>10}{'a: rel. error':>15}{'b: rel. error':>15}{'loss: max |diff|':>18}")
  for name, value in transformer.runnable_attentions(c).items():
    adapters, losses = adaptation.Trainer(dataclasses.replace(c, attention=value), cfg).train_all(
        params, data, 0, keys
    )
    got_a, got_b = parts(adapters)
    row = {
        "attention": name,
        "a_relative_error": _relative_error(got_a, want_a),
        "b_relative_error": _relative_error(got_b, want_b),
        "loss_max_abs_diff": float(np.nanmax(np.abs(losses - reference_losses))),
    }
    rows.append(row)
    print(
        f"{name:>10}{row['a_relative_error']:>15.2e}{row['b_relative_error']:>15.2e}"
        f"{row['loss_max_abs_diff']:>18.2e}"
    )
  return {"adapters": len(data), "dtype": c.dtype, "reference": "float32, xla, highest", "rows": rows}


def bench_scaling(config) -> dict:
  """Adapted inputs/s of one packed call of A adapters, for each A in --adapter_counts."""
  from ttsi_jax import experiment
  from ttsi_jax.ttsi import adaptation

  counts = list(map(int, _ADAPTER_COUNTS.value))
  if counts[0] != 1:
    raise ValueError(f"--adapter_counts must start at 1 (gains are against one adapter), not {counts}.")
  c = model_shapes(_SHAPES.value, config.model.dtype, config.model.attention)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(transformer.Transformer(c).init)(jax.random.key(0), tokens, tokens)["params"]
  trainer = adaptation.Trainer(c, experiment.adapt_config(config))
  if len(_SEQUENCE_TOKENS.value) != 2:
    raise ValueError(
        f"--sequence_tokens takes prompt and answer tokens, e.g. 576,64; not {_SEQUENCE_TOKENS.value}."
    )
  prompt_tokens, answer_tokens = map(int, _SEQUENCE_TOKENS.value)
  rng = np.random.default_rng(0)
  steps = trainer.cfg.epochs  # one pair per adapter, batch size 1 or more: one step per epoch
  peak = matmul_peak(config.model.dtype, torch_too=False)["jax"]
  attention = transformer.packed_attention(c)
  print(
      f"scaling: {_SHAPES.value} shapes, random weights, {config.model.dtype}, {attention} attention, "
      f"{prompt_tokens} + {answer_tokens} tokens per pair, {steps} steps per adapter, rank "
      f"{trainer.cfg.rank}; one {jax.devices()[0].device_kind}; "
      f"{config.model.dtype} matmul peak measured now: jax {peak:.1f} GFLOP/s"
  )
  print(
      f"{'adapters':>9}{'first call s':>14}{'seconds':>10}{'inputs/s':>10}{'vs A=1':>8}{'GFLOP/s':>10}"
      f"{'MFU':>7}{'steps s':>9}{'MFU':>6}{'loss: first step, last':>24}"
  )
  rows = []
  report = {
      "stage": "scaling",
      "shapes": _SHAPES.value,
      "sequence_tokens": [prompt_tokens, answer_tokens],
      "steps_per_adapter": steps,
      "adaptation": _adaptation_settings(trainer.cfg),
      "matmul_peak_gflop_per_s": peak,
      "device_kind": jax.devices()[0].device_kind,
      "attention": attention,
      "devices": 1,  # the random params are not placed on a mesh
      "rows": rows,
  }
  random_tokens = lambda n: rng.integers(0, c.vocab_size, n).tolist()
  random_pairs = lambda n: [  # one pair per adapter
      [(random_tokens(prompt_tokens), random_tokens(answer_tokens))] for _ in range(n)
  ]
  for count in counts:
    data = random_pairs(count)
    keys = jax.random.split(jax.random.key(1), count)
    losses = None

    def run():
      nonlocal losses
      adapters, losses = trainer.train_all(params, data, 0, keys, count)
      jax.block_until_ready(adapters)

    first_seconds, seconds = _first_and_best_time(run, _REPEATS.value)
    # The same call less its host-side packing: adapter init and the update steps.
    ((slots_S, packed_steps),) = trainer.plan_calls(params, data, 0, count)
    train_seconds = _best_time(
        lambda: jax.block_until_ready(trainer.train(params, packed_steps, keys[slots_S])), _REPEATS.value
    )
    flops = model_flops(
        c,
        [(prompt_tokens + answer_tokens, answer_tokens)] * count * steps,
        train=True,
        lora_rank=trainer.cfg.rank,
        lora_targets=trainer.cfg.targets,
    )
    row = {
        "adapters": count,
        "first_call_seconds": first_seconds,  # a new count's step compiles in its first call
        "seconds": seconds,
        "inputs_per_s": count / seconds,
        "gflop_per_s": flops / seconds / 1e9,
        "mfu": flops / seconds / 1e9 / peak,
        "train_seconds": train_seconds,
        "train_mfu": flops / train_seconds / 1e9 / peak,
        "first_loss": float(np.nanmean(losses[0])),
        "final_loss": float(np.nanmean(losses[-1])),
    }
    row["vs_one"] = row["inputs_per_s"] / rows[0]["inputs_per_s"] if rows else 1.0
    rows.append(row)
    print(
        f"{count:>9}{first_seconds:>14.2f}{seconds:>10.2f}{row['inputs_per_s']:>10.2f}"
        f"{row['vs_one']:>7.2f}x{row['gflop_per_s']:>10.1f}{row['mfu']:>7.0%}{train_seconds:>9.2f}"
        f"{row['train_mfu']:>6.0%}{row['first_loss']:>16.3f}{row['final_loss']:>8.3f}"
    )
    if _PROFILE.value and count == max(counts):
      report["profile"] = _profile_step(trainer, params, packed_steps[0], keys[slots_S], count)
    _write_json(config, report)  # each finished count is kept if a later one runs out of time
  if _ATTENTION_CHECK.value:
    n = _ATTENTION_CHECK.value
    keys = jax.random.split(jax.random.key(2), n)
    report["attention_check"] = attention_errors(c, trainer.cfg, params, random_pairs(n), keys)
    _write_json(config, report)
  return report


def _hf_reference(config, dtype: str):
  import torch
  import transformers

  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the CPUs XLA may use too (taskset, cgroups)
  path = checkpoints.resolve(config.model.path)
  kwargs = dict(dtype=getattr(torch, dtype))  # the same precision as ours
  if checkpoints.is_gguf(path):
    kwargs["gguf_file"] = os.path.basename(path)
    path = os.path.dirname(path)
  return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _hf_greedy(model, prompts, new_tokens: int, pad_id: int):
  """A call of transformers `generate` that writes exactly `new_tokens` greedy tokens after each
  of the prompts, left-padded into one batch."""
  import torch

  length = max(map(len, prompts))
  ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])

  def run():
    with torch.no_grad():
      return model.generate(
          ids,
          attention_mask=mask,
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          do_sample=False,
          pad_token_id=pad_id,
      )

  return run


def peft_train(model, cfg, examples, seeds) -> float:
  """Seconds for transformers + PEFT to train one fresh adapter per `examples[a]`, one after
  another, with our hyperparameters and schedule (`adaptation.lr_schedule`)."""
  import peft
  import torch
  from ttsi_jax.ttsi import adaptation

  seconds = 0.0
  for data, seed in zip(examples, seeds):
    torch.manual_seed(seed)
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.targets),
            task_type="CAUSAL_LM",
        ),
    )
    lora.train()  # from_pretrained gives eval mode, where PEFT's dropout would never fire
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    num_batches = math.ceil(len(data) / cfg.batch_size)
    schedule = adaptation.lr_schedule(cfg, cfg.epochs * num_batches)
    start = time.perf_counter()
    for step, lr in enumerate(schedule):
      batch = data[(step % num_batches) * cfg.batch_size :][: cfg.batch_size]
      length = max(len(p) + len(a) for p, a in batch)
      ids = torch.zeros((len(batch), length), dtype=torch.long)
      labels = torch.full((len(batch), length), -100, dtype=torch.long)
      mask = torch.zeros((len(batch), length), dtype=torch.long)
      for j, (p, a) in enumerate(batch):
        ids[j, : len(p) + len(a)] = torch.tensor(p + a)
        labels[j, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[j, : len(p) + len(a)] = 1
      for group in optimizer.param_groups:
        group["lr"] = float(lr)
      loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
    seconds += time.perf_counter() - start
    model = lora.unload()  # the base model again, for the next adapter
  return seconds


def bench_adapt(config) -> dict:
  """T: our packed step (all adapters in one call; one per call) vs transformers + PEFT."""
  from ttsi_jax import experiment
  from ttsi_jax.ttsi import adaptation

  exp = experiment.Experiment(config, workdir="")
  examples = exp.examples[: _ADAPTERS.value]
  data = [
      [adaptation.training_example(exp.tokenizer, exp.task, ex, ex.question, exp.task.gold_answer(ex))]
      for ex in examples
  ]
  keys = jax.random.split(jax.random.key(0), len(data))
  trainer = exp.trainer
  cfg = trainer.cfg  # row_tokens resolved
  steps_per_adapter = cfg.num_steps(max(map(len, data)))
  sequences = [(len(p) + len(a), len(a)) for ex in data for p, a in ex] * cfg.epochs
  tokens = sum(n for n, _ in sequences)
  flops = model_flops(exp.model_config, sequences, train=True, lora_rank=cfg.rank, lora_targets=cfg.targets)

  # The packed rows hold exactly these token ids (asserted, then handed to PEFT as they are).
  packed = adaptation.make_steps(cfg, data, exp.tokenizer.pad_id, len(data))[0]
  for a, ((prompt, answer),) in enumerate(data):
    ids = packed.tokens_MBT[np.repeat(packed.adapter_MBXA[..., a], adaptation.BLOCK, axis=-1)]
    assert ids[: len(prompt) + len(answer)].tolist() == prompt + answer, "token ids differ"

  def ours(per_call):
    return lambda: jax.block_until_ready(
        trainer.train_all(exp.params, data, exp.tokenizer.pad_id, keys, per_call)[0]
    )

  rows = [
      (name, _best_time(ours(per_call), _REPEATS.value), flops)
      for name, per_call in (
          ("ttsi_jax packed, all adapters in one call", 0),
          ("ttsi_jax packed, one adapter per call", 1),
      )
  ]
  if _XLA_ROWS.value and jax.default_backend() == "cpu" and cpu_kernels.available():  # their gain
    with cpu_kernels.xla_ops():
      rows += [
          (f"{name}, XLA ops", _best_time(ours(per_call), _REPEATS.value), flops)
          for name, per_call in (
              ("ttsi_jax packed, all adapters in one call", 0),
              ("ttsi_jax packed, one adapter per call", 1),
          )
      ]
  if _REFERENCE.value:
    model = _hf_reference(config, config.model.dtype)
    peft_train(model, dataclasses.replace(cfg, epochs=1), data[:1], [0])  # warm-up
    rows.append(
        (
            "transformers + PEFT, one after another",
            min(peft_train(model, cfg, data, range(len(data))) for _ in range(_REPEATS.value)),
            flops,
        )
    )
  profile = None
  if _PROFILE.value:
    (slots, steps), *_ = trainer.plan_calls(exp.params, data, exp.tokenizer.pad_id)  # the timed program's
    profile = _profile_step(trainer, exp.params, steps[0], keys[slots], len(data))
  peak = _peak(exp, config)
  attention = transformer.packed_attention(exp.model_config)
  result = _table(
      f"T: {len(data)} adapters x {steps_per_adapter} steps, rank {cfg.rank}, "
      f"{tokens // len(sequences)} tokens per sequence on average, remat "
      f"{cfg.remat}, {attention} attention, best of {_REPEATS.value}",
      rows,
      tokens,
      len(data) * steps_per_adapter,
      "adapter-step",
      peak,
      reference="transformers + PEFT, one after another",
      devices=exp.mesh.size,
  )
  return {
      "stage": "adapt",
      "attention": attention,
      "adapters": len(data),
      "steps_per_adapter": steps_per_adapter,
      "adaptation": _adaptation_settings(cfg),
      "tokens": tokens,
      "flops": flops,
      **result,
      **({"profile": profile} if profile else {}),
  }


def bench_score(config) -> dict:
  """H: candidate log-likelihoods, ours vs a transformers forward pass per prompt + candidate."""
  from ttsi_jax import experiment

  exp = experiment.Experiment(config, workdir="")
  examples = exp.examples[: _ADAPTERS.value]
  prompts = [exp.tokenizer.encode_chat(exp.task.prompt(ex)) for ex in examples]
  # Each candidate action "[name(" as H scores it: the name's tokens, then any token that begins
  # with "(" (a TAIL target: scored at the last position, never fed).
  candidates = [[exp.answerer.action_tokens(c) for c in exp.task.candidates(ex)] for ex in examples]
  fed = [[[t for t in a if t != scoring.TAIL] for a in cs] for cs in candidates]

  def ours():
    pre = exp.sampler.prefill(prompts, config.reserve)
    return exp.answerer.score(pre, examples)

  # Each side's own work: ours runs each prompt once (the tokens all prompts begin with once, where
  # the prompts are packed in one row) and each candidate's tokens after it (logits for the
  # candidate tokens); the reference runs prompt + candidate for every candidate (logits for all
  # its tokens, as a transformers forward computes them).
  flops = functools.partial(model_flops, exp.model_config, train=False)

  def ours_flops():
    shared = sampler_lib.shared_prefix_length(prompts) if exp.sampler.packs_prompts() else 0
    return flops([(shared, 0)]) + sum(
        flops([(len(p), 0)])
        - flops([(shared, 0)])
        + sum(flops([(len(p) + len(f), len(a))]) - flops([(len(p), 0)]) for a, f in zip(cs, fs))
        for p, cs, fs in zip(prompts, candidates, fed)
    )

  reference_flops = sum(
      flops([(len(p) + len(f), len(p) + len(f))]) for p, fs in zip(prompts, fed) for f in fs
  )
  rows = [
      (
          "ttsi_jax (prompts packed, candidates packed)",
          _best_time(ours, _REPEATS.value),
          ours_flops(),
      )
  ]
  if _XLA_ROWS.value and jax.default_backend() == "cpu" and cpu_kernels.available():  # their gain
    with cpu_kernels.xla_ops():
      rows.append(("ttsi_jax, XLA ops", _best_time(ours, _REPEATS.value), ours_flops()))
  if _REFERENCE.value:
    import torch

    model = _hf_reference(config, config.model.dtype).eval()

    opens_V = torch.tensor(np.asarray(exp.decoder.open_mask_V))

    def reference():
      out = []
      with torch.no_grad():
        for p, fs in zip(prompts, fed):
          logliks = []
          for f in fs:  # the name's tokens, then the total probability of the tokens opening "("
            logp = torch.log_softmax(
                model(input_ids=torch.tensor([p + f])).logits[0, len(p) - 1 :].float(), -1
            )
            name = logp[torch.arange(len(f)), torch.tensor(f)].sum()
            logliks.append(float(name + torch.logsumexp(logp[-1][opens_V], -1)))
          out.append(logliks)
      return out

    rows.append(
        ("transformers forward per candidate", _best_time(reference, _REPEATS.value), reference_flops)
    )
    if config.model.dtype == "float32":  # the same log-likelihoods, not only the same work
      stats = ours()
      mine = [-np.log(ppl[: len(cs)]) * [len(a) for a in cs] for ppl, cs in zip(stats.perplexity, candidates)]
      np.testing.assert_allclose(
          np.concatenate(mine), np.concatenate(reference()), rtol=1e-3, atol=1e-3, err_msg="H differs"
      )
  tokens = sum(map(len, prompts)) + sum(len(c) for cs in candidates for c in cs)
  peak = _peak(exp, config)
  result = _table(
      f"H: {len(prompts)} BFCL prompts, {sum(map(len, candidates))} candidates, " f"best of {_REPEATS.value}",
      rows,
      tokens,
      len(prompts),
      "prompt",
      peak,
      reference="transformers forward per candidate",
      devices=exp.mesh.size,
  )
  return {"stage": "score", "prompts": len(prompts), "tokens": tokens, **result}


def bench_answer(config) -> dict:
  """Answering (the base and adapted answers of a wave): prefill, candidate scores and well-formed
  calls for BFCL prompts, with the base model and with an adapter per prompt, beside transformers
  `generate` writing as many tokens greedily in one batch. The reference is a yardstick, not the
  same work: plain decoding follows no schema and scores no options. FLOPs: each prompt and its
  answer's tokens once, on every row (the work of writing the answers)."""
  from ttsi_jax import experiment
  from ttsi_jax.model import lora as lora_lib

  exp = experiment.Experiment(config, workdir="")
  examples = exp.examples[: _ADAPTERS.value]
  prompts = [exp.tokenizer.encode_chat(exp.task.prompt(ex)) for ex in examples]
  keys = jax.random.split(jax.random.key(0), len(examples))
  adapters = [  # trained-like adapters: b = 0 would leave the model as it is
      jax.tree.map(
          lambda w, k=k: w + 0.01 * jax.random.normal(k, w.shape, w.dtype),
          lora_lib.init(exp.model_config, k, exp.adapt_cfg.rank, exp.adapt_cfg.alpha, exp.adapt_cfg.targets),
      )
      for k in keys
  ]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)

  def ours(**prefill):
    pre = exp.sampler.prefill(prompts, config.reserve, **prefill)
    stats = exp.answerer.score(pre, examples)
    return exp.answerer.answers(pre, examples, stats, keys, ("direct",))["direct"]

  answer_tokens = [len(exp.tokenizer.encode(a)) for a in ours()]
  flops = sum(
      model_flops(exp.model_config, [(len(p) + n, n)], train=False) for p, n in zip(prompts, answer_tokens)
  )
  rows = [
      ("ttsi_jax, base model", _best_time(ours, _REPEATS.value), flops),
      (
          "ttsi_jax, an adapter per prompt",
          _best_time(lambda: ours(lora=stacked, lora_per_row=True), _REPEATS.value),
          flops,
      ),
  ]
  if _REFERENCE.value:
    model = _hf_reference(config, config.model.dtype).eval()
    reference = _hf_greedy(model, prompts, max(answer_tokens), exp.tokenizer.pad_id)
    rows.append(("transformers generate, as many tokens", _best_time(reference, _REPEATS.value), flops))
  tokens = sum(map(len, prompts)) + sum(answer_tokens)
  result = _table(
      f"Answers: {len(prompts)} BFCL prompts, well-formed calls of {min(answer_tokens)}-"
      f"{max(answer_tokens)} tokens, best of {_REPEATS.value}",
      rows,
      tokens,
      len(prompts),
      "prompt",
      _peak(exp, config),
      reference="transformers generate, as many tokens",
      devices=exp.mesh.size,
  )
  return {"stage": "answer", "prompts": len(prompts), "answer_tokens": answer_tokens, **result}


def _table(title, rows, tokens, units, unit, peak, reference, devices: int) -> dict:
  """Prints and returns rows of (implementation, seconds, FLOPs it computes); `devices`: how many
  ours ran on (its mesh's)."""
  best_peak = max(peak.values())
  print(title)
  print(
      "FLOPs counted from the model's shapes (bench.model_flops); float32 matmul peak measured "
      "now: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items())
  )
  print(
      f"{'implementation':<44}{'seconds':>9}{'s/' + unit:>16}{'tokens/s':>10}"
      f"{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'vs ref':>8}"
  )
  ref = {name: seconds for name, seconds, _ in rows}.get(reference)
  out = []
  for name, seconds, flops in rows:
    entry = {
        "implementation": name,
        "seconds": seconds,
        f"seconds_per_{unit}": seconds / units,
        "tokens_per_s": tokens / seconds,
        "flops": flops,
        "gflop_per_s": flops / seconds / 1e9,
        "fraction_of_peak": flops / seconds / 1e9 / best_peak,
        "vs_reference": ref / seconds if ref else None,
    }
    out.append(entry)
    vs = f"{entry['vs_reference']:.2f}x" if ref else "-"
    print(
        f"{name:<44}{seconds:>9.2f}{seconds / units:>16.2f}{entry['tokens_per_s']:>10.1f}"
        f"{flops / 1e9:>8.0f}{entry['gflop_per_s']:>9.1f}{entry['fraction_of_peak']:>9.0%}"
        f"{vs:>8}"
    )
  platform = jax.devices()[0].platform
  if ref and platform != "cpu":
    print(f"(the reference runs on this machine's CPU, ours on its {platform})")
  return {
      "matmul_peak_gflop_per_s": peak,
      "rows": out,
      "platform": platform,
      "devices": devices,
      **({"reference_device": "cpu"} if ref else {}),
  }


def _write_json(config, result: dict) -> None:
  """`result` with its model and dtype to --json's file, if one was asked for."""
  if not _JSON.value:
    return
  model = (
      f"random, {_SHAPES.value} shapes"
      if _STAGE.value == "scaling"
      else checkpoints.resolve(config.model.path)
  )
  with open(_JSON.value, "w") as f:
    json.dump({"model": model, "dtype": config.model.dtype, "repeats": _REPEATS.value, **result}, f, indent=2)


def _adaptation_settings(cfg) -> dict:
  """What the adapters trained with, for --json (rank, alpha, targets, rate, epochs, remat, ...)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def main(argv):
  del argv
  config = _CONFIG.value
  config_schema.validate(config)  # before any model is built
  with sampler_lib.buckets_per_octave(config.buckets_per_octave):  # shapes as a run pads them
    _bench(config)


def _bench(config):
  # First calls compile: a persistent cache ($JAX_COMPILATION_CACHE_DIR) would time its reads.
  jax.config.update("jax_compilation_cache_dir", None)
  if _STAGE.value in ("adapt", "score", "answer", "scaling"):
    stages = {"adapt": bench_adapt, "score": bench_score, "answer": bench_answer, "scaling": bench_scaling}
    stage = stages[_STAGE.value]
    _write_json(config, stage(config))
    return
  n = _NEW_TOKENS.value
  start = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh_shape or None)
  model = sampler_lib.load_model(config.model.path, config.model.dtype, mesh)
  tokenizer = model.tokenizer
  load_s = time.perf_counter() - start
  prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
  # No stop tokens: every row decodes exactly n tokens in both implementations.
  sampler = sampler_lib.Sampler(model.config, model.params, stop_ids=(), pad_id=tokenizer.pad_id)
  sampling = sampler_lib.SamplingParams(max_new_tokens=n)

  rows = []
  for b in map(int, _BATCH_SIZES.value):
    batch = [prompts[i % len(prompts)] for i in range(b)]
    seconds = _best_time(lambda: sampler.generate(batch, sampling), _REPEATS.value)
    rows.append(("ttsi_jax", b, seconds, b * n / seconds))

  if _REFERENCE.value:
    ref = _hf_reference(config, config.model.dtype).eval()
    for b in map(int, _BATCH_SIZES.value):
      batch = [prompts[i % len(prompts)] for i in range(b)]
      seconds = _best_time(_hf_greedy(ref, batch, n, tokenizer.pad_id), _REPEATS.value)
      rows.append(("transformers", b, seconds, b * n / seconds))

  print(
      f"model: {checkpoints.resolve(config.model.path)}  dtype={config.model.dtype}  "
      f"devices={mesh.size} ({jax.devices()[0].platform})"
  )
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
  _write_json(
      config,
      {
          "stage": "decode",
          "new_tokens": n,
          "platform": jax.devices()[0].platform,
          "devices": mesh.size,
          **({"reference_device": "cpu"} if _REFERENCE.value else {}),
          "load_s": load_s,
          "rows": [
              dict(implementation=impl, batch=b, seconds=t, tokens_per_s=tps) for impl, b, t, tps in rows
          ],
      },
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
