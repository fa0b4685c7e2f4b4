"""Packed adaptation equals training each adapter alone on plain rows; adapters are isolated;
training learns; equal bucket sizes never recompile."""

import contextlib
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from tests.conftest import VOCAB
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import cpu_kernels, cpu_matmul
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.ttsi import adaptation
from ttsi_jax.ttsi.adaptation import AdaptConfig

CFG = AdaptConfig(rank=4, alpha=8.0, learning_rate=1e-2, epochs=3, batch_size=1, warmup_ratio=0.1)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
  return hf.load(hf_checkpoints["llama"][0])


@pytest.fixture
def traced_anew():
  """For a test that changes what tracing reads (a monkeypatched op, a kernel threshold): trainers of
  equal settings share their compiled step, so it is traced anew here, and not kept for later tests."""
  jax.clear_caches()
  yield
  jax.clear_caches()


def _examples(seed, k, low=5, high=20):
  rs = np.random.RandomState(seed)
  return [
      (rs.randint(1, VOCAB, rs.randint(low, high)).tolist(), rs.randint(1, VOCAB, rs.randint(2, 6)).tolist())
      for _ in range(k)
  ]


def _answer_loss(config, params, adapter, tokens_BT, positions_BT, select_BI, targets_BI, weights_BI):
  """The plain loss: mean negative log-likelihood of the answer tokens of unpacked rows."""
  logits_BIV, _ = transformer.forward(
      config, params, tokens_BT, positions_BT, lora=adapter, select_BI=select_BI
  )
  logp_BI = jnp.take_along_axis(jax.nn.log_softmax(logits_BIV, -1), targets_BI[..., None], -1)[..., 0]
  return -jnp.sum(logp_BI * weights_BI) / jnp.maximum(jnp.sum(weights_BI), 1.0)


@functools.partial(jax.jit, static_argnames="config")
def _grad(params, adapter, *batch, config):
  return jax.grad(lambda ad: _answer_loss(config, params, ad, *batch))(adapter)


