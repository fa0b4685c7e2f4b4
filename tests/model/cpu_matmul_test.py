"""The OpenBLAS product of float32 linear layers equals XLA's dot, values and gradients, and the
model routes its float32 linear layers there only where it applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import random_tokens
from ttsi_jax.checkpoints import hf
from ttsi_jax.model import cpu_kernels, cpu_matmul, transformer
from ttsi_jax.model import lora as lora_lib


@pytest.mark.parametrize(
    "x_shape, w_shape",
    [
        ((3, 301, 96), (96, 160)),  # rows that split unevenly over the threads, leading axes
        ((129, 7), (7, 5)),  # widths off every vector and block size
        ((40, 64), (64, 48)),  # fewer rows than a chunk: one call on one thread
    ],
)
def test_matmul_and_its_gradients_equal_xlas_dot(x_shape, w_shape):
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  cotangent = jax.random.normal(kd, x_shape[:-1] + w_shape[-1:])
  got, got_vjp = jax.vjp(cpu_matmul.matmul, x, w)
  want, want_vjp = jax.vjp(lambda x, w: jnp.matmul(x, w, precision="highest"), x, w)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got_grad, want_grad, atol=2e-4, rtol=1e-5)


def test_vmapped_over_rows_with_one_weight_equals_the_dot():
  x = jax.random.normal(jax.random.key(1), (4, 150, 32))
  w = jax.random.normal(jax.random.key(2), (32, 16))
  got = jax.jit(jax.vmap(cpu_matmul.matmul, in_axes=(0, None)))(x, w)
  np.testing.assert_allclose(got, jnp.matmul(x, w, precision="highest"), atol=2e-5, rtol=1e-5)


def test_a_weight_per_row_is_refused_by_name():
  x = jax.random.normal(jax.random.key(1), (2, 150, 32))
  w = jax.random.normal(jax.random.key(2), (2, 32, 16))
  with pytest.raises(Exception, match="leading dimensions must all be 1"):
    jax.block_until_ready(jax.vmap(cpu_matmul.matmul)(x, w))


def test_a_weight_of_another_width_is_refused_by_name():
  with pytest.raises(Exception, match="x's and w's K differ"):
    jax.block_until_ready(cpu_matmul._call(jnp.ones((200, 32)), jnp.ones((16, 8)), None, False))


def test_an_empty_inner_axis_gives_zeros():
  got = cpu_matmul._call(jnp.ones((512, 0)), jnp.ones((0, 8)), None, False)
  np.testing.assert_array_equal(got, np.zeros((512, 8), np.float32))


def _targets(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


def test_float32_layers_with_enough_rows_use_blas_and_others_xla():
  w = jnp.ones((64, 32))
  many, few = jnp.ones((cpu_matmul.MIN_ROWS, 64)), jnp.ones((cpu_matmul.MIN_ROWS - 1, 64))
  assert "ttsi_matmul" in _targets(transformer.linear_product, many, w)
  assert "ttsi_matmul" not in _targets(transformer.linear_product, few, w)
  as_bf16 = lambda x, w: transformer.linear_product(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert "ttsi_matmul" not in _targets(as_bf16, many, w)
  with cpu_kernels.xla_ops():
    assert "ttsi_matmul" not in _targets(transformer.linear_product, many, w)


def test_without_openblas_the_kernels_stay_off_and_say_what_to_install(monkeypatch, tmp_path, caplog):
  def missing():
    raise ImportError("No module named 'scipy_openblas32'")

  monkeypatch.setattr(cpu_kernels, "_blas_flags", missing)
  monkeypatch.setenv("TTSI_JAX_KERNEL_DIR", str(tmp_path))  # nothing built here yet
  cpu_kernels._load.cache_clear()
  cpu_kernels._warn_once.cache_clear()
  try:
    with caplog.at_level("WARNING"):
      assert not cpu_kernels.available()
    assert "run on XLA ops, not the C++ kernels" in caplog.text
    assert "pip install scipy-openblas32" in caplog.text
  finally:
    cpu_kernels._load.cache_clear()
    cpu_kernels._warn_once.cache_clear()


def test_a_transposed_weight_is_read_where_it_lies_with_gradients():
  """The tied embedding's head: x @ w.T for w [V, K], without a transposed copy of w."""
  kx, kw, kd = jax.random.split(jax.random.key(3), 3)
  x, w_VK = jax.random.normal(kx, (2, 70, 48)), jax.random.normal(kw, (200, 48))
  cotangent = jax.random.normal(kd, (2, 70, 200))
  got, got_vjp = jax.vjp(lambda x, w: cpu_matmul.matmul(x, w, None, True), x, w_VK)
  want, want_vjp = jax.vjp(lambda x, w: jnp.matmul(x, w.T, precision="highest"), x, w_VK)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got_grad, want_grad, atol=2e-4, rtol=1e-5)
  assert "transpose" not in _targets(lambda x, w: cpu_matmul.matmul(x, w, None, True), x, w_VK)


