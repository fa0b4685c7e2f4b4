"""Batched generation equals generation alone; buckets compile once; per-row RNG; stop tokens."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import VOCAB
from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.model import transformer
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text.sampler import SamplingParams


@pytest.fixture(scope="module")
def sampler(hf_checkpoints):
  config, params = hf.load(hf_checkpoints["qwen2"][0])
  return sampler_lib.Sampler(config, params, stop_ids=[VOCAB - 1], pad_id=0)


def _prompts(lengths, seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randint(1, VOCAB - 1, n).tolist() for n in lengths]


def _random_adapters(config, keys):
  """One rank-4 adapter per key, b nonzero (a fresh adapter leaves the model as it is)."""
  return [
      jax.tree.map(
          lambda w, k=k: w + 0.3 * jax.random.normal(k, w.shape, w.dtype),
          lora_lib.init(config, k, 4, 8.0, lora_lib.ALL_LINEAR, 0.0),
      )
      for k in keys
  ]


def test_batched_greedy_equals_each_prompt_alone(sampler):
  prompts = _prompts([3, 17, 9, 30, 1])
  params = SamplingParams(max_new_tokens=12)
  batched = sampler.generate(prompts, params)
  alone = [sampler.generate([p], params)[0] for p in prompts]
  assert batched == alone
  assert all(len(c) == 12 for c in batched)  # random model: no stop token drawn


@pytest.mark.parametrize("per_octave, waste", [(2, 1 / 3), (4, 1 / 5)])
def test_buckets_bound_the_padding_and_the_number_of_shapes(per_octave, waste):
  sizes = [sampler_lib.bucket(n, per_octave=per_octave) for n in range(1, 4097)]
  assert all(0 <= size - n < waste * size for n, size in enumerate(sizes, 1))  # padding share
  assert all(sampler_lib.bucket(size, per_octave=per_octave) == size for size in sizes)  # fixed points
  assert len(set(sizes)) <= per_octave * 12 + 1  # per_octave shapes per doubling
  assert sampler_lib.bucket(9, per_octave=per_octave) == {2: 12, 4: 10}[per_octave]
  assert sampler_lib.bucket(3, minimum=32) == 32


def test_buckets_per_octave_caps_every_bucket_inside_its_block_only():
  fine = [sampler_lib.bucket(n, per_octave=4) for n in (5, 9, 13, 17)]
  assert fine == [5, 10, 14, 20]
  with sampler_lib.buckets_per_octave(1):
    assert [sampler_lib.bucket(n, per_octave=4) for n in (5, 9, 13, 17)] == [8, 16, 16, 32]
    assert sampler_lib.bucket(3, minimum=32) == 32
    with sampler_lib.buckets_per_octave(2):
      assert sampler_lib.bucket(9, per_octave=4) == 12
    assert sampler_lib.bucket(9, per_octave=4) == 16
  assert [sampler_lib.bucket(n, per_octave=4) for n in (5, 9, 13, 17)] == fine
  with pytest.raises(RuntimeError), sampler_lib.buckets_per_octave(1):
    raise RuntimeError  # a run that fails leaves no limit behind
  assert sampler_lib.bucket(9, per_octave=4) == 10
  with pytest.raises(ValueError, match=r"one of \(1, 2, 4\), not 3"):  # 3 would not divide an octave
    with sampler_lib.buckets_per_octave(3):
      pass


@pytest.mark.parametrize("packed", [True, False])
def test_one_compilation_per_bucket(sampler, monkeypatch, packed):
  """Left-padded rows compile once per (prompt bucket, batch bucket); packed prompts also per
  bucket of their total length."""
  monkeypatch.setattr(sampler, "packs_prompts", lambda: packed)
  fn = sampler_lib.generate_tokens_packed if packed else sampler_lib.generate_tokens
  params = SamplingParams(max_new_tokens=5)
  sampler.generate(_prompts([4, 6]), params)
  before = fn._cache_size()
  sampler.generate(_prompts([10, 20], seed=1), params)  # same prompt bucket (32), batch (2), total (32)
  sampler.generate(_prompts([25, 2], seed=2), params)
  assert fn._cache_size() == before
  sampler.generate(_prompts([40, 2]), params)  # prompt bucket 40, total 48: one new compilation
  assert fn._cache_size() == before + 1


@pytest.mark.parametrize("packed", [True, False])
def test_a_batchs_padding_rows_stop_at_once(sampler, monkeypatch, packed):
  """5 prompts fill a batch of 6: the 6th row is inactive (it would otherwise decode until it drew a
  stop token, holding the whole batch's loop)."""
  monkeypatch.setattr(sampler, "packs_prompts", lambda: packed)
  name = "generate_tokens_packed" if packed else "generate_tokens"
  original, seen = getattr(sampler_lib, name), []

  def spy(*args, **kwargs):
    out = original(*args, **kwargs)
    seen.append((np.asarray(args[-1]), np.asarray(out)))
    return out

  monkeypatch.setattr(sampler_lib, name, spy)
  params = SamplingParams(max_new_tokens=6)
  prompts = _prompts([4, 9, 7, 3, 5])
  assert sampler.generate(prompts, params) == [sampler.generate([p], params)[0] for p in prompts]
  active_B, out_BO = seen[0]
  assert active_B.tolist() == [True] * 5 + [False]
  assert (out_BO[5, 1:] == sampler.pad_id).all()
  assert all((row != sampler.pad_id).any() for row in out_BO[:5, 1:])  # the real rows decoded on


def test_pad_and_stop_ids_must_be_rows_of_the_embedding(sampler):
  with pytest.raises(ValueError, match=rf"ids \[{VOCAB + 3}\] are not rows of the model's embedding"):
    sampler_lib.Sampler(sampler.config, sampler.params, stop_ids=[VOCAB - 1], pad_id=VOCAB + 3)
  with pytest.raises(ValueError, match=rf"ids \[-1, {VOCAB}\] are not rows of the model's embedding"):
    sampler_lib.Sampler(sampler.config, sampler.params, stop_ids=[VOCAB, 2, -1], pad_id=0)


def test_a_tokenizer_larger_than_the_embedding_is_warned_of(tiny_chat_model, tmp_path, caplog):
  import shutil

  import transformers

  folder = str(tmp_path / "small_embedding")
  shutil.copytree(tiny_chat_model, folder)
  config = transformers.AutoConfig.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  model.resize_token_embeddings(config.vocab_size - 8)  # the tokenizer's last 8 tokens have no row
  model.save_pretrained(folder)
  with caplog.at_level(logging.WARNING):
    sampler_lib.load_model(folder, "float32", None)
  assert (
      f"the tokenizer has {config.vocab_size} tokens, the model's embedding {config.vocab_size - 8} rows"
      in caplog.text
  )


def test_sampled_row_does_not_depend_on_its_batch_neighbours(sampler):
  prompts = _prompts([5, 8, 13])
  params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
  key = jax.random.key(7)
  batched = sampler.generate(prompts, params, key)
  # max_batch=1: every row decoded in a batch of its own, with the same per-row key.
  alone = sampler_lib.Sampler(
      sampler.config, sampler.params, sampler.stop_ids, sampler.pad_id, max_batch=1
  ).generate(prompts, params, key)
  assert batched == alone
  assert len(set(map(tuple, batched))) == 3
  assert sampler.generate(prompts, params, jax.random.key(8)) != batched


def test_per_row_keys_make_a_row_independent_of_the_rows_beside_it(sampler):
  prompts = _prompts([5, 8, 13, 21])
  params = SamplingParams(max_new_tokens=10, temperature=1.0)
  keys_B = jax.random.split(jax.random.key(3), 4)
  together = sampler.generate(prompts, params, keys_B)
  # Other neighbours, another batch bucket and prompt bucket: rows 1 and 2 sample the same.
  assert sampler.generate(prompts[1:3], params, keys_B[1:3]) == together[1:3]
  pre = sampler.prefill(prompts[2:3], reserve=32)
  assert sampler.continue_(pre, [[]], params, keys_B[2:3]) == together[2:3]
  assert sampler.extend(pre, [[]]).used == pre.used  # nothing to append: no pass, no cache slots
  with pytest.raises(ValueError, match="3 row keys for 4 rows"):
    sampler.generate(prompts, params, keys_B[:3])


def test_tiny_top_p_is_greedy(sampler):
  prompts = _prompts([6, 11])
  greedy = sampler.generate(prompts, SamplingParams(max_new_tokens=8))
  nucleus = sampler.generate(
      prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6), jax.random.key(3)
  )
  assert nucleus == greedy


