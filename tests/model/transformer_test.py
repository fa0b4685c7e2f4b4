"""Our forward pass against transformers' own forward, with and without the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import ARCHS, random_tokens
from ttsi_jax.checkpoints import hf
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
  logits, cache = transformer.forward(config, params, tokens[:, :prefix],
                                      _positions(B, prefix), cache)
  steps = [np.asarray(logits)]
  for t in range(prefix, T):
    logits, cache = transformer.forward(config, params, tokens[:, t:t + 1],
                                        np.full((B, 1), t, np.int32), cache)
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


def test_bfloat16_compute_runs_close_to_float32(hf_checkpoints):
  folder, _ = hf_checkpoints["llama"]
  config, params = hf.load(folder)
  config16, params16 = hf.load(folder, dtype="bfloat16")
  assert params16["embedding"].dtype == jnp.bfloat16
  tokens = random_tokens(B, T)
  ref, _ = transformer.forward(config, params, tokens, _positions(B, T))
  out, _ = transformer.forward(config16, params16, tokens, _positions(B, T))
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1
