"""T, self-learning: many throw-away LoRA adapters trained together, one packed update step each.

A step packs the training sequences of every adapter back to back into rows of blocks (see
`transformer.Packing`): the frozen base matmuls run once over the real tokens of all adapters, each
block's LoRA branch uses its own adapter, and attention stays within each sequence. Every array that
belongs to an adapter carries a leading adapter axis A: LoRA params, AdamW state (updated under
`jax.vmap`), the learning rate. Each adapter has its own number of steps (epochs x its own batches)
and its own warmup-cosine schedule; an adapter whose data ran out is left out of later steps and
kept unchanged, so training A adapters together equals training each alone. LoRA dropout (off by
default) keeps that: each token's masks derive from its adapter's key, the step, and the token's
index among its adapter's tokens in the step (`token_index`), not from the rows it lands in.
Loss: each adapter's mean cross-entropy on its answer tokens only; the step minimises their sum,
whose gradient for each adapter is that adapter's own.
A step's rows are split into M microbatches of about `row_tokens` tokens (M = the step's tokens /
`row_tokens`, rounded up; a microbatch's rows all take its longest row's bucket, so one may hold
somewhat more) that run one after another inside the jitted step, their gradients summed
(gradient accumulation): the step keeps one microbatch's activations, so a wave too large for the
device's memory needs no remat (a third more FLOPs) unless a single microbatch does not fit;
padding microbatches are not run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttsi_jax.model import cpu_kernels
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text.sampler import bucket

# Tokens per packed block: a sequence pads only its last block; attention and the LoRA branch work
# block by block. Other sizes have not been measured yet.
BLOCK = 64
# The activations a microbatch is sized to keep, as a fraction of one device's memory
# (`row_tokens` = 0, auto); remat = "auto" recomputes each layer in the backward pass only when a
# device's share of one microbatch would keep more than twice that (a microbatch's rows take
# their bucket, up to a quarter longer, and a row may hold more than its share: no remat for those).
MICROBATCH_MEMORY_FRACTION = 0.25
REMAT_MEMORY_FRACTION = 2 * MICROBATCH_MEMORY_FRACTION


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = lora_lib.ALL_LINEAR
  learning_rate: float = 1e-3  # paper: 1e-4 (configs/paper.py); see docs/measured.md's oracle runs
  epochs: int = 5
  batch_size: int = 1
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  remat: str = "auto"  # "auto" (by the step's activation memory), "on" or "off"
  row_tokens: int = 0  # tokens per microbatch of packed rows; 0: what fits MICROBATCH_MEMORY_FRACTION

  def num_steps(self, num_examples: int) -> int:
    """An adapter's training steps on `num_examples` pairs."""
    return self.epochs * math.ceil(num_examples / self.batch_size)


