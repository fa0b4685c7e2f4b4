"""Sharded params on 8 simulated CPU devices give the single-device result."""

import logging
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import random_tokens
from ttsi_jax import checkpoints
from ttsi_jax.model import sharding, transformer
from ttsi_jax.model.transformer import KVCache
from ttsi_jax.text import sampler as sampler_lib


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
  return sharding.make_mesh((2, 2, 2))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_forward_equals_single_device(hf_checkpoints, mesh, arch):
  folder = hf_checkpoints[arch][0]
  config, params = checkpoints.load(folder)
  _, sharded = checkpoints.load(folder, mesh=mesh)
  q = sharded["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, ("fsdp",), ("tensor",))
  want = (config.embed_dim // 2, config.num_heads * config.head_dim // 2)  # fsdp=2, tensor=2
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1:] == want

  tokens = random_tokens(4, 10)
  positions = np.broadcast_to(np.arange(10, dtype=np.int32), (4, 10))
  ref, _ = transformer.forward(config, params, tokens, positions)
  tokens_sharded = jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.shape))
  out, _ = jax.jit(transformer.forward, static_argnums=0)(config, sharded, tokens_sharded, positions)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)

  cache = KVCache.init(config, 4, 16)
  out, cache = jax.jit(transformer.forward, static_argnums=0)(
      config, sharded, tokens_sharded, positions, cache
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_sharded_generation_equals_single_device(hf_checkpoints, mesh):
  folder = hf_checkpoints["qwen2"][0]
  config, params = checkpoints.load(folder)
  _, sharded = checkpoints.load(folder, mesh=mesh)
  prompts = [[5, 6, 7], [9] * 12, [3, 1, 4, 1, 5]]
  sampling = sampler_lib.SamplingParams(max_new_tokens=8)
  single = sampler_lib.Sampler(config, params, [255], 0).generate(prompts, sampling)
  assert sampler_lib.Sampler(config, sharded, [255], 0).generate(prompts, sampling) == single


def test_every_param_has_a_rule_and_unknown_params_fail(hf_checkpoints, mesh):
  config, _ = checkpoints.load(hf_checkpoints["qwen2"][0])
  shardings = sharding.params_sharding(mesh, transformer.param_shapes(config))
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(transformer.param_shapes(config)))
  with pytest.raises(KeyError, match="layers/attn/new_proj/kernel has no entry in PARAM_AXES"):
    sharding.param_sharding(mesh, ("layers", "attn", "new_proj", "kernel"), (2, 64, 64))


def test_non_dividing_axis_is_replicated(mesh):
  # 3 kv heads * 64 = 192 divides by tensor=2, but a vocab of 49153 does not: that dim replicates.
  spec = sharding.logical_to_spec(mesh, ("vocab", "embed"), (49153, 576))
  assert spec == P(None, ("fsdp",))


def test_attention_heads_are_never_split_inside_a_head(hf_checkpoints):
  """Tensor 4 divides the KV projection's 2 x 32 columns but not its 2 heads: k and v stay whole
  (cuDNN's attention refuses heads split inside, or q, k, v split unlike each other)."""
  folder = hf_checkpoints["qwen2"][0]
  config = checkpoints.read_config(folder)
  mesh = sharding.make_mesh((1, 2, 4))
  assert (config.num_kv_heads * config.head_dim) % 4 == 0 and config.num_kv_heads % 4
  _, sharded = checkpoints.load(folder, mesh=mesh)
  k = sharded["layers"]["attn"]["k_proj"]["kernel"].sharding.spec
  assert k == P(None, ("fsdp",), None)
  without_units = sharding.param_sharding(mesh, ("layers", "attn", "k_proj", "kernel"), (2, 64, 64))
  assert without_units.spec == P(None, ("fsdp",), ("tensor",))  # the flat count alone would split
  # q splits only at whole groups of the query heads that share a key head: here, like k and v.
  attn = sharded["layers"]["attn"]
  assert config.num_heads % 4 == 0  # q's own heads would split over tensor=4
  assert attn["q_proj"]["kernel"].sharding.spec == k == attn["v_proj"]["kernel"].sharding.spec
  assert attn["o_proj"]["kernel"].sharding.spec[1] is None  # o reads q's heads: not split either