def test_sample_token_draws_from_the_tempered_nucleus():
  """Draw frequencies against softmax(logits / T) restricted to the top-p nucleus (the token that
  crosses p kept), and top_p <= 0 is greedy."""
  logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.3, 0.1]]))
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(
      jax.vmap(lambda k, t, p: sampler_lib.sample_token(logits, k[None], t, p)[0], (0, None, None))
  )
  for temperature, top_p, expected in (
      (1.0, 1.0, [0.1, 0.5, 0.3, 0.1]),
      (0.5, 1.0, np.array([0.01, 0.25, 0.09, 0.01]) / 0.36),
      (1.0, 0.6, [0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0]),  # 0.5 < 0.6: the crossing 0.3 is kept
      (1.0, 0.5, [0.0, 1.0, 0.0, 0.0]),  # 0.5 reaches p: nothing more
  ):
    counts = np.bincount(np.asarray(draw(keys, temperature, top_p)), minlength=4) / n
    np.testing.assert_allclose(counts, expected, atol=0.015)
  assert int(sampler_lib.sample_token(logits, jax.random.key(1)[None], 1.0, 0.0)[0]) == 1  # not token 0


def test_an_old_style_prng_key_is_one_key(sampler):
  prompts = _prompts([6, 11, 9])
  params = SamplingParams(max_new_tokens=6, temperature=1.0)
  typed = sampler.generate(prompts, params, jax.random.key(5))
  assert sampler.generate(prompts, params, jax.random.PRNGKey(5)) == typed
  with pytest.raises(ValueError, match="rng must be a jax.random.key"):
    sampler.generate(prompts, params, jnp.zeros(3, jnp.float32))