def lr_schedule(cfg: AdaptConfig, total_steps: int) -> np.ndarray:
  """Linear warmup from 0, then cosine decay to 0 (transformers' cosine schedule, step by step).

  As in transformers (the paper's LLaMA-Factory runs), any warmup makes the first step's rate 0:
  the paper's 5 steps with warmup ratio 0.03 are 4 updates; warmup_ratio=0 makes them 5. Unlike
  there, warmup leaves the last step out: a single step (one pair, one epoch) trains at the full
  rate instead of leaving the adapter at its init.
  """
  warmup = min(math.ceil(cfg.warmup_ratio * total_steps), max(0, total_steps - 1))
  steps = np.arange(total_steps, dtype=np.float64)
  warm = steps / max(1, warmup)
  progress = (steps - warmup) / max(1, total_steps - warmup)
  cosine = 0.5 * (1.0 + np.cos(np.pi * progress))
  return (cfg.learning_rate * np.where(steps < warmup, warm, cosine)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PackedStep:
  """One training step of A adapters as M microbatches of B packed rows of X blocks each
  (T = X x BLOCK tokens), with I answer tokens per row; attention sees up to U sequences per row of
  up to W blocks each. The first `microbatches` of the M hold the data, the rest are padding."""

  tokens_MBT: np.ndarray
  positions_MBT: np.ndarray  # -1 = padding
  token_index_MBT: np.ndarray  # each token's index among its adapter's tokens in the step (dropout)
  adapter_MBXA: np.ndarray  # bool, one-hot adapter of each block
  select_MBI: np.ndarray  # indices whose logits predict the answer tokens
  targets_MBI: np.ndarray
  weights_MBI: np.ndarray  # 1 for answer tokens, 0 for padding
  answer_adapter_MBI: np.ndarray  # the adapter each answer token's loss belongs to
  seq_blocks_MBUW: np.ndarray  # the row's blocks of each sequence (X: padding), see Packing
  block_slots_MBX: np.ndarray  # each block's slot u x W + w (U x W: padding)
  microbatches: int
  learning_rate_A: np.ndarray
  active_A: np.ndarray  # False once an adapter has run all its steps

  def rows(self) -> tuple[np.ndarray, ...]:
    """The arrays with leading microbatch and row axes (the mesh's batch axes split the rows)."""
    return (
        self.tokens_MBT,
        self.positions_MBT,
        self.token_index_MBT,
        self.adapter_MBXA,
        self.seq_blocks_MBUW,
        self.block_slots_MBX,
        self.select_MBI,
        self.targets_MBI,
        self.weights_MBI,
        self.answer_adapter_MBI,
    )

  def step_args(self, rows: Sequence[jax.Array] | None = None) -> tuple:
    """`Trainer.step`'s arguments after the adapters' state and before the dropout keys: the rows
    (`rows()`, or those given, e.g. sharded over a mesh), microbatch count, rates and active flags."""
    rows = self.rows() if rows is None else tuple(rows)
    return (*rows, np.int32(self.microbatches), self.learning_rate_A, self.active_A)


def pack(
    sequences: Sequence[tuple[int, list[int], list[int]]],
    num_rows: int,
    num_adapters: int,
    pad_id: int,
    block: int = BLOCK,
) -> dict:
  """Packs (adapter, prompt ids, answer ids) sequences into `num_rows` rows of whole blocks, the
  longest first into the emptiest row (rows are what the mesh's batch axes split). A token's
  `token_index` counts its adapter's tokens before it, its sequences taken in their given order."""
  rows: list[list[int]] = [[] for _ in range(num_rows)]
  used = [0] * num_rows
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][1] + sequences[i][2]))
  first_index, seen = [], collections.Counter()
  for adapter, prompt, answer in sequences:
    first_index.append(seen[adapter])
    seen[adapter] += len(prompt + answer)
  for i in order:
    r = int(np.argmin(used))
    rows[r].append(i)
    used[r] += -(-len(sequences[i][1] + sequences[i][2]) // block)
  # Bucketed shapes: one compile per bucket. Rows take the finer buckets (at most 1/5 padding):
  # every padded slot costs the linear layers a token's FLOPs, and a step runs epochs times.
  X = bucket(max(used), per_octave=4)
  U = bucket(max(len(row) for row in rows))
  W = bucket(max(-(-len(p + a) // block) for _, p, a in sequences))
  I = bucket(max(sum(len(sequences[i][2]) for i in row) for row in rows), 8)
  T = X * block
  out = dict(
      tokens_BT=np.full((num_rows, T), pad_id, np.int32),
      positions_BT=np.full((num_rows, T), -1, np.int32),
      token_index_BT=np.zeros((num_rows, T), np.int32),
      adapter_BXA=np.zeros((num_rows, X, num_adapters), bool),
      seq_blocks_BUW=np.full((num_rows, U, W), X, np.int32),
      block_slots_BX=np.full((num_rows, X), U * W, np.int32),
      select_BI=np.zeros((num_rows, I), np.int32),
      targets_BI=np.zeros((num_rows, I), np.int32),
      weights_BI=np.zeros((num_rows, I), np.float32),
      answer_adapter_BI=np.zeros((num_rows, I), np.int32),
  )
  for r, row in enumerate(rows):
    at, answered = 0, 0
    for u, i in enumerate(row):
      adapter, prompt, answer = sequences[i]
      seq, n, m = prompt + answer, len(prompt), len(answer)
      out["tokens_BT"][r, at : at + len(seq)] = seq
      out["positions_BT"][r, at : at + len(seq)] = np.arange(len(seq))
      out["token_index_BT"][r, at : at + len(seq)] = first_index[i] + np.arange(len(seq))
      blocks = np.arange(at // block, -(-(at + len(seq)) // block))
      out["adapter_BXA"][r, blocks, adapter] = True
      out["seq_blocks_BUW"][r, u, : len(blocks)] = blocks
      out["block_slots_BX"][r, blocks] = u * W + np.arange(len(blocks))
      out["select_BI"][r, answered : answered + m] = at + np.arange(n - 1, n + m - 1)
      out["targets_BI"][r, answered : answered + m] = answer
      out["weights_BI"][r, answered : answered + m] = 1.0
      out["answer_adapter_BI"][r, answered : answered + m] = adapter
      at += -(-len(seq) // block) * block
      answered += m
  return out


def microbatch(rows: dict, microbatches: int) -> dict:
  """`pack`'s [M x B, ...] rows as [M, B, ...]."""
  out = {}
  for key, rows_B in rows.items():
    name, axes = key.rsplit("_", 1)
    out[f"{name}_M{axes}"] = rows_B.reshape(microbatches, -1, *rows_B.shape[1:])
  return out


def pad_step(step: PackedStep, microbatches: int, slots: int) -> PackedStep:
  """`step` with M = `microbatches` (the added ones padding, never run) and `slots` answer
  positions per row (the added ones weigh nothing in the loss): one compiled step for a call list."""
  M, _, X, _ = step.adapter_MBXA.shape
  U, W = step.seq_blocks_MBUW.shape[2:]
  more = microbatches - M

  def pad(x, value, answer_axis=False):
    widths = [(0, more)] + [(0, 0)] * (x.ndim - 1)
    if answer_axis:
      widths[2] = (0, slots - x.shape[2])
    return np.pad(x, widths, constant_values=value)

  return dataclasses.replace(
      step,
      tokens_MBT=pad(step.tokens_MBT, 0),
      positions_MBT=pad(step.positions_MBT, -1),
      token_index_MBT=pad(step.token_index_MBT, 0),
      adapter_MBXA=pad(step.adapter_MBXA, False),
      seq_blocks_MBUW=pad(step.seq_blocks_MBUW, X),
      block_slots_MBX=pad(step.block_slots_MBX, U * W),
      select_MBI=pad(step.select_MBI, 0, True),
      targets_MBI=pad(step.targets_MBI, 0, True),
      weights_MBI=pad(step.weights_MBI, 0, True),
      answer_adapter_MBI=pad(step.answer_adapter_MBI, 0, True),
  )


def training_example(tokenizer, task, ex, request: str, call: str) -> tuple[list, list]:
  """(prompt ids, answer ids) of one training pair: the input's prompt with `request` as its
  question, answered by `call` and the end of the turn."""
  prompt = tokenizer.encode_chat(task.prompt(dataclasses.replace(ex, question=request)))
  return prompt, tokenizer.encode(call) + [tokenizer.end_of_turn_id]


def make_steps(
    cfg: AdaptConfig,
    examples: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    num_adapters: int,
    num_rows: int = 1,
    block: int = BLOCK,
) -> list[PackedStep]:
  """`examples[a]` = (prompt ids, answer ids) pairs of adapter a; adapters beyond len(examples)
  idle. Step s packs batch s of every adapter that still has steps left, into `num_rows` rows per
  microbatch and as many microbatches as `cfg.row_tokens` asks for (one without). Every epoch takes
  an adapter's pairs in their given order (not shuffled: the paper's one pair per input, batch 1,
  has no order to shuffle)."""
  if any(not a for ex in examples for _, a in ex):
    raise ValueError("Every training example needs answer tokens.")
  b = cfg.batch_size
  steps_per_adapter = [cfg.num_steps(len(ex)) for ex in examples]
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
      sequences += [(a, p, t) for p, t in ex[(s % num_batches) * b : (s % num_batches + 1) * b]]
    microbatches = 1
    if cfg.row_tokens:
      tokens = sum(-(-len(p + t) // block) * block for _, p, t in sequences)
      by_tokens = -(-tokens // (cfg.row_tokens * num_rows))
      microbatches = max(1, min(by_tokens, -(-len(sequences) // num_rows)))  # no empty microbatch
    rows = pack(sequences, microbatches * num_rows, num_adapters, pad_id, block)
    steps.append(
        PackedStep(
            **microbatch(rows, microbatches),
            microbatches=microbatches,
            learning_rate_A=learning_rate_A,
            active_A=active_A,
        )
    )
  return steps


def token_keys(step_keys_A: jax.Array, adapter_BXA: jax.Array, token_index_BT: jax.Array) -> jax.Array:
  """Each token's LoRA dropout key [B, T]: its adapter's key for the step folded with its
  `token_index` (padding tokens: any key; their outputs are never read)."""
  X, T = adapter_BXA.shape[1], token_index_BT.shape[1]
  adapter_BT = jnp.repeat(jnp.argmax(adapter_BXA, -1), T // X, axis=1)
  return jax.vmap(jax.vmap(jax.random.fold_in))(step_keys_A[adapter_BT], token_index_BT)


def activation_bytes(config: ModelConfig, step: PackedStep, batch_shards: int = 1) -> int:
  """What one device keeps for a step's backward pass without remat (`transformer.SAVED_ONLY`):
  one microbatch at a time (they run one after another), of whose B rows a mesh's `batch_shards`
  give each device its share."""
  _, B, T = step.tokens_MBT.shape
  return -(-B // batch_shards) * T * activation_bytes_per_token(config)


def activation_bytes_per_token(config: ModelConfig) -> int:
  """Per layer and token the residual stream twice, q, k, v, the attention output and its softmax
  statistics, gate and up (the norms, SiLU and LoRA branches are recomputed)."""
  itemsize = jnp.dtype(config.dtype).itemsize
  per_token = (
      2 * config.embed_dim
      + 2 * config.num_heads * config.head_dim
      + 2 * config.num_kv_heads * config.head_dim
      + config.num_heads
      + 2 * config.mlp_dim
  ) * itemsize
  return config.num_layers * per_token


def device_memory_bytes() -> int:
  """Memory of one device: the accelerator's limit, or the host's RAM on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Trainer:
  """Builds the optimizer, the jitted adapter init (vmapped) and the packed update step.

  Trainers of equal settings are equal (hash and ==), and `init` and `step` are jitted with the
  trainer static: their compiled programs serve every trainer of those settings in the process
  (the sft baseline's retrained, a resumed run's), not only the one that traced them. They live
  until `jax.clear_caches` (`experiment.release_compiled_code_near_map_limit`), as every jitted
  function's do."""

  def __init__(self, config: ModelConfig, cfg: AdaptConfig):
    if cfg.remat not in ("auto", "on", "off"):
      raise ValueError(f"adaptation.remat must be 'auto', 'on' or 'off', not {cfg.remat!r}.")
    self.config = config
    if cfg.row_tokens == 0:  # auto: microbatches whose activations fit the budget
      budget = MICROBATCH_MEMORY_FRACTION * device_memory_bytes()
      cfg = dataclasses.replace(cfg, row_tokens=max(BLOCK, int(budget // activation_bytes_per_token(config))))
    self.cfg = cfg
    # The learning rate is a per-adapter hyperparameter fed each step (own schedule per adapter).
    self.optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=cfg.weight_decay),
    )

  def _settings(self) -> tuple[ModelConfig, AdaptConfig]:
    return self.config, self.cfg  # the optimizer is made from cfg

  def __hash__(self):
    return hash(self._settings())

  def __eq__(self, other):
    return isinstance(other, Trainer) and self._settings() == other._settings()

  @functools.partial(jax.jit, static_argnums=0, static_argnames=("mesh",))
  def init(self, rngs_A, *, mesh=None):
    """Fresh adapters and optimizer states, each device making only its share (`mesh`)."""
    return sharding.constrain_adapters(jax.vmap(self._init_one)(rngs_A), mesh)

  def _init_one(self, rng):
    adapter = lora_lib.init(
        self.config, rng, self.cfg.rank, self.cfg.alpha, self.cfg.targets, self.cfg.dropout
    )
    return adapter, self.optimizer.init(adapter)

  def remat_for(self, step: PackedStep, mesh=None) -> bool:
    if self.cfg.remat != "auto":
      return self.cfg.remat == "on"
    shards = sharding.fill_batch_shards(mesh, 1)
    return activation_bytes(self.config, step, shards) > REMAT_MEMORY_FRACTION * device_memory_bytes()

  def packed_loss(
      self,
      params,
      adapters,
      packing: transformer.Packing,
      tokens_BT,
      positions_BT,
      select_BI,
      targets_BI,
      weights_BI,
      answer_adapter_BI,
      answer_tokens_A,
      *,
      remat: bool,
  ):
    """(sum of the adapters' losses, loss_A): each adapter's cross-entropy summed over its answer
    tokens in these rows, over `answer_tokens_A` (all of its answer tokens in the step, so that
    microbatches add up to the mean); the sum's gradient for each adapter is that adapter's own."""
    num_adapters = answer_tokens_A.shape[0]
    # [A, L, ...] -> [L, A, ...]: the layer scan slices L, each block picks its adapter from A.
    by_layer = jax.tree.map(lambda w: jnp.swapaxes(w, 0, 1), adapters)
    logits_BIV, _ = transformer.forward(
        self.config,
        params,
        tokens_BT,
        positions_BT,
        lora=by_layer,
        select_BI=select_BI,
        packing=packing,
        remat=remat,
    )
    # The target's logit less the log-partition: log_softmax's [I, V] output and its gradient are
    # never formed (measured 1.6x faster for 96 answer slots at SmolLM2's vocabulary).
    target_logit_BI = jnp.take_along_axis(logits_BIV, targets_BI[..., None], -1)[..., 0]
    logp_BI = target_logit_BI - jax.nn.logsumexp(logits_BIV, -1)
    per_adapter = lambda x: jax.ops.segment_sum(
        x.ravel(), answer_adapter_BI.ravel(), num_segments=num_adapters
    )
    loss_A = -per_adapter(logp_BI * weights_BI) / jnp.maximum(answer_tokens_A, 1.0)
    return jnp.sum(loss_A), loss_A

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3), static_argnames=("remat", "mesh"))
  def step(
      self,
      params,
      adapters,
      opt_states,
      tokens_MBT,
      positions_MBT,
      token_index_MBT,
      adapter_MBXA,
      seq_blocks_MBUW,
      block_slots_MBX,
      select_MBI,
      targets_MBI,
      weights_MBI,
      answer_adapter_MBI,
      microbatches,
      learning_rate_A,
      active_A,
      dropout_keys_A,
      *,
      remat,
      mesh=None,
  ):
    """One update of every active adapter from a packed forward and backward pass per microbatch
    (the first `microbatches` of M; their gradients summed). `dropout_keys_A`: each adapter's key
    for this step's LoRA dropout (unused without). The adapters and their states come and go split
    over `mesh` (`sharding.constrain_adapters`)."""
    num_adapters = learning_rate_A.shape[0]
    answer_tokens_A = jax.ops.segment_sum(
        weights_MBI.ravel(), answer_adapter_MBI.ravel(), num_segments=num_adapters
    )

    def grads_of(m):
      keys_BT = None
      if self.cfg.dropout > 0:
        keys_BT = token_keys(dropout_keys_A, adapter_MBXA[m], token_index_MBT[m])
      packing = transformer.Packing(adapter_MBXA[m], seq_blocks_MBUW[m], block_slots_MBX[m], keys_BT)
      rows = (tokens_MBT, positions_MBT, select_MBI, targets_MBI, weights_MBI, answer_adapter_MBI)
      rows = tuple(x[m] for x in rows) + (answer_tokens_A,)
      loss = lambda adapters: self.packed_loss(params, adapters, packing, *rows, remat=remat)
      (_, loss_A), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
      return grads, loss_A

    if tokens_MBT.shape[0] == 1:
      grads, loss_A = grads_of(0)
    else:  # one microbatch after another; the padding ones are not run

      def accumulate(m, sums):
        grads, loss_A = grads_of(m)
        return jax.tree.map(jnp.add, sums, (grads, loss_A))

      zeros = jax.tree.map(jnp.zeros_like, (adapters, learning_rate_A))
      grads, loss_A = jax.lax.fori_loop(0, microbatches, accumulate, zeros)

    def update(grads, opt_state, adapter, learning_rate, active):
      opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
      updates, new_state = self.optimizer.update(grads, opt_state, adapter)
      new_adapter = optax.apply_updates(adapter, updates)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
      return keep(new_adapter, adapter), keep(new_state, opt_state)

    adapters, opt_states = jax.vmap(update)(grads, opt_states, adapters, learning_rate_A, active_A)
    return (*sharding.constrain_adapters((adapters, opt_states), mesh), loss_A)

  def train(self, params, steps: Sequence[PackedStep], rngs_A: jax.Array):
    """Fresh adapters (one key each), trained on `steps`: (adapters [A, ...], losses [steps, A]).
    On a mesh the packed rows are split over its batch axes (data, fsdp), the adapters and their
    optimizer states over its "adapters" axes."""
    mesh = sharding.mesh_of(params)
    init_rngs_A, dropout_rngs_A = jnp.unstack(jax.vmap(jax.random.split)(rngs_A), axis=1)
    adapters, opt_states = self.init(init_rngs_A, mesh=mesh)
    losses = []
    # Steps lower (on their first call of a shape) with the layer scan's stacks unfilled.
    with cpu_kernels.uninitialized_scan_outputs(single_device=sharding.on_one_device(mesh)):
      for s, step in enumerate(steps):
        step_keys_A = jax.vmap(jax.random.fold_in, (0, None))(dropout_rngs_A, s)
        rows = sharding.shard_rows(mesh, *step.rows(), row_axis=1)
        adapters, opt_states, loss = self.step(
            params,
            adapters,
            opt_states,
            *step.step_args(rows),
            step_keys_A,
            remat=self.remat_for(step, mesh),
            mesh=mesh,
        )
        losses.append(loss)
    losses = np.asarray(jnp.stack(losses)) if losses else np.zeros((0, len(rngs_A)), np.float32)
    active = np.stack([s.active_A for s in steps]) if steps else np.zeros_like(losses, bool)
    return adapters, np.where(active, losses, np.nan)

  def plan_calls(
      self,
      params,
      examples: Sequence[Sequence[tuple[list[int], list[int]]]],
      pad_id: int,
      per_call: int = 0,
  ) -> list[tuple[np.ndarray, list[PackedStep]]]:
    """The packed calls `train_all` runs, host-side work only: for each, (slots_S: the index in
    `examples` of each adapter slot, a bucket's idle slots repeating its last adapter; its steps,
    padded to one answer width and microbatch count shared by every call)."""
    longest = max((len(p) + len(a) for ex in examples for p, a in ex), default=0)
    if longest > self.config.context_length:  # its attention would not be the model's
      raise ValueError(
          f"A training sequence of {longest} tokens passes the model's context of "
          f"{self.config.context_length} tokens (its positions or sliding window)."
      )
    per_call = per_call or len(examples)
    mesh = sharding.mesh_of(params)
    rows = sharding.fill_batch_shards(mesh, 1)
    starts = range(0, len(examples), per_call)
    chunks = [examples[start : start + per_call] for start in starts]
    # Bucketed adapter counts (a compile each), filled to split evenly over the mesh.
    sizes = [sharding.fill_batch_shards(mesh, bucket(len(chunk)), "adapters") for chunk in chunks]
    steps_of = [make_steps(self.cfg, chunk, pad_id, size, rows) for chunk, size in zip(chunks, sizes)]
    # One answer width and microbatch count for the whole call list: answers differ in length, and
    # each width would compile a step of its own, where a wider one costs only a few more logits
    # rows; padding microbatches are not run.
    every = [s for steps in steps_of for s in steps]
    slots = max((s.select_MBI.shape[2] for s in every), default=0)
    microbatches = max((s.microbatches for s in every), default=1)
    return [
        (
            np.minimum(np.arange(start, start + size), start + len(chunk) - 1),
            [pad_step(s, microbatches, slots) for s in steps],
        )
        for start, chunk, size, steps in zip(starts, chunks, sizes, steps_of)
    ]

  def train_all(
      self,
      params,
      examples: Sequence[Sequence[tuple[list[int], list[int]]]],
      pad_id: int,
      rngs_A: jax.Array,
      per_call: int = 0,
  ):
    """One fresh adapter per `examples[a]` (key `rngs_A[a]`), `per_call` adapters per packed
    call (0: all in one; fewer bound the memory of a step). Returns (adapters [A', ...],
    losses [steps, A]); the result does not depend on `per_call`. The first A adapters are the
    examples'; on a mesh A' fills its "adapters" axes (copies of the last), over which the stack
    stays split: no device keeps the whole wave (A' = A on one device)."""
    parts, counts, losses = [], [], []
    for slots_S, steps in self.plan_calls(params, examples, pad_id, per_call):
      counts.append(len(np.unique(slots_S)))
      adapters, loss = self.train(params, steps, rngs_A[slots_S])
      parts.append(adapters)
      losses.append(loss[:, : counts[-1]])
    steps = max(l.shape[0] for l in losses)
    losses = [np.pad(l, ((0, steps - l.shape[0]), (0, 0)), constant_values=np.nan) for l in losses]
    return _joined(parts, tuple(counts), sharding.mesh_of(params)), np.concatenate(losses, axis=1)


@functools.partial(jax.jit, static_argnames=("counts", "mesh"))
def _joined(parts, counts: tuple[int, ...], mesh):
  """The calls' adapters as one stack: each call's first `counts` (its idle slots cut off), filled
  with copies of the last to split evenly over the mesh's "adapters" axes, and so split."""
  total = sum(counts)
  fill = sharding.fill_batch_shards(mesh, total, "adapters") - total

  def join(*xs):
    x_A = jnp.concatenate([x[:count] for x, count in zip(xs, counts)])
    return jnp.concatenate([x_A, jnp.repeat(x_A[-1:], fill, axis=0)])

  return sharding.constrain_adapters(jax.tree.map(join, *parts), mesh)