def test_a_rule_keeps_the_leading_mesh_axes_that_divide():
  mesh = sharding.make_mesh((2, 4, 1))
  assert sharding.logical_to_spec(mesh, ("batch",), (16,)) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(mesh, ("batch",), (2,)) == P(("data",))
  assert sharding.logical_to_spec(mesh, ("batch",), (3,)) == P(None)


def test_bad_mesh_shape_is_explained_and_a_smaller_one_takes_the_first_devices(caplog):
  with pytest.raises(ValueError, match=r"Mesh shape \(3, 2, 2\).*needs 12 devices but 8"):
    sharding.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match=r"Mesh shape \(-1, -1, 1\) needs a size of at least 1"):
    sharding.make_mesh((-1, -1, 1))
  with caplog.at_level(logging.WARNING):
    mesh = sharding.make_mesh((1, 2, 1))
  assert list(mesh.devices.flat) == jax.devices()[:2] and "uses 2 of the 8 devices" in caplog.text
  with pytest.raises(ValueError, match=r"Mesh shape \(8,\) needs one size per axis"):
    sharding.make_mesh((8,))


@pytest.mark.parametrize(
    "shape, sizes",
    [((1, 8, 1), {1: 8, 6: 8, 8: 8, 12: 16}), ((2, 2, 2), {3: 4, 6: 8, 8: 8}), ((1, 1, 8), {3: 3})],
)
def test_batches_fill_the_data_and_fsdp_shards(shape, sizes):
  mesh = sharding.make_mesh(shape)
  assert {n: sharding.fill_batch_shards(mesh, n) for n in sizes} == sizes
  assert sharding.fill_batch_shards(None, 6) == 6


def _shares(tree) -> set:
  """(length, one device's share) of the leading axis of every leaf."""
  return {(x.shape[0], x.addressable_shards[0].data.shape[0]) for x in jax.tree.leaves(tree)}


