"""The fused CPU attention kernel equals masked softmax attention, outputs and gradients, for
packed rows of several sequences, padding, grouped heads and lengths off the 64-token tiles."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttsi_jax.model import cpu_attention, cpu_kernels
from ttsi_jax.model import transformer


def _reference(q_BTNH, k_BTKH, v_BTKH, segments_BT):
  """Plain masked softmax attention (the kernel's contract), padding queries' outputs zero."""
  T, N, H = q_BTNH.shape[1:]
  G = N // k_BTKH.shape[2]
  k_BTNH, v_BTNH = jnp.repeat(k_BTKH, G, axis=2), jnp.repeat(v_BTKH, G, axis=2)
  index = jnp.arange(T)
  query_BT1, key_B1S = segments_BT[:, :, None], segments_BT[:, None, :]
  shared_B1S = (key_B1S == cpu_attention.SHARED_PREFIX) & (query_BT1 >= 0)
  mask_BTS = (((query_BT1 == key_B1S) & (key_B1S != -1)) | shared_B1S) & (
      index[None, None, :] <= index[None, :, None]
  )
  logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) * H**-0.5
  probs_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], logits_BNTS, -1e30), -1) * mask_BTS[:, None]
  out_BTNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BTNH)
  return out_BTNH * (segments_BT != -1)[:, :, None, None]


def _segments(T, layout, shared=0):
  """A row of T slots: a shared prefix of `shared` tokens, then (length, gap) runs, each a sequence
  followed by `gap` padding slots."""
  row, at = np.full(T, -1, np.int32), shared
  row[:shared] = cpu_attention.SHARED_PREFIX
  for u, (length, gap) in enumerate(layout):
    row[at : at + length] = u
    at += length + gap
  return row


def test_the_kernel_builds_and_serves_cpu_attention_here():
  assert jax.default_backend() == "cpu"
  assert cpu_kernels.available(), "the kernel did not build: see the warning logged above"


def test_a_kernels_setting_spelt_otherwise_is_refused_naming_the_valid_values():
  check = "from ttsi_jax.model import cpu_kernels; cpu_kernels.available()"
  env = {**os.environ, "TTSI_JAX_CPU_KERNELS": "off"}
  result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "TTSI_JAX_CPU_KERNELS='off': set it to 'fused' (the C++ kernels) or 'xla'." in result.stderr


@pytest.mark.parametrize(
    "T, N, K, H, layouts",
    [
        # One sequence over 12 tiles (the dense tiles and the diagonal ones).
        (768, 9, 3, 64, [[(768, 0)]]),
        # Packed rows: sequences starting mid-tile, padding between and after them, a sequence of
        # one token; a row with a different layout; T off the tiles.
        (200, 4, 2, 32, [[(70, 0), (1, 5), (60, 0)], [(130, 6), (40, 24)]]),
        # No grouping, a row that is all padding.
        (130, 2, 2, 16, [[(130, 0)], []]),
        # Whole tiles (the kernel reads q, k, v where they lie, row by row), two rows.
        (128, 4, 2, 16, [[(128, 0)], [(64, 0), (40, 24)]]),
        # Shared prefixes (packed prompts that begin alike): over two tiles and into a third, then
        # prompts of their own; one of whole tiles; one of a token; a row without one.
        (320, 4, 2, 16, [(150, [(30, 0), (1, 0), (100, 0)]), (64, [(64, 0), (100, 92)])]),
        (200, 2, 1, 16, [(1, [(70, 0), (60, 69)]), (0, [(130, 70)])]),
    ],
)
def test_fused_attention_equals_masked_softmax_attention_with_gradients(T, N, K, H, layouts):
  layouts = [layout if isinstance(layout, tuple) else (0, layout) for layout in layouts]
  segments_BT = jnp.asarray(np.stack([_segments(T, layout, shared) for shared, layout in layouts]))
  B = len(layouts)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (B, T, h, H)) for key, h in zip(keys, (N, K, K)))
  # No loss reads a padding query's output, so none flows back from it.
  cotangent = jax.random.normal(keys[3], (B, T, N, H)) * (segments_BT != -1)[:, :, None, None]
  results = []
  for attend in (cpu_attention.causal_attention, _reference):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segments_BT), q, k, v)
    results.append((out, vjp(cotangent)))
  (out, grads), (want_out, want_grads) = results
  np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=0)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bfloat16_inputs_are_saved_as_they_came_and_get_bfloat16_gradients():
  segments_BT = jnp.asarray(_segments(130, [(70, 0), (60, 0)]))[None]
  keys = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(key, (1, 130, h, 16)).astype(jnp.bfloat16) for key, h in zip(keys, (4, 2, 2)))
  cotangent = jax.random.normal(keys[3], (1, 130, 4, 16))
  attend = lambda q, k, v: cpu_attention.causal_attention(q, k, v, segments_BT)
  out, vjp = jax.vjp(attend, q, k, v)
  # The backward pass keeps k and v in bfloat16: no float32 copies of them among the residuals.
  assert not [r for r in jax.tree.leaves(vjp) if r.shape == k.shape and r.dtype == jnp.float32]
  grads = vjp(cotangent)
  assert out.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
  want_out, want_vjp = jax.vjp(attend, *(a.astype(jnp.float32) for a in (q, k, v)))
  np.testing.assert_array_equal(out, want_out)  # the same float32 values reach the kernel
  for got, want in zip(grads, want_vjp(cotangent)):
    np.testing.assert_allclose(np.float32(got), want, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("T, N, K", [(1, 9, 3), (5, 4, 2), (40, 2, 2)])
def test_cache_attention_equals_masked_softmax_over_the_layers_slots(T, N, K):
  # A cache of 3 layers, rows that see a left-padded prompt and new tokens, a row that sees a
  # shared first segment and its own slots, and a row that sees nothing (its output is 0).
  L, B, S, H = 3, 4, 200, 16
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k_cache, v_cache = (jax.random.normal(key, (L, B, K, S, H)) for key in keys[1:])
  slot, query = np.arange(S), np.arange(T)[:, None]
  mask_BTS = np.stack(
      [
          (slot >= 30) & (slot < 120 + query),  # left padding, then the prompt and new tokens
          (slot < 20 + query),
          (slot < 64) | ((slot >= 100 + 2 * query) & (slot < 100 + 2 * query + 3)),
          np.zeros((T, S), bool),
      ]
  )
  for layer in (0, 2):
    got = cpu_attention.cache_attention(q, k_cache, v_cache, layer, mask_BTS)
    want = transformer._attend(q, k_cache[layer], v_cache[layer], mask_BTS).reshape(B, T, N, H)
    want = want * mask_BTS.any(-1)[:, :, None, None]
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  # Mapped over a leading axis (per-row adapters' calls): each index its own queries, caches, layer
  # and mask.
  qs, k_caches, v_caches = (jnp.stack([x, x[..., ::-1]]) for x in (q, k_cache, v_cache))
  masks, layers = np.stack([mask_BTS, mask_BTS[::-1]]), jnp.array([2, 0])
  got = jax.vmap(cpu_attention.cache_attention)(qs, k_caches, v_caches, layers, masks)
  for i in range(2):
    want = cpu_attention.cache_attention(qs[i], k_caches[i], v_caches[i], layers[i], masks[i])
    np.testing.assert_array_equal(got[i], want)


def test_fused_attention_maps_over_leading_axes():
  q, k, v = (jax.random.normal(key, (3, 1, 100, 4, 16)) for key in jax.random.split(jax.random.key(1), 3))
  segments = jnp.asarray(np.stack([_segments(100, [(n, 0)]) for n in (100, 50, 7)]))[:, None]
  got = jax.vmap(cpu_attention.causal_attention)(q, k, v, segments)
  np.testing.assert_allclose(got, jax.vmap(_reference)(q, k, v, segments), atol=2e-6, rtol=0)


def test_fused_attention_names_what_is_wrong_with_its_shapes():
  q = jnp.zeros((1, 64, 4, 8))
  with pytest.raises(Exception, match="multiple of 16"):
    jax.block_until_ready(cpu_attention.causal_attention(q, q, q, jnp.zeros((1, 64), jnp.int32)))


def test_fused_attention_refuses_a_segment_split_in_two_runs():
  # The kernel's key bounds assume contiguous segments: a split one would see the wrong keys.
  q = jnp.zeros((1, 64, 4, 16))
  segments = jnp.asarray([[0] * 20 + [1] * 20 + [0] * 24], jnp.int32)
  with pytest.raises(Exception, match="segment 0 appears in two places"):
    jax.block_until_ready(cpu_attention.causal_attention(q, q, q, segments))


@pytest.mark.parametrize("before", [[0] * 20, [-1] * 20])
def test_fused_attention_refuses_a_shared_prefix_that_does_not_open_the_row(before):
  q = jnp.zeros((1, 64, 4, 16))
  segments = jnp.asarray([before + [cpu_attention.SHARED_PREFIX] * 44], jnp.int32)
  with pytest.raises(Exception, match="shared prefix .* must be one run that opens the row"):
    jax.block_until_ready(cpu_attention.causal_attention(q, q, q, segments))


def test_fused_attention_refuses_segment_ids_below_the_shared_prefix_and_no_key_heads():
  q = jnp.zeros((1, 64, 4, 16))
  segments = jnp.asarray([[0] * 32 + [-3] * 32], jnp.int32)  # not padding: an id it does not know
  with pytest.raises(Exception, match="segment ids are >= 0, -1 .* got -3"):
    jax.block_until_ready(cpu_attention.causal_attention(q, q, q, segments))
  no_heads = jnp.zeros((1, 64, 0, 16))  # was a division by zero in the process
  with pytest.raises(Exception, match="heads must group evenly"):
    jax.block_until_ready(
        cpu_attention.causal_attention(q, no_heads, no_heads, jnp.zeros((1, 64), jnp.int32))
    )


def test_cache_attention_names_a_layer_out_of_range():
  q, cache, mask = jnp.zeros((1, 1, 2, 16)), jnp.zeros((2, 1, 2, 8, 16)), jnp.ones((1, 1, 8), bool)
  with pytest.raises(Exception, match="layer out of range"):
    jax.block_until_ready(cpu_attention.cache_attention(q, cache, cache, 2, mask))


def test_packing_numbers_each_tokens_sequence_for_the_kernel():
  # Row 0 (blocks of 2): sequence 0 in blocks 0-1 (its last slot padding), sequence 1 in block 2,
  # block 3 padding; row 1: one sequence in blocks 1-2.
  seq_blocks_BUW = np.array([[[0, 1], [2, 4]], [[1, 2], [4, 4]]], np.int32)
  block_slots_BX = np.array([[0, 1, 2, 4], [4, 0, 1, 4]], np.int32)
  packing = transformer.Packing(np.zeros((2, 4, 1), bool), seq_blocks_BUW, block_slots_BX)
  positions_BT = np.array([[0, 1, 2, -1, 0, 1, -1, -1], [-1, -1, 0, 1, 2, 3, -1, -1]])
  assert packing.row_segments(positions_BT).tolist() == [
      [0, 0, 0, -1, 1, 1, -1, -1],
      [-1, -1, 0, 0, 0, 0, -1, -1],
  ]


@pytest.mark.parametrize(
    "compiler, reason",
    [(None, "no C++ compiler found"), ("false", "the kernels did not build")],
)
def test_without_a_working_compiler_attention_and_lora_stay_on_xla_and_say_why(
    compiler, reason, monkeypatch, tmp_path, caplog
):
  monkeypatch.setattr(cpu_kernels, "_compiler", lambda: compiler)
  monkeypatch.setenv("TTSI_JAX_KERNEL_DIR", str(tmp_path))  # nothing built here yet
  cpu_kernels._load.cache_clear()
  cpu_kernels._warn_once.cache_clear()
  try:
    with caplog.at_level("WARNING"):
      assert not cpu_kernels.available()
    assert (
        f"CPU attention, packed LoRA and float32 linear layers run on XLA ops, not the C++ kernels: {reason}"
        in caplog.text
    )
  finally:
    cpu_kernels._load.cache_clear()
    cpu_kernels._warn_once.cache_clear()
