"""The LoRA branch of packed training rows on XLA:CPU: the kernels of `cpu_lora.cc` (built and
loaded by `cpu_kernels`).

Each block of Z tokens goes through its own adapter. `narrow` (x [.., T, K] against w [A, R, K],
-> [.., T, R]) and `wide` (h [.., T, R] times w [A, R, N], -> [.., T, N]) are each other's input
gradients; `outer` (the sum of h^T y over each adapter's tokens, -> [A, R, N]) is the weight
gradient of both; `wide`'s two gradients come from one kernel that reads the output gradient once.
A block whose adapter index is -1 gives zeros.

The kernels compute in float32. The ops take activations in any float dtype and convert them at
the call, so that the backward pass saves them as they came (bfloat16 stays bfloat16): a float32
copy saved in the layer scan cost bfloat16 training whole-stack conversions, about 2 s a step.
"""

import jax
import jax.numpy as jnp

from ttsi_jax.model import cpu_kernels

VECTOR = 16  # floats per AVX-512 register: `wide` and `outer` take N in whole vectors


def supports(*widths: int) -> bool:
  """Whether the kernels take activations of these widths (the layers' in and out features)."""
  return all(width % VECTOR == 0 for width in widths)


def _f32(x):
  return x.astype(jnp.float32)


def _call(target, shape, *args):
  cpu_kernels.require()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")(*args)


def _outer(h, y, block_adapter, num_adapters):
  R, N = h.shape[-1], y.shape[-1]
  return _call("ttsi_lora_outer", (num_adapters, R, N), _f32(h), _f32(y), block_adapter)


@jax.custom_vjp
def narrow(x_BTK, w_ARK, block_adapter_BX):
  """out[t, r] = x[t] . w[a, r] with a the adapter of token t's block (float32)."""
  shape = x_BTK.shape[:-1] + w_ARK.shape[1:2]
  return _call("ttsi_lora_narrow", shape, _f32(x_BTK), _f32(w_ARK), block_adapter_BX)


@jax.custom_vjp
def wide(h_BTR, w_ARN, block_adapter_BX):
  """out[t] = h[t] @ w[a] with a the adapter of token t's block (float32)."""
  shape = h_BTR.shape[:-1] + w_ARN.shape[2:]
  return _call("ttsi_lora_wide", shape, _f32(h_BTR), _f32(w_ARN), block_adapter_BX)


def _narrow_bwd(residuals, dout_BTR):
  x_BTK, w_ARK, block_adapter_BX = residuals
  dx = wide(dout_BTR, w_ARK, block_adapter_BX).astype(x_BTK.dtype)
  dw = _outer(dout_BTR, x_BTK, block_adapter_BX, w_ARK.shape[0]).astype(w_ARK.dtype)
  return dx, dw, None


def _wide_bwd(residuals, dout_BTN):
  """narrow(dout, w) and outer(h, dout) in one kernel that reads dout once."""
  h_BTR, w_ARN, block_adapter_BX = residuals
  cpu_kernels.require()
  dh, dw = jax.ffi.ffi_call(
      "ttsi_lora_wide_grads",
      (jax.ShapeDtypeStruct(h_BTR.shape, jnp.float32), jax.ShapeDtypeStruct(w_ARN.shape, jnp.float32)),
      vmap_method="sequential",
  )(_f32(h_BTR), _f32(w_ARN), _f32(dout_BTN), block_adapter_BX)
  return dh.astype(h_BTR.dtype), dw.astype(w_ARN.dtype), None


@jax.custom_vjp
def wide_add(y_BTN, h_BTR, w_ARN, block_adapter_BX):
  """y + wide(h, w) for a float32 y, added in y's buffer (no [T, N] delta written and read again)."""
  cpu_kernels.require()
  return jax.ffi.ffi_call(
      "ttsi_lora_wide_add",
      jax.ShapeDtypeStruct(y_BTN.shape, jnp.float32),
      vmap_method="sequential",
      input_output_aliases={0: 0},
  )(y_BTN, _f32(h_BTR), _f32(w_ARN), block_adapter_BX)


def _wide_add_bwd(residuals, dout_BTN):
  return (dout_BTN,) + _wide_bwd(residuals, dout_BTN)


narrow.defvjp(lambda *args: (narrow(*args), args), _narrow_bwd)
wide.defvjp(lambda *args: (wide(*args), args), _wide_bwd)
wide_add.defvjp(lambda y, *args: (wide_add(y, *args), args), _wide_add_bwd)