def test_only_real_rows_are_computed_and_padding_rows_come_out_zero():
  """Runs of real rows (gaps of padding shorter and longer than the kernel merges), in the forward
  and backward pass, vmapped with the mask unbatched as well."""
  real_BT = np.zeros((2, 700), bool)
  real_BT[0, 3:300] = real_BT[0, 305:640] = True  # a short gap (computed, then zeroed) and a tail
  real_BT[1, 100:101] = real_BT[1, 400:700] = True  # one lone row, a long gap
  kx, kw, kd = jax.random.split(jax.random.key(4), 3)
  x, w = jax.random.normal(kx, (2, 700, 48)), jax.random.normal(kw, (48, 32))
  cotangent = jax.random.normal(kd, (2, 700, 32))
  got, got_vjp = jax.vjp(lambda x, w: cpu_matmul.matmul(x, w, jnp.asarray(real_BT)), x, w)
  keep = real_BT[..., None]
  want = np.where(keep, jnp.matmul(x, w, precision="highest"), 0.0)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  got_dx, got_dw = got_vjp(cotangent)
  want_dx = np.where(keep, jnp.matmul(cotangent, w.T, precision="highest"), 0.0)
  np.testing.assert_allclose(got_dx, want_dx, atol=2e-4, rtol=1e-5)
  # The weight's gradient too has nothing from the padding rows (only real rows reach the output).
  want_dw = jnp.einsum("btk,btn->kn", x, np.where(keep, cotangent, 0.0), precision="highest")
  np.testing.assert_allclose(got_dw, want_dw, atol=2e-3, rtol=1e-5)
  stacked = jnp.stack([x, 2 * x])
  vmapped = jax.vmap(lambda x: cpu_matmul.matmul(x, w, jnp.asarray(real_BT)))(stacked)
  np.testing.assert_allclose(vmapped, np.stack([want, 2 * want]), atol=5e-5, rtol=1e-5)


def test_real_rows_that_do_not_fit_x_are_refused_by_name():
  with pytest.raises(ValueError, match="real's rows"):
    cpu_matmul.matmul(jnp.ones((600, 8)), jnp.ones((8, 8)), jnp.ones((7,), bool))


def test_the_model_skips_padding_and_the_last_layers_unread_rows_with_the_same_logits_and_gradients(
    hf_checkpoints, monkeypatch
):
  """Padding rows (right and left) and, in the last layer, the rows whose logits are not selected
  leave the kernel's products out: the selected logits and the LoRA gradients equal XLA's dot,
  which computes every row."""
  monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 1)
  config, params = hf.load(hf_checkpoints["llama"][0])
  tokens = random_tokens(2, 24, seed=5)
  positions = np.tile(np.arange(24, dtype=np.int32), (2, 1))
  positions[0, 18:] = -1
  positions[1] = np.concatenate([[-1] * 3, np.arange(21)])
  select = np.array([[5, 17], [10, 23]], np.int32)
  adapter = lora_lib.init(config, jax.random.key(0), rank=4)
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  weights = jax.random.normal(jax.random.key(2), (2, 2, config.vocab_size))

  def loss(adapter):
    logits, _ = transformer.forward(config, params, tokens, positions, lora=adapter, select_BI=select)
    return jnp.sum(logits * weights), logits

  got_grads, got_logits = jax.grad(loss, has_aux=True)(adapter)
  assert "ttsi_matmul_real_rows" in jax.jit(loss).lower(adapter).as_text()
  with cpu_kernels.xla_ops():
    want_grads, want_logits = jax.jit(jax.grad(loss, has_aux=True))(adapter)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