def test_generation_stops_at_a_stop_token(sampler):
  prompts = _prompts([7])
  full = sampler.generate(prompts, SamplingParams(max_new_tokens=12))[0]
  stop = full[4]
  stopper = sampler_lib.Sampler(sampler.config, sampler.params, stop_ids=[stop], pad_id=0)
  assert stopper.generate(prompts, SamplingParams(max_new_tokens=12))[0] == full[: full.index(stop)]


def test_generate_with_an_adapter_is_vmappable(sampler):
  """Three adapters decode in one vmapped call, each equal to its own single-adapter call."""
  config = sampler.config
  adapters = [
      jax.tree.map(lambda x: x + 0.2 * i, lora_lib.init(config, jax.random.key(i), 2)) for i in range(3)
  ]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *adapters)
  tokens, positions = sampler_lib.left_pad(_prompts([5, 9]), 32, 2, 0)
  keys = jax.random.split(jax.random.key(0), 2)
  kwargs = dict(config=config, sampling=SamplingParams(max_new_tokens=6), stop_ids=sampler.stop_ids, pad_id=0)
  vmapped = jax.vmap(
      lambda a: sampler_lib.generate_tokens(sampler.params, tokens, positions, keys, a, **kwargs)
  )(stacked)
  for i, adapter in enumerate(adapters):
    single = sampler_lib.generate_tokens(sampler.params, tokens, positions, keys, adapter, **kwargs)
    np.testing.assert_array_equal(np.asarray(vmapped[i]), np.asarray(single))
  assert not np.array_equal(np.asarray(vmapped[0]), np.asarray(vmapped[2]))


def test_only_a_prompt_longer_than_the_context_is_rejected(sampler):
  with pytest.raises(
      ValueError,
      match="Prompt of 500 tokens \\+ max_new_tokens 64 exceeds the " "model's context of 512 tokens",
  ):
    sampler.generate(_prompts([500]), SamplingParams(max_new_tokens=64))
  # 400 + 64 fits the 512 context although 400's length bucket (512) would not leave room.
  (out,) = sampler.generate(_prompts([400]), SamplingParams(max_new_tokens=64))
  assert 0 < len(out) <= 64
  assert sampler.prefill(_prompts([400]), reserve=100).free() == 100


