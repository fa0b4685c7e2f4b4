"""Fused causal attention on XLA:CPU: the flash-attention kernel of `cpu_attention.cc` (64 x 64
tiles, forward and backward; built and loaded by `cpu_kernels`)."""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ttsi_jax.model import cpu_kernels

# The segment of a shared prefix: a run that opens a row, seen by every later token of the row.
# (Not `transformer.forward`'s segment 0, the slots every candidate after a cached prompt sees.)
SHARED_PREFIX = -2


def supports(head_dim: int) -> bool:
  return head_dim % 16 == 0


def _f32(*arrays):
  return tuple(x.astype(jnp.float32) for x in arrays)


def _forward_call(q, k, v, segments):
  cpu_kernels.require()
  lead, (T, N) = q.shape[:-3], q.shape[-3:-1]
  return jax.ffi.ffi_call(
      "ttsi_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(lead + (N, T), jnp.float32)),
      vmap_method="broadcast_all",
  )(*_f32(q, k, v), segments)


@jax.custom_vjp
def causal_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT):
  """Softmax attention of each token to the earlier tokens of its own segment, computed and returned
  in float32: query i sees key j when j <= i and segments[j] == segments[i] >= 0; -1 marks padding
  (its output is 0). Segments are contiguous runs, as packed rows hold them; a run of SHARED_PREFIX
  that opens a row is seen by every later token of the row (prompts that begin alike, packed).

  q, k and v may come in any float dtype: they are converted at the kernel's call, so that the
  backward pass saves them as they came (float32 copies of bfloat16 ones cost the layer scan
  whole-stack conversions)."""
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
  )(*_f32(q, k, v), segments, out, lse, dout.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_attention.defvjp(_fwd, _bwd)


def cache_attention(q_BTNH, k_cache_LBKSH, v_cache_LBKSH, layer, mask_BTS):
  """Softmax attention of the tokens q over layer `layer` of a float32 KV cache, query t seeing
  slot s where mask_BTS[b, t, s] (a token that sees none gets 0), computed in float32: decoding,
  extending a prefix and scoring candidates after it read the layer where it lies in the stacked
  cache and only the slots their row sees. Inference only (no gradient). The call has no
  partitioning rule: on a multi-device CPU mesh (tests) XLA gathers the cache for it."""
  cpu_kernels.require()
  return jax.ffi.ffi_call(
      "ttsi_cache_attention", jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32), vmap_method="broadcast_all"
  )(q_BTNH.astype(jnp.float32), k_cache_LBKSH, v_cache_LBKSH, jnp.asarray(layer, jnp.int32), mask_BTS)
