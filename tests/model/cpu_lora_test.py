"""The LoRA kernels of packed rows (cpu_lora.cc) equal the per-block einsums they replace, values
and gradients, for every layout a packed step makes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttsi_jax.model import cpu_kernels, cpu_lora

Z = 64  # tokens per block, as adaptation.BLOCK


def _kernels(y, x, a, b, scale, block_adapter):
  """The LoRA branch as the model runs it in the kernels (`transformer.Linear`)."""
  xa = cpu_lora.narrow(x, jnp.swapaxes(a, 1, 2), block_adapter) * scale
  return cpu_lora.wide_add(y.astype(jnp.float32), xa, b, block_adapter)


def _per_block(y, x, a, b, scale, block_adapter):
  """The XLA formulation: each block's adapter picked by a one-hot matmul (-1: none)."""
  B, X = block_adapter.shape
  onehot = jax.nn.one_hot(block_adapter, a.shape[0])
  x_BXZK = x.reshape(B, X, Z, x.shape[-1])
  xa = jnp.einsum("bxzk,bxkr->bxzr", x_BXZK, jnp.einsum("bxa,akr->bxkr", onehot, a)) * scale
  delta = jnp.einsum("bxzr,bxrn->bxzn", xa, jnp.einsum("bxa,arn->bxrn", onehot, b))
  return y + delta.reshape(y.shape)


@pytest.mark.parametrize(
    "block_adapter, rank",
    [
        ([[0, 0, 1, 1, 1, 2, -1]], 8),  # one row: runs of three adapters, then a padding block
        ([[1, 0, 1, -1], [2, 2, 0, 1]], 5),  # two rows; adapter 1 in runs apart; an odd rank
        ([[0, 0, 0]], 1),
    ],
)
def test_the_kernels_and_their_gradients_equal_the_per_block_einsums(block_adapter, rank):
  assert cpu_kernels.available()
  block_adapter = jnp.asarray(block_adapter, jnp.int32)
  (B, X), A, K, N = block_adapter.shape, 3, 48, 80
  keys = jax.random.split(jax.random.key(0), 5)
  y = jax.random.normal(keys[0], (B, X * Z, N))
  x = jax.random.normal(keys[1], (B, X * Z, K))
  a = jax.random.normal(keys[2], (A, K, rank))
  b = jax.random.normal(keys[3], (A, rank, N))
  dout = jax.random.normal(keys[4], (B, X * Z, N))
  results = []
  for add in (_kernels, _per_block):
    out, vjp = jax.vjp(lambda y, x, a, b: add(y, x, a, b, 2.0, block_adapter), y, x, a, b)
    results.append((out, *vjp(dout)))
  for name, got, want in zip(("out", "dy", "dx", "da", "db"), *results):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=name)
  # Padding blocks get the base output and no gradient into x.
  padding = np.repeat(np.asarray(block_adapter) < 0, Z, axis=1)
  np.testing.assert_array_equal(np.asarray(results[0][0])[padding], np.asarray(y)[padding])
  np.testing.assert_array_equal(np.asarray(results[0][2])[padding], 0.0)


_ADAPTER = jnp.zeros((1, 1), jnp.int32)  # one block of 64 tokens, adapter 0


def test_tokens_that_are_not_whole_blocks_are_refused():
  x = jnp.ones((1, 100, 16))
  with pytest.raises(Exception, match="whole number of blocks"):
    jax.block_until_ready(cpu_lora.narrow(x, jnp.ones((1, 4, 16)), jnp.zeros((1, 3), jnp.int32)))


@pytest.mark.parametrize(
    "op, message",
    [
        (
            lambda: cpu_lora.narrow(jnp.ones((1, 64, 32)), jnp.ones((1, 4, 48)), _ADAPTER),
            "x's last axis is not w's K",
        ),
        (
            lambda: cpu_lora.wide(jnp.ones((1, 64, 4)), jnp.ones((1, 8, 32)), _ADAPTER),
            "h's last axis is not w's R",
        ),
        (  # y narrower than w's N: the blocks' rows would be written past its end
            lambda: cpu_lora.wide_add(
                jnp.ones((1, 64, 16)), jnp.ones((1, 64, 4)), jnp.ones((1, 4, 32)), _ADAPTER
            ),
            "base must be h's rows by w's N",
        ),
    ],
)
def test_operands_of_other_widths_are_refused_not_read_past(op, message):
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(op())


def test_widths_the_kernels_do_not_take_are_reported():
  assert cpu_lora.supports(576, 1536) and not cpu_lora.supports(576, 100)


def test_bfloat16_activations_are_saved_as_they_came_and_get_bfloat16_gradients():
  block_adapter = jnp.asarray([[0, 1, 1, -1]], jnp.int32)
  keys = jax.random.split(jax.random.key(0), 5)
  y = jax.random.normal(keys[0], (1, 4 * Z, 80))
  x = jax.random.normal(keys[1], (1, 4 * Z, 48)).astype(jnp.bfloat16)
  a, b = jax.random.normal(keys[2], (2, 48, 8)), jax.random.normal(keys[3], (2, 8, 80))
  dout = jax.random.normal(keys[4], (1, 4 * Z, 80))
  add = lambda y, x, a, b: _kernels(y, x, a, b, 2.0, block_adapter)
  out, vjp = jax.vjp(add, y, x, a, b)
  # The backward pass keeps x in bfloat16: no float32 copy of it among the residuals.
  assert not [r for r in jax.tree.leaves(vjp) if r.shape == x.shape and r.dtype == jnp.float32]
  grads = vjp(dout)
  assert out.dtype == jnp.float32 and [g.dtype for g in grads] == [y.dtype, x.dtype, a.dtype, b.dtype]
  want_out, want_vjp = jax.vjp(add, y, x.astype(jnp.float32), a, b)
  np.testing.assert_array_equal(out, want_out)  # x is exact in float32: the same products
  for name, got, want in zip(("dy", "dx", "da", "db"), grads, want_vjp(dout)):
    np.testing.assert_allclose(
        np.float32(got), want, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(want))), err_msg=name
    )