def _prompts_that_begin_alike(shared, own_lengths, seed=0):
  """Prompts of `shared` common tokens and then their own (a prompt of 0 own tokens is the shared
  part itself, so exactly `shared` are common)."""
  (prefix,) = _prompts([shared], seed)
  return [prefix + own for own in _prompts(own_lengths, seed + 1)]


def test_packed_prompts_run_the_tokens_they_begin_with_once():
  prompts = _prompts_that_begin_alike(70, [0, 5, 40, 1])
  assert sampler_lib.shared_prefix_length(prompts) == 70
  assert sampler_lib.shared_prefix_length(prompts[:1]) == 0  # one prompt: nothing to share
  assert sampler_lib.shared_prefix_length(_prompts([3, 4])) == 0
  tokens_1T, positions_1T, packed, last_1B = sampler_lib.pack_prompts(prompts, 112, 4, 0)
  segments = np.asarray(packed.segments_1T[0])
  assert (segments == -2).sum() == 70 and (segments >= 0).sum() == 46  # 70 + 5 + 40 + 1 tokens
  # Each cache row holds its whole prompt, left-padded; the shared part comes from the row's start.
  for b, ids in enumerate(prompts):
    slots = np.asarray(packed.to_cache_BP[b, 112 - len(ids) :])
    assert tokens_1T[0, slots].tolist() == ids
    assert positions_1T[0, slots].tolist() == list(range(len(ids)))
    assert last_1B[0, b] == slots[-1]
  # The same prompt twice: all of it is shared, run once, and each row's last token is its end.
  same = prompts[:1] * 2
  _, _, packed, last_1B = sampler_lib.pack_prompts(same, 112, 2, 0)
  assert (np.asarray(packed.segments_1T[0]) == -2).sum() == 70 and last_1B[0].tolist() == [69, 69]


@pytest.mark.parametrize("alike", [False, True])
def test_packed_prompts_prefill_the_same_cache_and_continue_the_same(sampler, monkeypatch, alike):
  """On the fused CPU kernel `prefill` packs its prompts in one row (prompts that begin alike run
  that part once); the Prefix equals the left-padded batch's at every filled slot, and decoding
  continues the same."""
  assert sampler.packs_prompts()
  prompts = _prompts_that_begin_alike(70, [3, 17, 0, 30, 1]) if alike else _prompts([3, 17, 9, 30, 1])
  packed = sampler.prefill(prompts, reserve=16)
  monkeypatch.setattr(sampler, "packs_prompts", lambda: False)
  padded = sampler.prefill(prompts, reserve=16)
  a, b = packed.prefix, padded.prefix
  np.testing.assert_array_equal(a.cache.positions_BS, b.cache.positions_BS)
  np.testing.assert_array_equal(a.next_position_B, b.next_position_B)
  assert int(a.cache.end_index) == int(b.cache.end_index) == packed.used
  filled_BS = np.asarray(b.cache.positions_BS) >= 0
  for x, y in ((a.cache.k_LBKSH, b.cache.k_LBKSH), (a.cache.v_LBKSH, b.cache.v_LBKSH)):
    x, y = np.asarray(x).swapaxes(2, 3), np.asarray(y).swapaxes(2, 3)  # [L, B, S, K, H]
    np.testing.assert_allclose(x[:, filled_BS], y[:, filled_BS], atol=1e-5)
  np.testing.assert_allclose(a.last_logits_BV[: len(prompts)], b.last_logits_BV[: len(prompts)], atol=1e-4)
  greedy = SamplingParams(max_new_tokens=8)
  assert sampler.continue_(packed, [[]] * len(prompts), greedy) == sampler.continue_(
      padded, [[]] * len(prompts), greedy
  )


@pytest.mark.parametrize("temperature, alike", [(0.0, False), (1.0, False), (0.0, True)])
def test_packed_prompts_generate_what_left_padded_rows_generate(sampler, monkeypatch, temperature, alike):
  assert sampler.packs_prompts()
  lengths = [3, 17, 9, 30, 1]
  prompts = _prompts_that_begin_alike(70, lengths, seed=3) if alike else _prompts(lengths, seed=3)
  params = SamplingParams(max_new_tokens=10, temperature=temperature)
  packed = sampler.generate(prompts, params, jax.random.key(5))
  monkeypatch.setattr(sampler, "packs_prompts", lambda: False)
  assert packed == sampler.generate(prompts, params, jax.random.key(5))


