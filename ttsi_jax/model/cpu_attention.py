"""Fused causal attention on XLA:CPU: the C++ kernel in `cpu_attention.cc`, through `jax.ffi`.

XLA:CPU has no fused attention: its softmax runs on one core and its batched score dots far below
matmul speed, so attention cost a CPU training step more than all its linear layers. The kernel
(flash attention in 64 x 64 tiles, forward and backward, on XLA's intra-op threads) is compiled
once per machine with the system's C++ compiler into a cache folder and loaded from there.
Where no compiler works, `available()` says why and the model keeps its XLA attention.

`TTSI_JAX_CPU_ATTENTION=xla` turns the kernel off; `xla_attention()` does so for a block (the
bench times both in one run).
"""

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from jax.ad_checkpoint import checkpoint_name

_SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-w")
_TARGETS = {
    "ttsi_attention_forward": "TtsiAttentionForward",
    "ttsi_attention_backward": "TtsiAttentionBackward",
}


def cache_dir() -> pathlib.Path:
  """Where the compiled kernel lives: `$TTSI_JAX_KERNEL_DIR`, else ~/.cache/ttsi_jax/kernels."""
  return pathlib.Path(
      os.environ.get("TTSI_JAX_KERNEL_DIR") or pathlib.Path.home() / ".cache/ttsi_jax/kernels"
  )


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> pathlib.Path:
  """The kernel's shared library, compiled unless the cache holds one for this source, compiler,
  jaxlib and machine (`-march=native`: a library is only valid on the CPU that built it)."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(
      "\n".join(
          [
              _SOURCE.read_text(),
              version,
              " ".join(_FLAGS),
              jaxlib.__version__,
              platform.machine(),
              platform.node(),
          ]
      ).encode()
  ).hexdigest()[:16]
  path = cache_dir() / f"cpu_attention-{key}.so"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # atomic: concurrent processes
      out = pathlib.Path(tmp) / path.name
      cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(out)]
      result = subprocess.run(cmd, capture_output=True, text=True)
      if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
      os.replace(out, path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernel; returns None, or why it is not available."""
  if os.environ.get("TTSI_JAX_CPU_ATTENTION", "fused") == "xla":
    return "TTSI_JAX_CPU_ATTENTION=xla"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found (install g++ or set CXX)"
  try:
    library = ctypes.CDLL(str(_build(compiler)))
  except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
    return f"the kernel did not build: {e}"
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return None


_disabled = False


@contextlib.contextmanager
def xla_attention():
  """CPU attention on XLA ops inside this block. Clears JAX's caches on entry and exit: the choice
  is made when a function is traced."""
  global _disabled
  jax.clear_caches()
  _disabled = True
  try:
    yield
  finally:
    _disabled = False
    jax.clear_caches()


def available() -> bool:
  """Whether the fused kernel serves CPU attention (builds it on first call; logs why not once)."""
  if _disabled:
    return False
  reason = _load()
  if reason is not None:
    _warn_once(reason)
  return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("CPU attention runs on XLA ops, not the fused kernel: %s", reason)


def supports(head_dim: int) -> bool:
  return head_dim % 16 == 0


def _require() -> None:
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"The fused CPU attention kernel is not available: {reason}.")


def _forward_call(q, k, v, segments):
  _require()
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