def _reference(model, examples, rng, cfg):
  """One adapter trained the plain way: unpacked rows (one per example of the batch, padded to
  the batch's longest), the model's ordinary attention, optax's AdamW step by step."""
  config, params = model
  trainer = adaptation.Trainer(config, cfg)
  init_rng, _ = jax.random.split(rng)
  adapter, opt_state = jax.tree.map(lambda x: x[0], trainer.init(init_rng[None]))
  num_batches = -(-len(examples) // cfg.batch_size)
  schedule = adaptation.lr_schedule(cfg, cfg.epochs * num_batches)
  for s, lr in enumerate(schedule):
    batch = examples[(s % num_batches) * cfg.batch_size : (s % num_batches + 1) * cfg.batch_size]
    length, answers = 64, 8  # fixed shapes: one compile for every batch
    tokens, positions = np.zeros((len(batch), length), np.int32), -np.ones((len(batch), length), np.int32)
    select, targets = np.zeros((len(batch), answers), np.int32), np.zeros_like(tokens[:, :answers])
    weights = np.zeros((len(batch), answers), np.float32)
    for j, (p, a) in enumerate(batch):
      tokens[j, : len(p + a)], positions[j, : len(p + a)] = p + a, np.arange(len(p + a))
      select[j, : len(a)], targets[j, : len(a)], weights[j, : len(a)] = (
          np.arange(len(p) - 1, len(p + a) - 1),
          a,
          1,
      )
    grads = _grad(params, adapter, tokens, positions, select, targets, weights, config=config)
    adapter, opt_state = _adamw_step(trainer.optimizer, grads, opt_state, adapter, lr)
  return adapter


@functools.partial(jax.jit, static_argnums=0)
def _adamw_step(optimizer, grads, opt_state, adapter, learning_rate):
  opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
  updates, opt_state = optimizer.update(grads, opt_state, adapter)
  return optax.apply_updates(adapter, updates), opt_state


_DOT_PRODUCT_ATTENTION = jax.nn.dot_product_attention


def _attention_with_padding_garbage(q_BTNH, k_BSKH, v_BSKH, *, implementation, **kwargs):
  """`jax.nn.dot_product_attention` (XLA's) that leaves NaN at padded positions, in its outputs
  and in the gradients it passes back to q, k and v there: what a kernel may leave in the slots
  it does not compute."""
  del implementation
  out_BTNH = _DOT_PRODUCT_ATTENTION(q_BTNH, k_BSKH, v_BSKH, implementation="xla", **kwargs)
  lengths_B = kwargs["query_seq_lengths"]
  padded_BT11 = (jnp.arange(q_BTNH.shape[1])[None] >= lengths_B[:, None])[:, :, None, None]
  padding = lambda x: jnp.where(padded_BT11, x, 0)  # selects: real positions keep exact zeros
  garbage_BTNH = (
      padding(q_BTNH) * jnp.nan + (padding(k_BSKH) + padding(v_BSKH)).sum(2, keepdims=True) * jnp.nan
  )
  return out_BTNH + padding(garbage_BTNH)


@pytest.mark.parametrize(
    "batch_size, with_cpu_kernels, attention",
    [
        (1, True, "auto"),
        (2, True, "auto"),
        (2, False, "auto"),
        (2, True, "cudnn"),
        (2, True, "cudnn, garbage"),
    ],
)
def test_packed_training_equals_each_adapter_trained_alone(
    model, batch_size, with_cpu_kernels, attention, monkeypatch, traced_anew
):
  """On CPU packed rows run attention, the LoRA branch and the linear layers (padding rows and the
  last layer's unread rows left out) in the C++ kernels, or on XLA's ops. attention="cudnn" runs
  `jax.nn.dot_product_attention` on each sequence's real tokens, here its XLA implementation (the
  same call as on a GPU: the sequence layout and lengths are what is under test); with garbage,
  one that leaves NaN at padded positions, which must reach neither the loss nor any gradient."""
  monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 1)
  if attention == "cudnn, garbage":
    attention = "cudnn"
    monkeypatch.setattr(jax.nn, "dot_product_attention", _attention_with_padding_garbage)
  elif attention == "cudnn":
    monkeypatch.setattr(
        jax.nn,
        "dot_product_attention",
        lambda *a, implementation, **k: _DOT_PRODUCT_ATTENTION(*a, implementation="xla", **k),
    )
  # lr 1e-3: Adam turns float-rounding differences in near-zero gradients into lr-sized steps.
  cfg = AdaptConfig(**{**CFG.__dict__, "batch_size": batch_size, "learning_rate": 1e-3, "epochs": 2})
  # Mixed lengths (one sequence spans several blocks), different numbers of pairs and so of steps.
  examples = [_examples(0, 1), _examples(1, 3, 20, 40), _examples(2, 2), _examples(3, 1, 30, 31)]
  rngs = jax.random.split(jax.random.key(0), 4)
  config, params = model
  trainer = adaptation.Trainer(dataclasses.replace(config, attention=attention), cfg)
  steps = adaptation.make_steps(cfg, examples, 0, 4, block=16)
  assert steps[0].tokens_MBT.shape[:2] == (1, 1) and steps[0].adapter_MBXA[0, 0].any(0).all()  # one row
  with contextlib.nullcontext() if with_cpu_kernels else cpu_kernels.xla_ops():
    together, losses = trainer.train(params, steps, rngs)
  num_steps = [cfg.epochs * -(-len(ex) // batch_size) for ex in examples]
  assert losses.shape == (max(num_steps), 4)
  for a, n in enumerate(num_steps):
    assert not np.isnan(losses[:n, a]).any() and np.isnan(losses[n:, a]).all()
    alone = _reference(model, examples[a], rngs[a], cfg)
    for got, want in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
      np.testing.assert_allclose(np.asarray(got[a]), np.asarray(want), atol=1e-5, rtol=0)


def test_microbatched_steps_train_as_one_row_does(model):
  """Rows of about `row_tokens` run one after another in the step, gradients summed; steps with
  fewer microbatches than the call's M skip the padding ones. Batches of 2: an adapter's batch can
  span microbatches, and its loss is still the mean over the whole batch."""
  cfg = AdaptConfig(**{**CFG.__dict__, "learning_rate": 1e-3, "epochs": 2, "batch_size": 2})
  examples = [_examples(0, 1), _examples(1, 3, 20, 40), _examples(2, 2), _examples(3, 1, 30, 31)]
  rngs = jax.random.split(jax.random.key(0), 4)
  config, params = model
  one_row = adaptation.make_steps(cfg, examples, 0, 4, block=16)
  split_cfg = AdaptConfig(**{**cfg.__dict__, "row_tokens": 32})
  split = adaptation.make_steps(split_cfg, examples, 0, 4, block=16)
  counts = [s.microbatches for s in split]
  assert max(counts) > 1 and min(counts) < max(counts), counts
  slots = max(s.select_MBI.shape[2] for s in split)
  split = [adaptation.pad_step(s, max(counts) + 1, slots) for s in split]  # every step pads some
  want, want_losses = adaptation.Trainer(config, cfg).train(params, one_row, rngs)
  got, losses = adaptation.Trainer(config, split_cfg).train(params, split, rngs)
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_packing_keeps_each_sequence_to_its_own_blocks():
  seqs = [(0, [1] * 10, [2] * 3), (1, [3] * 2, [4] * 2), (2, [5] * 29, [6])]
  out = adaptation.pack(seqs, num_rows=2, num_adapters=3, pad_id=0, block=8)
  # The longest (30 tokens, 4 blocks) alone in row 0; the other two share row 1.
  assert out["adapter_BXA"][0, :3].argmax(-1).tolist() == [2, 2, 2]
  assert out["adapter_BXA"][1, :3].argmax(-1).tolist() == [0, 0, 1]
  assert not out["adapter_BXA"][1, 3:].any()  # padding blocks belong to no adapter
  assert out["positions_BT"][1, 16:20].tolist() == [0, 1, 2, 3]
  assert out["positions_BT"][1, 12:17].tolist() == [12, -1, -1, -1, 0]  # a last block's padding
  # Attention's layout: per row S=2 sequence slots of W=4 blocks (the longest's); N=4 pads them.
  assert out["seq_blocks_BUW"].tolist() == [[[0, 1, 2, 3], [4, 4, 4, 4]], [[0, 1, 4, 4], [2, 4, 4, 4]]]
  assert out["block_slots_BX"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 8]]  # padding block: S x W
  assert out["targets_BI"][1, :5].tolist() == [2, 2, 2, 4, 4]
  assert out["answer_adapter_BI"][1, :5].tolist() == [0, 0, 0, 1, 1]
  assert out["select_BI"][1, 3:5].tolist() == [16 + 1, 16 + 2]


def test_each_token_keeps_its_index_among_its_adapters_tokens_however_rows_are_packed():
  """LoRA dropout's masks follow `token_index`: its adapter's tokens counted in the order of its
  sequences, whichever rows (or microbatches) they land in; padding 0."""
  seqs = [(0, [1] * 10, [2] * 3), (1, [3] * 2, [4] * 2), (0, [5] * 29, [6]), (1, [7] * 5, [8])]
  index = {}
  for num_rows in (1, 2, 4):
    out = adaptation.pack(seqs, num_rows=num_rows, num_adapters=2, pad_id=0, block=8)
    adapter_BT = np.repeat(out["adapter_BXA"].argmax(-1), 8, axis=1)
    real = out["positions_BT"] >= 0
    assert (out["token_index_BT"][~real] == 0).all()
    index[num_rows] = sorted(
        zip(adapter_BT[real], out["tokens_BT"][real], out["positions_BT"][real], out["token_index_BT"][real])
    )
  assert index[1] == index[2] == index[4]
  # Adapter 0: its first sequence's 13 tokens, then its second's (29 + 1) from index 13 on.
  assert [i for a, t, p, i in index[1] if a == 0 and t == 5][:2] == [13, 14]
  assert [i for a, t, p, i in index[1] if a == 1 and t == 7] == [4, 5, 6, 7, 8]


def test_rows_pad_to_the_fine_buckets():
  # 9 blocks of 8 tokens take a row of 10 blocks (the sampler's coarser buckets would give 12).
  out = adaptation.pack([(0, [1] * 70, [2])], num_rows=1, num_adapters=1, pad_id=0, block=8)
  assert out["tokens_BT"].shape == (1, 80)


def test_an_adapter_never_sees_another_inputs_data(model):
  config, params = model
  trainer = adaptation.Trainer(config, CFG)
  rngs = jax.random.split(jax.random.key(1), 2)
  first, _ = trainer.train_all(params, [_examples(0, 1), _examples(1, 1)], 0, rngs)
  second, _ = trainer.train_all(params, [_examples(0, 1), _examples(9, 1, 30, 40)], 0, rngs)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-6)  # adapter 0
  assert any(
      not np.allclose(np.asarray(a[1]), np.asarray(b[1]))
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second))
  )