def test_per_row_adapters_continue_as_each_row_with_its_adapter_alone(sampler):
  """Each row of a per-row-adapter prefix decodes what its prompt decodes with its adapter alone
  (one call loops over all rows' steps; `sampler._decode`)."""
  keys = jax.random.split(jax.random.key(7), 3)
  adapters = _random_adapters(sampler.config, keys)
  prompts, extensions = _prompts([5, 12, 9], seed=4), [[3], [], [4, 5]]
  params = SamplingParams(max_new_tokens=6)
  stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *adapters)
  pre = sampler.prefill(prompts, reserve=32, lora=stacked, lora_per_row=True)
  rows = sampler.continue_(pre, extensions, params)
  alone = [
      sampler.continue_(sampler.prefill([p], reserve=32, lora=a), [e], params)[0]
      for p, e, a in zip(prompts, extensions, adapters)
  ]
  assert rows == alone
  nothing = sampler.continue_(pre, [[]] * 3, params)  # no extension pass, per row too
  assert nothing == [
      sampler.continue_(sampler.prefill([p], reserve=32, lora=a), [[]], params)[0]
      for p, a in zip(prompts, adapters)
  ]
  assert rows != sampler.continue_(sampler.prefill(prompts, reserve=32), extensions, params)  # they adapt


def test_on_a_mesh_each_device_keeps_its_rows_adapters_and_rows_decode_the_same(sampler):
  """Per-row adapters are split over the mesh's batch axes like the rows they serve (trained
  adapters come split over the adapter axis, or not at all), with the same continuations."""
  mesh = sharding.make_mesh((1, 4, 1), jax.devices()[:4])
  placed = jax.device_put(sampler.params, sharding.params_sharding(mesh, sampler.params, sampler.config))
  on_mesh = sampler_lib.Sampler(sampler.config, placed, stop_ids=[VOCAB - 1], pad_id=0)
  adapters = _random_adapters(sampler.config, jax.random.split(jax.random.key(8), 3))
  stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *adapters)
  prompts, extensions = _prompts([5, 12, 9], seed=5), [[3], [], [4, 5]]
  params = SamplingParams(max_new_tokens=6)
  pre = on_mesh.prefill(prompts, reserve=32, lora=stacked, lora_per_row=True)
  assert {(x.shape[0], x.addressable_shards[0].data.shape[0]) for x in jax.tree.leaves(pre.lora)} == {(4, 1)}
  want = sampler.continue_(
      sampler.prefill(prompts, reserve=32, lora=stacked, lora_per_row=True), extensions, params
  )
  assert on_mesh.continue_(pre, extensions, params) == want


@pytest.mark.parametrize("lora_kernel", [True, False])
def test_per_row_adapters_prefill_packed_as_each_prompt_padded_alone(sampler, monkeypatch, lora_kernel):
  """Prompts of per-row adapters packed in one row (each block through its prompt's adapter, in
  the LoRA kernels of packed training or their one-hot form) prefill what the vmapped
  left-padded rows prefill, in the same per-row layout."""
  assert sampler.packs_prompts()
  monkeypatch.setattr(transformer, "packed_lora_kernel", lambda *widths: lora_kernel)
  jax.clear_caches()  # the monkeypatched choice is made while tracing
  keys = jax.random.split(jax.random.key(3), 4)
  adapters = _random_adapters(sampler.config, keys)
  stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *adapters)
  prompts = _prompts([21, 3, 40], seed=6)  # 3 rows of a batch of 4: the last is padding
  tokens_1T, _, packed_prompts, _ = sampler_lib.pack_prompts(prompts, 48, 4, 0, per_row_adapters=True)
  starts = [np.flatnonzero(np.asarray(packed_prompts.adapter_1XA[0, :, b]))[0] for b in range(3)]
  assert [s * sampler_lib.PER_ROW_BLOCK for s in starts] == [0, 32, 48]  # each on a block of its own
  packed = sampler.prefill(prompts, reserve=8, lora=stacked, lora_per_row=True)
  monkeypatch.setattr(sampler, "packs_prompts", lambda: False)
  padded = sampler.prefill(prompts, reserve=8, lora=stacked, lora_per_row=True)
  a, b = packed.prefix, padded.prefix
  assert jax.tree.map(np.shape, a) == jax.tree.map(np.shape, b)
  np.testing.assert_array_equal(a.cache.positions_BS, b.cache.positions_BS)
  np.testing.assert_array_equal(a.cache.end_index, b.cache.end_index)
  np.testing.assert_array_equal(a.next_position_B[:3], b.next_position_B[:3])
  filled = np.asarray(b.cache.positions_BS)[:3, 0] >= 0  # [rows, S]
  for x, y in ((a.cache.k_LBKSH, b.cache.k_LBKSH), (a.cache.v_LBKSH, b.cache.v_LBKSH)):
    x, y = (np.asarray(z)[:3, :, 0].transpose(0, 3, 1, 2, 4) for z in (x, y))  # [rows, S, L, K, H]
    np.testing.assert_allclose(x[filled], y[filled], rtol=1e-4, atol=1e-4)  # sums in another order
  np.testing.assert_allclose(a.last_logits_BV[:3], b.last_logits_BV[:3], rtol=1e-4, atol=1e-4)
  base = sampler.prefill(prompts, reserve=8)
  assert not np.allclose(a.last_logits_BV[:3, 0], base.prefix.last_logits_BV[:3], atol=1e-2)  # adapted


