"""T, self-learning: many throw-away LoRA adapters trained in parallel with one vmapped update step.

Every array that belongs to an adapter carries a leading adapter axis A: LoRA params, AdamW state,
the per-step batch, the learning rate and the dropout key. The frozen base params are shared
(`in_axes=None`), so one step reads them once for all A adapters. Each adapter has its own number of
steps (epochs x its own batches) and its own warmup-cosine schedule; an adapter whose data ran out
skips the remaining steps unchanged, so training A adapters together equals training each alone.
Loss: mean cross-entropy on answer tokens only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text.sampler import bucket

MIN_LENGTH_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = lora_lib.ALL_LINEAR
  learning_rate: float = 1e-4
  epochs: int = 5
  batch_size: int = 1
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0


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
class Batches:
  """Per-step training data for A adapters (S steps, B rows per step, L tokens, I answer tokens),
  plus each adapter's learning rate and activity per step."""

  tokens_SABL: np.ndarray
  positions_SABL: np.ndarray  # -1 = padding
  select_SABI: np.ndarray  # indices whose logits predict the answer tokens
  targets_SABI: np.ndarray
  weights_SABI: np.ndarray  # 1 for answer tokens, 0 for padding
  learning_rate_SA: np.ndarray
  active_SA: np.ndarray  # False once an adapter has run all its steps


def make_batches(cfg: AdaptConfig, examples: Sequence[Sequence[tuple[list[int], list[int]]]],
                 pad_id: int, num_adapters: int) -> Batches:
  """`examples[a]` = (prompt ids, answer ids) pairs of adapter a; rows beyond len(examples) idle."""
  seqs = [p + a for ex in examples for p, a in ex]
  answers = [a for ex in examples for _, a in ex]
  if any(not a for a in answers):
    raise ValueError("Every training example needs answer tokens.")
  L = bucket(max(map(len, seqs), default=1), MIN_LENGTH_BUCKET)
  I = bucket(max(map(len, answers), default=1), 8)
  b = cfg.batch_size
  steps_per_adapter = [cfg.epochs * math.ceil(len(ex) / b) for ex in examples]
  S = max(steps_per_adapter, default=0)
  A = num_adapters
  out = Batches(
      tokens_SABL=np.full((S, A, b, L), pad_id, np.int32),
      positions_SABL=np.full((S, A, b, L), -1, np.int32),
      select_SABI=np.zeros((S, A, b, I), np.int32), targets_SABI=np.zeros((S, A, b, I), np.int32),
      weights_SABI=np.zeros((S, A, b, I), np.float32),
      learning_rate_SA=np.zeros((S, A), np.float32), active_SA=np.zeros((S, A), bool))
  for a, ex in enumerate(examples):
    total = steps_per_adapter[a]
    if not total:
      continue
    out.learning_rate_SA[:total, a] = lr_schedule(cfg, total)
    out.active_SA[:total, a] = True
    num_batches = math.ceil(len(ex) / b)
    for s in range(total):
      chunk = ex[(s % num_batches) * b:(s % num_batches + 1) * b]  # fixed order, every epoch
      for j, (prompt, answer) in enumerate(chunk):
        seq = prompt + answer
        n, m = len(prompt), len(answer)
        out.tokens_SABL[s, a, j, :len(seq)] = seq
        out.positions_SABL[s, a, j, :len(seq)] = np.arange(len(seq))
        out.select_SABI[s, a, j, :m] = np.arange(n - 1, n + m - 1)
        out.targets_SABI[s, a, j, :m] = answer
        out.weights_SABI[s, a, j, :m] = 1.0
  return out


def answer_loss(config: ModelConfig, params, adapter, tokens_BL, positions_BL, select_BI,
                targets_BI, weights_BI, dropout_rng=None):
  """Mean negative log-likelihood of the answer tokens (prompt tokens carry no loss)."""
  logits_BIV, _ = transformer.forward(config, params, tokens_BL, positions_BL, lora=adapter,
                                      select_BI=select_BI, dropout_rng=dropout_rng)
  logp_BI = jnp.take_along_axis(jax.nn.log_softmax(logits_BIV, -1), targets_BI[..., None],
                                -1)[..., 0]
  return -jnp.sum(logp_BI * weights_BI) / jnp.maximum(jnp.sum(weights_BI), 1.0)


