"""Vmapped adaptation equals sequential adaptation; adapters are isolated; training learns."""

import jax
import numpy as np
import pytest

from tests.conftest import VOCAB
from ttsi_jax.checkpoints import hf
from ttsi_jax.ttsi import adaptation
from ttsi_jax.ttsi.adaptation import AdaptConfig

CFG = AdaptConfig(rank=4, alpha=8.0, learning_rate=1e-2, epochs=5, batch_size=1)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
  return hf.load(hf_checkpoints["llama"][0])


def _examples(seed, k):
  rs = np.random.RandomState(seed)
  return [(rs.randint(1, VOCAB, rs.randint(5, 20)).tolist(),
           rs.randint(1, VOCAB, rs.randint(2, 6)).tolist()) for _ in range(k)]


def _train(model, examples, rngs, cfg=CFG):
  config, params = model
  trainer = adaptation.Trainer(config, cfg)
  batches = adaptation.make_batches(cfg, examples, pad_id=0, num_adapters=len(rngs))
  return trainer.train(params, batches, rngs)


def test_vmapped_update_equals_sequential_updates(model):
  examples = [_examples(0, 1), _examples(1, 2), _examples(2, 1)]  # different K: own steps each
  rngs = jax.random.split(jax.random.key(0), 3)
  together, losses = _train(model, examples, rngs)
  assert losses.shape == (10, 3) and np.isnan(losses[5:, 0]).all() and not np.isnan(losses).all(0).any()
  for a in range(3):
    alone, _ = _train(model, [examples[a]], rngs[a:a + 1])
    for got, want in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
      np.testing.assert_allclose(np.asarray(got[a]), np.asarray(want[0]), atol=1e-5, rtol=0)


def test_an_adapter_never_sees_another_inputs_data(model):
  rngs = jax.random.split(jax.random.key(1), 2)
  first, _ = _train(model, [_examples(0, 1), _examples(1, 1)], rngs)
  second, _ = _train(model, [_examples(0, 1), _examples(9, 1)], rngs)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))  # adapter 0: unchanged
  assert any(not np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_training_lowers_the_loss_on_its_example(model):
  config, params = model
  examples = [_examples(3, 1)]
  rngs = jax.random.split(jax.random.key(2), 1)
  adapters, _ = _train(model, examples, rngs)
  batch = adaptation.make_batches(CFG, examples, 0, 1)
  args = [x[0, 0] for x in (batch.tokens_SABL, batch.positions_SABL, batch.select_SABI,
                            batch.targets_SABI, batch.weights_SABI)]
  adapter = jax.tree.map(lambda x: x[0], adapters)
  fresh = adaptation.Trainer(config, CFG).init(rngs)[0]
  before = adaptation.answer_loss(config, params, jax.tree.map(lambda x: x[0], fresh), *args)
  after = adaptation.answer_loss(config, params, adapter, *args)
  assert float(after) < float(before) - 0.3


def test_schedule_warms_up_from_zero_then_decays_to_zero():
  lr = adaptation.lr_schedule(AdaptConfig(learning_rate=1e-3, warmup_ratio=0.03), 5)
  np.testing.assert_allclose(lr, 1e-3 * np.array([0, 1, 0.5 * (1 + np.cos(np.pi / 4)),
                                                   0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
                             rtol=1e-6)


def test_dropout_changes_training_only_when_enabled(model):
  rngs = jax.random.split(jax.random.key(4), 1)
  plain, _ = _train(model, [_examples(5, 1)], rngs)
  dropped, _ = _train(model, [_examples(5, 1)], rngs, CFG.__class__(**{**CFG.__dict__,
                                                                       "dropout": 0.5}))
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(dropped)))


def test_adapters_per_call_changes_nothing_but_speed(model):
  config, params = model
  trainer = adaptation.Trainer(config, CFG)
  examples = [_examples(0, 1), _examples(1, 2), _examples(2, 1)]
  rngs = jax.random.split(jax.random.key(5), 3)
  together, losses = trainer.train_all(params, examples, 0, rngs)  # one vmapped call
  for per_call in (1, 2):
    split, split_losses = trainer.train_all(params, examples, 0, rngs, per_call)
    np.testing.assert_allclose(split_losses, losses, atol=1e-5)
    for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(together)):
      assert got.shape[0] == 3
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
