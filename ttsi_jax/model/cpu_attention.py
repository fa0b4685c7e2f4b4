"""Fused causal attention on XLA:CPU: the flash-attention kernel of `cpu_attention.cc` (64 x 64
tiles, forward and backward; built and loaded by `cpu_kernels`)."""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ttsi_jax.model import cpu_kernels


def supports(head_dim: int) -> bool:
  return head_dim % 16 == 0


def _forward_call(q, k, v, segments):
  cpu_kernels.require()
  lead, (T, N) = q.shape[:-3], q.shape[-3:-1]
  return jax.ffi.ffi_call(
      "ttsi_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(lead + (N, T), jnp.float32)),
      vmap_method="broadcast_all",
  )(q, k, v, segments)


@jax.custom_vjp
def causal_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT):
  """Softmax attention of each token to the earlier tokens of its own segment (float32):
  query i sees key j when j <= i and segments[j] == segments[i] >= 0; -1 marks padding (its
  output is 0). Segments are contiguous runs, as packed training rows hold them."""
  return _forward_call(q_BTNH, k_BTKH, v_BTKH, segments_BT)[0]


def _fwd(q, k, v, segments):
  out, lse = _forward_call(q, k, v, segments)
  # The backward pass needs the output and softmax statistics: a remat policy that saves this name (the
  # model's does) keeps them instead of running the forward kernel again.
  out, lse = checkpoint_name(out, "saved"), checkpoint_name(lse, "saved")
  return out, (q, k, v, segments, out, lse)


def _bwd(residuals, dout):
  q, k, v, segments, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      "ttsi_attention_backward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),) + (jax.ShapeDtypeStruct(k.shape, jnp.float32),) * 2,
      vmap_method="broadcast_all",
  )(q, k, v, segments, out, lse, dout.astype(jnp.float32))
  return dq, dk, dv, None


causal_attention.defvjp(_fwd, _bwd)