class Trainer:
  """Builds the optimizer and the jitted, adapter-vmapped init and update step."""

  def __init__(self, config: ModelConfig, cfg: AdaptConfig):
    self.config = config
    self.cfg = cfg
    # The learning rate is a per-adapter hyperparameter fed each step (own schedule per adapter).
    self.optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=cfg.weight_decay))
    self.init = jax.jit(jax.vmap(self._init_one))
    self.step = jax.jit(jax.vmap(self._step_one, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
                        donate_argnums=(1, 2))

  def _init_one(self, rng):
    adapter = lora_lib.init(self.config, rng, self.cfg.rank, self.cfg.alpha, self.cfg.targets,
                            self.cfg.dropout)
    return adapter, self.optimizer.init(adapter)

  def _step_one(self, params, adapter, opt_state, tokens_BL, positions_BL, select_BI, targets_BI,
                weights_BI, learning_rate, active, rng):
    """One adapter's update (vmapped over A); an inactive adapter keeps its params and state."""
    dropout_rng = rng if self.cfg.dropout > 0 else None
    loss, grads = jax.value_and_grad(
        lambda ad: answer_loss(self.config, params, ad, tokens_BL, positions_BL, select_BI,
                               targets_BI, weights_BI, dropout_rng))(adapter)
    opt_state[1].hyperparams["learning_rate"] = learning_rate
    updates, new_state = self.optimizer.update(grads, opt_state, adapter)
    new_adapter = optax.apply_updates(adapter, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
    return keep(new_adapter, adapter), keep(new_state, opt_state), loss

  def train(self, params, batches: Batches, rngs_A: jax.Array):
    """Fresh adapters (one key each), trained on `batches`: (adapters [A, ...], losses [S, A]).
    On a mesh, the adapters and their data are split over its batch axes (data, fsdp)."""
    mesh = sharding.mesh_of(params)
    # Several adapters split over the mesh's batch axes; a single one splits its batches instead.
    place = sharding.shard_rows if len(rngs_A) > 1 else sharding.shard_batches_of_one_adapter
    init_rngs_A, dropout_rngs_A = place(mesh, *jnp.unstack(
        jax.vmap(jax.random.split)(rngs_A), axis=1))  # init and dropout draw on their own keys
    adapters, opt_states = self.init(init_rngs_A)
    losses = []
    for s in range(batches.tokens_SABL.shape[0]):
      step_rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_rngs_A, s)
      # Each step as long as its longest sequence needs (its length bucket), not the longest of all.
      length = bucket(int((batches.positions_SABL[s] >= 0).sum(-1).max()), MIN_LENGTH_BUCKET)
      adapters, opt_states, loss = self.step(
          params, adapters, opt_states, *place(
              mesh, batches.tokens_SABL[s, ..., :length], batches.positions_SABL[s, ..., :length],
              batches.select_SABI[s], batches.targets_SABI[s], batches.weights_SABI[s],
              batches.learning_rate_SA[s], batches.active_SA[s]), step_rngs)
      losses.append(loss)
    losses = np.asarray(jnp.stack(losses)) if losses else np.zeros((0, len(rngs_A)), np.float32)
    return adapters, np.where(batches.active_SA, losses, np.nan)

  def train_all(self, params, examples: Sequence[Sequence[tuple[list[int], list[int]]]],
                pad_id: int, rngs_A: jax.Array, per_call: int = 0):
    """One fresh adapter per `examples[a]` (key `rngs_A[a]`), `per_call` adapters per vmapped call
    (0: all in one). Returns (adapters [A, ...], losses [S, A]); the result does not depend on
    `per_call`: only speed and memory do (vmapped calls pay off on accelerators, see README)."""
    per_call = per_call or len(examples)
    mesh = sharding.mesh_of(params)
    parts, losses = [], []
    for start in range(0, len(examples), per_call):
      chunk = examples[start:start + per_call]
      # A bucketed adapter count (one compile per size) that splits evenly over the mesh; a
      # single adapter stays single (its batches split over the mesh instead).
      size = 1 if len(chunk) == 1 else sharding.fill_batch_shards(mesh, bucket(len(chunk)))
      keys = rngs_A[np.minimum(np.arange(start, start + size), start + len(chunk) - 1)]
      adapters, loss = self.train(params, make_batches(self.cfg, chunk, pad_id, size), keys)
      parts.append(jax.tree.map(lambda x: x[:len(chunk)], adapters))
      losses.append(loss[:, :len(chunk)])
    steps = max(l.shape[0] for l in losses)
    losses = [np.pad(l, ((0, steps - l.shape[0]), (0, 0)), constant_values=np.nan) for l in losses]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), np.concatenate(losses, axis=1)
