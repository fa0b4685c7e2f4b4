import jax
import jax.numpy as jnp
import pytest

from ttsi_jax import profiling


def test_op_table_shares_out_the_wall_time_by_kind_and_op_name():
  def layers(x_LTD, w_LDD):
    def layer(x, w):
      y = jnp.tanh(x @ w)
      return y, y  # the stacked outputs: the scan's copies

    return jax.lax.scan(layer, x_LTD[0], w_LDD)[1].sum()

  # Donated arguments: every call gets its own copies.
  fn = jax.jit(jax.grad(layers, argnums=1), donate_argnums=(1,))
  x = jax.random.normal(jax.random.key(0), (4, 256, 256))
  w = jax.random.normal(jax.random.key(1), (4, 256, 256)) / 16
  table = profiling.op_table(fn, x, w, calls=3)
  assert w.is_deleted() is False
  kinds = table["kinds"]
  assert kinds[profiling.MATMUL] > 0 and kinds[profiling.OTHER] > 0
  assert sum(kinds.values()) + table["idle_s"] == pytest.approx(table["wall_s"], rel=1e-6)
  assert sum(kinds.values()) <= table["wall_s"] * 1.05  # shared out, never counted twice
  names = [name for kind, name, _ in table["ops"] if kind == profiling.MATMUL]
  assert any(name.endswith("dot_general") for name in names), names
  assert sum(s for *_, s in table["ops"]) == pytest.approx(sum(kinds.values()))


def test_classify_reads_kernels_matmuls_and_scan_copies_from_the_compiled_hlo():
  forward = (
      'metadata={op_name="jit(_step)/jvp(Transformer)/while/body/closed_call/layers/mlp/up_proj/dot_general"}'
  )
  assert profiling.classify(f"%ynn_fusion.1 = f32[8,8]{{1,0}} fusion(%a, %b), {forward}") == (
      profiling.MATMUL,
      "forward/layers/mlp/up_proj/dot_general",
  )
  kernel = (
      '%ffi_call.3 = f32[8] custom-call(%a), custom_call_target="ttsi_lora_outer", '
      'metadata={op_name="x/ffi_call"}'
  )
  assert profiling.classify(kernel) == ("ttsi_lora_outer", "x/ffi_call")
  copy = 'metadata={op_name="jit(f)/transpose(jvp(Transformer))/while/body/dynamic_update_slice"}'
  assert profiling.classify(f"%f = f32[2] fusion(%a), {copy}") == (
      profiling.SCAN_COPIES,
      "backward/dynamic_update_slice",
  )
  assert (
      profiling.classify('%add = f32[2] add(%a, %b), metadata={op_name="jit(f)/add"}')[0] == profiling.OTHER
  )