def test_training_lowers_the_loss_on_its_example(model):
  config, params = model
  ((prompt, answer),) = _examples(3, 1)
  rngs = jax.random.split(jax.random.key(2), 1)
  trainer = adaptation.Trainer(config, CFG)
  adapters, _ = trainer.train_all(params, [[(prompt, answer)]], 0, rngs)
  seq = np.asarray([prompt + answer], np.int32)
  args = (
      seq,
      np.arange(seq.shape[1])[None],
      np.arange(len(prompt) - 1, seq.shape[1] - 1)[None],
      np.asarray([answer]),
      np.ones((1, len(answer)), np.float32),
  )
  fresh = lora_lib.unstack(trainer.init(rngs)[0], 0)
  before = _answer_loss(config, params, fresh, *args)
  after = _answer_loss(config, params, lora_lib.unstack(adapters, 0), *args)
  assert float(after) < float(before) - 0.3


def test_schedule_warms_up_from_zero_then_decays_to_zero():
  lr = adaptation.lr_schedule(AdaptConfig(learning_rate=1e-3, warmup_ratio=0.03), 5)
  np.testing.assert_allclose(
      lr,
      1e-3 * np.array([0, 1, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
      rtol=1e-6,
  )
  # One step (one pair, one epoch) trains at the full rate: warmup never takes the last step.
  np.testing.assert_allclose(
      adaptation.lr_schedule(AdaptConfig(learning_rate=1e-3, warmup_ratio=0.5), 1), [1e-3]
  )
  np.testing.assert_allclose(
      adaptation.lr_schedule(AdaptConfig(learning_rate=1e-3, warmup_ratio=1.0), 2), [0, 1e-3]
  )


def test_dropout_changes_training_but_keeps_each_adapter_independent_of_its_call_and_microbatches(model):
  """With LoRA dropout an adapter still trains alike in one call with the others as alone over
  microbatches: a token's masks derive from its adapter's key, the step and its place in the
  adapter's batch (batches of 2 here), not from the rows it shares. (Drawn over the rows, they
  differed.)"""
  config, params = model
  cfg = AdaptConfig(**{**CFG.__dict__, "dropout": 0.3, "batch_size": 2, "epochs": 2})
  examples = [_examples(0, 1), _examples(1, 3, 20, 40), _examples(2, 2)]
  rngs = jax.random.split(jax.random.key(6), 3)
  together, losses = adaptation.Trainer(config, cfg).train_all(params, examples, 0, rngs)
  plain = AdaptConfig(**{**cfg.__dict__, "dropout": 0.0})
  undropped, _ = adaptation.Trainer(config, plain).train_all(params, examples, 0, rngs)
  assert not np.allclose(
      np.asarray(undropped.weights["attn"]["q_proj"]["a"]),
      np.asarray(together.weights["attn"]["q_proj"]["a"]),
  )
  trainer = adaptation.Trainer(config, AdaptConfig(**{**cfg.__dict__, "row_tokens": 64}))  # a pair each
  alone, alone_losses = trainer.train_all(params, examples, 0, rngs, per_call=1)
  np.testing.assert_allclose(alone_losses, losses, atol=1e-5)
  for g, w in zip(jax.tree.leaves(alone), jax.tree.leaves(together), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_remat_and_adapters_per_call_change_nothing_but_speed(model, traced_anew):
  config, params = model
  # One pair each, lengths in one bucket: each way below compiles a single step program (mixed
  # lengths and step counts are test_packed_training_equals_each_adapter_trained_alone's).
  examples = [_examples(s, 1, 10, 14) for s in (2, 3, 4, 6)]
  rngs = jax.random.split(jax.random.key(5), 4)
  trainer = adaptation.Trainer(config, AdaptConfig(**{**CFG.__dict__, "remat": "off"}))
  together, losses = trainer.train_all(params, examples, 0, rngs)  # one packed call per step
  trainer = adaptation.Trainer(config, AdaptConfig(**{**CFG.__dict__, "remat": "on"}))
  compiled = trainer.step._cache_size()  # every trainer's programs (those of equal settings shared)
  split, split_losses = trainer.train_all(params, examples, 0, rngs, 2)  # two calls per step
  assert trainer.step._cache_size() == compiled + 1
  np.testing.assert_allclose(split_losses, losses, atol=1e-5)
  for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(together)):
    assert got.shape[0] == 4
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_uneven_calls_and_padded_adapter_slots_train_each_adapter_as_alone(model):
  config, params = model
  examples = [_examples(s, 1, 10, 14) for s in (2, 3, 4, 6, 8)]
  rngs = jax.random.split(jax.random.key(8), 5)
  trainer = adaptation.Trainer(config, CFG)
  want, want_losses = trainer.train_all(params, examples, 0, rngs)  # 5 adapters in a bucket of 6 slots
  alone = _reference(model, examples[4], rngs[4], CFG)  # the adapter whose slot is repeated
  for got, ref in zip(jax.tree.leaves(lora_lib.unstack(want, 4)), jax.tree.leaves(alone)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
  for per_call in (2, 3):  # calls of 2, 2 and 1 adapters; of 3 and 2 (each padded to its bucket)
    got, losses = trainer.train_all(params, examples, 0, rngs, per_call)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape[0] == 5
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_waves_in_the_same_buckets_compile_once(model, traced_anew):
  config, params = model
  # On a mesh, as the main job runs: the step's inputs keep one sharding from step to step.
  params = jax.device_put(params, sharding.params_sharding(sharding.make_mesh(), params))
  trainer = adaptation.Trainer(config, CFG)
  rngs = jax.random.split(jax.random.key(6), 3)
  before = trainer.step._cache_size()
  # Two waves of 3 adapters whose packed shapes fall in the same buckets, then a longer one.
  trainer.train_all(params, [_examples(s, 1, 10, 12) for s in range(3)], 0, rngs)
  compiled = trainer.step._cache_size()
  assert compiled == before + 1  # all 3 epochs' steps of the wave in one program
  trainer.train_all(params, [_examples(s, 1, 10, 12) for s in range(3, 6)], 0, rngs)
  assert trainer.step._cache_size() == compiled
  trainer.train_all(params, [_examples(s, 1, 300, 301) for s in range(3)], 0, rngs)
  assert trainer.step._cache_size() == compiled + 1
  # Another trainer of the same settings (a resumed run's, the next sft baseline's) compiles nothing.
  trainer = adaptation.Trainer(config, CFG)
  trainer.train_all(params, [_examples(s, 1, 10, 12) for s in range(3)], 0, rngs)
  assert trainer.step._cache_size() == compiled + 1
  # Other settings (here the optimizer's clipping) are another program, never a reused one.
  trainer = adaptation.Trainer(config, AdaptConfig(**{**CFG.__dict__, "max_grad_norm": 0.5}))
  trainer.train_all(params, [_examples(s, 1, 10, 12) for s in range(3)], 0, rngs)
  assert trainer.step._cache_size() == compiled + 2


def test_on_a_tensor_mesh_each_device_keeps_its_share_of_the_adapters_and_they_train_as_on_one(model):
  """On a (2, 2, 2) mesh, whose tensor axis splits the base kernels, with the accelerators' ops (no
  CPU kernels): the adapters and their AdamW states are split over the devices from their init
  through every step, a wave's steps compile once (left to propagation, a LoRA b took its
  kernel's tensor split and the second step compiled again), and the adapters train as on one
  device, LoRA dropout's masks too (the tensor axis splits the features they are drawn over).
  (The CPU kernels on a mesh: sharding_test.)"""
  config, params = model
  cfg = AdaptConfig(**{**CFG.__dict__, "dropout": 0.3})
  mesh = sharding.make_mesh((2, 2, 2))
  placed = jax.device_put(params, sharding.params_sharding(mesh, params, config))
  examples = [_examples(s, 1, 10, 14) for s in (2, 3, 4, 6, 8)]
  rngs = jax.random.split(jax.random.key(9), 5)
  with cpu_kernels.xla_ops():
    want, want_losses = adaptation.Trainer(config, cfg).train_all(params, examples, 0, rngs)
    trainer = adaptation.Trainer(config, cfg)
    compiled_step, shares = trainer.step, []
    compiled = compiled_step._cache_size()

    def step(params, adapters, opt_states, *args, **kwargs):
      leaves = jax.tree.leaves((adapters, opt_states))
      shares.append({(x.shape[0], x.addressable_shards[0].data.shape[0]) for x in leaves})
      return compiled_step(params, adapters, opt_states, *args, **kwargs)

    trainer.step = step
    got, losses = trainer.train_all(placed, examples, 0, rngs)
    assert compiled_step._cache_size() == compiled + 1
  assert len(shares) == CFG.epochs and all(share == {(8, 1)} for share in shares)  # 5 -> 8 slots
  np.testing.assert_allclose(losses, want_losses, atol=1e-5)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (g.shape[0], g.addressable_shards[0].data.shape[0]) == (8, 1)  # split, filled as in training
    np.testing.assert_allclose(np.asarray(g[:5]), np.asarray(w), atol=1e-5, rtol=0)


def test_answers_of_other_lengths_share_one_step_program_and_train_the_same(model, traced_anew):
  config, params = model
  trainer = adaptation.Trainer(config, CFG)
  keys = jax.random.split(jax.random.key(7), 2)
  prompt = list(range(1, 11))
  examples = [[(prompt, [3] * 2)], [(prompt, [4] * 20)]]  # alone: 8 and 24 answer slots
  compiled = trainer.step._cache_size()
  together, _ = trainer.train_all(params, examples, 0, keys, per_call=1)
  assert trainer.step._cache_size() == compiled + 1
  alone, _ = trainer.train_all(params, examples[:1], 0, keys[:1])
  for got, want in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6, rtol=0)


def test_auto_microbatches_fit_the_memory_budget_and_remat_is_the_last_resort(model, monkeypatch):
  config, _ = model
  examples = [_examples(s, 1, 30, 50) for s in range(4)]  # one 64-token block each
  per_token = adaptation.activation_bytes_per_token(config)
  # (tokens a microbatch may keep, microbatches, remat): that budget is a quarter of the memory;
  # remat only past twice it (a 64-token block over a 32-token budget is a bucket's slack).
  for budget, microbatches, remat in ((1000, 1, False), (128, 2, False), (32, 4, False), (16, 4, True)):
    memory = int(budget * per_token / adaptation.MICROBATCH_MEMORY_FRACTION)
    monkeypatch.setattr(adaptation, "device_memory_bytes", lambda: memory)
    trainer = adaptation.Trainer(config, CFG)  # row_tokens 0: auto
    step = adaptation.make_steps(trainer.cfg, examples, 0, 4)[0]
    assert step.microbatches == microbatches and trainer.remat_for(step) == remat, budget
  # On a mesh each device keeps its share of a microbatch's rows: 2 rows over 2 batch shards.
  step = adaptation.make_steps(CFG, examples, 0, 4, num_rows=2)[0]
  assert step.tokens_MBT.shape[:2] == (1, 2)
  assert adaptation.activation_bytes(config, step, 2) * 2 == adaptation.activation_bytes(config, step)
  threshold = 192  # tokens: between the step's 2 x 128 and a device's 128
  monkeypatch.setattr(adaptation, "device_memory_bytes", lambda: int(threshold * per_token / 0.5))
  mesh = sharding.make_mesh((1, 2, 1), jax.devices()[:2])
  trainer = adaptation.Trainer(config, AdaptConfig(rank=4, alpha=8.0, row_tokens=4096))
  assert step.tokens_MBT.shape[2] == 128
  assert trainer.remat_for(step) and not trainer.remat_for(step, mesh)
  with pytest.raises(ValueError, match="adaptation.remat"):
    adaptation.Trainer(config, AdaptConfig(remat="sometimes"))


def test_a_sequence_past_the_models_context_is_refused(model):
  config, params = model
  trainer = adaptation.Trainer(dataclasses.replace(config, sliding_window=40), CFG)
  with pytest.raises(ValueError, match="sequence of 41 tokens passes the model's context of 40 tokens"):
    trainer.plan_calls(params, [[(list(range(1, 31)), [5] * 11)]], 0)


def _packed_step_args(step):
  """The packing and rows of the step's single microbatch, and its answer tokens per adapter."""
  assert step.tokens_MBT.shape[0] == 1
  packing = transformer.Packing(step.adapter_MBXA[0], step.seq_blocks_MBUW[0], step.block_slots_MBX[0])
  rows = (step.tokens_MBT, step.positions_MBT, step.select_MBI, step.targets_MBI, step.weights_MBI)
  A = step.adapter_MBXA.shape[-1]
  answer_tokens_A = np.bincount(step.answer_adapter_MBI.ravel(), step.weights_MBI.ravel(), minlength=A)
  return packing, tuple(x[0] for x in rows) + (step.answer_adapter_MBI[0], answer_tokens_A)


def test_a_step_without_remat_keeps_what_activation_bytes_counts(model, capsys):
  config, params = model
  trainer = adaptation.Trainer(config, CFG)
  step = adaptation.make_steps(CFG, [_examples(0, 1), _examples(1, 1)], 0, 2)[0]
  adapters, _ = trainer.init(jax.random.split(jax.random.key(0), 2))
  packing, rows = _packed_step_args(step)
  loss = lambda ad: trainer.packed_loss(params, ad, packing, *rows, remat=False)[0]
  print_saved_residuals(loss, adapters)
  # The layer scan's stacked activations: [L, B, ...] arrays with a T axis.
  (B, T), kept = step.tokens_MBT.shape[1:], 0
  out = capsys.readouterr().out
  for line in out.splitlines():
    array = re.match(r"f(\d+)\[([\d,]+)\]", line)  # e.g. f32[2,1,128,64] output of scan ...
    dims = [int(d) for d in array.group(2).split(",")] if array else []
    if dims[:2] == [config.num_layers, B] and T in dims[2:]:
      kept += math.prod(dims) * int(array.group(1)) // 8
  assert kept == adaptation.activation_bytes(config, step), out


def _compiled_step(model, remat, uninitialized=False):
  config, params = model
  trainer = adaptation.Trainer(config, CFG)
  step = adaptation.make_steps(CFG, [_examples(0, 1)], 0, 1)[0]
  adapters, opt_states = trainer.init(jax.random.split(jax.random.key(0), 1))
  jax.clear_caches()  # lowered here, not an equal trainer's step lowered outside the block below
  with cpu_kernels.uninitialized_scan_outputs(single_device=uninitialized):
    lowered = adaptation.Trainer.step.lower(
        trainer,
        params,
        adapters,
        opt_states,
        *step.step_args(),
        jax.random.split(jax.random.key(0), 1),
        remat=remat,
    )
  return lowered.compile().as_text()


def test_the_layer_scan_stacks_its_activations_unfilled_and_trains_the_same(model, monkeypatch, traced_anew):
  """The [L, B, T, ...] stacks the backward pass reads come from the empty custom call, not from a
  broadcast of zeros; training with them equals training without, bit for bit."""
  assert cpu_kernels.available()
  config, _ = model
  step = adaptation.make_steps(CFG, [_examples(0, 1)], 0, 1)[0]
  stack = re.compile(rf"f32\[{config.num_layers},1,{step.tokens_MBT.shape[-1]}[,\]]")
  for uninitialized in (False, True):
    hlo = _compiled_step(model, remat=False, uninitialized=uninitialized)
    stacks = [
        line for line in hlo.splitlines() if re.search(r"= " + stack.pattern, line.strip().split("%", 1)[-1])
    ]
    empty = [line for line in stacks if 'custom_call_target="ttsi_uninitialized"' in line]
    zeros = [line for line in stacks if "broadcast" in line]
    assert (len(empty) > 0, len(zeros) > 0) == (uninitialized, not uninitialized), "\n".join(stacks)

  examples = [_examples(0, 1), _examples(1, 2, 20, 40)]
  rngs = jax.random.split(jax.random.key(0), 2)
  steps = adaptation.make_steps(CFG, examples, 0, 2, block=16)
  unfilled = adaptation.Trainer(config, CFG).train(model[1], steps, rngs)
  with monkeypatch.context() as m:
    m.setattr(cpu_kernels, "uninitialized_scan_outputs", lambda single_device: contextlib.nullcontext())
    jax.clear_caches()  # the equal trainer's step lowers again, outside the block
    zero_filled = adaptation.Trainer(config, CFG).train(model[1], steps, rngs)
  for got, want in zip(jax.tree.leaves(unfilled), jax.tree.leaves(zero_filled)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_step_without_remat_runs_the_attention_kernel_forward_once(model):
  """Its softmax statistics are kept for the backward pass, not recomputed."""
  assert cpu_kernels.available()
  for remat, forwards in ((False, 1), (True, 2)):
    hlo = _compiled_step(model, remat)
    assert hlo.count('custom_call_target="ttsi_attention_forward"') == forwards, remat


def test_a_packed_step_runs_every_lora_branch_in_the_cpu_kernels(model):
  """Per layer: each of the 7 targets adds its branch in place (wide_add) and gets its b's gradient
  and its rank-R input's gradient in one pass (wide_grads); the layers that read one input (q/k/v,
  gate/up) share one rank-R product of it (narrow, recomputed in the backward pass), so the 4 inputs
  take 2 x 4 narrow products, 4 gradients of the inputs (wide) and 4 of the a's (outer); no per-block
  batched dot is left."""
  assert cpu_kernels.available()
  hlo = _compiled_step(model, remat=False)
  count = lambda op: hlo.count(f'custom_call_target="ttsi_lora_{op}"')
  assert (count("wide_add"), count("wide_grads"), count("narrow"), count("wide"), count("outer")) == (
      7,
      7,
      8,
      4,
      4,
  )
  assert "bxzi,bxir->bxzr" not in hlo
