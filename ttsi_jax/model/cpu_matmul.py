"""The frozen linear layers' float32 products on XLA:CPU: OpenBLAS's sgemm through `cpu_matmul.cc`
(built and loaded by `cpu_kernels`): 15-20% faster than XLA's dot alone on a training step's shapes,
7% inside the step (docs/measured.md). Given which rows hold tokens, it leaves out the others (padding, and
the rows of the last layer whose output nobody reads): 4-5% of a packed step's linear layers."""

import functools
import math

import jax
import jax.numpy as jnp

from ttsi_jax.model import cpu_kernels

# Fewer rows than this stay on XLA's dot, which measured as fast or faster there (decoding, short
# prefills); from 768 rows on OpenBLAS is ahead (docs/measured.md).
MIN_ROWS = 512


def supports(x_shape: tuple[int, ...]) -> bool:
  """Whether a product with x of this shape runs in the kernel (enough rows to split)."""
  return math.prod(x_shape[:-1]) >= MIN_ROWS


def _call(x, w, real, trans_w: bool):
  cpu_kernels.require()
  N = w.shape[-2] if trans_w else w.shape[-1]
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (N,), jnp.float32)
  if real is None:
    return jax.ffi.ffi_call("ttsi_matmul", out, vmap_method="expand_dims")(x, w, trans_w=trans_w)
  try:
    real = jnp.broadcast_to(real, x.shape[:-1])
  except ValueError:
    raise ValueError(f"matmul: real's rows {real.shape} do not fit x's rows {x.shape[:-1]}.") from None
  return jax.ffi.ffi_call("ttsi_matmul_real_rows", out, vmap_method="expand_dims")(
      x, w, real, trans_w=trans_w
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul(x_BTK, w, real_BT=None, transpose_w: bool = False):
  """x @ w (x @ w.T with transpose_w: a tied embedding [V, K] read where it lies) in float32, for
  one w shared by every row (vmapped over rows, w stays unbatched; a batched w is an error of the
  kernel). With `real_BT` (bool, x's rows) only the real rows are computed, the others (padding)
  come out as zeros, in the backward pass too."""
  return _call(x_BTK, w, real_BT, transpose_w)


def _matmul_fwd(x_BTK, w, real_BT, transpose_w):
  return matmul(x_BTK, w, real_BT, transpose_w), (x_BTK, w, real_BT)


def _matmul_bwd(transpose_w, residuals, dout_BTN):
  x_BTK, w, real_BT = residuals
  if real_BT is not None:  # padding rows came out as zeros: no gradient flows through them
    dout_BTN = jnp.where(jnp.broadcast_to(real_BT, x_BTK.shape[:-1])[..., None], dout_BTN, 0)
  dx = _call(dout_BTN, w, real_BT, not transpose_w)
  # A frozen weight's gradient is never used, and XLA drops it; where it is, XLA's dot computes it.
  dw_KN = jnp.einsum("...k,...n->kn", x_BTK, dout_BTN)
  dw = dw_KN.T if transpose_w else dw_KN
  return dx, dw, None


matmul.defvjp(_matmul_fwd, _matmul_bwd)