def test_rows_and_adapters_split_over_data_and_fsdp_give_single_device_results(hf_checkpoints):
  from ttsi_jax.text import scoring
  from ttsi_jax.ttsi import adaptation

  folder = hf_checkpoints["qwen2"][0]
  config, params = checkpoints.load(folder)
  _, sharded = checkpoints.load(folder, mesh=sharding.make_mesh((4, 2, 1)))
  prompts = [[5, 6, 7], [9] * 12, [3, 1, 4, 1, 5], [2] * 7, [8] * 3, [7] * 9]
  candidates = [[[11, 12], [13]]] * len(prompts)
  sampling = sampler_lib.SamplingParams(max_new_tokens=6, temperature=1.0)
  keys_B = jax.random.split(jax.random.key(0), len(prompts))
  results = []
  for p in (params, sharded):
    s = sampler_lib.Sampler(config, p, [255], 0)
    pre = s.prefill(prompts, reserve=32)
    loglik, _ = scoring.score_after(s, pre, candidates)
    results.append((pre, loglik, s.continue_(pre, [[]] * len(prompts), sampling, keys_B)))
  (_, loglik, samples), (pre, sharded_loglik, sharded_samples) = results
  # 6 rows padded to 8, one per device: 6 would not split over 8 devices and be replicated.
  assert pre.batch == 8 and pre.prefix.cache.k_LBKSH.sharding.spec[1] == ("data", "fsdp")
  np.testing.assert_allclose(sharded_loglik, loglik, atol=1e-5, rtol=0)
  assert sharded_samples == samples

  # Packed training: each step's rows split over data x fsdp (8 rows, one per device), for a
  # wave of adapters and for a single adapter's batch (the sft baseline) alike, the latter in
  # microbatches of a 64-token block per row (2 microbatches of 8 rows on the mesh, 16 of one row
  # on one device).
  keys_A = jax.random.split(jax.random.key(1), 3)
  for cfg, examples in (
      (adaptation.AdaptConfig(learning_rate=1e-3, epochs=2), [[(p, [3, 4])] for p in prompts[:3]]),
      (
          adaptation.AdaptConfig(learning_rate=1e-3, epochs=1, batch_size=16, row_tokens=64),
          [[(p, [3, 4]) for p in 2 * prompts + prompts[:4]]],
      ),
  ):
    trainer = adaptation.Trainer(config, cfg)
    specs, step = [], trainer.step
    trainer.step = lambda p, ad, opt, tokens, *rest, **kw: (
        specs.append((getattr(tokens, "sharding", None), tokens.shape, _shares((ad, opt))))
        or step(p, ad, opt, tokens, *rest, **kw)
    )
    keys = keys_A[: len(examples)]
    want, want_losses = trainer.train_all(params, examples, 0, keys)
    got, losses = trainer.train_all(sharded, examples, 0, keys)
    one_device, mesh = (16, 2) if cfg.row_tokens else (1, 1)  # microbatches
    assert specs[0][0] is None and specs[0][1][:2] == (one_device, 1)
    assert specs[-1][0].spec == P(None, ("data", "fsdp"), None) and specs[-1][1][:2] == (mesh, 8)
    # The adapters and their AdamW states: whole on one device; on the mesh the call's count
    # filled to 8 slots, one on each device.
    assert specs[0][2] == {(len(examples),) * 2} and specs[-1][2] == {(8, 1)}
    # The trained adapters come back split the same way (their count filled: copies of the last).
    assert _shares(want) == {(len(examples),) * 2} and _shares(got) == {(8, 1)}
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for x, y in zip(jax.tree.leaves(got.weights), jax.tree.leaves(want.weights), strict=True):
      filled = np.concatenate([y, np.repeat(y[-1:], 8 - len(y), axis=0)])
      np.testing.assert_allclose(np.asarray(x), filled, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 2, 2)])
def test_trained_adapters_stay_split_from_their_calls_to_the_answer_rows(shape):
  """The wave's adapters, joined from several calls (idle slots cut, filled with the last) and then
  laid out as answer rows (padding rows: the last adapter), are kept split: each device holds its
  share of the stack, then its rows' adapters. No step all-gathers the stack: a tensor axis
  (rows replicated over it) brings each device its partner's slot alone."""
  from ttsi_jax.ttsi import adaptation

  mesh = sharding.make_mesh(shape)
  split = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "tensor")))
  calls = [np.arange(8 * 2 * 16 * 4.0).reshape(8, 2, 16, 4) + 1e4 * c for c in range(2)]  # [A, L, in, R]
  parts = [{"a": jax.device_put(x, split)} for x in calls]
  joined = adaptation._joined(parts, (5, 2), mesh)["a"]
  want = np.concatenate([calls[0][:5], calls[1][:2], calls[1][1:2]])  # 7 filled to 8
  np.testing.assert_array_equal(np.asarray(joined), want)
  assert (joined.shape[0], joined.addressable_shards[0].data.shape[0]) == (8, 1)
  rows = sampler_lib._adapters_of_rows({"a": joined}, 6, 8, mesh)["a"]
  np.testing.assert_array_equal(np.asarray(rows), np.concatenate([want[:6], want[5:6], want[5:6]]))
  assert rows.sharding.is_equivalent_to(sharding.batch_sharding(mesh, rows.shape), rows.ndim)
  for program in (
      adaptation._joined.lower(parts, (5, 2), mesh),
      sampler_lib._adapters_of_rows.lower({"a": joined}, 6, 8, mesh),
  ):
    gathered = re.findall(r"f32\[(\d+),[\d,]+\]\S* all-gather\(", program.compile().as_text())
    assert all(int(n) <= shape[2] for n in gathered), gathered