@pytest.mark.parametrize("per_row", [False, True])
def test_an_end_rule_ends_a_row_at_the_token_that_reaches_its_last_state(sampler, per_row):
  """`end_states_VS` ends each row after the token that drives it into the last state, with the
  tokens before it those of a decode without the rule (per-row adapters too)."""
  prompts = _prompts([5, 12, 9], seed=8)
  prefill = {}
  if per_row:
    adapters = [lora_lib.init(sampler.config, k, 4, 8.0) for k in jax.random.split(jax.random.key(1), 3)]
    prefill = dict(lora=jax.tree.map(lambda *xs: jax.numpy.stack(xs), *adapters), lora_per_row=True)
  pre = sampler.prefill(prompts, reserve=32, **prefill)
  params = SamplingParams(max_new_tokens=10)
  full = sampler.continue_(pre, [[]] * 3, params)
  ends = {full[0][2], full[1][6]}  # a two-state rule: state 0 -> 1 (the end) at these tokens
  end_states_VS = np.zeros((sampler.config.vocab_size, 2), np.int8)
  end_states_VS[:, 1] = 1
  end_states_VS[sorted(ends), 0] = 1
  cut = sampler.continue_(pre, [[]] * 3, params, end_states_VS=jax.numpy.asarray(end_states_VS))
  for row_full, row_cut in zip(full, cut):
    first = next((i for i, t in enumerate(row_full) if t in ends), None)
    assert row_cut == (row_full if first is None else row_full[: first + 1])
  assert len(cut[0]) <= 3 < len(full[0])


def test_without_stop_ids_every_row_writes_max_new_tokens(sampler):
  """The decode bench's setting (no stop tokens); an end rule, which marks its end with one, then
  says what it needs."""
  plain = sampler_lib.Sampler(sampler.config, sampler.params, stop_ids=(), pad_id=0)
  assert [len(c) for c in plain.generate(_prompts([3, 9]), SamplingParams(max_new_tokens=5))] == [5, 5]
  pre = plain.prefill(_prompts([3]), reserve=16)
  rule = jax.numpy.zeros((sampler.config.vocab_size, 2), jax.numpy.int8)
  with pytest.raises(ValueError, match="give stop_ids"):
    plain.continue_(pre, [[]], SamplingParams(max_new_tokens=4), end_states_VS=rule)


def test_load_model_sets_the_attention_asked_for_and_refuses_cudnn_here_before_loading(
    tiny_chat_model, monkeypatch
):
  model = sampler_lib.load_model(tiny_chat_model, "float32", None, attention="xla")
  assert model.config.attention == "xla" and transformer.packed_attention(model.config) == "xla"

  def no_load(*args, **kwargs):
    raise AssertionError("the weights loaded before the setting was refused")

  monkeypatch.setattr(checkpoints, "load", no_load)
  with pytest.raises(ValueError, match="model.attention='cudnn' cannot run here: it needs an NVIDIA GPU"):
    sampler_lib.load_model(tiny_chat_model, "float32", None, attention="cudnn")
