"""Our forward pass against transformers' own forward, with and without the KV cache."""

import contextlib
import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import ARCHS, random_tokens
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import cpu_kernels
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import KVCache

B, T = 2, 12


def _positions(batch, length):
  return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(hf_checkpoints, arch):
  folder, model = hf_checkpoints[arch]
  config, params = hf.load(folder)
  tokens = random_tokens(B, T)
  logits, cache = transformer.forward(config, params, tokens, _positions(B, T))
  assert cache is None
  np.testing.assert_allclose(np.asarray(logits), _torch_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_incremental_decode_equals_full_forward(hf_checkpoints, arch):
  folder, model = hf_checkpoints[arch]
  config, params = hf.load(folder)
  tokens = random_tokens(B, T, seed=1)
  full = _torch_logits(model, tokens)
  cache = KVCache.init(config, B, T + 4)
  prefix = 5
  logits, cache = transformer.forward(config, params, tokens[:, :prefix], _positions(B, prefix), cache)
  steps = [np.asarray(logits)]
  for t in range(prefix, T):
    logits, cache = transformer.forward(
        config, params, tokens[:, t : t + 1], np.full((B, 1), t, np.int32), cache
    )
    steps.append(np.asarray(logits))
  assert int(cache.end_index) == T
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_left_padding_does_not_change_logits(hf_checkpoints):
  folder, _ = hf_checkpoints["qwen2"]
  config, params = hf.load(folder)
  tokens = random_tokens(1, T)
  alone, _ = transformer.forward(config, params, tokens, _positions(1, T))
  pad = 5
  padded = np.concatenate([np.zeros((1, pad), np.int32), tokens], axis=1)
  positions = np.concatenate([np.full((1, pad), -1, np.int32), _positions(1, T)], axis=1)
  logits, _ = transformer.forward(config, params, padded, positions)
  np.testing.assert_allclose(np.asarray(logits)[:, pad:], np.asarray(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused_cpu_kernel", [True, False])
def test_prefill_in_causal_chunks_equals_attending_over_the_whole_cache(hf_checkpoints, fused_cpu_kernel):
  # 512 left-padded prompt slots: 4 query chunks of 128 (XLA's attention; the fused CPU kernel
  # works in 64-token tiles). Row 1 holds 200 tokens, so its first two chunks are padding
  # (skipped on CPU) and its third is part padding, part prompt.
  folder, _ = hf_checkpoints["llama"]
  config, params = hf.load(folder)
  P, lengths = 512, (512, 200)
  tokens = random_tokens(2, P, seed=2)
  positions = np.stack([np.arange(P) - (P - n) for n in lengths]).astype(np.int32)
  positions[positions < 0] = -1
  valid = positions >= 0
  run = jax.jit(
      lambda prefill: transformer.forward(
          config, params, tokens, positions, KVCache.init(config, 2, P + 8), prefill=prefill
      ),
      static_argnums=0,
  )
  with contextlib.nullcontext() if fused_cpu_kernel else cpu_kernels.xla_ops():
    (chunked, chunked_cache), (full, full_cache) = run(True), run(False)
  np.testing.assert_allclose(np.asarray(chunked)[valid], np.asarray(full)[valid], atol=1e-4)
  for got, want in ((chunked_cache.k_LBKSH, full_cache.k_LBKSH), (chunked_cache.v_LBKSH, full_cache.v_LBKSH)):
    np.testing.assert_allclose(
        # [L, B, K, S, H] as [L, B, S, K, H]: the valid slots of each row
        np.asarray(got).swapaxes(2, 3)[:, :, :P][:, valid],
        np.asarray(want).swapaxes(2, 3)[:, :, :P][:, valid],
        atol=1e-4,
    )
  # Decoding on from the chunked prefill gives the same next logits.
  next_tokens, next_positions = random_tokens(2, 1, seed=3), np.array([[P], [200]], np.int32)
  after = [
      transformer.forward(config, params, next_tokens, next_positions, cache)[0]
      for cache in (chunked_cache, full_cache)
  ]
  np.testing.assert_allclose(np.asarray(after[0]), np.asarray(after[1]), atol=1e-4)


def test_fresh_lora_is_exactly_the_base_model(hf_checkpoints):
  """Bitwise on CPU, where CI runs. (XLA:GPU compiles the graph with the zero branch differently:
  up to 6e-5 apart at `highest` matmul precision on an H200.)"""
  folder, _ = hf_checkpoints["llama"]
  config, params = hf.load(folder)
  tokens = random_tokens(B, T)
  base, _ = transformer.forward(config, params, tokens, _positions(B, T))
  adapter = lora_lib.init(config, jax.random.key(0), rank=4)
  adapted, _ = transformer.forward(config, params, tokens, _positions(B, T), lora=adapter)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  # A non-zero b changes the output: the adapter is really applied.
  moved = jax.tree.map(lambda x: x + 0.05, adapter)
  changed, _ = transformer.forward(config, params, tokens, _positions(B, T), lora=moved)
  assert float(jnp.max(jnp.abs(changed - base))) > 1e-3


def test_lora_dropout_zeroes_the_rate_scales_the_rest_and_follows_each_token():
  """Inverted dropout on the branch's input: a fraction `rate` of x zeroed, the rest / (1 - rate)
  (so the branch's mean is unchanged), and nothing without dropout keys (answering). A token's mask
  is its key's and the module's: the same wherever the token sits, another in another module."""
  rate, x = 0.3, jnp.ones((1, 4096, 8), jnp.float32)
  keys_BT = jax.random.split(jax.random.key(0), 4096)[None]
  variables = {"params": {"kernel": jnp.zeros((8, 8))}}
  lora = {"a": jnp.eye(8), "b": jnp.eye(8)}  # the branch passes dropout(x) through

  def branch(keys_BT, name="q_proj"):
    layer = transformer.Linear(8, use_bias=False, dtype="float32", param_dtype="float32", name=name)
    return np.asarray(layer.apply(variables, x, lora, (1.0, rate), dropout_keys_BT=keys_BT))

  np.testing.assert_array_equal(branch(None), np.asarray(x))
  dropped = branch(keys_BT)
  np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / (1 - rate)], rtol=1e-6)
  assert abs((dropped == 0).mean() - rate) < 0.02
  assert abs(dropped.mean() - 1.0) < 0.03
  order = np.random.RandomState(0).permutation(4096)
  np.testing.assert_array_equal(branch(keys_BT[:, order]), dropped[:, order])
  assert not np.array_equal(dropped, branch(keys_BT, "k_proj"))  # a mask per module
  assert not np.array_equal(dropped, branch(jax.random.split(jax.random.key(1), 4096)[None]))


@pytest.mark.parametrize("targets", [lora_lib.ALL_LINEAR, ("q_proj", "v_proj", "up_proj", "down_proj")])
def test_layers_that_share_an_input_share_its_lora_product_with_the_same_values_and_gradients(
    hf_checkpoints, monkeypatch, targets
):
  """q/k/v (and gate/up) take their LoRA branches' rank-R inputs from one product with their a's
  concatenated; the logits and the adapter's gradients equal those of one product per layer (with a
  subset of targets, only the targeted layers share: here q and v, and up alone)."""
  config, params = hf.load(hf_checkpoints["llama"][0])
  tokens = random_tokens(B, T)
  adapter = lora_lib.init(config, jax.random.key(0), rank=4, targets=targets)
  adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # b != 0: every branch contributes

  def logits_and_grads():
    jax.clear_caches()  # the choice below is made while tracing
    loss = lambda ad: jnp.mean(transformer.forward(config, params, tokens, _positions(B, T), lora=ad)[0] ** 2)
    return transformer.forward(config, params, tokens, _positions(B, T), lora=adapter)[0], jax.grad(loss)(
        adapter
    )

  shared = logits_and_grads()
  calls = []
  real = transformer.shared_lora_inputs
  monkeypatch.setattr(
      transformer, "shared_lora_inputs", lambda *args: calls.append(real(*args)) or [None] * len(args[1])
  )
  separate = logits_and_grads()
  assert calls and any(xa is not None for xas in calls for xa in xas)  # the shared path was real
  for got, want in zip(jax.tree.leaves(shared), jax.tree.leaves(separate)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # separate and tied output embeddings
def test_bfloat16_compute_runs_close_to_float32(hf_checkpoints, arch):
  folder, _ = hf_checkpoints[arch]
  config, params = hf.load(folder)
  config16, params16 = hf.load(folder, dtype="bfloat16")
  assert params16["embedding"].dtype == jnp.bfloat16
  tokens = random_tokens(B, T)
  ref, _ = transformer.forward(config, params, tokens, _positions(B, T))
  out, _ = transformer.forward(config16, params16, tokens, _positions(B, T))
  assert out.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits (0.4% per rounding): logits within 2% of their scale (measured
  # 0.75% here), and not bit-equal, which would mean float32 compute.
  error, scale = float(jnp.max(jnp.abs(out - ref))), float(jnp.max(jnp.abs(ref)))
  assert 0 < error < 0.02 * scale
  # The logits themselves come out of a float32 accumulation, not rounded to bfloat16 (which would
  # move candidate log-likelihoods, and so the margins, by tenths).
  assert bool(jnp.any(out.astype(jnp.bfloat16).astype(jnp.float32) != out))
  # The linear layers' bfloat16 dots accumulate and return float32 (then cast): XLA:CPU runs
  # bfloat16 dots on AMX only in that form (5-6x float32 here, docs/measured.md).
  text = (
      jax.jit(functools.partial(transformer.forward, config16))
      .lower(params16, tokens, _positions(B, T))
      .as_text()
  )
  dots = [  # the linear layers' (attention's own dots are batched over heads)
      line
      for line in text.splitlines()
      if "dot_general" in line and "batching_dims" not in line and "bf16" in line.split("->")[0]
  ]
  assert len(dots) >= 7 and all(line.rstrip().endswith("f32>") for line in dots), dots


def test_bfloat16_matmul_accumulates_in_float32_forward_and_backward():
  x, w, d_out = (
      jax.random.normal(key, shape).astype(jnp.bfloat16)
      for key, shape in zip(jax.random.split(jax.random.key(0), 3), ((2, 8, 64), (64, 32), (2, 8, 32)))
  )
  out, vjp = jax.vjp(transformer.matmul_f32_accumulate, x, w)
  want_out, want_vjp = jax.vjp(lambda x, w: x @ w, *(a.astype(jnp.float32) for a in (x, w)))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.float32(out), want_out, rtol=1e-2, atol=1e-2 * float(jnp.abs(want_out).max()))
  for got, want, arg in zip(vjp(d_out.astype(jnp.float32)), want_vjp(d_out.astype(jnp.float32)), (x, w)):
    assert got.dtype == arg.dtype
    np.testing.assert_allclose(np.float32(got), want, rtol=1e-2, atol=1e-2 * float(jnp.abs(want).max()))
  # Every dot, the gradient's too, takes bfloat16 and returns float32 (AMX's form on XLA:CPU).
  loss = lambda x, w: transformer.matmul_f32_accumulate(x, w).sum()
  grad = jax.jit(jax.value_and_grad(loss, (0, 1)))
  dots = [line for line in grad.lower(x, w).as_text().splitlines() if "dot_general" in line]
  assert len(dots) == 3 and all(
      "bf16" in d.split("->")[0] and d.rstrip().endswith("f32>") for d in dots
  ), dots


def test_bfloat16_lora_applies_the_exact_alpha_over_rank():
  # alpha / rank = 16 / 12: 1.3359 in bfloat16, 1.3333 in the exported model. With a = I the
  # branch is x * scale, rounded once to bfloat16 from the exact product.
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (256, 4)), jnp.bfloat16)
  scale = jnp.asarray(16 / 12, jnp.float32)
  want = (x.astype(jnp.float32) * (16 / 12)).astype(jnp.bfloat16)
  got = transformer._lora_input(x, jnp.eye(4, dtype=jnp.bfloat16), scale, None, jnp.bfloat16)
  assert got.dtype == jnp.bfloat16 and np.array_equal(np.asarray(got), np.asarray(want))
  one_adapter_BXA = jnp.ones((1, 4, 1), bool)  # packed rows: 4 blocks of 64 tokens, adapter 0
  packed = transformer._lora_input(
      x, jnp.eye(4, dtype=jnp.bfloat16)[None], scale, one_adapter_BXA, jnp.bfloat16
  )
  assert np.array_equal(np.asarray(packed), np.asarray(want))
  rounded = (x * jnp.asarray(16 / 12, jnp.bfloat16)).astype(jnp.bfloat16)  # the scale in bfloat16
  assert not np.array_equal(np.asarray(rounded), np.asarray(want))  # the test tells them apart


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "xla_ops"])
def test_a_nan_adapter_leaves_the_other_adapters_of_packed_rows_alone(kernels):
  """0 * NaN is NaN: picking each block's adapter by a one-hot product would spread one diverged
  adapter to every block of the call (the XLA path: GPU, TPU)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 3 * 16, 64)), jnp.float32)  # 3 blocks of 16 tokens
  a = jnp.asarray(rng.normal(size=(2, 64, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 64)), jnp.float32)
  adapter_BXA = jnp.asarray([[[True, False], [False, True], [False, False]]])  # 0, 1, padding
  nan_a, nan_b = a.at[1].set(jnp.nan), b.at[1].set(jnp.nan)
  with contextlib.nullcontext() if kernels else cpu_kernels.xla_ops():

    def branch(a, b):
      xa = transformer._lora_input(x, a, 2.0, adapter_BXA, jnp.float32)
      return np.asarray(transformer._lora_output(jnp.zeros_like(x), xa, b, adapter_BXA, jnp.float32))

    clean, broken = branch(a, b), branch(nan_a, nan_b)
  np.testing.assert_allclose(broken[0, :16], clean[0, :16], rtol=1e-5)  # adapter 0's block
  np.testing.assert_allclose(clean[0, :16], 2.0 * np.asarray(x[0, :16] @ a[0] @ b[0]), rtol=1e-4, atol=1e-4)
  assert np.isnan(broken[0, 16:32]).all() and (broken[0, 32:] == 0).all()  # its own; padding: none


def test_bfloat16_attention_scores_are_not_rounded_to_bfloat16_before_the_softmax():
  """Large scores (Qwen2's q/k biases give |logit| ~ 35) rounded to bfloat16 move the probabilities
  by percents: the XLA path keeps them in float32, as cuDNN, the CPU kernels and transformers do."""
  B, T, N, K, H = 1, 16, 2, 1, 64
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = 6.0 * jax.random.normal(kq, (B, T, N, H)) / H**0.25
  k = 6.0 * jax.random.normal(kk, (B, K, T, H)) / H**0.25
  v = jax.random.normal(kv, (B, K, T, H))
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  bf16 = lambda x: x.astype(jnp.bfloat16)
  got = transformer._attend(bf16(q), bf16(k), bf16(v), mask)
  # float32 from the same bfloat16 inputs: only the scores' and output's precision differ.
  want = transformer._attend(*(bf16(x).astype(jnp.float32) for x in (q, k, v)), mask)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got), want, atol=0.016, rtol=0)  # 0.030 from rounded scores


def test_bfloat16_values_saved_for_the_backward_pass_are_kept_as_bits_and_not_recomputed():
  L, T, D = 3, 64, 32
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (T, D)).astype(jnp.bfloat16)
  ws = (jax.random.normal(keys[1], (L, D, D)) * D**-0.5).astype(jnp.bfloat16)

  def loss(save, x, ws):  # a layer scan under the model's remat policy
    def layer(x, w):
      h = save(transformer.matmul_f32_accumulate(x, w).astype(jnp.bfloat16))
      return jnp.tanh(h) * h, None

    y, _ = jax.lax.scan(jax.checkpoint(layer, policy=transformer.SAVED_ONLY, prevent_cse=False), x, ws)
    return y.astype(jnp.float32).sum()

  named = lambda h: checkpoint_name(h, "saved")
  grads = {
      save: jax.jit(jax.grad(functools.partial(loss, save), (0, 1))) for save in (transformer.saved, named)
  }
  for got, want in zip(grads[transformer.saved](x, ws), grads[named](x, ws)):
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
  lowered = {save: grad.lower(x, ws).as_text() for save, grad in grads.items()}
  # The scan stacks the saved values as 16-bit integers (XLA:CPU writes those in place) ...
  assert f"tensor<{L}x{T}x{D}xui16>" in lowered[transformer.saved]
  # ... and the backward pass reads them back instead of running the layer's matmul again.
  count = lambda text: text.count("stablehlo.dot_general")
  assert count(lowered[transformer.saved]) == count(lowered[named])


@pytest.mark.parametrize("skip_padding", [False, True])
def test_chunked_causal_attention_equals_full_attention_with_its_gradient(skip_padding):
  # 512 slots: 4 query chunks, each attending only to the keys up to its end. Sequence 1 is 300
  # tokens: its last chunk is padding (skipped with skip_padding), as are its padded tail keys.
  L, N, K, H = 512, 4, 2, 8
  q, k, v = (
      jax.random.normal(key, (2, L, heads, H))
      for key, heads in zip(jax.random.split(jax.random.key(0), 3), (N, K, K))
  )
  length_B = np.array([[L], [300]])
  index = np.arange(L)
  mask_BTT = (index[None, None, :] <= index[None, :, None]) & (index[None, None, :] < length_B[..., None])
  valid_BL1 = (index[None, :] < length_B)[..., None]
  # No loss reads a padding query's output, so none flows back from it.
  cotangent = jax.random.normal(jax.random.key(1), (2, L, N * H)) * valid_BL1
  chunked = functools.partial(transformer._attend_causal, skip_padding=skip_padding)
  full = lambda q, k, v, mask: transformer._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
  for attend in (full, chunked):
    out, grads = jax.jit(
        lambda q, k, v: (lambda out, vjp: (out, vjp(cotangent)))(
            *jax.vjp(lambda q, k, v: attend(q, k, v, mask_BTT), q, k, v)
        )
    )(q, k, v)
    if attend is full:
      want_out, want_grads = out, grads
  np.testing.assert_allclose(out * valid_BL1, want_out * valid_BL1, atol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_packing_regathers_rows_into_sequences_and_back_with_gather_gradients():
  # Row 0: sequence 0 in blocks 0-1, sequence 1 in block 2, block 3 padding; row 1: one sequence.
  seq_blocks_BUW = np.array([[[0, 1], [2, 4]], [[1, 4], [4, 4]]], np.int32)
  block_slots_BX = np.array([[0, 1, 2, 4], [4, 0, 4, 4]], np.int32)
  packing = transformer.Packing(np.zeros((2, 4, 1), bool), seq_blocks_BUW, block_slots_BX)
  x_BT = jnp.arange(2 * 8, dtype=jnp.float32).reshape(2, 8) + 1  # blocks of C = 2 tokens
  seqs = packing.to_sequences(x_BT)
  assert seqs.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [11, 12, 0, 0], [0, 0, 0, 0]]
  back_BT = packing.to_rows(seqs)  # padding blocks come back as zeros
  assert back_BT.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0], [0, 0, 11, 12, 0, 0, 0, 0]]
  # The custom gradient (a gather the other way) equals the plain gather's (a scatter-add).
  w_seqs = jax.random.normal(jax.random.key(0), seqs.shape)

  def plain(x_BT):
    padded = jnp.concatenate([x_BT.reshape(2, 4, 2), jnp.zeros((2, 1, 2))], 1)
    return jnp.take_along_axis(padded, seq_blocks_BUW.reshape(2, 4)[..., None], 1).reshape(4, 4)

  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(packing.to_sequences(x) * w_seqs))(x_BT),
      jax.grad(lambda x: jnp.sum(plain(x) * w_seqs))(x_BT),
      atol=1e-6,
  )


class _FakeDevice:

  def __init__(self, platform, device_kind, compute_capability=None):
    self.platform, self.device_kind = platform, device_kind
    if compute_capability is not None:
      self.compute_capability = compute_capability


@pytest.mark.parametrize(
    "device, dtype, head_dim, want",
    [
        (_FakeDevice("gpu", "NVIDIA H200", "9.0"), "bfloat16", 128, "cudnn"),
        (_FakeDevice("gpu", "NVIDIA H200", "9.0"), "float32", 128, "xla"),  # cuDNN takes 16-bit only
        (_FakeDevice("gpu", "NVIDIA H200", "9.0"), "bfloat16", 256, "cudnn"),
        (_FakeDevice("gpu", "NVIDIA H200", "9.0"), "bfloat16", 264, "xla"),
        (_FakeDevice("gpu", "NVIDIA A100-SXM4-40GB", "8.0"), "bfloat16", 256, "xla"),
        (_FakeDevice("gpu", "NVIDIA L4", "8.9"), "float16", 128, "cudnn"),
        (_FakeDevice("gpu", "Tesla T4", "7.5"), "float16", 64, "xla"),  # before Ampere
        (_FakeDevice("gpu", "AMD Instinct MI300X"), "bfloat16", 128, "xla"),  # no compute capability
        (_FakeDevice("tpu", "TPU v5 lite"), "bfloat16", 128, "xla"),
    ],
)
def test_auto_attention_takes_cudnn_where_it_runs_else_xla(monkeypatch, device, dtype, head_dim, want):
  config = transformer.ModelConfig(
      "LlamaForCausalLM", 64, 1, 2 * head_dim, 2, 1, head_dim, 64, 1e-5, 1e4, 64, True, dtype=dtype
  )
  monkeypatch.setattr(transformer, "fused_cpu_attention", lambda config: False)
  monkeypatch.setattr(jax, "devices", lambda: [device])
  assert transformer.packed_attention(config) == want
  if want == "xla":  # asked for by name, cuDNN is refused with the reason
    with pytest.raises(ValueError, match="model.attention='cudnn' cannot run here: it (needs|takes)"):
      transformer.check_attention(dataclasses.replace(config, attention="cudnn"))
  else:
    transformer.check_attention(dataclasses.replace(config, attention="cudnn"))
  assert transformer.packed_attention(dataclasses.replace(config, attention="xla")) == "xla"
  # What the bench's attention check trains with here: xla, and cudnn where it runs.
  assert transformer.runnable_attentions(config) == {
      "xla": "xla",
      **({"cudnn": "cudnn"} if want == "cudnn" else {}),
  }


def test_on_cpu_auto_attention_is_the_fused_kernel_and_unknown_names_are_refused(hf_checkpoints):
  config, _ = hf.load(hf_checkpoints["llama"][0])
  assert transformer.packed_attention(config) == ("fused" if cpu_kernels.available() else "xla")
  fused = {"fused": "auto"} if cpu_kernels.available() else {}
  assert transformer.runnable_attentions(config) == {"xla": "xla", **fused}
  with cpu_kernels.xla_ops():
    assert transformer.packed_attention(config) == "xla"
    assert transformer.runnable_attentions(config) == {"xla": "xla"}
  with pytest.raises(ValueError, match=r"model.attention='flash': use one of \['auto', 'xla', 'cudnn'\]"):
    transformer.check_attention(dataclasses.replace(config, attention="flash"))
