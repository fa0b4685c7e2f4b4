"""The frozen linear layers' float32 products on XLA:CPU: OpenBLAS's sgemm through `cpu_matmul.cc`
(built and loaded by `cpu_kernels`): 15-20% faster than XLA's dot alone on a training step's shapes,
7% inside the step (README)."""

import functools
import math

import jax
import jax.numpy as jnp

from ttsi_jax.model import cpu_kernels

# Fewer rows than this stay on XLA's dot, which measured as fast or faster there (decoding, short
# prefills); from 768 rows on OpenBLAS is ahead (README).
MIN_ROWS = 512


def supports(x_shape: tuple[int, ...]) -> bool:
  """Whether a product with x of this shape runs in the kernel (enough rows to split)."""
  return math.prod(x_shape[:-1]) >= MIN_ROWS


def _call(x, w, trans_w: bool):
  cpu_kernels.require()
  N = w.shape[-2] if trans_w else w.shape[-1]
  return jax.ffi.ffi_call(
      "ttsi_matmul", jax.ShapeDtypeStruct(x.shape[:-1] + (N,), jnp.float32), vmap_method="expand_dims"
  )(x, w, trans_w=trans_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_BTK, w, transpose_w: bool = False):
  """x @ w (x @ w.T with transpose_w: a tied embedding [V, K] read where it lies) in float32, for
  one w shared by every row (vmapped over rows, w stays unbatched; a batched w is an error of the
  kernel)."""
  return _call(x_BTK, w, transpose_w)


def _matmul_bwd(transpose_w, residuals, dout_BTN):
  x_BTK, w = residuals
  dx = _call(dout_BTN, w, not transpose_w)
  # A frozen weight's gradient is never used, and XLA drops it; where it is, XLA's dot computes it.
  dw_KN = jnp.einsum("...k,...n->kn", x_BTK, dout_BTN)
  dw = dw_KN.T if transpose_w else dw_KN
  return dx, dw


matmul.defvjp(lambda x, w, transpose_w: (matmul(x, w, transpose_w), (x, w)), _matmul_bwd)
