"""T, self-learning: many throw-away LoRA adapters trained together, one packed update step each.

A step packs the training sequences of every adapter back to back into rows of blocks (see
`transformer.Packing`): the frozen base matmuls run once over the real tokens of all adapters, each
block's LoRA branch uses its own adapter, and attention stays within each sequence. Every array that
belongs to an adapter carries a leading adapter axis A: LoRA params, AdamW state (updated under
`jax.vmap`), the learning rate. Each adapter has its own number of steps (epochs x its own batches)
and its own warmup-cosine schedule; an adapter whose data ran out is left out of later steps and
kept unchanged, so training A adapters together equals training each alone.
Loss: each adapter's mean cross-entropy on its answer tokens only; the step minimises their sum,
whose gradient for each adapter is that adapter's own.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text.sampler import bucket

# Tokens per packed block: a sequence pads only its last block; attention and the LoRA branch work
# block by block. Other sizes have not been measured yet.
BLOCK = 64
# Remat (recompute each layer in the backward pass) when the activations a step would keep exceed
# this fraction of the device's memory ("auto").
REMAT_MEMORY_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = lora_lib.ALL_LINEAR
  learning_rate: float = 1e-3  # paper: 1e-4 (configs/paper.py); see the README's oracle runs
  epochs: int = 5
  batch_size: int = 1
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  remat: str = "auto"  # "auto" (by the step's activation memory), "on" or "off"


def lr_schedule(cfg: AdaptConfig, total_steps: int) -> np.ndarray:
  """Linear warmup from 0, then cosine decay to 0 (transformers' cosine schedule, step by step).

  As in transformers (the paper's LLaMA-Factory runs), any warmup makes the first step's rate 0:
  the paper's 5 steps with warmup ratio 0.03 are 4 updates; warmup_ratio=0 makes them 5.
  """
  warmup = math.ceil(cfg.warmup_ratio * total_steps)
  steps = np.arange(total_steps, dtype=np.float64)
  warm = steps / max(1, warmup)
  progress = (steps - warmup) / max(1, total_steps - warmup)
  cosine = 0.5 * (1.0 + np.cos(np.pi * progress))
  return (cfg.learning_rate * np.where(steps < warmup, warm, cosine)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PackedStep:
  """One training step of A adapters as R packed rows of N blocks (T = N x BLOCK tokens), with
  I answer tokens per row; attention sees up to S sequences per row of up to W blocks each."""

  tokens_RT: np.ndarray
  positions_RT: np.ndarray  # -1 = padding
  adapter_RNA: np.ndarray  # bool, one-hot adapter of each block
  select_RI: np.ndarray  # indices whose logits predict the answer tokens
  targets_RI: np.ndarray
  weights_RI: np.ndarray  # 1 for answer tokens, 0 for padding
  answer_adapter_RI: np.ndarray  # the adapter each answer token's loss belongs to
  learning_rate_A: np.ndarray
  seq_blocks_RSW: np.ndarray  # the row's blocks of each sequence (N: padding), see Packing
  block_slots_RN: np.ndarray  # each block's slot s x W + w (S x W: padding)
  active_A: np.ndarray  # False once an adapter has run all its steps

  def rows(self) -> tuple[np.ndarray, ...]:
    """The arrays with a leading row axis (what the mesh's batch axes split)."""
    return (self.tokens_RT, self.positions_RT, self.adapter_RNA, self.seq_blocks_RSW,
            self.block_slots_RN, self.select_RI, self.targets_RI, self.weights_RI,
            self.answer_adapter_RI)


def pack(sequences: Sequence[tuple[int, list[int], list[int]]], num_rows: int, num_adapters: int,
         pad_id: int, block: int = BLOCK) -> dict:
  """Packs (adapter, prompt ids, answer ids) sequences into `num_rows` rows of whole blocks, the
  longest first into the emptiest row (rows are what the mesh's batch axes split)."""
  rows: list[list[int]] = [[] for _ in range(num_rows)]
  used = [0] * num_rows
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][1] + sequences[i][2]))
  for i in order:
    r = int(np.argmin(used))
    rows[r].append(i)
    used[r] += -(-len(sequences[i][1] + sequences[i][2]) // block)
  N = bucket(max(used))  # bucketed shapes: one compile per bucket
  S = bucket(max(len(row) for row in rows))
  W = bucket(max(-(-len(p + a) // block) for _, p, a in sequences))
  I = bucket(max(sum(len(sequences[i][2]) for i in row) for row in rows), 8)
  T = N * block
  out = dict(tokens_RT=np.full((num_rows, T), pad_id, np.int32),
             positions_RT=np.full((num_rows, T), -1, np.int32),
             adapter_RNA=np.zeros((num_rows, N, num_adapters), bool),
             seq_blocks_RSW=np.full((num_rows, S, W), N, np.int32),
             block_slots_RN=np.full((num_rows, N), S * W, np.int32),
             select_RI=np.zeros((num_rows, I), np.int32),
             targets_RI=np.zeros((num_rows, I), np.int32),
             weights_RI=np.zeros((num_rows, I), np.float32),
             answer_adapter_RI=np.zeros((num_rows, I), np.int32))
  for r, row in enumerate(rows):
    at, answered = 0, 0
    for s, i in enumerate(row):
      adapter, prompt, answer = sequences[i]
      seq, n, m = prompt + answer, len(prompt), len(answer)
      out["tokens_RT"][r, at:at + len(seq)] = seq
      out["positions_RT"][r, at:at + len(seq)] = np.arange(len(seq))
      blocks = np.arange(at // block, -(-(at + len(seq)) // block))
      out["adapter_RNA"][r, blocks, adapter] = True
      out["seq_blocks_RSW"][r, s, :len(blocks)] = blocks
      out["block_slots_RN"][r, blocks] = s * W + np.arange(len(blocks))
      out["select_RI"][r, answered:answered + m] = at + np.arange(n - 1, n + m - 1)
      out["targets_RI"][r, answered:answered + m] = answer
      out["weights_RI"][r, answered:answered + m] = 1.0
      out["answer_adapter_RI"][r, answered:answered + m] = adapter
      at += -(-len(seq) // block) * block
      answered += m
  return out


def training_example(tokenizer, task, ex, request: str, call: str) -> tuple[list, list]:
  """(prompt ids, answer ids) of one training pair: the input's prompt with `request` as its
  question, answered by `call` and the end of the turn."""
  prompt = tokenizer.encode_chat(task.prompt(dataclasses.replace(ex, question=request)))
  return prompt, tokenizer.encode(call) + [tokenizer.end_of_turn_id]


def make_steps(cfg: AdaptConfig, examples: Sequence[Sequence[tuple[list[int], list[int]]]],
               pad_id: int, num_adapters: int, num_rows: int = 1,
               block: int = BLOCK) -> list[PackedStep]:
  """`examples[a]` = (prompt ids, answer ids) pairs of adapter a; adapters beyond len(examples)
  idle. Step s packs batch s of every adapter that still has steps left."""
  if any(not a for ex in examples for _, a in ex):
    raise ValueError("Every training example needs answer tokens.")
  b = cfg.batch_size
  steps_per_adapter = [cfg.epochs * math.ceil(len(ex) / b) for ex in examples]
  schedules = [lr_schedule(cfg, n) for n in steps_per_adapter]
  steps = []
  for s in range(max(steps_per_adapter, default=0)):
    learning_rate_A = np.zeros(num_adapters, np.float32)
    active_A = np.zeros(num_adapters, bool)
    sequences = []
    for a, ex in enumerate(examples):
      if s >= steps_per_adapter[a]:
        continue
      learning_rate_A[a], active_A[a] = schedules[a][s], True
      num_batches = math.ceil(len(ex) / b)
      sequences += [(a, p, t) for p, t in ex[(s % num_batches) * b:(s % num_batches + 1) * b]]
    steps.append(PackedStep(**pack(sequences, num_rows, num_adapters, pad_id, block),
                            learning_rate_A=learning_rate_A, active_A=active_A))
  return steps


def answer_loss(config: ModelConfig, params, adapter, tokens_BL, positions_BL, select_BI,
                targets_BI, weights_BI, dropout_rng=None):
  """Mean negative log-likelihood of the answer tokens (prompt tokens carry no loss)."""
  logits_BIV, _ = transformer.forward(config, params, tokens_BL, positions_BL, lora=adapter,
                                      select_BI=select_BI, dropout_rng=dropout_rng)
  logp_BI = jnp.take_along_axis(jax.nn.log_softmax(logits_BIV, -1), targets_BI[..., None],
                                -1)[..., 0]
  return -jnp.sum(logp_BI * weights_BI) / jnp.maximum(jnp.sum(weights_BI), 1.0)


def activation_bytes(config: ModelConfig, step: PackedStep) -> int:
  """What a step without remat keeps for its backward pass: per layer and token the linear layers'
  inputs and outputs (attention probabilities are recomputed in the backward pass)."""
  itemsize = jnp.dtype(config.dtype).itemsize
  per_token = (6 * config.embed_dim + 2 * config.num_heads * config.head_dim
               + 2 * config.num_kv_heads * config.head_dim + 3 * config.mlp_dim) * itemsize
  return config.num_layers * step.tokens_RT.size * per_token


def device_memory_bytes() -> int:
  """Memory of one device: the accelerator's limit, or the host's RAM on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Trainer:
  """Builds the optimizer, the jitted adapter init (vmapped) and the packed update step."""

  def __init__(self, config: ModelConfig, cfg: AdaptConfig):
    if cfg.remat not in ("auto", "on", "off"):
      raise ValueError(f"adaptation.remat must be 'auto', 'on' or 'off', not {cfg.remat!r}.")
    self.config = config
    self.cfg = cfg
    # The learning rate is a per-adapter hyperparameter fed each step (own schedule per adapter).
    self.optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=cfg.weight_decay))
    self.init = jax.jit(jax.vmap(self._init_one))
    self.step = jax.jit(self._step, donate_argnums=(1, 2), static_argnames=("remat",))

  def _init_one(self, rng):
    adapter = lora_lib.init(self.config, rng, self.cfg.rank, self.cfg.alpha, self.cfg.targets,
                            self.cfg.dropout)
    return adapter, self.optimizer.init(adapter)

  def remat_for(self, step: PackedStep) -> bool:
    if self.cfg.remat != "auto":
      return self.cfg.remat == "on"
    return activation_bytes(self.config, step) > REMAT_MEMORY_FRACTION * device_memory_bytes()

  def _step(self, params, adapters, opt_states, tokens_RT, positions_RT, adapter_RNA,
            seq_blocks_RSW, block_slots_RN, select_RI, targets_RI, weights_RI, answer_adapter_RI,
            learning_rate_A, active_A, rng, *, remat):
    """One update of every active adapter from one packed forward and backward pass."""
    packing = transformer.Packing(adapter_RNA, seq_blocks_RSW, block_slots_RN)
    num_adapters = learning_rate_A.shape[0]

    def loss(adapters):
      # [A, L, ...] -> [L, A, ...]: the layer scan slices L, each block picks its adapter from A.
      by_layer = jax.tree.map(lambda w: jnp.swapaxes(w, 0, 1), adapters)
      logits_RIV, _ = transformer.forward(
          self.config, params, tokens_RT, positions_RT, lora=by_layer, select_BI=select_RI,
          packing=packing, remat=remat, dropout_rng=rng if self.cfg.dropout > 0 else None)
      logp_RI = jnp.take_along_axis(jax.nn.log_softmax(logits_RIV, -1), targets_RI[..., None],
                                    -1)[..., 0]
      per_adapter = lambda x: jax.ops.segment_sum(x.ravel(), answer_adapter_RI.ravel(),
                                                  num_segments=num_adapters)
      loss_A = -per_adapter(logp_RI * weights_RI) / jnp.maximum(per_adapter(weights_RI), 1.0)
      return jnp.sum(loss_A), loss_A

    (_, loss_A), grads = jax.value_and_grad(loss, has_aux=True)(adapters)

    def update(grads, opt_state, adapter, learning_rate, active):
      opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
      updates, new_state = self.optimizer.update(grads, opt_state, adapter)
      new_adapter = optax.apply_updates(adapter, updates)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
      return keep(new_adapter, adapter), keep(new_state, opt_state)

    adapters, opt_states = jax.vmap(update)(grads, opt_states, adapters, learning_rate_A,
                                            active_A)
    return adapters, opt_states, loss_A

  def train(self, params, steps: Sequence[PackedStep], rngs_A: jax.Array):
    """Fresh adapters (one key each), trained on `steps`: (adapters [A, ...], losses [S, A]).
    On a mesh the packed rows are split over its batch axes (data, fsdp); adapters and their
    optimizer states are small and replicated."""
    mesh = sharding.mesh_of(params)
    init_rngs_A, dropout_rngs_A = jnp.unstack(jax.vmap(jax.random.split)(rngs_A), axis=1)
    adapters, opt_states = self.init(init_rngs_A)
    if mesh is not None:  # replicated, as the step returns them: else its 2nd call compiles again
      adapters, opt_states = jax.device_put((adapters, opt_states),
                                            NamedSharding(mesh, PartitionSpec()))
    losses = []
    for s, step in enumerate(steps):
      # One dropout key per step (dropout > 0 draws its masks over the packed rows).
      rng = jax.random.fold_in(dropout_rngs_A[0], s)
      rows = sharding.shard_rows(mesh, *step.rows())
      adapters, opt_states, loss = self.step(params, adapters, opt_states, *rows,
                                             step.learning_rate_A, step.active_A, rng,
                                             remat=self.remat_for(step))
      losses.append(loss)
    losses = np.asarray(jnp.stack(losses)) if losses else np.zeros((0, len(rngs_A)), np.float32)
    active_SA = np.stack([s.active_A for s in steps]) if steps else np.zeros_like(losses, bool)
    return adapters, np.where(active_SA, losses, np.nan)

  def train_all(self, params, examples: Sequence[Sequence[tuple[list[int], list[int]]]],
                pad_id: int, rngs_A: jax.Array, per_call: int = 0):
    """One fresh adapter per `examples[a]` (key `rngs_A[a]`), `per_call` adapters per packed
    call (0: all in one; fewer bound the memory of a step). Returns (adapters [A, ...],
    losses [S, A]); the result does not depend on `per_call`."""
    per_call = per_call or len(examples)
    rows = sharding.fill_batch_shards(sharding.mesh_of(params), 1)
    parts, losses = [], []
    for start in range(0, len(examples), per_call):
      chunk = examples[start:start + per_call]
      size = bucket(len(chunk))  # a bucketed adapter count: one compile per size
      keys = rngs_A[np.minimum(np.arange(start, start + size), start + len(chunk) - 1)]
      adapters, loss = self.train(params, make_steps(self.cfg, chunk, pad_id, size, rows), keys)
      parts.append(jax.tree.map(lambda x: x[:len(chunk)], adapters))
      losses.append(loss[:, :len(chunk)])
    steps = max(l.shape[0] for l in losses)
    losses = [np.pad(l, ((0, steps - l.shape[0]), (0, 0)), constant_values=np.nan) for l in losses]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), np.concatenate(losses, axis=1)
